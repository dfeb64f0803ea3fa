"""Figures of spectra, densities, sharpness and gradient norms (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes, bool]:
    """The caller's axes (and their figure), or a new figure of ``figsize`` with one axes; and whether the
    figure is this module's own."""
    if ax is not None:
        return ax.figure, ax, False
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax, True


def _finish(fig: Figure, path: str | Path | None, own: bool) -> Figure:
    """Lay out and save a figure this module made (then close it); a caller's figure is saved as it is and
    left open, since the caller may still be drawing into it."""
    if own:
        fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        if own:
            plt.close(fig)
    return fig


def plot_eigenvalues(
    values: Sequence[float], path: str | Path | None = None, *, title: str = "Top Hessian eigenvalues",
    ax: Axes | None = None,
) -> Figure:
    """Eigenvalue magnitudes by index on a log scale; negative ones in another colour. Draws into ``ax`` when
    given (as do the other ``plot_*`` functions), else into a new figure."""
    values = np.asarray(values, dtype=float)
    fig, ax, own = _axes(ax, (6, 4))
    index = np.arange(1, len(values) + 1)
    positive = values > 0
    ax.semilogy(index[positive], values[positive], "o-", label="λ > 0")
    if (~positive).any():
        ax.semilogy(index[~positive], np.abs(values[~positive]), "s", color="tab:red", label="|λ|, λ < 0")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # an index: no fractional ticks for a few values
    ax.set_xlabel("index i (by decreasing magnitude)")
    ax.set_ylabel("eigenvalue λᵢ (loss units / parameter²)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _finish(fig, path, own)


def plot_density(
    grid: Sequence[float], density: Sequence[float], path: str | Path | None = None, *,
    top: Sequence[float] | None = None, title: str = "Hessian spectral density (SLQ)", ax: Axes | None = None,
) -> Figure:
    """The density on a log scale (floored at 1e-7 of its peak) with the top eigenvalues marked."""
    grid, density = np.asarray(grid, dtype=float), np.asarray(density, dtype=float)
    fig, ax, own = _axes(ax, (6, 4))
    ax.semilogy(grid, np.maximum(density, 1e-7 * density.max()))
    ax.set_ylim(bottom=1e-7 * density.max())
    for i, value in enumerate(top or []):
        ax.axvline(value, color="tab:red", lw=0.8, ls="--", label="top eigenvalues" if i == 0 else None)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (per unit λ)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if top:
        ax.legend()
    return _finish(fig, path, own)


def plot_sharpness(
    steps: Sequence[float], values: Sequence[Sequence[float]], path: str | Path | None = None, *,
    unit: str = "step", title: str = "Sharpness over training", ax: Axes | None = None,
) -> Figure:
    """The top Hessian eigenvalue(s) against training steps or epochs, log scale."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    fig, ax, own = _axes(ax, (6, 4))
    for i in range(values.shape[1]):
        ax.plot(steps, values[:, i], "o-", label=f"λ{i + 1}")
    if (values > 0).all() and values.max() > 10 * values.min():  # log only when it spans a decade
        ax.set_yscale("log")
    ax.set_xlabel(unit)
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _finish(fig, path, own)


def plot_grad_norms(
    epochs: Sequence[float], norms: Mapping[str, Sequence[float]], path: str | Path | None = None, *,
    title: str = "Per-layer gradient norms", ax: Axes | None = None,
) -> Figure:
    """Each layer's mean gradient Frobenius norm per epoch, log scale."""
    fig, ax, own = _axes(ax, (7, 4))
    for name, series in norms.items():
        ax.plot(epochs, series, "o-", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("‖∇θ L‖_F (mean over the epoch's steps)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _finish(fig, path, own)
