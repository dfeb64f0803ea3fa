"""The figures: drawn into a caller's axes or a new figure, saved where asked, with sensible ticks."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from hessops.plot import plot_density, plot_eigenvalues, plot_grad_norms, plot_sharpness


def test_each_plot_draws_into_the_callers_axes_and_leaves_its_figure_open(tmp_path):
    fig, axes = plt.subplots(2, 2)
    grid = np.linspace(-1, 5, 50)
    drawn = [
        plot_eigenvalues([4.0, 2.0, -0.5], ax=axes[0, 0]),
        plot_density(grid, np.exp(-grid**2), top=[4.0], ax=axes[0, 1]),
        plot_sharpness([0, 1, 2], [[3.0], [2.5], [2.0]], unit="epoch", ax=axes[1, 0]),
        plot_grad_norms([1, 2], {"0.weight": [1.0, 0.5], "2.weight": [0.3, 0.2]}, tmp_path / "grid.png", ax=axes[1, 1]),
    ]
    assert all(f is fig for f in drawn)
    assert all(len(ax.lines) >= 1 for ax in axes.flat)
    assert [ax.get_xlabel() for ax in axes.flat] == ["index i (by decreasing magnitude)", "eigenvalue λ", "epoch", "epoch"]
    assert (tmp_path / "grid.png").stat().st_size > 0  # saved ...
    assert plt.fignum_exists(fig.number)  # ... and still the caller's to draw into
    plt.close(fig)


def test_a_figure_of_its_own_is_saved_and_closed(tmp_path):
    fig = plot_eigenvalues([3.0, 1.0], tmp_path / "sub" / "eigs.png")
    assert (tmp_path / "sub" / "eigs.png").stat().st_size > 0
    assert not plt.fignum_exists(fig.number)


def test_eigenvalue_indices_get_whole_number_ticks():
    fig = plot_eigenvalues([5.0, 3.0, 1.0])
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)
