"""The figures: drawn into a caller's axes or a new figure, saved where asked, with whole-number ticks for
counts, rendered math in labels, legends beside the data rather than over it, and no global side effect
at import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import cola
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes

import hessops
from hessops.plot import plot_density, plot_eigenvalues, plot_grad_norms, plot_log_volume, plot_sharpness, plot_trace


def data_under_legend(ax: Axes) -> int:
    """How many data points of the axes' lines (in data coordinates) the legend box covers."""
    ax.figure.canvas.draw()
    box = ax.get_legend().get_window_extent()
    covered = 0
    for line in ax.lines:
        if line.get_transform() != ax.transData:  # axhline/axvline span the axes, not data points
            continue
        points = ax.transData.transform(line.get_xydata())
        inside = (
            (box.x0 <= points[:, 0]) & (points[:, 0] <= box.x1) & (box.y0 <= points[:, 1]) & (points[:, 1] <= box.y1)
        )
        covered += int(inside.sum())
    return covered


def whole_ticks(ax: Axes) -> bool:
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


@pytest.fixture(scope="module")
def operator():
    """A dense SPD operator with a spiked spectrum (n = 60), small enough for the exact answers."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=g))
    eigenvalues = torch.cat(
        [torch.tensor([40.0, 20.0, 10.0], dtype=torch.float64), torch.linspace(0.5, 2.0, 57, dtype=torch.float64)]
    )
    return cola.SelfAdjoint(cola.ops.Dense(Q @ torch.diag(eigenvalues) @ Q.T))


def test_importing_hessops_plot_leaves_the_backend_and_pyplot_alone(tmp_path):
    """A user's backend (svg here) stays chosen, pyplot stays unimported until a figure is made, and saving a
    PNG works under any backend (it goes through the Figure, not pyplot's current canvas)."""
    script = textwrap.dedent(
        f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        import hessops.plot
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert "matplotlib.pyplot" not in sys.modules and "torch" not in sys.modules
        hessops.plot.plot_eigenvalues([3.0, 1.0], {str(tmp_path / "eigs.png")!r})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    assert (tmp_path / "eigs.png").read_bytes()[:4] == b"\x89PNG"


def test_each_plot_draws_into_the_callers_axes_and_leaves_its_figure_open(tmp_path, operator):
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    grid = np.linspace(-1, 5, 50)
    drawn = [
        plot_eigenvalues([4.0, 2.0, -0.5], ax=axes[0, 0]),
        plot_density(grid, np.exp(-(grid**2)), top=[4.0], ax=axes[0, 1]),
        plot_trace(hessops.trace(operator, probes=12, method="hutchinson"), ax=axes[0, 2]),
        plot_sharpness([0, 1, 2], [[3.0], [2.5], [2.0]], unit="epoch", ax=axes[1, 0]),
        plot_grad_norms([1, 2], {"0.weight": [1.0, 0.5], "2.weight": [0.3, 0.2]}, tmp_path / "grid.png", ax=axes[1, 1]),
    ]
    assert all(f is fig for f in drawn)
    assert all(len(ax.lines) >= 1 for ax in axes.flat[:5])
    assert [ax.get_xlabel() for ax in axes.flat[:5]] == [
        r"index $i$",
        r"eigenvalue $\lambda$",
        "operator products (probes)",
        "epoch",
        "epoch",
    ]
    assert (tmp_path / "grid.png").stat().st_size > 0  # saved ...
    assert plt.fignum_exists(fig.number)  # ... and still the caller's to draw into
    plt.close(fig)


def test_a_figure_of_its_own_is_saved_and_closed(tmp_path):
    fig = plot_eigenvalues([3.0, 1.0], tmp_path / "sub" / "eigs.png")
    assert (tmp_path / "sub" / "eigs.png").stat().st_size > 0
    assert not plt.fignum_exists(fig.number)


def test_counts_get_whole_number_ticks_and_labels_render_math():
    """Indices, steps and epochs are whole numbers: no 2.5 on their axes. Labels with $…$ are mathtext, which
    drawing parses (a malformed expression raises)."""
    figures = [
        plot_eigenvalues([5.0, 3.0, 1.0]),
        plot_sharpness([0, 5, 10], [[3.0, 1.0], [2.5, 1.2], [2.0, 1.1]], unit="epoch"),
        plot_grad_norms([1, 2, 3], {"0.weight": [1.0, 0.5, 0.4]}),
    ]
    for fig in figures:
        ax = fig.axes[0]
        assert whole_ticks(ax)
        assert "$" in ax.get_ylabel()
        plt.close(fig)
    fig = plot_sharpness([0.0, 0.5, 1.0], [[1.0], [2.0], [3.0]])  # fractional epochs keep fractional ticks
    fig.canvas.draw()
    assert any(not float(t).is_integer() for t in fig.axes[0].get_xticks())
    plt.close(fig)


def test_legends_label_what_they_show_and_cover_no_data():
    rising = np.linspace(1.0, 10.0, 30)
    sharp = plot_sharpness(list(range(30)), np.stack([rising, rising / 2], 1))
    assert [t.get_text() for t in sharp.axes[0].get_legend().get_texts()] == [r"$\lambda_{1}$", r"$\lambda_{2}$"]
    eigen = plot_eigenvalues([9.0, 5.0, -3.0, 1.0])
    assert [t.get_text() for t in eigen.axes[0].get_legend().get_texts()] == [
        r"$\lambda_i > 0$",
        r"$|\lambda_i|$, $\lambda_i < 0$",
    ]
    many = plot_grad_norms(
        list(range(1, 11)), {f"{i}.weight": list(np.geomspace(1, 0.1, 10) * (i + 1)) for i in range(9)}
    )
    for fig in (sharp, eigen, many):
        assert data_under_legend(fig.axes[0]) == 0
        plt.close(fig)


def test_plot_trace_draws_the_running_estimate_and_its_band(operator):
    estimate = hessops.trace(operator, probes=30, method="hutch++", seed=1)
    fig = plot_trace(estimate, title="Trace, a test operator")
    ax = fig.axes[0]
    line = ax.lines[0]
    assert line.get_xdata().tolist() == estimate.history.probes
    assert line.get_ydata().tolist() == estimate.history.estimate
    band = ax.collections[0].get_paths()[0].vertices  # the ± one-standard-error band around the estimate
    assert band[:, 1].max() == pytest.approx(
        max(e + s for e, s in zip(estimate.history.estimate, estimate.history.std_error))
    )
    assert ax.get_title() == "Trace, a test operator" and whole_ticks(ax)
    assert any("final" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)


@pytest.mark.parametrize("method", ["dense", "slq"])
def test_plot_log_volume_shows_the_terms_and_the_spectrum(tmp_path, operator, method):
    volume = hessops.basin_volume(operator, threshold=2.0, c=0.1, method=method, probes=4, lanczos_steps=30)
    fig = plot_log_volume(volume, tmp_path / "basin.png", title="Log basin volume, a test operator")
    assert (tmp_path / "basin.png").stat().st_size > 0
    terms, spectrum = fig.axes
    widths = [patch.get_width() for patch in terms.patches]
    expected = [volume.log_unit_ball, volume.log_threshold_term, -volume.half_logdet, volume.log_volume]
    assert widths == pytest.approx(expected, rel=1e-12)
    assert fig._suptitle.get_text() == "Log basin volume, a test operator"
    if method == "dense":  # the histogram of the exact eigenvalues: every one of the 60 counted
        assert sum(patch.get_height() for patch in spectrum.patches) == 60
    else:
        assert len(spectrum.lines) == 1 and "SLQ" in spectrum.get_legend().get_texts()[0].get_text()
    estimate = hessops.logdet(hessops.Regularized(operator, 0.1), method=method, probes=4, lanczos_steps=30)
    fig = plot_log_volume(estimate)
    assert [patch.get_width() for patch in fig.axes[0].patches] == pytest.approx([estimate.estimate], rel=1e-12)
    plt.close("all")
