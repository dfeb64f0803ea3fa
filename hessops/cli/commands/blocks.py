"""``hessops blocks``: :func:`hessops.block_spectra` on each parameter group; prints each block's values."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hessops.cli import options, output, setup
from hessops.cli.values import count
from hessops.constants import WHICH

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def group_spec(text: str) -> tuple[str, list[str]]:
    """``NAME=PREFIX[,PREFIX...]``: a parameter group, its module-name prefixes."""
    name, sep, prefixes = text.partition("=")
    members = [p.strip() for p in prefixes.split(",")]
    if not sep or not name.strip() or not all(members):
        raise argparse.ArgumentTypeError(
            f"{text!r}: pass NAME=PREFIX[,PREFIX...], e.g. attention=encoder.layers.0.self_attn (module names as in "
            "model.named_parameters())"
        )
    return name.strip(), members


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and operator, how many eigenvalues of each group, the groups, when Lanczos stops."""
    options.common(parser)
    parser.add_argument("--k", type=count(), default=1, help="how many eigenvalues of each block")
    parser.add_argument(
        "--which", choices=WHICH, default="LA", help="largest magnitude, largest, smallest, or both ends"
    )
    parser.add_argument(
        "--group",
        dest="groups",
        type=group_spec,
        action="append",
        metavar="NAME=PREFIX[,PREFIX...]",
        help="a parameter group by module names (repeat for more; default: the repeated blocks found automatically, "
        "each other module its own group)",
    )
    options.stopping(parser, " per block")


def check(args: argparse.Namespace) -> str | None:
    """``--k`` and ``--max-iters`` against the model; each ``--group`` its own name."""
    problem = options.check_eigenvalue_count(args)
    names = [name for name, _ in args.groups or []]
    twice = sorted({name for name in names if names.count(name) > 1})
    if problem is None and twice:
        return f"--group {twice[0]} is given twice: give each group its own name"
    return problem


def run(args: argparse.Namespace) -> None:
    """Each block's eigenvalues, printed one block a line."""
    import hessops
    from hessops.plot import plot_block_spectra

    s = setup.load(args)
    groups = None if args.groups is None else dict(args.groups)
    spectra = hessops.block_spectra(
        s.model,
        s.loss_fn,
        s.loader,
        groups=groups,
        k=args.k,
        operator=args.operator,
        which=args.which,
        tol=args.tol,
        value_tol=args.value_tol,
        max_iters=args.max_iters,
        seed=args.seed,
        dtype=s.op.dtype,
        operator_options=setup.operator_options(args),
        progress=not args.no_progress,
    )
    result = spectra.to_dict()
    width = max(len(block["name"]) for block in result["blocks"])
    for block in result["blocks"]:
        values = "  ".join(f"{v: .6g}" for v in block["eigenvalues"])
        print(
            f"{block['name']:<{width}}  {block['n_params']:>10,} params   λ = {values}   "
            f"max ‖Hv − λv‖ = {max(block['residuals']):.2g}"
        )
    print(f"{len(result['blocks'])} blocks: {result['n_matvecs']} products in {result['seconds']:.2f} s")

    def draw() -> Figure:
        fig, ax = output.new_figure(size=(max(6.5, 0.45 * len(result["blocks"]) + 2), 4.5))
        values = {block["name"]: block["eigenvalues"] for block in result["blocks"]}
        what = f"{type(s.op).__name__} blocks ({args.which}, k = {args.k})"
        plot_block_spectra(values, ax=ax, title=output.title(what, s.settings))
        return fig

    output.emit(args, output.settings(args, s.settings, groups=groups), result, s.op.device, draw)
