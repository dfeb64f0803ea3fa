"""hessops against independent peers: curvlinops' operators and PyHessian's Hessian-vector products, and
the benchmark harness that runs them side by side (smoke mode).

Tolerance 1e-10 relative in float64: independent implementations of the same sums.
"""

from __future__ import annotations

import json

import pytest
import torch
from reference import relative_error
from torch import nn
from toy_networks import mlp

import hessops

curvlinops = pytest.importorskip("curvlinops")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model, x, y = mlp(4, 8, 3).double(), torch.randn(23, 4, dtype=torch.float64), torch.randint(0, 3, (23,))
    return model, nn.CrossEntropyLoss(), [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]


@pytest.mark.parametrize(
    "ours, theirs",
    [("Hessian", "HessianLinearOperator"), ("GGN", "GGNLinearOperator"), ("EmpiricalFisher", "EFLinearOperator")],
)
def test_operators_match_curvlinops(problem, ours, theirs):
    model, loss_fn, data = problem
    op = getattr(hessops, ours)(model, loss_fn, data)
    peer = getattr(curvlinops, theirs)(model, loss_fn, list(model.parameters()), data, check_deterministic=False)
    V = torch.randn(op.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert relative_error(op @ V, peer @ V) < 1e-10


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")  # PyHessian's own call
def test_hessian_matches_pyhessian(problem):
    pyhessian = pytest.importorskip("pyhessian")
    model, loss_fn, data = problem
    H = hessops.Hessian(model, loss_fn, data)
    peer = pyhessian.hessian(model, loss_fn, dataloader=data, cuda=False)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shapes = [p.shape for p in model.parameters()]
    v_list = [t.reshape(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes)]
    _, theirs = peer.dataloader_hv_product(v_list)
    assert (
        relative_error(H @ v, torch.cat([t.reshape(-1) for t in theirs]).double()) < 1e-6
    )  # PyHessian accumulates in float32


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_benchmark_harness_smoke(tmp_path):
    """Not a timing test: the harness runs every method and the methods agree."""
    from benchmarks.run import main

    report = main(["--smoke", "--out", str(tmp_path / "bench.json")])
    entry = report["workloads"]["tiny"]
    ratios = entry["products"]["ratios"]
    assert (
        ratios["hessops hvp / grad"] > 0
        and ratios["hessops block8 / 8×hvp"] > 0
        and ratios["hessops micro2 hvp / grad"] > 0
    )
    assert entry["top"]["hessops LA"]["criterion"] == {"value_tol": 1e-4, "verify": False}
    assert all(diff < 1e-5 for diff in entry["products"]["agreement"].values())
    assert entry["top"]["hessops LA"]["max rel. error"] < 1e-3 and entry["top"]["hessops LM"]["max rel. error"] < 1e-3
    assert entry["trace"]["hessops hutch++"]["std_error"] > 0 and entry["trace"]["pyhessian"]["probes"] == 8
    assert (tmp_path / "bench.json").exists()


def test_transformer_harness_smoke(tmp_path):
    """Not a timing test: benchmarks/transformers.py runs hessops and both peers on a 2-layer GPT in the math
    attention kernel the peers need, and the three products agree (curvlinops is wrong through LayerNorm, so
    it is held to 1e-2 only)."""
    from benchmarks.transformers import main

    report = main(
        ["--smoke", "--workloads", "gpt-bytes-tiny", "--top", "0", "--no-memory", "--out", str(tmp_path / "t.json")]
    )
    entry = report["workloads"]["gpt-bytes-tiny"]
    assert entry["n_params"] > 0 and all(r > 0 for r in entry["products"]["ratios"].values())
    assert entry["products"]["agreement"]["pyhessian rel. diff"] < 1e-5
    assert entry["products"]["agreement"]["curvlinops rel. diff"] < 1e-2
    assert (tmp_path / "t.json").exists()


def test_transformer_harness_memory_with_micro_batches():
    """Not a measurement: the transformer harness's memory counts run, with micro-batches as well; the
    micro-batched HVP agrees with the whole batches' and holds no more memory."""
    from benchmarks.transformers import main

    report = main(["--smoke", "--workloads", "gpt-bytes-tiny", "--top", "0", "--peers", "--micro-batch-size", "1"])
    memory = report["workloads"]["gpt-bytes-tiny"]["memory"]
    peaks = memory["peak_bytes"]
    assert memory["micro-batch rel. diff"] < 1e-5
    assert 0 < peaks["hessops hvp (micro-batches of 1)"] <= 1.01 * peaks["hessops hvp"]


def test_tensor_memory_tracker_counts_storages_exactly():
    """The CPU peak-memory meter of benchmarks/memory.py: known allocations, views not counted twice,
    frees subtracted, the peak kept."""
    from benchmarks.memory import TensorMemory

    x = torch.randn(1000, 250)  # 1,000,000 bytes, allocated before: not counted
    with TensorMemory() as meter:
        a = x * 2
        b = a.view(-1)[:10]  # a view: no new storage
        assert meter.current == meter.peak == 1_000_000
        c = a + 1
        del a, b, c
        assert meter.current == 0 and meter.peak == 2_000_000


def test_memory_benchmark_smoke():
    """Not a measurement: the memory script runs, and micro-batches do not raise the HVP's peak."""
    from benchmarks.memory import main

    peaks = main(["--workloads", "tiny", "--num-examples", "12", "--batch-size", "6", "--micro-batch-sizes", "3"])[
        "tiny"
    ]
    # a piece's own few scalars (its weight, its loss) may add bytes, not a batch's worth: 1 % room
    assert peaks["grad"] > 0 and peaks["hvp"] > 0 and 0 < peaks["hvp micro 3"] <= 1.01 * peaks["hvp"]


def test_gpu_check_smoke(tmp_path):
    """Not a measurement: benchmarks/gpu_check.py's sections run at toy sizes on the CPU (random images, as
    CIFAR-10 is not in the folder, and the report says so); compiling is left to a device run (a minute of
    inductor on 2 cores), and its section is not asked for here."""
    from benchmarks.gpu_check import main

    out = tmp_path / "gpu.json"
    report = main(
        ["--smoke", "--device", "cpu", "--data-dir", str(tmp_path), "--sections", "top", "products", "head", "blocks"]
        + ["--out", str(out)]
    )
    assert report["data"].startswith("synthetic") and json.loads(out.read_text())["model"] == "cnn-cifar-5k"
    top, products = report["top"], report["products"]
    assert "error" not in top and "error" not in products, (top.get("traceback"), products.get("traceback"))
    assert len(top["eigenvalues"]) == 2 and top["hvps"] >= 2 and top["converged"]
    assert products["hvp / grad"] > 0 and products["peak bytes"]["hessops hvp"] > 0
    head = report["head"]
    assert "error" not in head, head.get("traceback")
    assert head["head_check"]["passed"] and head["head_vs_plain"] < 1e-4 and head["in_gradients"]["head"] > 0
    blocks = report["blocks"]
    assert "error" not in blocks, blocks.get("traceback")
    assert all(blocks[f"block {b}"]["converged"] and blocks[f"block {b}"]["n_matvecs"] >= b for b in (1, 4, 8))


def test_gpu_check_smoke_races_and_tracking(tmp_path):
    """Not a measurement: the GPU check's races against PyHessian (the ResNet's stand-in, the ViT, the GPT) and
    its tracking rows run at toy sizes; hessops' values sit within their verified bounds of the tight
    reference, and a PyHessian run that counts as agreeing is within the accuracy asked."""
    from benchmarks.gpu_check import main

    report = main(
        ["--smoke", "--device", "cpu", "--data-dir", str(tmp_path), "--out", str(tmp_path / "gpu.json")]
        + ["--sections", "peers", "vit", "gpt", "tracking"]
    )
    for section in ("peers", "vit", "gpt", "tracking"):
        assert "error" not in report[section], report[section].get("traceback")
    tops = [v for k, v in report["peers"].items() if k.startswith("top-")]
    tops += [next(iter(report[s]["workloads"].values()))["top"] for s in ("vit", "gpt")]
    for top in tops:
        assert top["hessops within its bounds"]
        race = top["pyhessian to equal accuracy"]
        assert race["attempts"] and race["attempts"][0]["tol"] == 1e-3
        if race["agreed"] is not None:
            assert race["agreed"]["max certified error"] <= race["accuracy"]
    assert {r["setting"] for r in report["tracking"]["rows"]} >= {"default", "update-curvature"}


class _ScriptedPeer:
    """A stand-in for PyHessian whose top-k at each tolerance is given, costing one product per call."""

    def __init__(self, answers: dict[float, list[float]]):
        self.answers, self.hvps = answers, 0

    def top(self, k: int, tol: float, max_iter: int) -> list[float]:
        from benchmarks.peers import OutOfBudget

        self.hvps += 1
        if self.answers[tol] is None:  # a run still going when the budget ran out
            raise OutOfBudget
        return self.answers[tol][:k]


def test_certified_errors_pair_values_by_magnitude_and_add_the_reference_bound():
    from benchmarks.peers import certified_errors

    # ranks by |value|: -10 with 9.9, 5 with 5.2; each error is the distance plus the reference's bound
    errors = certified_errors([5.2, 9.9], reference=[-10.0, 5.0], bounds=[0.5, 0.25])
    assert errors == pytest.approx([19.9 + 0.5, 0.2 + 0.25])


def test_pyhessian_sweep_stops_at_the_first_tolerance_within_the_accuracy():
    from benchmarks.peers import pyhessian_to_accuracy

    clock = iter(range(100))
    answers = {1e-3: [9.0, 4.0], 1e-4: [9.95, 4.02], 1e-5: [10.0, 4.0], 1e-6: [10.0, 4.0]}
    race = pyhessian_to_accuracy(_ScriptedPeer(answers), [10.0, 4.0], [0.01, 0.01], 0.1, lambda: next(clock))
    assert [a["tol"] for a in race["attempts"]] == [1e-3, 1e-4] and race["agreed"]["tol"] == 1e-4
    assert race["agreed"]["max certified error"] == pytest.approx(0.06) and race["sweep hvps"] == 2
    # never close enough: every tolerance tried, none agreed
    never = {tol: [9.0, 4.0] for tol in answers}
    race = pyhessian_to_accuracy(_ScriptedPeer(never), [10.0, 4.0], [0.01, 0.01], 0.1, lambda: next(clock))
    assert len(race["attempts"]) == 4 and race["agreed"] is None
    # a budget ends the sweep after the attempt that spends it
    race = pyhessian_to_accuracy(
        _ScriptedPeer(never), [10.0, 4.0], [0.01, 0.01], 0.1, lambda: next(clock), budget_seconds=0.5
    )
    assert len(race["attempts"]) == 1 and race["agreed"] is None
    # a run stopped by the budget mid-way: recorded with its cost and no values, and the sweep ends there
    stopped = {1e-3: [9.0, 4.0], 1e-4: None, 1e-5: [10.0, 4.0], 1e-6: [10.0, 4.0]}
    race = pyhessian_to_accuracy(
        _ScriptedPeer(stopped), [10.0, 4.0], [0.01, 0.01], 0.1, lambda: next(clock), budget_seconds=50
    )
    assert [a["tol"] for a in race["attempts"]] == [1e-3, 1e-4] and race["agreed"] is None
    assert race["attempts"][1]["stopped at the budget"] and race["attempts"][1]["values"] is None


def test_headline_rows_show_each_pyhessian_attempt_including_one_stopped_at_the_budget():
    from benchmarks.run import render_headline

    attempts = [
        {"tol": 1e-3, "seconds": 2.0, "hvps": 9, "values": [1.0], "max certified error": 0.5, "agrees": False},
        {"tol": 1e-4, "seconds": 3.0, "hvps": 12, "values": None, "stopped at the budget": True, "agrees": False},
    ]
    headline = {
        "hessops": {"seconds": 1.0, "hvps": 5, "values": [1.0, 0.5], "tuning seconds": 0.0},
        "pyhessian to equal accuracy": {"accuracy": 1e-3, "attempts": attempts, "agreed": None},
        "pyhessian sweep / hessops time": 5.0,
    }
    rows = "\n".join(render_headline(headline))
    assert "top-2 LM" in rows and "| 2.00 / 9 / 0.5 |" in rows and "| 3.00 / 12 / stopped at the budget |" in rows
    assert "equal accuracy** |" not in rows and "whole sweep / hessops time | 5.00 |" in rows


def test_large_runs_harness_smoke(tmp_path):
    """Not a measurement: benchmarks/large.py runs each configuration in its own process, reports the basis
    each used and its peak resident memory, and the disk basis gives the device basis's eigenvalues."""
    from benchmarks.large import main

    report = main(["--smoke", "--out", str(tmp_path / "large.json")])
    runs = report["runs"]
    assert [r.get("basis used") for r in runs] == ["device", "disk", "none"], [r.get("error") for r in runs]
    assert all(r["peak resident bytes"] > 0 for r in runs)
    torch.testing.assert_close(torch.tensor(runs[1]["eigenvalues"]), torch.tensor(runs[0]["eigenvalues"]))
    assert json.loads((tmp_path / "large.json").read_text())["runs"][1]["slowdown against the device basis"] > 0


def test_resume_benchmark_smoke():
    """Not a measurement: benchmarks/resume.py kills a checkpointed run with SIGKILL, resumes it, and finds the
    resumed density bit-identical to the uninterrupted one (a small CNN, saving at every step)."""
    from benchmarks.resume import main

    report = main(["--smoke", "--every", "0", "--kill-at", "0.8"])
    assert report["bit-identical"] and report["attempts"][-1]["killed"] is False
    assert report["total / uninterrupted"] > 0


def test_tracking_benchmark_smoke():
    """Not a measurement: benchmarks/tracking.py trains the digits MLP for one epoch with each tracker setting
    and reports a fraction and products (one product for the update curvature, fewer for the loose settings)."""
    from benchmarks.tracking import main

    rows = main(["--models", "mlp-digits", "--train", "100", "--subset", "20", "--epochs", "2"])
    by = {r["setting"]: r for r in rows}
    assert set(by) == {"default", "loose", "loose-nocheck", "update-curvature"}
    assert by["update-curvature"]["products"] == 1 and all(r["fraction"] > 0 for r in rows)
    assert by["loose-nocheck"]["products"] <= by["default"]["products"]
