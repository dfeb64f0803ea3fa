"""The demo behind ``hessops demo`` and ``make demo``: everything hessops measures, on the embedded digits."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hessops.data import load_dataset, make_loader
from hessops.density import spectral_density
from hessops.models import build_model, make_loss, model_spec
from hessops.operators import Hessian
from hessops.plot import plot_density, plot_eigenvalues
from hessops.spectrum import eigs
from hessops.trace_estimation import trace
from hessops.tracking import GradNormTracker, SharpnessTracker, train
from hessops.volume import basin_volume

DEMO_MODEL = "mlp-digits"
THRESHOLD = 2.0
PRIOR_C = 1e-4 + 1.0  # weight decay 1e-4 plus a Gaussian prior of std 1: c = λ + 1/s²


def run_demo(out_dir: Path = Path("demo"), *, k: int = 10, epochs: int = 30, seed: int = 0, progress: bool = True) -> dict:
    """Train ``mlp-digits`` on scikit-learn's bundled digits (1,437 training images) with SGD, tracking
    sharpness and gradient norms; then at the solution the top-``k`` Hessian eigenvalues, the spectral
    density, the trace and the log basin volume. Writes four figures to ``out_dir`` and returns the result
    (``hessops demo`` writes it as JSON)."""
    out_dir = Path(out_dir)
    began = time.perf_counter()
    spec = model_spec(DEMO_MODEL)
    model, loss_fn = build_model(DEMO_MODEL, seed=seed), make_loss(spec)
    train_set = load_dataset("digits", train=True)
    test_set = load_dataset("digits", train=False)
    loader = make_loader(train_set, batch_size=128)
    sharpness = SharpnessTracker(model, loss_fn, make_loader(torch.utils.data.Subset(train_set, range(512)), 128), unit="epoch", every=5)
    grad_norms = GradNormTracker(model)
    history = train(model, loss_fn, loader, epochs=epochs, lr=0.1, momentum=0.9, sharpness=sharpness, grad_norms=grad_norms, every=5, progress=progress)
    with torch.no_grad():
        x, y = next(iter(make_loader(test_set, batch_size=len(test_set))))
        test_accuracy = float((model(x).argmax(1) == y).float().mean())
    print(f"trained {DEMO_MODEL} for {epochs} epochs: train loss {history[-1]['loss']:.4f}, test accuracy {test_accuracy:.3f}")

    H = Hessian(model, loss_fn, loader, dtype=torch.float64)
    spectrum = eigs(H, k, "LM", tol=1e-6, seed=seed, progress=progress)
    density = spectral_density(H, num_probes=10, lanczos_steps=60, seed=seed, progress=progress)
    tr = trace(H, probes=60, seed=seed)
    volume = basin_volume(H, threshold=THRESHOLD, c=PRIOR_C, method="slq", probes=20, lanczos_steps=40, seed=seed, progress=progress)
    values = spectrum.values.tolist()
    print(f"Hessian of the mean training loss, n = {H.shape[0]} parameters, {len(train_set)} examples:")
    print("  top eigenvalues: " + ", ".join(f"{v:.5g}" for v in values))
    print(f"  trace {tr.estimate:.5g} ± {tr.std_error:.2g}; log basin volume {volume.log_volume:.2f} ± {0.5 * volume.logdet_std_error:.2g}")

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_eigenvalues(values, out_dir / "eigenvalues.png", title=f"Top-{k} Hessian eigenvalues, {DEMO_MODEL} on digits")
    plot_density(density.grid.tolist(), density.density.tolist(), out_dir / "density.png", top=values[:3], title=f"Hessian spectral density, {DEMO_MODEL} on digits")
    sharpness.plot(out_dir / "sharpness.png")
    grad_norms.plot(out_dir / "grad_norms.png")
    result = {
        "command": "demo",
        "settings": {"model": DEMO_MODEL, "data": "digits", "num_examples": len(train_set), "epochs": epochs, "seed": seed,
                     "n_params": H.shape[0], "dtype": "float64", "threshold": THRESHOLD, "c": PRIOR_C, "torch": torch.__version__},
        "training": history,
        "test_accuracy": test_accuracy,
        "eigenvalues": values,
        "residuals": spectrum.residuals.tolist(),
        "n_matvecs": spectrum.n_matvecs,
        "density": {"grid": density.grid.tolist(), "density": density.density.tolist(), "sigma": density.sigma},
        "trace": {"estimate": tr.estimate, "std_error": tr.std_error, "method": tr.method},
        "basin_volume": {"log_volume": volume.log_volume, "log_unit_ball": volume.log_unit_ball, "log_threshold_term": volume.log_threshold_term,
                         "half_logdet": volume.half_logdet, "logdet_std_error": volume.logdet_std_error, "method": volume.method},
        "sharpness": [{"epoch": r.step, "eigenvalues": r.values} for r in sharpness.history],
        "grad_norms": grad_norms.history,
        "seconds": time.perf_counter() - began,
    }
    print(f"wrote 4 figures in {out_dir}/ ({result['seconds']:.1f} s)")
    return result
