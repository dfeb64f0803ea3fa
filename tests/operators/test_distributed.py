"""Data-parallel operators on torch.distributed (gloo, CPU processes) against the single-process result.

Tolerance 1e-10 relative in float64: the ranks' partial sums are added in another order than one process
adds its batches, which costs ~1e-15.
"""

from __future__ import annotations

import time

import distributed_workers as workers
import pytest
import torch
import torch.multiprocessing as mp
from reference import relative_error

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


# Tests bound work, not time: a guard against a hang only, far beyond any run on a loaded machine (the
# workers' process group waits $HESSOPS_DIST_TIMEOUT, else 30 minutes, for a rank that stalls).
HANG_GUARD_S = 3600


def spawn(fn, world: int, tmp_path) -> None:
    """Run ``fn(rank, world, store, out_dir)`` in ``world`` processes; raises if a rank failed (SIGABRT
    included), fails the test if they still run after ``HANG_GUARD_S``."""
    context = mp.spawn(fn, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + HANG_GUARD_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__}: the ranks still ran after {HANG_GUARD_S} s (a hang)")


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_products_and_eigenvalues_match_one_process(world, tmp_path):
    spawn(workers.products, world, tmp_path)
    expected = workers.single_process_results()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for result in results:
        assert relative_error(result["HV"], expected["HV"]) < 1e-10
        assert relative_error(result["GV"], expected["GV"]) < 1e-10
        torch.testing.assert_close(result["top5"], expected["top5"], rtol=1e-10, atol=1e-12)
    for result in results[1:]:  # lock-step: every rank holds the same numbers
        assert torch.equal(result["HV"], results[0]["HV"]) and torch.equal(result["top5"], results[0]["top5"])


def test_finite_difference_ranks_agree_on_their_error_and_stay_in_lock_step(tmp_path):
    """Each rank measures the finite differences' error on its own first batch, and rank 2 has no data at all:
    after the first product every rank carries the largest, so their bounds and eigs' steps agree; the products are
    within that error of one process's exact ones."""
    spawn(workers.finite_differences, 3, tmp_path)
    expected = workers.single_process_results()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    errors = {result["error"] for result in results}
    assert len(errors) == 1 and 0 < errors.pop() < 1e-6
    for result in results:
        assert relative_error(result["HV"], expected["HV"]) <= result["error"]
        assert torch.equal(result["top3"], results[0]["top3"])
    torch.testing.assert_close(results[0]["top3"], expected["top5"][:3], rtol=1e-6, atol=0)


def test_a_failing_rank_stops_every_rank_with_its_name(tmp_path):
    """No rank waits for the timeout: each ends after the product's one status exchange (no sum follows),
    rank 0 with rank 1's error, which only that exchange carries (a timeout says "a collective failed")."""
    import json

    spawn(workers.failing, 2, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    messages = [result["message"] for result in results]
    assert messages[0].startswith("DistributedError: rank 1 failed: RuntimeError"), messages[0]
    assert "RuntimeError" in messages[1] and "mat1 and mat2 shapes cannot be multiplied" in messages[1]
    assert [result["collectives"] for result in results] == [1, 1]


def test_all_reduce_returns_only_once_gloo_lets_go_of_the_tensor(tmp_path):
    """A gloo worker thread that drops its reference while the process exits aborts it ("terminate called
    without an active exception", pytorch/pytorch#190489). Measured on torch 2.15: dist.all_reduce returns with
    the tensor still held in ~25% of calls; hessops.operators.distributed.all_reduce waits until it is let go."""
    spawn(workers.releasing, 2, tmp_path)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == {"held": 0, "wrong": 0}


def test_a_long_error_message_is_cut_to_fit_the_status_table():
    import pickle

    from hessops.operators.distributed import STATUS_BYTES, _pickled

    message = "RuntimeError: " + "é shape mismatch " * 1000  # multi-byte characters: the cut is by bytes
    payload = _pickled({"count": 3, "error": message, "nonfinite": (2, float("nan"))})
    assert len(payload) <= STATUS_BYTES - 8
    status = pickle.loads(payload)
    assert status["count"] == 3 and status["nonfinite"][0] == 2
    assert message.startswith(status["error"].removesuffix(" [...]")) and status["error"].endswith(" [...]")
    assert pickle.loads(_pickled({"count": 1, "error": None})) == {"count": 1, "error": None}


def test_a_dead_rank_ends_the_others_with_an_error(tmp_path):
    """Rank 1 exits abruptly; rank 0 must end with a DistributedError at its first collective (the product's
    status exchange), not wait forever."""
    import json

    context = mp.get_context("spawn")
    processes = [
        context.Process(target=workers.dying, args=(r, 2, str(tmp_path / "store"), str(tmp_path))) for r in range(2)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + HANG_GUARD_S  # a guard against a hang only
    try:
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            process.kill()
    assert processes[1].exitcode == 3 and processes[0].exitcode == 0, [p.exitcode for p in processes]
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["message"].startswith("DistributedError: rank 0: a collective failed"), result["message"]
    assert result["collectives"] == 1


def test_the_default_timeout_is_generous_and_set_by_the_environment(monkeypatch):
    from hessops.operators.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, default_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert default_timeout() == DEFAULT_TIMEOUT_S == 1800.0  # torch's own gloo default: room for a loaded machine
    monkeypatch.setenv(TIMEOUT_ENV, " 7200 ")
    assert default_timeout() == 7200.0
    for wrong in ("0", "-5", "nan", "inf", "ten minutes"):
        monkeypatch.setenv(TIMEOUT_ENV, wrong)
        with pytest.raises(ValueError, match=f"{TIMEOUT_ENV}="):
            default_timeout()


def test_shard_covers_every_example_once():
    from hessops.operators.distributed import shard

    dataset = list(range(10))
    assert list(shard(dataset)) == dataset  # outside torch.distributed: everything


def test_torchrun_cli_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m hessops eigs` shards the data, agrees with one process, and only rank 0
    writes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    args = [
        "-m",
        "hessops",
        "eigs",
        "--num-examples",
        "200",
        "--k",
        "3",
        "--dtype",
        "float64",
        "--tol",
        "1e-10",
        "--no-progress",
    ]
    # both at once, one thread per process (the two runs are independent: one torch import's wait, not two)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.Popen(
        [sys.executable, *args, "--out", str(tmp_path / "one.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    two = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--master_port=29547", *args, "--out", str(tmp_path / "two.json")],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,  # a guard against a hang only
        env=env,
        cwd=tmp_path,
    )
    _, one_stderr = one.communicate(timeout=HANG_GUARD_S)
    assert one.returncode == 0, one_stderr
    assert two.returncode == 0, two.stderr
    single, parallel = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert parallel["settings"]["world_size"] == 2 and parallel["settings"]["num_examples"] == 200
    torch.testing.assert_close(
        torch.tensor(parallel["eigenvalues"]), torch.tensor(single["eigenvalues"]), rtol=1e-10, atol=0
    )
    assert two.stdout.count("wrote") == 1  # rank 0 alone prints and writes


def test_disagreeing_ranks_end_every_rank_with_the_cause(tmp_path):
    """Different weights, a different eigs seed, different operator sizes: each ends every rank with a
    DistributedError naming the ranks and the fix (the sizes before any collective of the product, so gloo
    cannot abort), and the process group stays usable."""
    import json

    spawn(workers.disagreeing, 2, tmp_path)  # mp.spawn raises if a rank died (SIGABRT included)
    for rank in range(2):
        messages = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert messages["params"].startswith("DistributedError: the ranks disagree (ranks 0: "), messages
        assert "ranks 1: " in messages["params"] and "load the same checkpoint" in messages["params"]
        assert messages["seed"].startswith("DistributedError: the ranks disagree") and "same seed" in messages["seed"]
        assert messages["size"].startswith("DistributedError: the ranks disagree (ranks 0: 67; ranks 1: 27)"), messages
        assert messages["agreeing"] == "no error"
