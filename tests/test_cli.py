"""The `hessops` command run as a user runs it (subprocess), reading back what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hessops
from hessops.data import load_dataset, make_loader
from hessops.models import build_model, make_loss, model_spec

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def hessops_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hessops", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def digits_hessian(num_examples: int, seed: int = 0, model_seed: int | None = None):
    model = build_model("mlp-digits", seed=seed if model_seed is None else model_seed)
    data = make_loader(load_dataset("digits", num_examples=num_examples, seed=seed), batch_size=128)
    return hessops.Hessian(model, make_loss(model_spec("mlp-digits")), data, dtype=torch.float64)


@pytest.fixture(scope="module")
def exact_200():
    return torch.linalg.eigvalsh(digits_hessian(200).to_dense())


def test_eigs_writes_json_and_plot_matching_the_dense_spectrum(tmp_path, exact_200):
    out, plot = tmp_path / "eigs.json", tmp_path / "eigs.png"
    run = hessops_cli("eigs", "--num-examples", "200", "--k", "4", "--which", "both", "--dtype", "float64",
                      "--tol", "1e-8", "--out", str(out), "--plot", str(plot))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert {"eigenvalues", "residuals", "n_matvecs", "seconds", "settings", "converged"} <= set(result)
    assert result["settings"] | {} and result["settings"]["model"] == "mlp-digits" and result["settings"]["num_examples"] == 200
    assert result["settings"]["n_params"] == 2410 and result["settings"]["which"] == "both"
    expected = torch.cat([exact_200.flip(0)[:2], exact_200[:2].flip(0)])
    torch.testing.assert_close(torch.tensor(result["eigenvalues"], dtype=torch.float64), expected, rtol=0, atol=1e-7 * float(exact_200.abs().max()))
    assert plot.stat().st_size > 10_000
    assert "λ1" in run.stdout


def test_eigs_value_tol_stops_on_eigenvalue_error_bounds(tmp_path, exact_200):
    """--value-tol: the values within value_tol · max|λ| of the dense ones, each within its reported bound."""
    out = tmp_path / "eigs.json"
    run = hessops_cli("eigs", "--num-examples", "200", "--k", "2", "--which", "LA", "--dtype", "float64",
                      "--value-tol", "1e-6", "--no-progress", "--out", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["settings"]["value_tol"] == 1e-6 and "error ≤" in run.stdout
    errors = (torch.tensor(result["eigenvalues"], dtype=torch.float64) - exact_200.flip(0)[:2]).abs()
    assert float(errors.max()) <= 1e-6 * float(exact_200.abs().max())
    assert all(float(e) <= b * (1 + 1e-6) + 1e-14 for e, b in zip(errors, result["error_bounds"]))


def test_density_trace_logdet_basin(tmp_path, exact_200):
    common = ("--num-examples", "200", "--dtype", "float64", "--no-progress")
    runs = {
        "density": ("--num-probes", "4", "--lanczos-steps", "30", "--plot", str(tmp_path / "density.png")),
        "trace": ("--probes", "60",),
        "logdet": ("--operator", "ggn", "--c", "0.01", "--method", "slq", "--probes", "8", "--lanczos-steps", "30"),
        "basin": ("--c", "5.0", "--threshold", "2", "--method", "slq", "--probes", "8", "--lanczos-steps", "30"),
    }
    results = {}
    for command, extra in runs.items():
        run = hessops_cli(command, *common, *extra, "--out", str(tmp_path / f"{command}.json"))
        assert run.returncode == 0, (command, run.stderr)
        results[command] = json.loads((tmp_path / f"{command}.json").read_text())
    density = torch.tensor(results["density"]["density"])
    grid = torch.tensor(results["density"]["grid"])
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "density.png").stat().st_size > 10_000
    assert abs(results["trace"]["trace"] - float(exact_200.sum())) < 3 * results["trace"]["std_error"]
    basin = results["basin"]
    assert basin["log_volume"] == pytest.approx(basin["log_unit_ball"] + basin["log_threshold_term"] - basin["half_logdet"])
    assert abs(2 * basin["half_logdet"] - float(torch.log(exact_200 + 5.0).sum())) < 3 * basin["logdet_std_error"] + 1e-3
    assert results["logdet"]["method"] == "slq" and results["logdet"]["std_error"] > 0


def test_checkpoint_is_loaded(tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.save(build_model("mlp-digits", seed=7).state_dict(), checkpoint)
    out = tmp_path / "eigs.json"
    run = hessops_cli("eigs", "--num-examples", "100", "--k", "1", "--which", "LA", "--dtype", "float64", "--tol", "1e-10",
                      "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress")
    assert run.returncode == 0, run.stderr
    expected = float(torch.linalg.eigvalsh(digits_hessian(100, model_seed=7).to_dense()).max())
    assert json.loads(out.read_text())["eigenvalues"][0] == pytest.approx(expected, rel=1e-8)


def test_track_writes_history_and_figures(tmp_path):
    out, plot = tmp_path / "track.json", tmp_path / "sharpness.png"
    run = hessops_cli("track", "--num-examples", "256", "--epochs", "2", "--sharpness-examples", "128",
                      "--out", str(out), "--plot", str(plot), "--no-progress")
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert [s["epoch"] for s in result["sharpness"]] == [0, 1, 2]
    assert len(result["training"]) == 2 and len(result["grad_norms"]) == 2
    assert plot.stat().st_size > 10_000 and (tmp_path / "sharpness_grad_norms.png").stat().st_size > 10_000


def test_demo_writes_result_and_four_figures(tmp_path):
    run = hessops_cli("demo", "--out", str(tmp_path / "result.json"), "--plot", str(tmp_path), "--no-progress")
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["eigenvalues"]) == 10 and result["test_accuracy"] > 0.9
    assert {"density", "trace", "basin_volume", "sharpness", "grad_norms", "residuals"} <= set(result)
    for name in ("eigenvalues", "density", "sharpness", "grad_norms"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert "FutureWarning" not in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("eigs", "--model", "no-such-net"), "no-such-net"),
        (("eigs", "--data", "mnist", "--data-dir", "{tmp}"), "hessops download mnist"),
        (("eigs", "--device", "cuda"), "CUDA is not available"),
        (("eigs", "--checkpoint", "{tmp}/missing.pt"), "missing.pt"),
        (("eigs", "--checkpoint", "{tmp}/cnn.pt"), "checkpoint"),
        (("eigs", "--k", "0"), "k=0 must be at least 1"),
        (("density", "--lanczos-steps", "0"), "lanczos_steps=0"),
        (("density", "--num-probes", "0"), "num_probes=0"),
        (("density", "--sigma", "-1"), "sigma=-1 must be positive"),
        (("trace", "--probes", "0"), "probes=0"),
        (("logdet", "--c", "nan"), "c=nan must be finite"),
        (("basin", "--threshold", "inf"), "threshold=inf must be finite"),
    ],
    ids=[
        "unknown-model", "missing-dataset", "no-cuda", "missing-checkpoint", "wrong-checkpoint", "k-zero",
        "no-lanczos-steps", "no-probes-density", "negative-sigma", "no-probes-trace", "nan-c", "infinite-threshold",
    ],
)
def test_bad_input_exits_with_one_line(tmp_path, args, message):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has CUDA")
    torch.save(build_model("cnn-cifar-5k").state_dict(), tmp_path / "cnn.pt")
    run = hessops_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], "--no-progress")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hessops: error:") and message in lines[0], run.stderr


def _as_a_terminal_foreground_job() -> None:
    # A job started with `&` by a non-interactive shell (as CI runners and `make test &` do) inherits SIGINT as
    # ignored, and Python then installs no KeyboardInterrupt handler, so the SIGINT below would do nothing.
    # A user's Ctrl-C reaches a foreground job, whose SIGINT is at its default: give the child that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_with_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "hessops", "density", "--num-probes", "50", "--lanczos-steps", "3000", "--dtype", "float64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_as_a_terminal_foreground_job,
    )
    deadline = time.monotonic() + 600  # a loaded machine can take minutes to import torch
    seen = ""
    while "SLQ" not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += process.stderr.read(1)  # wait until it is inside the long loop
    assert "SLQ" in seen, f"the density run never reached its Lanczos loop:\n{seen[-2000:]}"
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=300)  # the interrupt lands when the running product returns
    finally:
        process.kill()
    assert process.returncode == 130
    assert err.strip().splitlines()[-1].endswith("hessops: interrupted") and "Traceback" not in err


def test_python_dash_m_and_console_script_agree():
    run = hessops_cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"hessops {hessops.__version__}"
    script = Path(sys.executable).parent / "hessops"
    if script.exists():
        assert subprocess.run([str(script), "--version"], capture_output=True, text=True).stdout == run.stdout


def test_models_lists_the_zoo():
    run = hessops_cli("models")
    assert run.returncode == 0
    for name in ("mlp-digits", "cnn-cifar-5k", "cnn-mnist-1710", "mlp-cifar2", "mlp-mnist", "resnet18", "resnet50", "resnet18_cifar10"):
        assert name in run.stdout


def test_hvp_mode_is_validated_and_recorded(tmp_path):
    """--hvp-mode forward-over-reverse is checked against double backward on its first product (the JSON says
    so) and gives the eigenvalues double backward gives (relative 1e-5: float32 products, different roundings)."""
    results = {}
    for mode in ("autograd", "forward-over-reverse"):
        out = tmp_path / f"{mode}.json"
        run = hessops_cli("eigs", "--num-examples", "64", "--k", "2", "--hvp-mode", mode, "--out", str(out), "--no-progress")
        assert run.returncode == 0, run.stderr
        results[mode] = json.loads(out.read_text())
    explicit = results["forward-over-reverse"]
    assert explicit["settings"]["hvp_mode"] == "forward-over-reverse" and explicit["verified"] is True
    assert explicit["hvp_tuning"]["single"]["source"] == "explicit"
    assert explicit["hvp_tuning"]["single"]["errors"]["forward-over-reverse"] < 3.5e-3
    for ours, reference in zip(explicit["eigenvalues"], results["autograd"]["eigenvalues"]):
        assert abs(ours - reference) <= 1e-5 * abs(reference)
