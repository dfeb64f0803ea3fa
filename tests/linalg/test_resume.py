"""Resumable runs (hessops.linalg.checkpoint): interrupted and resumed runs give the bit-identical result of an
uninterrupted one, a checkpoint of another run is refused, Ctrl-C says how to resume, and the command line resumes
after a real SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import cola
import pytest
import torch
from torch import nn
from toy_networks import bn_mlp, interrupted_at, mlp

import hessops
from hessops.errors import CheckpointMismatchError

# One thread per child: the test below runs three command-line processes at once, and three processes of torch's
# default two threads each on a 2-core machine spent 50-75 s on 600 products that take 3 s alone (oversubscribed
# threads spin-waiting on each other). Each run's result is bit-identical from one run to the next either way.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def mlp_hessian(seed: int) -> hessops.Hessian:
    torch.manual_seed(seed)
    model = mlp(4, 16, 3).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    return hessops.Hessian(model, nn.MSELoss(), [(x[:25], y[:25]), (x[25:], y[25:])])


@pytest.fixture(scope="module")
def hessian():
    """An MLP Hessian (n = 131) as a dense CoLA operator: cheap products (the command-line test below resumes
    a real hessops operator); a dense operator's fingerprint hashes its entries."""
    dense = mlp_hessian(0).to_dense()
    return cola.SelfAdjoint(cola.ops.Dense((dense + dense.T) / 2))


@pytest.mark.parametrize("mode", ["device", "disk", "none"])
def test_eigs_resumes_bit_identically(tmp_path, hessian, mode):
    path = tmp_path / "run.ckpt"
    reference = hessops.eigs(hessian, 3, tol=1e-9, basis=mode)
    with (
        interrupted_at(hessian, 12) as interrupting,
        pytest.raises(KeyboardInterrupt, match=f"checkpoint='{path}'.*--resume {path}"),
    ):
        hessops.eigs(interrupting, 3, tol=1e-9, basis=mode, checkpoint=path, checkpoint_every=0)
    assert torch.load(path, weights_only=True)["state"]["steps"] == 11  # the steps before the interrupted one
    resumed = hessops.eigs(hessian, 3, tol=1e-9, basis=mode, checkpoint=path)
    assert torch.equal(resumed.values, reference.values) and torch.equal(resumed.vectors, reference.vectors)
    assert resumed.steps == reference.steps and resumed.n_matvecs == reference.n_matvecs
    again = hessops.eigs(hessian, 3, tol=1e-9, basis=mode, checkpoint=path)  # a finished checkpoint: no products
    assert torch.equal(again.values, reference.values)


@pytest.mark.parametrize("where", ["drawing the progress bar", "the first product"])
def test_an_interrupt_before_the_first_step_saves_and_resumes(tmp_path, hessian, monkeypatch, where):
    """A SIGTERM read as the progress bar appears (the CLI test's `kill` on seeing "SLQ") arrives before the
    first step: it saves a checkpoint of step 0 and says so, as an interrupt later does (it was a bare
    "terminated", one run in four), and the resumed run is the uninterrupted one."""
    import hessops.linalg.lanczos as lanczos_module

    path = tmp_path / "run.ckpt"
    reference = hessops.eigs(hessian, 3, tol=1e-9)
    if where == "drawing the progress bar":

        def bar(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(lanczos_module, "tqdm", bar)
        context = contextlib.nullcontext(hessian)
    else:
        context = interrupted_at(hessian, 1)
    with context as op, pytest.raises(KeyboardInterrupt, match=f"progress saved in {path}"):
        hessops.eigs(op, 3, tol=1e-9, checkpoint=path)
    assert torch.load(path, weights_only=True)["state"]["steps"] == 0
    monkeypatch.undo()
    resumed = hessops.eigs(hessian, 3, tol=1e-9, checkpoint=path)
    assert torch.equal(resumed.values, reference.values) and resumed.n_matvecs == reference.n_matvecs


def test_slq_functions_resume_bit_identically(tmp_path, hessian):
    A = hessops.Regularized(hessian, 5.0)
    settings = dict(method="slq", probes=4, lanczos_steps=20)
    reference = hessops.logdet(A, **settings)
    path = tmp_path / "logdet.ckpt"
    with interrupted_at(A, 9), pytest.raises(KeyboardInterrupt):
        hessops.logdet(A, **settings, checkpoint=path, checkpoint_every=0)
    resumed = hessops.logdet(A, **settings, checkpoint=path)
    assert resumed.estimate == reference.estimate and resumed.std_error == reference.std_error
    volume = hessops.basin_volume(hessian, threshold=1.0, c=5.0, **settings)
    with interrupted_at(hessian, 7), pytest.raises(KeyboardInterrupt):
        hessops.basin_volume(hessian, threshold=1.0, c=5.0, **settings, checkpoint=tmp_path / "basin.ckpt")
    resumed_volume = hessops.basin_volume(hessian, threshold=1.0, c=5.0, **settings, checkpoint=tmp_path / "basin.ckpt")
    assert resumed_volume.log_volume == volume.log_volume
    assert torch.equal(resumed.quadrature.nodes, reference.quadrature.nodes)


def test_deflated_basin_volume_resumes_each_of_its_runs_bit_identically(tmp_path, hessian):
    """The deflated basin volume runs three Lanczos runs (the check's smallest eigenvalue, the top ones, the
    complement's SLQ; 50 products here), each checkpointed to a file of its own: interrupted at every 8th product
    of each call and resumed until it finishes, it gives the uninterrupted result bit for bit."""
    settings = dict(threshold=1.0, c=5.0, method="deflated", deflate=3, probes=4, lanczos_steps=15)
    reference = hessops.basin_volume(hessian, **settings)
    path = tmp_path / "basin.ckpt"
    interruptions = 0
    while True:
        try:
            with interrupted_at(hessian, 8):
                resumed = hessops.basin_volume(hessian, **settings, checkpoint=path, checkpoint_every=0)
            break
        except KeyboardInterrupt:
            interruptions += 1
            assert interruptions < 20, "no progress from one resume to the next"
    assert interruptions >= 5  # 50 products, 7 of them kept from each interrupted call
    assert {f.name for f in tmp_path.iterdir()} >= {"basin.ckpt.smallest", "basin.ckpt.top", "basin.ckpt.slq"}
    assert resumed.log_volume == reference.log_volume
    assert resumed.confidence_interval == reference.confidence_interval
    assert torch.equal(resumed.logdet.deflated_eigenvalues, reference.logdet.deflated_eigenvalues)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_resumes_bit_identically(tmp_path, hessian, method):
    """With a checkpoint the products run in chunks of columns; an uninterrupted checkpointed run and an
    interrupted, resumed one compute the same chunks, so agree bit for bit (and with the one-block run to
    rounding, 1e-12 relative: only the grouping of columns into products differs)."""
    plain = hessops.trace(hessian, probes=40, method=method)
    whole = hessops.trace(hessian, probes=40, method=method, checkpoint=tmp_path / "whole.ckpt")
    path = tmp_path / "trace.ckpt"
    with interrupted_at(hessian, 5), pytest.raises(KeyboardInterrupt):
        hessops.trace(hessian, probes=40, method=method, checkpoint=path, checkpoint_every=0)
    resumed = hessops.trace(hessian, probes=40, method=method, checkpoint=path)
    assert resumed.estimate == whole.estimate and resumed.history == whole.history
    assert resumed.estimate == pytest.approx(plain.estimate, rel=1e-12)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    H = mlp_hessian(0)
    hessops.eigs(H, 2, checkpoint=path, max_iters=20, verify=False)
    with pytest.raises(CheckpointMismatchError, match="arguments"):
        hessops.eigs(H, 3, checkpoint=path, max_iters=20, verify=False)
    with pytest.raises(CheckpointMismatchError, match="function"):
        hessops.spectral_density(H, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="operator"):
        hessops.eigs(hessops.Regularized(H, 1.0), 2, checkpoint=path, max_iters=20, verify=False)
    with pytest.raises(CheckpointMismatchError, match="parameters"):  # the same network, other weights
        hessops.eigs(mlp_hessian(1), 2, checkpoint=path, max_iters=20, verify=False)
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="cannot be read"):
        hessops.eigs(H, 2, checkpoint=tmp_path / "junk")


def run_on(x, y, model=None, loss_fn=None, operator=hessops.Hessian, **options):
    """An operator over ``x, y`` in batches of 10 (an MLP at a fixed point by default)."""
    if model is None:
        torch.manual_seed(0)
        model = mlp(4, 8, 3).double()
    batches = list(zip(x.split(10), y.split(10)))
    return operator(model, loss_fn or nn.CrossEntropyLoss(), batches, **options)


def examples(n: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=torch.float64, generator=generator), torch.randint(0, 3, (n,), generator=generator)


DENSITY = dict(num_probes=2, lanczos_steps=12, grid=50)


def test_a_resume_on_other_data_is_refused_before_anything_is_computed_from_it(tmp_path):
    """Finding (a): interrupted on 60 examples, resumed on their first 30 (or 60 others): the resumed run's first
    product compares its data with the saved fingerprint and raises before it returns. The same examples in
    another order and batching resume; the same data resume bit for bit; a finished checkpoint is compared at
    once, by a pass over the data without a product."""
    x, y = examples(60)
    path = tmp_path / "density.ckpt"
    reference = hessops.spectral_density(run_on(x, y), **DENSITY)
    with interrupted_at(run_on(x, y), 5) as H, pytest.raises(KeyboardInterrupt):
        hessops.spectral_density(H, **DENSITY, checkpoint=path, checkpoint_every=0)
    saved = torch.load(path, weights_only=True)
    assert saved["version"] == 2 and saved["data"][0][0] == 60  # the first product's fingerprint: 60 examples
    fewer = run_on(x[:30], y[:30])
    with pytest.raises(CheckpointMismatchError, match="its data differ.*number of examples went from 60 to 30"):
        hessops.spectral_density(fewer, **DENSITY, checkpoint=path)
    other = run_on(*examples(60, seed=2))
    with pytest.raises(CheckpointMismatchError, match="its data differ.*hold other values"):
        hessops.spectral_density(other, **DENSITY, checkpoint=path)
    assert torch.equal(torch.load(path, weights_only=True)["state"]["alphas"], saved["state"]["alphas"])  # kept
    shuffled = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    reordered = hessops.spectral_density(run_on(x[shuffled], y[shuffled]), **DENSITY, checkpoint=tmp_path / "copy")
    assert torch.allclose(reordered.density, reference.density, rtol=1e-9, atol=1e-12)
    resumed = hessops.spectral_density(run_on(x, y), **DENSITY, checkpoint=path)
    assert torch.equal(resumed.density, reference.density) and resumed.n_matvecs == reference.n_matvecs
    products = run_on(x[:30], y[:30])
    with interrupted_at(products, 10**9), pytest.raises(CheckpointMismatchError, match="from 60 to 30"):
        hessops.spectral_density(products, **DENSITY, checkpoint=path)  # finished: no product follows
    assert products.problem.memo["data_fingerprint"][0] == 30  # taken by a pass of its own


def test_trace_products_saved_from_other_data_are_refused_at_once(tmp_path):
    """trace takes its saved products back without a product of its own, so the data are compared when the file is
    opened, by a pass over the data that runs no model."""
    x, y = examples(60)
    path = tmp_path / "trace.ckpt"
    with interrupted_at(run_on(x, y), 3) as H, pytest.raises(KeyboardInterrupt):
        hessops.trace(H, probes=12, checkpoint=path, checkpoint_every=0)
    fewer = run_on(x[:30], y[:30])
    with interrupted_at(fewer, 1), pytest.raises(CheckpointMismatchError, match="from 60 to 30"):
        hessops.trace(fewer, probes=12, checkpoint=path)  # a product would raise KeyboardInterrupt instead
    assert hessops.trace(run_on(x, y), probes=12, checkpoint=path).estimate == pytest.approx(
        hessops.trace(run_on(x, y), probes=12, checkpoint=tmp_path / "whole.ckpt").estimate, rel=1e-12
    )


def recalibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm's running statistics recomputed over ``x`` with the same weights, as SWA's ``update_bn`` does."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_other_buffers_another_loss_or_other_samples_are_refused(tmp_path):
    """Findings (b) and (c): the same weights with recalibrated BatchNorm statistics, another label smoothing, and
    MCFisher's other samples or seed are other matrices: a resumed SLQ log-determinant names what differs."""
    x, y = examples(60)
    settings = dict(method="slq", probes=2, lanczos_steps=40)

    def interrupted(op, path):
        with interrupted_at(op, 4), pytest.raises(KeyboardInterrupt):
            hessops.logdet(hessops.Regularized(op, 5.0), **settings, checkpoint=path, checkpoint_every=0)

    torch.manual_seed(0)
    model = bn_mlp(4, 8, 3).double()
    interrupted(run_on(x, y, model), tmp_path / "bn.ckpt")
    with pytest.raises(CheckpointMismatchError, match="its buffers .*BatchNorm's running statistics.* differ"):
        hessops.logdet(
            hessops.Regularized(run_on(x, y, recalibrated(model, x)), 5.0), **settings, checkpoint=tmp_path / "bn.ckpt"
        )

    interrupted(run_on(x, y), tmp_path / "loss.ckpt")
    smoothed = run_on(x, y, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.3))
    with pytest.raises(CheckpointMismatchError, match="its loss is .*label_smoothing=0.0.* this run's .*=0.3"):
        hessops.logdet(hessops.Regularized(smoothed, 5.0), **settings, checkpoint=tmp_path / "loss.ckpt")
    functional = run_on(x, y, loss_fn=torch.nn.functional.cross_entropy)  # the same loss, another spelling
    assert hessops.logdet(hessops.Regularized(functional, 5.0), **settings, checkpoint=tmp_path / "loss.ckpt")

    interrupted(run_on(x, y, operator=hessops.MCFisher, samples=2), tmp_path / "mc.ckpt")
    for options in ({"samples": 3}, {"samples": 2, "seed": 1}):
        other = run_on(x, y, operator=hessops.MCFisher, **options)
        with pytest.raises(CheckpointMismatchError, match="its operator is .*MCFisher\\(samples=2, seed=0\\)"):
            hessops.logdet(hessops.Regularized(other, 5.0), **settings, checkpoint=tmp_path / "mc.ckpt")


def test_a_checkpoint_of_the_earlier_format_is_refused(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"format": "hessops-checkpoint", "version": 1, "fingerprint": {}, "state": {}}, path)
    with pytest.raises(CheckpointMismatchError, match="another version of hessops \\(format 1; this one reads 2\\)"):
        hessops.spectral_density(run_on(*examples(20)), **DENSITY, checkpoint=path)


def _run(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hessops", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=_as_a_terminal_foreground_job,
    )


def _as_a_terminal_foreground_job() -> None:
    # A job started with `&` by a non-interactive shell inherits SIGINT as ignored (tests/cli/test_cli.py says more);
    # a user's Ctrl-C reaches a foreground job, whose SIGINT is at its default: give the child that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_after_first_checkpoint(path, *args: str, how: signal.Signals) -> subprocess.Popen:
    """Run the command with ``--resume path`` and send it ``how`` once ``path`` exists (its first checkpoint)."""
    return _stop_each_after_first_checkpoint({path: (args, how)})[path]


def _stop_each_after_first_checkpoint(runs: dict) -> dict:
    """Start the commands ``{path: (args, how)}`` at once, each with ``--resume path``, and send each its signal
    ``how`` as soon as its ``path`` exists (its first checkpoint): two runs cost one torch import's wait."""
    processes = {
        path: _run(*args, "--resume", str(path), "--checkpoint-every", "0.2") for path, (args, _) in runs.items()
    }
    waiting = dict(processes)
    deadline = time.monotonic() + 3600  # a hang guard only: importing torch on a loaded machine can take minutes
    while waiting and time.monotonic() < deadline:
        for path, process in list(waiting.items()):
            if path.exists() or process.poll() is not None:
                process.send_signal(runs[path][1])
                del waiting[path]
        time.sleep(0.005)
    for path, process in waiting.items():
        process.send_signal(runs[path][1])
    return processes


def test_cli_resumes_after_sigkill_and_ctrl_c(tmp_path):
    """Density runs stopped after their first checkpoint, by SIGKILL and by Ctrl-C (SIGINT: exit status 130 and
    one line saying how to resume), then resumed with --resume, write the same nodes, weights and density, bit
    for bit, as an uninterrupted run."""
    common = ["density", "--num-examples", "200", "--num-probes", "4", "--lanczos-steps", "150", "--grid", "200"]
    common += ["--dtype", "float64", "--no-progress"]
    killed_at, interrupted_at = tmp_path / "killed.ckpt", tmp_path / "interrupted.ckpt"
    uninterrupted = _run(*common, "--out", str(tmp_path / "uninterrupted.json"))  # meanwhile, on its own
    stopped = _stop_each_after_first_checkpoint(
        {killed_at: (common, signal.SIGKILL), interrupted_at: (common, signal.SIGINT)}
    )
    killed, interrupted = stopped[killed_at], stopped[interrupted_at]
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    _, err = interrupted.communicate(timeout=3600)
    assert interrupted.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"hessops: interrupted: progress saved in {interrupted_at}; run the same call again with "
        f"checkpoint='{interrupted_at}' (command line: --resume {interrupted_at}) to continue"
    )
    for path in (killed_at, interrupted_at):
        saved = torch.load(path, weights_only=True)["state"]
        assert not saved["done"] and 0 < saved["steps"] < 150
    runs = {
        "killed": _run(*common, "--resume", str(killed_at), "--out", str(tmp_path / "killed.json")),
        "interrupted": _run(*common, "--resume", str(interrupted_at), "--out", str(tmp_path / "interrupted.json")),
        "uninterrupted": uninterrupted,
    }
    for process in runs.values():
        _, err = process.communicate(timeout=3600)
        assert process.returncode == 0, err
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    for key in ("nodes", "weights", "density", "grid", "n_matvecs"):
        assert results["killed"][key] == results["interrupted"][key] == results["uninterrupted"][key], key


def test_cli_refuses_to_resume_on_other_data_in_one_line(tmp_path):
    """Finding (a) as a user meets it: `hessops density --model mlp-digits --num-examples 600 --resume ck` killed,
    then the same with --num-examples 300: one line naming the data, exit status 2, nothing written."""
    path, out = tmp_path / "ck", tmp_path / "density.json"
    common = ["density", "--model", "mlp-digits", "--num-probes", "2", "--lanczos-steps", "150", "--no-progress"]
    killed = _stop_after_first_checkpoint(path, *common, "--num-examples", "600", how=signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    other = _run(*common, "--num-examples", "300", "--resume", str(path), "--out", str(out))
    _, err = other.communicate(timeout=3600)
    assert other.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"hessops: error: checkpoint {path} belongs to another run: its data differ from this run's (the number of "
        "examples went from 600 to 300). Resume with the same model, data and settings, or pass another checkpoint "
        "path (or delete the file) to start afresh"
    )
    assert not out.exists()
