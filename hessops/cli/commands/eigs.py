"""``hessops eigs``: Lanczos on the operator; prints each eigenvalue with its residual and error bound."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from hessops.cli import options, output, setup
from hessops.cli.values import count, output_path
from hessops.constants import WHICH

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and operator, how many eigenvalues and where, when Lanczos stops, long runs."""
    outputs = options.common(parser)
    parser.add_argument("--k", type=count(), default=10, help="how many eigenvalues (at each end for --which both)")
    parser.add_argument(
        "--which", choices=WHICH, default=WHICH[0], help="largest magnitude, largest, smallest, or both ends"
    )
    outputs.add_argument(
        "--save-vectors",
        type=output_path(),
        metavar="PATH",
        help="also write the eigenvectors to PATH, reloadable as parameter-shaped dicts "
        "(hessops.load_eigenvectors; `hessops landscape --vectors PATH`) (default: not written)",
    )
    options.stopping(parser, "")
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check runs that find further copies of repeated eigenvalues: one Lanczos run, fewer "
        "products, and 'converged' no longer certifies the k extreme values with multiplicity (default: checked)",
    )
    parser.add_argument(
        "--block-size",
        type=count(),
        default=1,
        help="vectors multiplied per Lanczos step (block Lanczos: pays where a block of products costs little more "
        "than one, as on a GPU a single product leaves idle; default 1)",
    )
    parser.add_argument(
        "--basis-size",
        type=count(),
        help="keep at most this many Lanczos vectors and restart thick when the basis is full (at least k + 2 "
        "blocks; default: as many as the steps, or what fits in memory with --basis auto)",
    )
    options.long_runs(parser)


def check(args: argparse.Namespace) -> str | None:
    """``--k`` and ``--max-iters`` against the model; ``--save-vectors`` a file of its own."""
    problem = options.check_eigenvalue_count(args)
    blocked = args.block_size > 1 or args.basis_size is not None
    if problem is None and blocked and args.resume is not None:
        return "--resume saves single-vector Lanczos runs only: leave out --block-size and --basis-size to resume"
    if problem is None and blocked and args.basis not in ("auto", "device"):
        return f"--block-size and --basis-size keep the basis on the device: --basis {args.basis} cannot be used"
    if problem is None and args.basis_size is not None and args.basis_size < args.k + 2 * args.block_size:
        return f"--basis-size {args.basis_size} is less than --k + 2 x --block-size ({args.k + 2 * args.block_size})"
    if problem is None and args.save_vectors is not None:
        where = os.path.abspath(args.save_vectors)
        same = [
            o for o in ("out", "plot") if getattr(args, o) is not None and os.path.abspath(getattr(args, o)) == where
        ]
        if same:
            return f"--save-vectors and --{same[0]} are the same file {args.save_vectors}: give each its own"
    return problem


def run(args: argparse.Namespace) -> None:
    """Lanczos, the eigenvalues printed; the eigenvectors at ``--save-vectors``."""
    import hessops
    from hessops.plot import plot_eigenvalues

    s = setup.load(args)
    spectrum = hessops.eigs(
        s.op,
        args.k,
        args.which,
        tol=args.tol,
        value_tol=args.value_tol,
        max_iters=args.max_iters,
        seed=args.seed,
        check=not args.no_check,
        progress=not args.no_progress,
        block_size=args.block_size,
        basis_size=args.basis_size,
        **setup.long_run_options(args),
    )
    result = spectrum.to_dict()
    for i, (value, residual, bound) in enumerate(
        zip(result["eigenvalues"], result["residuals"], result["error_bounds"]), 1
    ):
        print(f"λ{i:<3d} = {value: .8g}   ‖Hv − λv‖ = {residual:.2g}   error ≤ {bound:.2g}")
    print(
        f"{result['n_matvecs']} products in {result['seconds']:.2f} s ({result['lanczos_steps']} Lanczos steps, "
        f"{result['check_runs']} check runs), converged: {result['converged']}"
    )
    name = type(s.op).__name__
    what = (
        f"{name} top-{args.k} eigenvalues" if args.which == "LM" else f"{name} eigenvalues ({args.which}, k = {args.k})"
    )

    def draw() -> Figure:
        fig, ax = output.new_figure()
        plot_eigenvalues(result["eigenvalues"], ax=ax, title=output.title(what, s.settings))
        return fig

    settings = output.settings(args, s.settings)
    if args.save_vectors is not None and not getattr(args, "rank", None):  # rank 0 alone writes
        spectrum.save_vectors(args.save_vectors, s.op)
        print(f"wrote {args.save_vectors}")
        settings["save_vectors"] = str(args.save_vectors)
    tuning = {kind: t.to_dict() for kind, t in getattr(s.op, "hvp_tuning", {}).items()}
    head = getattr(s.op, "softmax_head", None)
    differences = getattr(s.op, "finite_difference_report", None)  # hvp_mode="finite-difference": its measured error
    record = result | {
        "hvp_tuning": tuning,
        "softmax_head": head.to_dict() if head is not None else None,
        "finite_difference": differences.to_dict() if differences is not None else None,
    }
    output.emit(args, settings, record, s.op.device, draw)
