"""Figures of spectra, densities, traces, log-volumes, sharpness and gradient norms (matplotlib).

Importing this module changes nothing global: no backend is chosen here (matplotlib's own choice, or the
user's, stands), and pyplot is imported only by the functions that make a new figure. Each function draws
into ``ax`` when given (the caller's figure is saved as it is and left open), else into a new figure that
it closes after saving; each returns the figure and saves it to ``path`` when given (creating the folder).
Titles should name what is shown, of which model, on which data, with how many examples: the defaults
say what is shown, and callers that know the rest (the CLI, the demo) pass it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hessops.errors import InvalidArgumentError

if TYPE_CHECKING:
    from hessops.analysis.blocks import BlockSpectra
    from hessops.analysis.landscape import LandscapeSlice
    from hessops.analysis.logdet import LogdetEstimate
    from hessops.analysis.trace import TraceEstimate
    from hessops.analysis.volume import BasinVolume

__all__ = [
    "plot_eigenvalues",
    "plot_density",
    "plot_trace",
    "plot_log_volume",
    "plot_sharpness",
    "plot_grad_norms",
    "plot_block_spectra",
    "plot_landscape",
]

_LEGEND_INSIDE = 6  # more legend entries than this go outside the axes, beside the data


def _new_figure(figsize: tuple[float, float], ncols: int = 1) -> tuple[Figure, np.ndarray]:
    import matplotlib.pyplot as plt  # only here: importing hessops.plot leaves pyplot (and the backend) alone

    fig, axes = plt.subplots(1, ncols, figsize=figsize, layout="constrained", squeeze=False)
    return fig, axes[0]


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes, bool]:
    """The caller's axes (and their figure), or a new figure of ``figsize`` with one axes; and whether the
    figure is this module's own."""
    if ax is not None:
        return ax.figure, ax, False
    fig, axes = _new_figure(figsize)
    return fig, axes[0], True


def _finish(fig: Figure, path: str | Path | None, own: bool) -> Figure:
    """Save a figure to ``path`` (when given) and close it if it is this module's own; a caller's figure is
    saved as it is and left open, since the caller may still be drawing into it."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight" if own else None)
        if own:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return fig


def _legend(ax: Axes) -> None:
    """A legend where it hides no data: matplotlib's least-covering spot, or beside the axes when long."""
    entries = len(ax.get_legend_handles_labels()[1])
    if entries > _LEGEND_INSIDE:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    elif entries:
        ax.legend(loc="best")


def _integer_ticks(ax: Axes, values: Sequence[float]) -> None:
    """Whole-number ticks on the x-axis when the x values are whole numbers (steps, epochs, indices)."""
    if all(float(v).is_integer() for v in values):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_eigenvalues(
    values: Sequence[float],
    path: str | Path | None = None,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Eigenvalue magnitudes ``|λ_i|`` against their index ``i`` (in the order given), log scale; negative
    eigenvalues in another colour."""
    values = np.asarray(values, dtype=float)
    fig, ax, own = _axes(ax, (6, 4))
    index = np.arange(1, len(values) + 1)
    positive = values > 0
    ax.semilogy(index[positive], values[positive], "o-", label=r"$\lambda_i > 0$")
    if (~positive).any():
        ax.semilogy(
            index[~positive], np.abs(values[~positive]), "s", color="tab:red", label=r"$|\lambda_i|$, $\lambda_i < 0$"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # an index: no fractional ticks for a few values
    ax.set_xlabel(r"index $i$")
    ax.set_ylabel(r"eigenvalue magnitude $|\lambda_i|$")
    ax.set_title(title or f"Top {len(values)} eigenvalues")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return _finish(fig, path, own)


def plot_density(
    grid: Sequence[float],
    density: Sequence[float],
    path: str | Path | None = None,
    *,
    top: Sequence[float] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The spectral density on a log scale (floored at 1e-7 of its peak), with the ``top`` eigenvalues marked."""
    grid, density = np.asarray(grid, dtype=float), np.asarray(density, dtype=float)
    fig, ax, own = _axes(ax, (6, 4))
    floor = 1e-7 * density.max()
    ax.semilogy(grid, np.maximum(density, floor), label="spectral density (SLQ)")
    ax.set_ylim(bottom=floor)
    for i, value in enumerate(top or []):
        ax.axvline(value, color="tab:red", lw=0.8, ls="--", label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel(r"density $\hat\phi(\lambda)$")
    ax.set_title(title or "Spectral density")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return _finish(fig, path, own)


def plot_trace(
    estimate: TraceEstimate,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The running trace estimate against the operator products used (``estimate.history``), with its band of
    ± one standard error, and the final estimate as a dashed line."""
    history = estimate.history
    probes, value = np.asarray(history.probes, dtype=float), np.asarray(history.estimate, dtype=float)
    error = np.asarray(history.std_error, dtype=float)
    fig, ax, own = _axes(ax, (6, 4))
    label = f"running estimate ({estimate.method})"
    ax.plot(probes, value, "o-" if len(probes) < 30 else "-", ms=3, label=label)
    ax.fill_between(probes, value - error, value + error, alpha=0.25, label=r"$\pm$ 1 standard error")
    final = f"{estimate.estimate:.6g} ± {estimate.std_error:.2g}"
    ax.axhline(estimate.estimate, color="k", lw=0.8, ls="--", label=f"final: {final}")
    _integer_ticks(ax, probes)
    ax.set_xlabel("operator products (probes)")
    ax.set_ylabel(r"estimate of $\mathrm{tr}\,A$")
    ax.set_title(title or "Trace estimate")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return _finish(fig, path, own)


def plot_log_volume(
    result: BasinVolume | LogdetEstimate,
    path: str | Path | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Two panels. Left: the terms of the log basin volume as bars, ``log V = log V_n + (n/2) log(2·threshold)
    − ½ log det(H + cI)``, with the error bar of the SLQ estimate (for a ``LogdetEstimate``: the log-determinant
    alone). Right: what the log-determinant comes from, the SLQ spectral density of its quadrature, or the
    histogram of the exact eigenvalues when dense."""
    logdet = getattr(result, "logdet", result)
    fig, (terms, spectrum) = _new_figure((11, 4), ncols=2)
    if logdet is result:
        labels, values, errors = [r"$\log\det A$"], [logdet.estimate], [logdet.std_error]
        operator = r"$A$"
    else:
        damped = rf"H + {result.c:g}\,I" if result.c else "H"
        labels = [
            r"$\log V_n$ (unit ball)",
            rf"$\frac{{n}}{{2}}\log(2 \cdot {result.threshold:g})$",
            rf"$-\frac{{1}}{{2}}\log\det({damped})$",
            r"$\log V$ (basin)",
        ]
        values = [result.log_unit_ball, result.log_threshold_term, -result.half_logdet, result.log_volume]
        errors = [0.0, 0.0, 0.5 * logdet.std_error, 0.5 * logdet.std_error]
        operator = f"${damped}$"
    _bars(terms, labels, values, errors)
    terms.set_title("log-volume terms" if logdet is not result else f"estimate ({logdet.method})")
    if logdet.quadrature is not None:
        grid, density, sigma = logdet.quadrature.density()
        grid, density = grid.numpy(), density.numpy()
        floor = 1e-7 * density.max()
        spectrum.semilogy(grid, np.maximum(density, floor), label=rf"SLQ density, $\sigma$ = {sigma:.2g}")
        spectrum.set_ylim(bottom=floor)
        spectrum.set_ylabel(r"density $\hat\phi(\lambda)$")
    else:
        eigenvalues = logdet.eigenvalues.numpy()
        spectrum.hist(
            eigenvalues,
            bins=min(100, max(10, int(math.sqrt(len(eigenvalues))))),
            log=True,
            label=f"exact eigenvalues (n = {len(eigenvalues):,})",
        )
        spectrum.set_ylabel("count")
    spectrum.set_xlabel(r"eigenvalue $\lambda$ of " + operator)
    spectrum.set_title(f"spectrum of {operator} ({'SLQ' if logdet.quadrature is not None else 'exact'})")
    spectrum.grid(True, which="both", alpha=0.3)
    _legend(spectrum)
    if title is None:
        n = result.n if logdet is not result else None
        title = (
            "Log basin volume" + (f", n = {n:,} parameters" if n else "") if logdet is not result else "Log-determinant"
        )
    fig.suptitle(title)
    return _finish(fig, path, True)


def _bars(ax: Axes, labels: list[str], values: list[float], errors: list[float]) -> None:
    """Horizontal bars, top to bottom, with their values written beside them and error bars where an error is
    known; the last bar (the total, or the only one) in a stronger colour."""
    position = np.arange(len(values))[::-1]
    colors = ["tab:gray"] * (len(values) - 1) + ["tab:blue"]
    errors = [e if e > 0 and math.isfinite(e) else 0.0 for e in errors]
    ax.barh(position, values, height=0.6, color=colors)
    ax.set_ylim(-1, len(values))
    known = [i for i, e in enumerate(errors) if e > 0]
    if known:
        ax.errorbar(
            [values[i] for i in known],
            position[known],
            xerr=[errors[i] for i in known],
            fmt="none",
            ecolor="k",
            capsize=4,
        )
    ax.set_yticks(position, labels)
    ax.axvline(0, color="k", lw=0.8)
    low, high = min(0.0, *(v - e for v, e in zip(values, errors))), max(0.0, *(v + e for v, e in zip(values, errors)))
    room = 0.45 * ((high - low) or 1.0)  # for the numbers written beside the bars
    for y, value, error in zip(position, values, errors):
        text = f"{value:,.2f}" + (f" ± {error:.2g}" if error else "")
        ax.annotate(
            text,
            (value, y),
            xytext=(4 if value >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if value >= 0 else "right",
            va="center",
            fontsize="small",
        )
    ax.set_xlim(low - room if low < 0 else 0.0, high + room if high > 0 else 0.0)
    ax.set_xlabel("nats")
    ax.grid(True, axis="x", alpha=0.3)


def plot_sharpness(
    steps: Sequence[float],
    values: Sequence[Sequence[float]],
    path: str | Path | None = None,
    *,
    unit: str = "step",
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The top eigenvalue(s) against training steps or epochs; log scale when they span a decade."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    fig, ax, own = _axes(ax, (6, 4))
    for i in range(values.shape[1]):
        ax.plot(steps, values[:, i], "o-", label=rf"$\lambda_{{{i + 1}}}$")
    if (values > 0).all() and values.max() > 10 * values.min():
        ax.set_yscale("log")
    _integer_ticks(ax, steps)
    ax.set_xlabel(unit)
    ax.set_ylabel(
        r"top Hessian eigenvalue $\lambda_1$" if values.shape[1] == 1 else r"top Hessian eigenvalues $\lambda_i$"
    )
    ax.set_title(title or "Sharpness over training")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return _finish(fig, path, own)


def plot_grad_norms(
    epochs: Sequence[float],
    norms: Mapping[str, Sequence[float]],
    path: str | Path | None = None,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Each parameter tensor's mean gradient Frobenius norm per epoch, log scale; the legend beside the axes
    when there are many."""
    fig, ax, own = _axes(ax, (7, 4) if len(norms) <= _LEGEND_INSIDE else (9, 4))
    for name, series in norms.items():
        ax.plot(epochs, series, "o-", ms=3, label=name)
    ax.set_yscale("log")
    _integer_ticks(ax, epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$\|\nabla_\theta L\|_F$ (mean over the epoch's steps)")
    ax.set_title(title or "Per-layer gradient norms")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return _finish(fig, path, own)


def plot_block_spectra(
    blocks: BlockSpectra | Mapping[str, Sequence[float]],
    path: str | Path | None = None,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Each parameter group's top eigenvalues (:func:`hessops.block_spectra`, or ``{name: values}`` as in its
    ``to_dict()``) against the group, in order, named on the x-axis: ``λ_1`` of every block joined by a line,
    then ``λ_2``, ...; log scale when all are positive and span a decade. A block with fewer values than the
    others (smaller than ``k``) has gaps."""
    values = {name: np.asarray(v, dtype=float).ravel() for name, v in _block_values(blocks).items()}
    if not values:
        raise InvalidArgumentError(
            "plot_block_spectra: no blocks to draw; pass block_spectra's result or {name: values}"
        )
    names, k = list(values), max(v.size for v in values.values())
    table = np.full((len(names), k), np.nan)
    for row, name in enumerate(names):
        table[row, : values[name].size] = values[name]
    fig, ax, own = _axes(ax, (max(6.0, 0.45 * len(names) + 2), 4.5))
    position = np.arange(len(names))
    for i in range(k):
        ax.plot(position, table[:, i], "o-", ms=4, label=rf"$\lambda_{{{i + 1}}}$")
    finite = table[np.isfinite(table)]
    if (finite > 0).all() and finite.max() > 10 * finite.min():
        ax.set_yscale("log")
    ax.set_xticks(position, names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_xlabel("parameter group (block)")
    ax.set_ylabel(r"eigenvalue $\lambda_i$ of the block")
    ax.set_title(title or f"Top {k} eigenvalues of each block")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return _finish(fig, path, own)


def _block_values(blocks: BlockSpectra | Mapping[str, Sequence[float]]) -> Mapping[str, Sequence[float]]:
    """Each block's eigenvalues by name, from a ``BlockSpectra`` (on the CPU) or a mapping of them."""
    if hasattr(blocks, "spectra"):
        return {name: spectrum.values.cpu() for name, spectrum in blocks.spectra.items()}
    return blocks


def plot_landscape(
    landscape: LandscapeSlice | Mapping,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """A loss-landscape slice (:func:`hessops.loss_landscape`, or its ``to_dict()``). A line: the loss against
    the coordinate, the parameters marked, and the accuracy on a second y-axis for a classifier. A plane: filled
    contours of the loss, with contour lines, a colour bar and the parameters marked at the center. The loss is
    on a log scale (logarithmic contour levels) when positive and spanning more than two decades; points where
    it is not finite are left blank."""
    record = landscape.to_dict() if hasattr(landscape, "to_dict") else landscape
    coordinates = [np.asarray(c, dtype=float) for c in record["coordinates"]]
    loss = np.asarray(record["loss"], dtype=float)
    labels, center = record["labels"], record["center_loss"]
    finite = loss[np.isfinite(loss)]
    logarithmic = finite.size > 0 and finite.min() > 0 and finite.max() > 100 * finite.min()
    fig, ax, own = _axes(ax, (6, 4) if len(coordinates) == 1 else (6, 5))
    if len(coordinates) == 1:
        ax.plot(coordinates[0], loss, "o-", ms=3, label="loss")
        ax.plot([0.0], [center], "*", ms=12, color="tab:red", label="the parameters")
        if logarithmic:
            ax.set_yscale("log")
        ax.set_xlabel(labels[0])
        ax.set_ylabel("loss")
        if record.get("accuracy") is not None:
            right = ax.twinx()
            right.plot(coordinates[0], record["accuracy"], "s--", ms=3, color="tab:green", label="accuracy")
            right.set_ylabel("accuracy", color="tab:green")
            right.set_ylim(-0.02, 1.02)
            (lines, names), (more, more_names) = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
            ax.legend(lines + more, names + more_names, loc="best")  # one legend for both y-axes
        else:
            _legend(ax)
        ax.grid(True, alpha=0.3)
    else:
        a, b = np.meshgrid(coordinates[0], coordinates[1], indexing="ij")
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        levels = np.geomspace(low, high, 25) if logarithmic else np.linspace(low, high if high > low else low + 1, 25)
        masked = np.ma.masked_invalid(loss)
        filled = ax.contourf(a, b, masked, levels=levels, cmap="viridis", norm=LogNorm() if logarithmic else None)
        ax.contour(a, b, masked, levels=levels[::3], colors="white", linewidths=0.5, alpha=0.6)
        ax.plot([0.0], [0.0], "*", ms=14, color="tab:red", label=f"the parameters (loss {center:.4g})")
        fig.colorbar(filled, ax=ax, label="loss", ticks=levels[::4], format="%.3g")
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.legend(loc="upper right", fontsize="small")
    ax.set_title(title or f"Loss landscape along {record['directions']} directions")
    return _finish(fig, path, own)
