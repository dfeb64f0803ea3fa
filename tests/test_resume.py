"""Resumable runs (hessops.checkpoint): interrupted and resumed runs give the bit-identical result of an
uninterrupted one, a checkpoint of another run is refused, Ctrl-C says how to resume, and the command line resumes
after a real SIGKILL."""

from __future__ import annotations

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
from toy_networks import interrupted_at, mlp

import hessops
from hessops.errors import CheckpointMismatchError

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


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
    # A job started with `&` by a non-interactive shell inherits SIGINT as ignored (tests/test_cli.py says more);
    # a user's Ctrl-C reaches a foreground job, whose SIGINT is at its default: give the child that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_after_first_checkpoint(path, *args: str, how: signal.Signals) -> subprocess.Popen:
    """Run the command with ``--resume path`` and send it ``how`` once ``path`` exists (its first checkpoint)."""
    process = _run(*args, "--resume", str(path), "--checkpoint-every", "0.2")
    deadline = time.monotonic() + 600  # importing torch on a loaded machine can take minutes
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(how)
    return process


def test_cli_resumes_after_sigkill_and_ctrl_c(tmp_path):
    """Density runs stopped after their first checkpoint, by SIGKILL and by Ctrl-C (SIGINT: exit status 130 and
    one line saying how to resume), then resumed with --resume, write the same nodes, weights and density, bit
    for bit, as an uninterrupted run."""
    common = ["density", "--num-examples", "200", "--num-probes", "4", "--lanczos-steps", "150", "--grid", "200"]
    common += ["--dtype", "float64", "--no-progress"]
    killed_at, interrupted_at = tmp_path / "killed.ckpt", tmp_path / "interrupted.ckpt"
    killed = _stop_after_first_checkpoint(killed_at, *common, how=signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    interrupted = _stop_after_first_checkpoint(interrupted_at, *common, how=signal.SIGINT)
    _, err = interrupted.communicate(timeout=600)
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
        "uninterrupted": _run(*common, "--out", str(tmp_path / "uninterrupted.json")),
    }
    for process in runs.values():
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    for key in ("nodes", "weights", "density", "grid", "n_matvecs"):
        assert results["killed"][key] == results["interrupted"][key] == results["uninterrupted"][key], key
