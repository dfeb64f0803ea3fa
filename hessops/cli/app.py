"""The ``hessops`` command line: ``hessops COMMAND``, one of the commands of the registry
(:data:`hessops.cli.commands.COMMANDS`).

This module is the command line's grammar and its contract, and imports nothing heavy: ``hessops --help``
and ``--version`` answer from the registry alone, and ``hessops COMMAND`` imports that command's module only,
which is torch-free until it runs. Every value is checked here, before any model or data is loaded.

Exit statuses (docs/cli.md): 0 done; 1 the run failed (a rank of a distributed run, or writing a result);
2 a bad command line or bad input, in one line on standard error; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, NoReturn

from hessops import __version__
from hessops.cli import commands, options, setup
from hessops.errors import DistributedError, HessopsError, OutputError

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


# -- the grammar -----------------------------------------------------------------------------------------------
class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (``None``, or a flag's ``False``): the help
    says what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on standard error (``hessops: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line and exit with status 2."""
        usage_error(message, self.prog)


class CommandParser(Parser):
    """One command's parser, its options added by its module (``add_arguments``) when it first parses or
    shows its help: so a command line imports the module of its own command and no other."""

    def __init__(self, *, command: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command, self.loaded = command, False

    def load(self) -> CommandParser:
        """Add the command's options (once), and name its own ones, its settings, in ``own_options``."""
        if not self.loaded:
            commands.load(self.command).add_arguments(self)
            self.set_defaults(own_options=options.own_options(self))
            self.loaded = True
        return self

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        """``argparse``'s, once the options are there."""
        return super(CommandParser, self.load()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        """``argparse``'s, once the options are there."""
        return super(CommandParser, self.load()).format_help()


def usage_error(message: str, prog: str = "hessops") -> NoReturn:
    """``hessops: error: <message> (see `<prog> --help`)`` on standard error, exit status 2."""
    print(f"hessops: error: {message} (see `{prog} --help`)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def build_parser() -> Parser:
    """The ``hessops`` argument parser (torch-free): one subparser for each command of the registry, its
    options loaded when it is used."""
    parser = Parser(
        prog="hessops",
        description="Curvature of neural networks: spectra, densities, traces, volumes.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"hessops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name, command in commands.COMMANDS.items():
        description = command.help[0].upper() + command.help[1:] + "."
        sub.add_parser(name, help=command.help, description=description, formatter_class=Formatter, command=name)
    return parser


# -- what depends on several options -----------------------------------------------------------------------------
def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the options together (one line), or ``None``; nothing is loaded to find out. The
    shared model and data options first, then the command's own ``check``, then long runs and outputs."""
    if hasattr(args, "model"):
        problem = options.check_model_and_data(args)
        if problem is not None:
            return problem
    own = getattr(commands.load(args.command), "check", None)
    problem = own(args) if own is not None else None
    return problem or options.check_long_runs(args) or options.check_outputs(args)


# -- running ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``sys.argv[1:]`` when ``argv`` is None); returns the exit status."""
    began, started = time.perf_counter(), datetime.now(timezone.utc)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, terminated = None, []
    try:
        with _sigterm_as_interrupt(terminated):
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            if extra:
                usage_error(_unknown(args.command, extra), f"hessops {args.command}")
            problem = check(args)
            if problem is not None:
                usage_error(problem, f"hessops {args.command}")
            args.began = began
            args.run = {
                "argv": ["hessops", *argv],
                "started": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
            }
            commands.load(args.command).run(args)
        return 0
    except SystemExit as done:  # argparse: --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    except KeyboardInterrupt as stop:  # a checkpointed run says where it saved and how to resume
        said, status = ("terminated", EXIT_TERMINATED) if terminated else ("interrupted", EXIT_INTERRUPTED)
        return _fail(f"{said}: {stop}" if str(stop) else said, status)
    except DistributedError as error:  # another rank failed: not a bad command line
        return _fail(f"error: {error}", EXIT_FAILED)
    except OutputError as error:
        return _fail(f"error: {error}", EXIT_FAILED)
    except (HessopsError, ValueError, FileNotFoundError) as error:  # bad input found while loading or computing
        return _fail(f"error: {_one_line(error)}", EXIT_USAGE)
    finally:
        if args is not None and getattr(args, "rank", None) is not None:
            setup.end_distributed()


@contextlib.contextmanager
def _sigterm_as_interrupt(received: list[int]) -> Iterator[None]:
    """SIGTERM (``kill PID``, a scheduler's time limit) raises ``KeyboardInterrupt``, as Ctrl-C does, noted in
    ``received``: the run then ends cleanly (checkpoints save, ``finally`` blocks run) with its own status.
    The previous handler comes back afterwards; outside the main thread, where no handler can be set,
    nothing changes.

    Args:
        received: a list that each SIGTERM received appends its signal number to.

    Returns:
        A context manager for the run."""

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _unknown(command: str, extra: list[str]) -> str:
    """Options the command does not take; ``--plot`` and ``--out`` on one with nothing to draw or write."""
    refused = [option for option in ("--plot", "--out") if any(e.split("=")[0] == option for e in extra)]
    if refused:
        nothing = "no figure to draw" if refused[0] == "--plot" else "no result to write"
        return f"`hessops {command}` has {nothing}: leave out {refused[0]}"
    return f"unrecognized arguments: {' '.join(extra)}"


def _fail(message: str, status: int) -> int:
    print(f"hessops: {message}", file=sys.stderr)
    return status


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
