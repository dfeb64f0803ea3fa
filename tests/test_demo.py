"""The demo that `make demo` runs: as a user runs it (subprocess), and checked against the dense truth."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

import hessops

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_script_writes_its_result(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(DEMO), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "λ1 =" in run.stdout and "FutureWarning" not in run.stderr
    result = json.loads(out.read_text())
    assert len(result["eigenvalues"]) == 5 and result["n_params"] == 451
    assert result["eigenvalues"] == sorted(result["eigenvalues"], reverse=True)


def test_demo_eigenvalues_are_the_dense_top_five():
    """float32 Lanczos against eigvalsh of the float64 dense Hessian: 1e-4 relative to λmax (float32)."""
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    top, _, _ = demo.top_eigenvalues(5)
    model, loss_fn, data = demo.trained_problem()
    dense = hessops.Hessian(model, loss_fn, data, dtype=torch.float64).to_dense()
    exact = torch.linalg.eigvalsh(dense).flip(0)[:5]
    torch.testing.assert_close(torch.tensor(top, dtype=torch.float64), exact, rtol=0, atol=1e-4 * float(exact[0]))
