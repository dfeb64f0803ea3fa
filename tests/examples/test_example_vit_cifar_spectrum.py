"""examples/vit_cifar_spectrum.py: its --quick mode run as a user runs it (a timm ViT trained on upsampled
digits; top eigenvalues and SLQ density of its Hessian) and checked through result.json and its figures."""

from __future__ import annotations

import math

import examples_runner
import pytest


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return examples_runner.run_quick("vit_cifar_spectrum", tmp_path_factory.mktemp("vit_quick"))


def test_quick_trains_the_vit_to_a_solution(quick):
    result, out = quick
    assert result["mode"] == "quick" and result["model"] == "vit-micro-cifar" and result["n_params"] == 32_554
    assert (result["train_examples"], result["epochs"], result["batch_size"]) == (500, 30, 50)
    # far below chance (ln 10 = 2.30) on the curvature's images (measured: 0.68, accuracy 0.83)
    assert result["train"]["loss"] < 0.5 * math.log(10) and result["train"]["accuracy"] > 0.5
    for name in ("top_eigenvalues", "density"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


def test_quick_top_eigenvalues_are_converged_and_bound_the_density(quick):
    result, _ = quick
    top, density = result["top"], result["density"]
    values = top["values"]
    assert top["converged"] and top["verified"] and len(values) == 4
    assert values == sorted(values, reverse=True) and values[0] > 0
    # eigs' tol=1e-3 bounds each true residual ‖Hv − λv‖ by 1e-3 · max|λ| (measured: ≤ 0.34 at λ_1 = 995)
    assert max(top["residuals"]) <= 1e-3 * values[0]
    # SLQ's Ritz values lie inside the spectrum; its 30 steps find the top edge (measured: equal to 1e-7)
    largest_node = max(max(nodes) for nodes in density["nodes"])
    assert largest_node <= values[0] * (1 + 1e-4) + top["residuals"][0]
    assert largest_node >= 0.9 * values[0]
    assert density["n_matvecs"] == 3 * 30
    step = density["grid"][1] - density["grid"][0]
    assert abs(sum(density["density"]) * step - 1) < 1e-2  # a density: integrates to one on its grid
