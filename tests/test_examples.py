"""The examples in their offline --quick mode, run as a user runs them, checked through their result.json."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import hessops

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_mnist_basin_volume_quick(tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "mnist_basin_volume.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mode"] == "quick" and [r["weight_decay"] for r in result["runs"]] == [0.0, 1e-5]
    for r in result["runs"]:
        assert r["n_params"] == 1710 and r["c"] == pytest.approx(r["weight_decay"] + 4.0)
        exact, slq = r["exact"], r["slq"]
        assert exact["log_unit_ball"] == pytest.approx(hessops.log_unit_ball_volume(1710)) == pytest.approx(-3942.7423, abs=1e-4)
        assert exact["log_threshold_term"] == pytest.approx(855 * math.log(4))
        assert exact["log_volume"] == pytest.approx(exact["log_unit_ball"] + exact["log_threshold_term"] - exact["half_logdet"])
        assert abs(slq["half_logdet"] - exact["half_logdet"]) < 3 * 0.5 * slq["logdet_std_error"] + 0.05
        assert r["smallest_eigenvalue"] + r["c"] > 0
    for tag in ("plain", "wd"):
        assert (tmp_path / f"density_{tag}.png").stat().st_size > 10_000
