"""``hessops basin``: the log volume of the quadratic basin {δ: ½δᵀ(H + cI)δ ≤ threshold}."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hessops.cli import options, output, setup
from hessops.cli.values import number

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and operator, the log-determinant's options (``--c`` 0), the threshold, the check of
    c against the smallest eigenvalue, long runs."""
    options.common(parser)
    options.log_determinant(parser, c=0.0)
    parser.add_argument(
        "--threshold", type=number(above=0), default=2.0, help="the loss increase that bounds the basin"
    )
    parser.add_argument(
        "--no-check-c",
        action="store_true",
        help="skip the check that c exceeds |λ_min| of H by more than its error bound (one eigs run)",
    )
    parser.add_argument(
        "--smallest-eigenvalue",
        type=number(),
        help="a known lower bound on the operator's smallest eigenvalue (0 for ggn, ef, mcfisher), checked "
        "against --c instead of the eigs run (default: none, run eigs)",
    )
    options.long_runs(parser)


def run(args: argparse.Namespace) -> None:
    """The log volume and its terms printed, and what is known of the smallest eigenvalue."""
    import hessops
    from hessops.plot import plot_log_volume

    s = setup.load(args)
    method, deflate = setup.deflation(args)
    volume = hessops.basin_volume(
        s.op,
        threshold=args.threshold,
        c=args.c,
        method=method,
        probes=args.probes,
        lanczos_steps=args.lanczos_steps,
        seed=args.seed,
        progress=not args.no_progress,
        **setup.long_run_options(args),
        deflate=deflate,
        confidence=args.confidence,
        check_c=not args.no_check_c,
        eigs_max_iters=args.eigs_max_iters,
        smallest_eigenvalue=args.smallest_eigenvalue,
    )
    result = volume.to_dict()
    print(
        f"log V = {result['log_volume']:.6f}  (log unit ball {result['log_unit_ball']:.6f} + threshold term "
        f"{result['log_threshold_term']:.6f} − ½ logdet {result['half_logdet']:.6f} ± "
        f"{0.5 * result['logdet_std_error']:.2g}; n = {result['n']}, {result['method']})" + output.interval_text(result)
    )
    if args.smallest_eigenvalue is not None:
        print(
            f"smallest eigenvalue of {args.operator}: at least {args.smallest_eigenvalue:g} (given), "
            f"above -c = {-args.c:g}"
        )
    elif "smallest_eigenvalue" in result:
        print(
            f"smallest eigenvalue of {args.operator}: {result['smallest_eigenvalue']:.6g} "
            f"± {result['smallest_eigenvalue_bound']:.2g}, below c = {args.c:g} in magnitude (checked)"
        )

    def draw() -> Figure:
        what = output.title(f"Log basin volume ({type(s.op).__name__}, c = {args.c:g})", s.settings)
        return plot_log_volume(volume, title=what)

    settings = output.settings(args, s.settings, method=method, deflate=deflate)
    output.emit(args, settings, result, s.op.device, draw)
