"""The demo behind ``hessops demo`` and ``make demo``: everything hessops measures, on the embedded digits.

Torch-free at import (the command line checks ``--k`` against :data:`DEMO_MODEL`'s size before loading
anything); :func:`run_demo` imports what it runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hessops.analysis.density import SpectralDensity
    from hessops.analysis.spectrum import Spectrum
    from hessops.analysis.trace import TraceEstimate
    from hessops.analysis.tracking import GradNormTracker, SharpnessTracker
    from hessops.analysis.volume import BasinVolume

DEMO_MODEL = "mlp-digits"
THRESHOLD = 2.0
PRIOR_C = 1e-4 + 1.0  # weight decay 1e-4 plus a Gaussian prior of std 1: c = λ + 1/s²


@dataclass
class DemoResult:
    """What :func:`run_demo` measured: the training and, at its solution, the Hessian's spectrum, density,
    trace and basin volume."""

    settings: dict
    training: list[dict]
    test_accuracy: float
    spectrum: Spectrum
    density: SpectralDensity
    trace: TraceEstimate
    basin_volume: BasinVolume
    sharpness: SharpnessTracker
    grad_norms: GradNormTracker
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each result's own ``to_dict()``, the training history and the trackers' records."""
        return {
            "training": self.training,
            "test_accuracy": self.test_accuracy,
            "spectrum": self.spectrum.to_dict(),
            "density": self.density.to_dict(),
            "trace": self.trace.to_dict(),
            "basin_volume": self.basin_volume.to_dict(),
            "sharpness": [asdict(record) for record in self.sharpness.history],
            "grad_norms": self.grad_norms.history,
            "seconds": self.seconds,
        }

    def figure(self) -> Figure:
        """One figure, four panels: the top eigenvalues, the spectral density, the sharpness and the gradient
        norms during training."""
        from matplotlib.figure import Figure

        from hessops.plot import plot_density, plot_eigenvalues

        fig = Figure(figsize=(13, 9), layout="constrained")
        (eigenvalues, density), (sharpness, grad_norms) = fig.subplots(2, 2)
        values = self.spectrum.values.tolist()
        plot_eigenvalues(values, ax=eigenvalues, title=f"Top-{len(values)} Hessian eigenvalues at the solution")
        plot_density(
            self.density.grid.tolist(),
            self.density.density.tolist(),
            ax=density,
            top=values[:3],
            title="Hessian spectral density at the solution (SLQ)",
        )
        self.sharpness.plot(ax=sharpness, title="Sharpness (top Hessian eigenvalue) during training")
        self.grad_norms.plot(ax=grad_norms, title="Per-layer gradient norms during training")
        settings = self.settings
        fig.suptitle(f"hessops demo: {settings['model']} on {settings['data']}, N = {settings['num_examples']:,}")
        return fig


def run_demo(*, k: int = 10, epochs: int = 30, seed: int = 0, progress: bool = True) -> DemoResult:
    """Train ``mlp-digits`` on scikit-learn's bundled digits (1,437 training images) with SGD, tracking
    sharpness and gradient norms; then at the solution the top-``k`` Hessian eigenvalues, the spectral
    density, the trace and the log basin volume. Prints a summary; ``hessops demo`` writes the result's
    ``to_dict()`` as JSON and its ``figure()``."""
    import torch

    from hessops import GradNormTracker, Hessian, SharpnessTracker, basin_volume, eigs, spectral_density, trace, train
    from hessops.zoo.data import load_dataset, make_loader
    from hessops.zoo.models import build_model, make_loss, model_spec

    began = time.perf_counter()
    spec = model_spec(DEMO_MODEL)
    model, loss_fn = build_model(DEMO_MODEL, seed=seed), make_loss(spec)
    train_set = load_dataset("digits", train=True)
    test_set = load_dataset("digits", train=False)
    loader = make_loader(train_set, batch_size=128)
    fixed = make_loader(torch.utils.data.Subset(train_set, range(512)), 128)
    sharpness = SharpnessTracker(model, loss_fn, fixed, unit="epoch", every=5)
    grad_norms = GradNormTracker(model)
    history = train(
        model,
        loss_fn,
        loader,
        epochs=epochs,
        lr=0.1,
        momentum=0.9,
        sharpness=sharpness,
        grad_norms=grad_norms,
        every=5,
        progress=progress,
    )
    with torch.no_grad():
        x, y = next(iter(make_loader(test_set, batch_size=len(test_set))))
        test_accuracy = float((model(x).argmax(1) == y).float().mean())
    print(
        f"trained {DEMO_MODEL} for {epochs} epochs: train loss {history[-1]['loss']:.4f}, "
        f"test accuracy {test_accuracy:.3f}"
    )

    H = Hessian(model, loss_fn, loader, dtype=torch.float64)
    spectrum = eigs(H, k, "LM", tol=1e-6, seed=seed, progress=progress)
    density = spectral_density(H, num_probes=10, lanczos_steps=60, seed=seed, progress=progress)
    tr = trace(H, probes=60, seed=seed)
    volume = basin_volume(
        H, threshold=THRESHOLD, c=PRIOR_C, method="slq", probes=20, lanczos_steps=40, seed=seed, progress=progress
    )
    print(f"Hessian of the mean training loss, n = {H.shape[0]} parameters, {len(train_set)} examples:")
    print("  top eigenvalues: " + ", ".join(f"{v:.5g}" for v in spectrum.values.tolist()))
    print(
        f"  trace {tr.estimate:.5g} ± {tr.std_error:.2g}; "
        f"log basin volume {volume.log_volume:.2f} ± {0.5 * volume.logdet_std_error:.2g}"
    )
    settings = {
        "model": DEMO_MODEL,
        "data": "digits",
        "split": "train",
        "num_examples": len(train_set),
        "epochs": epochs,
        "k": k,
        "seed": seed,
        "n_params": H.shape[0],
        "dtype": "float64",
        "threshold": THRESHOLD,
        "c": PRIOR_C,
    }
    return DemoResult(
        settings,
        history,
        test_accuracy,
        spectrum,
        density,
        tr,
        volume,
        sharpness,
        grad_norms,
        time.perf_counter() - began,
    )
