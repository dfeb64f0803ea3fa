"""The ``hessops`` command: ``hessops eigs|density|trace|logdet|basin|track|demo|download``.

Every command prints a short summary, writes ``--out`` JSON (keys documented in docs/cli.md) and ``--plot``
figures, shows tqdm bars on long steps, and exits non-zero with a one-line reason on bad input. Ctrl-C ends
it with one line, exit status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from hessops import __version__
from hessops.errors import HessopsError
from hessops.operators.hessian import HVP_MODES

OPERATORS = ("hessian", "ggn", "ef", "mcfisher")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CommandError(Exception):
    """A bad command line: reported in one line, exit status 2."""


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default="mlp-digits", help="a zoo name (see `hessops models`), or timm:NAME")
    group.add_argument("--checkpoint", type=Path, help="a state_dict file to load into the model (else: init from --seed)")
    group.add_argument("--data", help="digits (embedded), mnist, cifar10 or cifar2; default: the model's")
    group.add_argument("--data-dir", type=Path, default=Path("data"), help="where datasets are (default: ./data)")
    group.add_argument("--test-split", action="store_true", help="use the test split instead of the training split")
    group.add_argument("--num-examples", type=int, help="a deterministic subset of this many examples (by --seed)")
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--operator", choices=OPERATORS, default="hessian")
    group.add_argument("--hvp-mode", choices=HVP_MODES, default="auto",
                       help="the Hessian-vector product formulation (--operator hessian); auto: validated against double backward")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the operator's dtype")
    group.add_argument("--seed", type=int, default=0, help="model init, data subset and probe vectors")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help="write the result as JSON here")
    out.add_argument("--plot", type=Path, help="write the figure here (PNG)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    par = parser.add_argument_group("data-parallel (torch.distributed)")
    par.add_argument("--distributed", action="store_true",
                     help="shard the data over the processes torchrun started (automatic when WORLD_SIZE > 1)")
    par.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for the others before failing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hessops", description="Curvature of neural networks: spectra, densities, traces, volumes.")
    parser.add_argument("--version", action="version", version=f"hessops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eigs", help="extreme eigenvalues by Lanczos")
    _common(p)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--which", choices=("LM", "LA", "SA", "both"), default="LM")
    p.add_argument("--tol", type=float, default=1e-5, help="residual tolerance relative to max |λ|")
    p.add_argument("--value-tol", type=float, help="stop on eigenvalue error bounds instead (relative to max |λ|)")
    p.add_argument("--max-iters", type=int)

    p = sub.add_parser("density", help="spectral density by stochastic Lanczos quadrature")
    _common(p)
    p.add_argument("--num-probes", type=int, default=10)
    p.add_argument("--lanczos-steps", type=int, default=80)
    p.add_argument("--sigma", type=float, help="Gaussian broadening (default: 1%% of the spectrum's span)")
    p.add_argument("--grid", type=int, default=1000, help="number of grid points")

    p = sub.add_parser("trace", help="trace by Hutch++ or Hutchinson")
    _common(p)
    p.add_argument("--probes", type=int, default=100)
    p.add_argument("--method", choices=("hutch++", "hutchinson"), default="hutch++")

    for name, help_text in (("logdet", "log det(op + c·I)"), ("basin", "log basin volume {δ: ½δᵀ(H+cI)δ ≤ threshold}")):
        p = sub.add_parser(name, help=help_text)
        _common(p)
        p.add_argument("--c", type=float, default=0.0 if name == "basin" else 1e-3, help="the multiple of I added")
        p.add_argument("--method", choices=("auto", "dense", "slq"), default="auto")
        p.add_argument("--probes", type=int, default=30)
        p.add_argument("--lanczos-steps", type=int, default=50)
        if name == "basin":
            p.add_argument("--threshold", type=float, default=2.0, help="the loss increase that bounds the basin")

    p = sub.add_parser("track", help="train with SGD, tracking sharpness and per-layer gradient norms")
    _common(p)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--every", type=int, default=1, help="measure sharpness every this many epochs")
    p.add_argument("--sharpness-examples", type=int, default=256, help="fixed subset the sharpness is measured on")

    p = sub.add_parser("demo", help="train a small net on the embedded digits, then spectrum, density, trace, basin")
    p.add_argument("--out", type=Path, default=Path("demo/result.json"))
    p.add_argument("--plot", type=Path, default=Path("demo"), help="the folder for the figures")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("download", help="fetch a dataset through torchvision (needs the network)")
    p.add_argument("name", choices=("mnist", "cifar10", "cifar2"))
    p.add_argument("--data-dir", type=Path, default=Path("data"))

    sub.add_parser("models", help="list the model zoo")
    return parser


# -- set-up shared by the commands ------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


@dataclass
class Setup:
    model: torch.nn.Module
    loss_fn: Any
    dataset: torch.utils.data.Dataset
    loader: Any
    op: Any
    settings: dict


def _setup(args: argparse.Namespace) -> Setup:
    """Model (with checkpoint), loss, loader on the device, and the operator the command asked for."""
    import hessops
    from hessops.data import load_dataset, make_loader, on_device
    from hessops.models import build_model, load_checkpoint, make_loss, model_spec

    device = _device(args.device)
    if getattr(args, "rank", None) is not None:
        device = args.rank_device
    spec = model_spec(args.model)
    model = build_model(args.model, seed=args.seed)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    model = model.to(device).eval()
    data_name = args.data or spec.default_data
    if data_name is None or data_name == "imagenet":
        raise CommandError(f"--model {args.model} has no dataset hessops can load by default: pass --data (digits, mnist, cifar10, cifar2)")
    # The model's own normalization where it was trained on this data (resnet18_cifar10's checkpoint differs).
    normalization = {"mean": spec.mean, "std": spec.std} if data_name == spec.default_data and spec.mean else {}
    dataset = load_dataset(data_name, data_dir=args.data_dir, train=not args.test_split, num_examples=args.num_examples, seed=args.seed, **normalization)
    total_examples = len(dataset)
    if getattr(args, "rank", None) is not None:
        from hessops.distributed import shard

        dataset = shard(dataset)  # this rank's contiguous part; the operator sums over all ranks
    loader = on_device(make_loader(dataset, batch_size=args.batch_size), device)
    loss_fn = make_loss(spec)
    kwargs = dict(dtype=DTYPES[args.dtype], progress=not args.no_progress)
    cls = {"hessian": hessops.Hessian, "ggn": hessops.GGN, "ef": hessops.EmpiricalFisher, "mcfisher": hessops.MCFisher}[args.operator]
    if args.operator == "mcfisher":
        kwargs["seed"] = args.seed
    if args.operator == "hessian":
        kwargs["hvp_mode"] = args.hvp_mode
    op = cls(model, loss_fn, loader, **kwargs)
    settings = {
        "model": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None, "data": data_name,
        "split": "test" if args.test_split else "train", "num_examples": total_examples, "batch_size": args.batch_size,
        "operator": args.operator, "hvp_mode": args.hvp_mode if args.operator == "hessian" else None, "device": str(op.device), "dtype": args.dtype, "seed": args.seed, "n_params": op.shape[0],
        "torch": torch.__version__, "hessops": __version__, "world_size": getattr(args, "world_size", 1),
    }
    return Setup(model, loss_fn, dataset, loader, op, settings)


def _write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


def _plotted(path: Path | None) -> None:
    if path is not None:
        print(f"wrote {path}")


# -- the commands -----------------------------------------------------------------------------------------
def cmd_eigs(args: argparse.Namespace) -> dict:
    from hessops.plot import plot_eigenvalues
    from hessops.spectrum import eigs

    setup = _setup(args)
    op, settings = setup.op, setup.settings
    s = eigs(
        op, args.k, args.which, tol=args.tol, value_tol=args.value_tol, max_iters=args.max_iters, seed=args.seed,
        progress=not args.no_progress,
    )
    for i, (value, residual, bound) in enumerate(zip(s.values.tolist(), s.residuals.tolist(), s.error_bounds.tolist()), 1):
        print(f"λ{i:<3d} = {value: .8g}   ‖Hv − λv‖ = {residual:.2g}   error ≤ {bound:.2g}")
    print(f"{s.n_matvecs} products in {s.seconds:.2f} s ({s.steps} Lanczos steps), converged: {s.converged}")
    if args.plot:
        plot_eigenvalues(s.values.tolist(), args.plot, title=f"{args.operator} eigenvalues ({args.which}), {args.model}")
        _plotted(args.plot)
    return {
        "command": "eigs", "settings": settings | {"k": args.k, "which": args.which, "tol": args.tol, "value_tol": args.value_tol},
        "eigenvalues": s.values.tolist(), "residuals": s.residuals.tolist(), "error_bounds": s.error_bounds.tolist(),
        "n_matvecs": s.n_matvecs,
        "lanczos_steps": s.steps, "converged": s.converged, "verified": s.verified, "seconds": s.seconds,
        "hvp_tuning": _hvp_tuning(op),
    }


def cmd_density(args: argparse.Namespace) -> dict:
    from hessops.density import spectral_density
    from hessops.plot import plot_density

    setup = _setup(args)
    op, settings = setup.op, setup.settings
    d = spectral_density(op, num_probes=args.num_probes, lanczos_steps=args.lanczos_steps, grid=args.grid, sigma=args.sigma, seed=args.seed, progress=not args.no_progress)
    top = d.quadrature.nodes.max(1).values.mean().item()
    print(f"density on [{d.grid[0]:.4g}, {d.grid[-1]:.4g}], σ = {d.sigma:.3g}; mean eigenvalue {d.quadrature.moment(1):.6g}; "
          f"{d.quadrature.n_matvecs} products in {d.seconds:.2f} s")
    if args.plot:
        plot_density(d.grid.tolist(), d.density.tolist(), args.plot, top=[top], title=f"{args.operator} spectral density, {args.model}")
        _plotted(args.plot)
    return {
        "command": "density", "settings": settings | {"num_probes": args.num_probes, "lanczos_steps": args.lanczos_steps},
        "grid": d.grid.tolist(), "density": d.density.tolist(), "sigma": d.sigma,
        "moments": {"mean": d.quadrature.moment(1), "second": d.quadrature.moment(2)},
        "nodes": d.quadrature.nodes.tolist(), "weights": d.quadrature.weights.tolist(),
        "n_matvecs": d.quadrature.n_matvecs, "seconds": d.seconds,
    }


def cmd_trace(args: argparse.Namespace) -> dict:
    from hessops.trace_estimation import trace

    setup = _setup(args)
    op, settings = setup.op, setup.settings
    t = trace(op, probes=args.probes, method=args.method, seed=args.seed)
    print(f"trace = {t.estimate:.8g} ± {t.std_error:.2g} ({t.method}, {t.n_matvecs} products, {t.seconds:.2f} s)")
    return {
        "command": "trace", "settings": settings | {"probes": args.probes, "method": args.method},
        "trace": t.estimate, "std_error": t.std_error, "n_matvecs": t.n_matvecs, "seconds": t.seconds,
    }


def cmd_logdet(args: argparse.Namespace) -> dict:
    import hessops
    from hessops.volume import logdet

    setup = _setup(args)
    op, settings = setup.op, setup.settings
    began = time.perf_counter()
    r = logdet(hessops.Regularized(op, args.c), method=args.method, probes=args.probes, lanczos_steps=args.lanczos_steps, seed=args.seed, progress=not args.no_progress)
    print(f"log det({args.operator} + {args.c:g}·I) = {r.estimate:.8g} ± {r.std_error:.2g} ({r.method}, {r.n_matvecs} products)")
    return {
        "command": "logdet", "settings": settings | {"c": args.c, "method": args.method, "probes": args.probes, "lanczos_steps": args.lanczos_steps},
        "logdet": r.estimate, "std_error": r.std_error, "method": r.method, "n_matvecs": r.n_matvecs, "seconds": time.perf_counter() - began,
    }


def cmd_basin(args: argparse.Namespace) -> dict:
    from hessops.volume import basin_volume

    setup = _setup(args)
    op, settings = setup.op, setup.settings
    began = time.perf_counter()
    b = basin_volume(op, threshold=args.threshold, c=args.c, method=args.method, probes=args.probes, lanczos_steps=args.lanczos_steps, seed=args.seed, progress=not args.no_progress)
    print(f"log V = {b.log_volume:.6f}  (log unit ball {b.log_unit_ball:.6f} + threshold term {b.log_threshold_term:.6f} "
          f"− ½ logdet {b.half_logdet:.6f} ± {0.5 * b.logdet_std_error:.2g}; n = {b.n}, {b.method})")
    return {
        "command": "basin", "settings": settings | {"threshold": args.threshold, "c": args.c, "method": args.method},
        "log_volume": b.log_volume, "log_unit_ball": b.log_unit_ball, "log_threshold_term": b.log_threshold_term,
        "half_logdet": b.half_logdet, "logdet_std_error": b.logdet_std_error, "n": b.n, "method": b.method,
        "seconds": time.perf_counter() - began,
    }


def cmd_track(args: argparse.Namespace) -> dict:
    from hessops.data import make_loader, on_device
    from hessops.tracking import GradNormTracker, SharpnessTracker, train

    setup = _setup(args)
    model, loss_fn, loader, op, settings, dataset = setup.model, setup.loss_fn, setup.loader, setup.op, setup.settings, setup.dataset
    subset = torch.utils.data.Subset(dataset, range(min(args.sharpness_examples, len(dataset))))
    fixed = on_device(make_loader(subset, batch_size=args.batch_size), op.device)
    sharpness = SharpnessTracker(model, loss_fn, fixed, unit="epoch", dtype=op.dtype)
    grad_norms = GradNormTracker(model)
    history = train(model, loss_fn, loader, epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                    sharpness=sharpness, grad_norms=grad_norms, every=args.every, progress=not args.no_progress)
    for record in sharpness.history:
        print(f"epoch {record.step:3d}: sharpness {record.values[0]:.6g}")
    if args.plot:
        sharpness.plot(args.plot)
        grads = args.plot.with_name(args.plot.stem + "_grad_norms" + args.plot.suffix)
        grad_norms.plot(grads)
        _plotted(args.plot)
        _plotted(grads)
    return {
        "command": "track", "settings": settings | {"epochs": args.epochs, "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay},
        "training": history,
        "sharpness": [{"epoch": r.step, "eigenvalues": r.values, "residuals": r.residuals, "n_matvecs": r.n_matvecs} for r in sharpness.history],
        "grad_norms": grad_norms.history,
    }


def cmd_demo(args: argparse.Namespace) -> dict:
    from hessops.demo import run_demo

    return run_demo(out_dir=args.plot, k=args.k, seed=args.seed, progress=not args.no_progress)


def cmd_download(args: argparse.Namespace) -> dict:
    from hessops.data import download_dataset

    path = download_dataset(args.name, args.data_dir)
    print(f"{args.name} is in {path}")
    return {}


def cmd_models(args: argparse.Namespace) -> dict:
    from hessops.models import MODEL_NAMES, model_spec

    for name in MODEL_NAMES:
        spec = model_spec(name)
        print(f"{name:18s} input {tuple(spec.input_shape)}, {spec.num_classes} classes, data {spec.default_data}")
    print("timm:NAME          any timm model (pip install 'hessops[zoo]')")
    return {}


COMMANDS = {
    "eigs": cmd_eigs, "density": cmd_density, "trace": cmd_trace, "logdet": cmd_logdet, "basin": cmd_basin,
    "track": cmd_track, "demo": cmd_demo, "download": cmd_download, "models": cmd_models,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    import os

    args = build_parser().parse_args(argv)
    args.rank = None
    try:
        if hasattr(args, "distributed") and (args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            _start_distributed(args)
        result = COMMANDS[args.command](args)
        if result and getattr(args, "out", None) is not None and not args.rank:
            _write(args, _finite(result))
        return 0
    except KeyboardInterrupt:
        print("hessops: interrupted", file=sys.stderr)
        return 130
    except (HessopsError, CommandError, FileNotFoundError) as error:
        print(f"hessops: error: {error}", file=sys.stderr)
        return 2
    finally:
        if args.rank is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _start_distributed(args: argparse.Namespace) -> None:
    """Join the process group torchrun set up; only rank 0 prints, shows progress and writes files."""
    import io

    from hessops.distributed import init_from_environment

    _device(args.device)
    args.rank, args.world_size, args.rank_device = init_from_environment(args.device, args.timeout)
    if args.rank != 0:
        args.no_progress = True
        args.plot = None
        sys.stdout = io.StringIO()  # ranks other than 0 compute in silence


def _hvp_tuning(op: Any) -> dict:
    """What the Hessian's formulation tuner did, per kind of product (empty for other operators)."""
    return {kind: tuning.to_dict() for kind, tuning in getattr(op, "hvp_tuning", {}).items()}


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
