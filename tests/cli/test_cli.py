"""The `hessops` command computes the right numbers: its results against dense spectra, read back from what it
wrote. Run as a user runs it (a subprocess) where that adds something (the entry point, the exit status, the
streams, a fresh interpreter), else in-process through `hessops.cli.main`, which is the same code without
importing torch again (seconds per process on a busy machine)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from digits_reference import digits_dense_ggn, digits_dense_hessian
from reference import as_float64, next_token_loss, reference_hessian

import hessops
from hessops.cli import main
from hessops.zoo.data import load_dataset, make_loader
from hessops.zoo.models import build_model, make_loss

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
FIGURE_BYTES = 10_000  # a drawn PNG figure of these sizes is 30-100 kB; an empty canvas is about 3 kB


def hessops_cli(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    """The command in a fresh interpreter; ``timeout`` only guards against a hang (tests bound work, not time:
    the demo takes about 30 s on 2 quiet cores and ten times that on a busy machine)."""
    return subprocess.run(
        [sys.executable, "-m", "hessops", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


@pytest.fixture(scope="module")
def hessian_200():
    return digits_dense_hessian(200)


@pytest.fixture(scope="module")
def exact_200(hessian_200):
    return torch.linalg.eigvalsh(hessian_200)


def assert_density_of(record: dict, hessian: torch.Tensor) -> None:
    """A density record (``hessops density``'s JSON, the demo's ``density``) against the reference ``hessian``:
    - each probe's quadrature is a probability measure whose nodes are Ritz values, so inside the spectrum's range
      (to 1e-6 of its scale: float32 products);
    - the moments are probe averages of ``vᵀHv/n`` and ``vᵀH²v/n`` (Gauss quadrature with m steps is exact to
      degree 2m - 1), whose variance for Rademacher probes is exactly ``2/n² Σ_{i≠j} A_ij²`` (A = H, H²): each
      within 5 of its standard errors of ``tr H/n``, ``tr H²/n`` (a miss by chance: below 1e-6);
    - the broadened density integrates to one on its grid and has the quadrature's mean (the Gaussians are
      symmetric; the grid holds their tails: 1e-4 of the spectrum's scale)."""
    nodes = torch.tensor(record["nodes"], dtype=torch.float64)
    weights = torch.tensor(record["weights"], dtype=torch.float64)
    exact = torch.linalg.eigvalsh(hessian)
    n, probes, scale = hessian.shape[0], nodes.shape[0], float(exact.abs().max())
    torch.testing.assert_close(weights.sum(1), torch.ones(probes, dtype=torch.float64), rtol=0, atol=1e-6)
    assert float(weights.min()) >= 0
    assert float(nodes.min()) >= float(exact[0]) - 1e-6 * scale
    assert float(nodes.max()) <= float(exact[-1]) + 1e-6 * scale
    # the extreme Ritz values converge first: with 30+ steps on these spectra the top node is the top eigenvalue
    # (measured: to 4e-16 for the 200-example float64 run), which a scaled or shifted operator would miss
    assert float(nodes.max()) == pytest.approx(float(exact[-1]), rel=1e-4)
    for key, power in (("mean", hessian), ("second", hessian @ hessian)):
        off_diagonal = float((power**2).sum() - (torch.diagonal(power) ** 2).sum())
        std_error = (2 * off_diagonal / n**2 / probes) ** 0.5
        truth = float(torch.trace(power)) / n
        assert abs(record["moments"][key] - truth) < 5 * std_error, (key, record["moments"][key], truth, std_error)
    grid = torch.tensor(record["grid"], dtype=torch.float64)
    density = torch.tensor(record["density"], dtype=torch.float64)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.trapezoid(grid * density, grid)) == pytest.approx(record["moments"]["mean"], abs=1e-4 * scale)


def test_eigs_writes_json_and_plot_matching_the_dense_spectrum(tmp_path, exact_200):
    out, plot = tmp_path / "eigs.json", tmp_path / "figures" / "eigs.png"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    args = (
        "eigs",
        "--num-examples",
        "200",
        "--k",
        "4",
        "--which",
        "both",
        "--dtype",
        "float64",
        "--tol",
        "1e-8",
        "--out",
        str(out),
        "--plot",
        str(plot),
    )
    run = hessops_cli(*args)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["command"] == "eigs" and {
        "eigenvalues",
        "residuals",
        "error_bounds",
        "n_matvecs",
        "seconds",
        "converged",
    } <= set(result)
    settings = result["settings"]
    assert settings["model"] == "mlp-digits" and settings["num_examples"] == 200 and settings["n_params"] == 2410
    assert settings["which"] == "both" and settings["k"] == 4 and settings["dtype"] == "float64"
    record = result["run"]
    assert record["argv"] == ["hessops", *args] and record["versions"] == {
        "hessops": hessops.__version__,
        "torch": torch.__version__,
        "cola": __import__("cola").__version__,
    }
    assert record["device"].startswith("cpu (") and 0 < record["wall_seconds"]
    assert before <= datetime.fromisoformat(record["started"].replace("Z", "+00:00")) <= datetime.now(timezone.utc)
    expected = torch.cat([exact_200.flip(0)[:2], exact_200[:2].flip(0)])
    # tol 1e-8 relative to max |λ| bounds each residual, and so each eigenvalue's error, by 1e-8 · max |λ|
    torch.testing.assert_close(
        torch.tensor(result["eigenvalues"], dtype=torch.float64),
        expected,
        rtol=0,
        atol=1e-7 * float(exact_200.abs().max()),
    )
    assert plot.stat().st_size > FIGURE_BYTES and list(tmp_path.glob("**/.*")) == []  # no temporary file left
    assert "λ1" in run.stdout and "Warning" not in run.stderr


def test_eigs_value_tol_stops_on_eigenvalue_error_bounds(tmp_path, capsys, exact_200):
    """--value-tol: the values within value_tol · max|λ| of the dense ones, each within its reported bound."""
    out = tmp_path / "eigs.json"
    assert (
        main(
            [
                "eigs",
                "--num-examples",
                "200",
                "--k",
                "2",
                "--which",
                "LA",
                "--dtype",
                "float64",
                "--value-tol",
                "1e-6",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["settings"]["value_tol"] == 1e-6 and "error ≤" in capsys.readouterr().out
    errors = (torch.tensor(result["eigenvalues"], dtype=torch.float64) - exact_200.flip(0)[:2]).abs()
    assert float(errors.max()) <= 1e-6 * float(exact_200.abs().max())
    assert all(float(e) <= b * (1 + 1e-6) + 1e-14 for e, b in zip(errors, result["error_bounds"]))
    assert result["check_runs"] >= 1 and result["settings"]["check"] is True
    # --no-check: one Lanczos run, fewer products, the same values to within their bounds
    assert (
        main(
            ["eigs", "--num-examples", "200", "--k", "2", "--which", "LA", "--dtype", "float64"]
            + ["--value-tol", "1e-6", "--no-check", "--no-progress", "--out", str(out)]
        )
        == 0
    )
    unchecked = json.loads(out.read_text())
    assert unchecked["check_runs"] == 0 and unchecked["settings"]["check"] is False
    assert unchecked["n_matvecs"] < result["n_matvecs"]
    assert all(
        abs(a - b) <= e for a, b, e in zip(unchecked["eigenvalues"], result["eigenvalues"], result["error_bounds"])
    )


def test_eigs_blocks_and_a_bounded_basis(tmp_path, exact_200, capsys):
    """`--block-size` and `--basis-size`: the top-2 of the 200-example digits MLP (float64) within its bounds of
    the exact values, with the JSON saying what ran; refused with --resume or a basis off the device, and below
    k + 2 blocks."""
    out = tmp_path / "eigs.json"
    common = ["eigs", "--num-examples", "200", "--k", "2", "--which", "LA", "--dtype", "float64", "--no-progress"]
    assert main([*common, "--block-size", "2", "--basis-size", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["block_size"], result["settings"]["basis_size"]) == (2, 8) and result["restarts"] >= 1
    errors = (torch.tensor(result["eigenvalues"], dtype=torch.float64) - exact_200.flip(0)[:2]).abs()
    assert result["converged"] and all(float(e) <= b for e, b in zip(errors, result["error_bounds"]))
    for extra, problem in (
        (["--basis-size", "8", "--resume", str(tmp_path / "run.ckpt")], "--resume saves single-vector"),
        (["--block-size", "2", "--basis", "none"], "keep the basis on the device"),
        (["--block-size", "2", "--basis-size", "5"], "less than --k + 2 x --block-size"),
    ):
        assert main([*common, *extra]) == 2
        assert problem in capsys.readouterr().err


def test_density_trace_logdet_basin_and_their_figures(tmp_path, exact_200, hessian_200):
    common = ("--num-examples", "200", "--dtype", "float64", "--no-progress")
    runs = {
        "density": ("--num-probes", "4", "--lanczos-steps", "30"),
        "trace": ("--probes", "60"),
        "logdet": ("--operator", "ggn", "--c", "0.01", "--method", "slq", "--probes", "8", "--lanczos-steps", "30"),
        "basin": ("--c", "5.0", "--threshold", "2", "--method", "slq", "--probes", "8", "--lanczos-steps", "30"),
    }
    results = {}
    for command, extra in runs.items():
        out, plot = tmp_path / f"{command}.json", tmp_path / f"{command}.png"
        assert main([command, *common, *extra, "--out", str(out), "--plot", str(plot)]) == 0, command
        results[command] = json.loads(out.read_text())
        assert plot.stat().st_size > FIGURE_BYTES, command
    assert_density_of(results["density"], hessian_200)
    trace = results["trace"]
    assert abs(trace["trace"] - float(exact_200.sum())) < 3 * trace["std_error"]  # within 3 standard errors
    assert trace["history"]["probes"][-1] == trace["n_matvecs"] and trace["history"]["estimate"][-1] == trace["trace"]
    basin = results["basin"]
    assert basin["log_volume"] == pytest.approx(
        basin["log_unit_ball"] + basin["log_threshold_term"] - basin["half_logdet"]
    )
    assert (
        abs(2 * basin["half_logdet"] - float(torch.log(exact_200 + 5.0).sum())) < 3 * basin["logdet_std_error"] + 1e-3
    )
    logdet = results["logdet"]
    assert logdet["method"] == "slq" and logdet["std_error"] > 0
    # log det(GGN + 0.01·I) of the reference GGN by slogdet (positive definite: sign +1); SLQ within 3 standard
    # errors, plus 1e-3 for the quadrature (30 Lanczos steps), as for the basin's above
    ggn = digits_dense_ggn(200)
    sign, exact_logdet = torch.linalg.slogdet(ggn + 0.01 * torch.eye(ggn.shape[0], dtype=ggn.dtype))
    assert float(sign) == 1.0
    assert abs(logdet["logdet"] - float(exact_logdet)) < 3 * logdet["std_error"] + 1e-3, (logdet, float(exact_logdet))
    assert all(r["n_matvecs"] > 0 and r["seconds"] > 0 for r in results.values())


def test_checkpoint_is_loaded(tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.save(build_model("mlp-digits", seed=7).state_dict(), checkpoint)
    out = tmp_path / "eigs.json"
    assert (
        main(
            [
                "eigs",
                "--num-examples",
                "100",
                "--k",
                "1",
                "--which",
                "LA",
                "--dtype",
                "float64",
                "--tol",
                "1e-10",
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    expected = float(torch.linalg.eigvalsh(digits_dense_hessian(100, model_seed=7)).max())
    assert json.loads(out.read_text())["eigenvalues"][0] == pytest.approx(expected, rel=1e-8)  # tol 1e-10


_TOP_OF_STATE: dict[str, float] = {}


def _top_reference_eigenvalue(state: dict, fixed) -> float:
    """The top eigenvalue of tests/reference.py's float64 Hessian of mlp-digits at ``state`` on ``fixed``, kept by a
    digest of every byte of the state: both runs of the track test below train the same weights (its settings
    change only how sharpness is measured), so the second takes the first's three dense references."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    key = digest.hexdigest()
    if key not in _TOP_OF_STATE:
        model = build_model("mlp-digits", seed=0).double()
        model.load_state_dict(state)
        hessian = reference_hessian(model.eval(), make_loss("mlp-digits"), fixed)
        _TOP_OF_STATE[key] = float(torch.linalg.eigvalsh(hessian).max())
    return _TOP_OF_STATE[key]


@pytest.mark.parametrize("cheap", [(), ("--value-tol", "1e-2", "--no-check")], ids=["default", "loose-no-check"])
def test_track_writes_history_and_one_two_panel_figure(tmp_path, monkeypatch, cheap):
    """Its history and figure, and each recorded sharpness against the top eigenvalue of the reference Hessian
    (tests/reference.py, float64) of the model as it was when measured, on the fixed 128 examples (rtol 1e-3: a
    float32 operator, Lanczos tol 1e-4; with --value-tol and --no-check, within the recorded residual plus
    float32's rounding)."""
    from hessops.analysis.tracking import SharpnessTracker

    states = {}
    measure = SharpnessTracker.measure

    def recording(self, step):
        states[step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return measure(self, step)

    monkeypatch.setattr(SharpnessTracker, "measure", recording)
    out, plot = tmp_path / "track.json", tmp_path / "track.png"
    assert (
        main(
            [
                "track",
                "--num-examples",
                "256",
                "--epochs",
                "2",
                "--sharpness-examples",
                "128",
                "--out",
                str(out),
                "--plot",
                str(plot),
                "--no-progress",
                *cheap,
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert [s["step"] for s in result["sharpness"]] == [0, 1, 2] and result["settings"]["sharpness_examples"] == 128
    assert (result["settings"]["value_tol"], result["settings"]["check"]) == ((0.01, False) if cheap else (None, True))
    assert len(result["training"]) == 2 and len(result["grad_norms"]) == 2
    subset = torch.utils.data.Subset(load_dataset("digits", num_examples=256, seed=0), range(128))
    fixed = as_float64(make_loader(subset))
    for record in result["sharpness"]:
        exact = _top_reference_eigenvalue(states[record["step"]], fixed)
        if cheap:
            assert abs(record["values"][0] - exact) <= record["residuals"][0] + 1e-4 * abs(exact), (record, exact)
        else:
            assert record["values"][0] == pytest.approx(exact, rel=1e-3), (record["step"], exact)
    assert plot.stat().st_size > FIGURE_BYTES and sorted(p.name for p in tmp_path.iterdir()) == [
        "track.json",
        "track.png",
    ]


def test_demo_writes_its_result_and_one_figure(tmp_path, monkeypatch, recwarn):
    """In-process, to get hold of the trained model (the Hessian it builds is recorded): its spectrum, trace and
    basin volume against tests/reference.py's float64 Hessian of that model on the 1,437 training images. The
    top-10 (LM, tol 1e-6) to 1e-5·max|λ|; the trace within 3 standard errors; the basin's log det(H + c·I) by
    slogdet within 3 standard errors plus 1e-3 (SLQ's quadrature, 40 steps)."""
    built = []
    real = hessops.Hessian

    def recording(model, loss_fn, data, **kwargs):
        built.append((model, loss_fn, data))
        return real(model, loss_fn, data, **kwargs)

    monkeypatch.setattr(hessops, "Hessian", recording)
    out, plot = tmp_path / "demo" / "result.json", tmp_path / "demo" / "demo.png"
    assert main(["demo", "--out", str(out), "--plot", str(plot), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "demo" and result["settings"]["model"] == "mlp-digits"
    assert len(result["spectrum"]["eigenvalues"]) == 10 and result["test_accuracy"] > 0.9
    assert {"density", "trace", "basin_volume", "sharpness", "grad_norms", "training", "run"} <= set(result)
    assert plot.stat().st_size > FIGURE_BYTES and sorted(p.name for p in plot.parent.iterdir()) == [
        "demo.png",
        "result.json",
    ]
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    (model, loss_fn, data), c = built[-1], result["settings"]["c"]
    model64 = copy.deepcopy(model).double()
    hessian = reference_hessian(model64, loss_fn, as_float64(data))
    exact = torch.linalg.eigvalsh(hessian)
    assert_density_of(result["density"], hessian)
    top = exact[exact.abs().argsort(descending=True)[:10]]
    found = torch.tensor(result["spectrum"]["eigenvalues"], dtype=torch.float64)
    scale = float(exact.abs().max())
    assert torch.allclose(found.sort().values, top.sort().values, rtol=0, atol=1e-5 * scale), (found, top)
    trace = result["trace"]
    assert abs(trace["trace"] - float(exact.sum())) < 3 * trace["std_error"], (trace, float(exact.sum()))
    basin = result["basin_volume"]
    exact_logdet = float(torch.log(exact + c).sum())
    assert abs(2 * basin["half_logdet"] - exact_logdet) < 3 * basin["logdet_std_error"] + 1e-3, (basin, exact_logdet)


@pytest.mark.parametrize(
    "args, message",
    [
        (("eigs", "--data", "mnist", "--data-dir", "{tmp}"), "hessops download mnist"),
        (("eigs", "--device", "cuda"), "CUDA is not available"),
        (("eigs", "--checkpoint", "{tmp}/cnn.pt"), "checkpoint"),
        (("eigs", "--model", "cnn-cifar-5k", "--data", "digits"), "--model cnn-cifar-5k does not take digits's inputs"),
    ],
    ids=["missing-dataset", "no-cuda", "wrong-checkpoint", "model-does-not-take-the-data"],
)
def test_bad_input_found_while_loading_is_one_line_and_keeps_the_old_result(tmp_path, capsys, args, message):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has CUDA")
    torch.save(build_model("cnn-cifar-5k").state_dict(), tmp_path / "cnn.pt")
    old = tmp_path / "old.json"
    old.write_text('{"from": "an earlier run"}\n')
    status = main([*(a.replace("{tmp}", str(tmp_path)) for a in args), "--no-progress", "--out", str(old)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("hessops: error:") and message in lines[0], lines
    assert old.read_text() == '{"from": "an earlier run"}\n'


def _as_a_terminal_foreground_job() -> None:
    # A job started with `&` by a non-interactive shell (as CI runners and `make test &` do) inherits SIGINT as
    # ignored, and Python then installs no KeyboardInterrupt handler, so the SIGINT below would do nothing.
    # A user's Ctrl-C reaches a foreground job, whose SIGINT is at its default: give the child that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_with_one_line(tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hessops",
            "density",
            "--num-probes",
            "50",
            "--lanczos-steps",
            "3000",
            "--dtype",
            "float64",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=_as_a_terminal_foreground_job,
    )
    deadline = time.monotonic() + 3600  # a hang guard only: a loaded machine can take minutes to import torch
    seen = ""
    while "SLQ" not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += process.stderr.read(1)  # wait until it is inside the long loop
    assert "SLQ" in seen, f"the density run never reached its Lanczos loop:\n{seen[-2000:]}"
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=3600)  # the interrupt lands when the running product returns
    finally:
        process.kill()
    assert process.returncode == 130
    assert err.strip().splitlines()[-1].endswith("hessops: interrupted") and "Traceback" not in err


@pytest.mark.parametrize("resume", [False, True], ids=["temporary-basis", "resume"])
def test_sigterm_ends_cleanly_saving_the_checkpoint_and_leaving_no_basis_file(tmp_path, resume):
    """`kill PID` (SIGTERM, also a scheduler's time limit) in the middle of a disk-basis run: one line, exit
    143, no temporary basis file left in TMPDIR (the file, as large as the basis, stayed), and with --resume
    the progress saved, as on Ctrl-C (SIGTERM killed the process before either)."""
    scratch, checkpoint = tmp_path / "tmp", tmp_path / "density.ckpt"
    scratch.mkdir()
    args = ["density", "--num-probes", "4", "--lanczos-steps", "2400", "--dtype", "float64", "--basis", "disk"]
    process = subprocess.Popen(
        [sys.executable, "-m", "hessops", *args, *(["--resume", str(checkpoint)] if resume else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, "TMPDIR": str(scratch)},
    )
    deadline = time.monotonic() + 3600  # a hang guard only: a loaded machine can take minutes to import torch
    seen = ""
    while "SLQ" not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += process.stderr.read(1)  # wait until it is inside the long loop, its basis file made
    assert "SLQ" in seen, f"the density run never reached its Lanczos loop:\n{seen[-2000:]}"
    process.terminate()
    try:
        _, err = process.communicate(timeout=3600)
    finally:
        process.kill()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert list(scratch.iterdir()) == []
    if resume:
        assert f"hessops: terminated: progress saved in {checkpoint}" in last and checkpoint.exists()
    else:
        assert last.endswith("hessops: terminated")


def test_python_dash_m_and_console_script_agree():
    run = hessops_cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"hessops {hessops.__version__}"
    script = Path(sys.executable).parent / "hessops"
    if script.exists():
        assert subprocess.run([str(script), "--version"], capture_output=True, text=True).stdout == run.stdout


def test_hvp_mode_is_validated_and_recorded(tmp_path):
    """--hvp-mode forward-over-reverse is checked against double backward on its first product (the JSON says
    so) and gives the eigenvalues double backward gives (relative 1e-5: float32 products, different roundings)."""
    results = {}
    for mode in ("autograd", "forward-over-reverse"):
        out = tmp_path / f"{mode}.json"
        assert (
            main(["eigs", "--num-examples", "64", "--k", "2", "--hvp-mode", mode, "--out", str(out), "--no-progress"])
            == 0
        )
        results[mode] = json.loads(out.read_text())
    explicit = results["forward-over-reverse"]
    assert explicit["settings"]["hvp_mode"] == "forward-over-reverse" and explicit["verified"] is True
    assert explicit["hvp_tuning"]["single"]["source"] == "explicit"
    assert explicit["hvp_tuning"]["single"]["errors"]["forward-over-reverse"] < 3.5e-3
    for ours, reference in zip(explicit["eigenvalues"], results["autograd"]["eigenvalues"]):
        assert abs(ours - reference) <= 1e-5 * abs(reference)


def test_eigs_of_a_gpt_on_text_against_the_reference_on_the_same_model_and_blocks(tmp_path):
    """`hessops eigs --model gpt:... --data text` against tests/reference.py: the top-2 by magnitude of the float64
    Hessian of the model and blocks the documented recipe builds (GPT under the seed, the first k of the seeded
    permutation), by scipy's ARPACK on the reference's double-backward products (11,712 parameters: a dense
    Hessian would be 1 GB). Each value must lie within the error bound the command reports for it: the bound
    covers the float32 products' rounding (24 eps32 of the inner precision) and Lanczos' residual."""
    import numpy as np
    import scipy.sparse.linalg
    from reference import hessian_product

    from hessops.zoo.lm import GPT, gpt_config
    from hessops.zoo.text import load_text

    out = tmp_path / "eigs.json"
    args = ["--model", "gpt:gpt-bytes-tiny", "--data", "text", "--seq-len", "16", "--num-examples", "8", "--k", "2"]
    assert main(["eigs", *args, "--no-progress", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {k: record["settings"][k] for k in ("model", "data", "seq_len", "num_examples", "split", "which")} == {
        "model": "gpt:gpt-bytes-tiny",
        "data": "text",
        "seq_len": 16,
        "num_examples": 8,
        "split": None,
        "which": "LM",
    }
    torch.manual_seed(0)
    model = GPT(gpt_config("gpt-bytes-tiny")).double().eval()
    blocks = load_text(block_size=16)
    keep = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[:8].tolist()
    data = as_float64(make_loader(torch.utils.data.Subset(blocks, keep), batch_size=128))
    n = sum(p.numel() for p in model.parameters())
    assert record["settings"]["n_params"] == n
    assert record["softmax_head"]["passed"] and record["softmax_head"]["error"] < record["softmax_head"]["tolerance"]

    def product(v):
        return hessian_product(model, next_token_loss, data, torch.from_numpy(np.ravel(v))).numpy()

    operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=product, dtype=np.float64)
    exact = scipy.sparse.linalg.eigsh(operator, k=2, which="LM", tol=1e-12, v0=np.ones(n), return_eigenvectors=False)
    exact = sorted(exact.tolist(), key=abs, reverse=True)
    assert record["converged"]
    for value, bound, truth in zip(record["eigenvalues"], record["error_bounds"], exact):
        assert abs(value - truth) <= bound, (value, truth, bound)


def test_a_broken_hf_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    """hf:FOLDER with a half-downloaded model.safetensors printed a traceback, exit 1; a cut config.json a
    bare JSON error naming no file: one line naming the file and the fix, exit 2 (docs/cli.md's promise)."""
    pytest.importorskip("transformers")
    from hf_checkpoints import BROKEN, broken_checkpoints

    for name, path in broken_checkpoints(tmp_path).items():
        capsys.readouterr()
        status = main(["eigs", "--model", f"hf:{path}", "--seq-len", "6", "--num-examples", "2", "--no-progress"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hessops")]
        assert status == 2 and len(lines) == 1 and lines[0].startswith("hessops: error: "), (name, lines)
        assert all(part in lines[0] for part in BROKEN[name]), (name, lines[0])


def test_hf_model_from_a_config_file_on_a_users_text_file(tmp_path):
    """hf:CONFIG.json (random weights from --seed) on text:PATH, through `hessops blocks`: one block per
    transformer layer and the embeddings, and the token count of the user's file in the settings."""
    pytest.importorskip("transformers")
    config = tmp_path / "config.json"
    sizes = {"n_embd": 8, "n_head": 2, "n_layer": 2, "n_positions": 16, "vocab_size": 256}
    config.write_text(json.dumps({"model_type": "gpt2", **sizes}))
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time, a small model read a short story about curvature. ✓\n", encoding="utf-8")
    out = tmp_path / "blocks.json"
    args = [
        "blocks",
        "--model",
        f"hf:{config}",
        "--data",
        f"text:{text}",
        "--seq-len",
        "16",
        "--k",
        "1",
        "--value-tol",
        "1e-3",
    ]
    assert main([*args, "--hf-override", "n_layer=1", "--no-progress", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    n_bytes = len(text.read_text(encoding="utf-8").encode())
    assert record["settings"]["num_examples"] == -(-n_bytes // 16)  # blocks of 16 bytes, the last one padded
    assert record["settings"]["hf_overrides"] == {"n_layer": 1}
    names = [block["name"] for block in record["blocks"]]
    assert "transformer.h.0" in names and "transformer.h.1" not in names  # the override took
    # each block's top eigenvalue against tests/reference.py's float64 Hessian of that block (its own next-token
    # loss), on the model and text blocks the command builds (value-tol 1e-3 on float32 products: rtol 2e-3)
    from hessops.zoo.lm import load_hf_model
    from hessops.zoo.text import load_text

    model = load_hf_model(str(config), overrides={"n_layer": 1}, seed=0).double().eval()
    data = as_float64(make_loader(load_text(text, block_size=16)))
    tensors = dict(model.named_parameters())
    for block in record["blocks"]:
        params = [tensors[name] for name in block["parameters"]]
        exact = float(torch.linalg.eigvalsh(reference_hessian(model, next_token_loss, data, params=params)).max())
        assert block["eigenvalues"][0] == pytest.approx(exact, rel=2e-3), (block["name"], exact)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--num-examples", "9"), "text:{tmp}/a.txt has 8 blocks of 16 tokens; pass at most 8"),
        (("--seq-len", "65"), "gpt:gpt-bytes-tiny reads at most 64 tokens"),
    ],
    ids=["num-examples-above-blocks", "seq-len-above-context"],
)
def test_text_that_does_not_fit_is_one_line_when_loaded(tmp_path, capsys, args, message):
    (tmp_path / "a.txt").write_text("x" * 128)
    common = ["eigs", "--model", "gpt:gpt-bytes-tiny", "--data", f"text:{tmp_path}/a.txt", "--seq-len", "16"]
    status = main([*common, *args, "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message.replace("{tmp}", str(tmp_path)) in lines[0], lines


def test_vocabulary_that_does_not_cover_the_tokens_is_one_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    overrides = ["n_layer=1", "n_embd=8", "n_head=2", "vocab_size=100"]
    args = ["eigs", "--model", "hf:gpt2", *(x for o in overrides for x in ("--hf-override", o)), "--seq-len", "8"]
    assert main([*args, "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert "hf:gpt2 has a vocabulary of 100 tokens, but text's token ids go up to" in line and "\n" not in line


def test_finite_difference_products_record_their_error_and_keep_their_bounds(tmp_path):
    """--hvp-mode finite-difference: the JSON records the error measured on the first product, and each eigenvalue
    lies within its reported bound of double backward's (eigs adds that error to the bounds)."""
    results = {}
    for mode, extra in (("autograd", []), ("finite-difference", ["--value-tol", "0.01"])):
        out = tmp_path / f"{mode}.json"
        command = ["eigs", "--num-examples", "64", "--k", "2", "--hvp-mode", mode, "--out", str(out), "--no-progress"]
        assert main([*command, *extra]) == 0
        results[mode] = json.loads(out.read_text())
    differences = results["finite-difference"]
    report = differences["finite_difference"]
    assert (
        report["step"] > 0
        and 0 < report["error"] < 0.05
        and report["exact"]
        and results["autograd"]["finite_difference"] is None
    )
    assert differences["converged"]
    for ours, bound, reference in zip(
        differences["eigenvalues"], differences["error_bounds"], results["autograd"]["eigenvalues"]
    ):
        assert bound >= report["error"] * max(map(abs, differences["eigenvalues"])) and abs(ours - reference) <= bound
