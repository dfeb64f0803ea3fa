"""The command line's contract, each case its own test: a bad value is refused before anything is loaded, in
one line on standard error with exit status 2; the run's own failures have their own status; outputs are
checked before computing and written whole; parsing imports nothing heavy. Fast: nothing here computes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import hessops.demo
from hessops.cli import app as cli
from hessops.cli import output, setup, values
from hessops.errors import CommandError, DistributedError, InvalidArgumentError, OutputError
from hessops.zoo import MODELS


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any command that gets as far as loading a model or data fails the test."""

    def loaded(args):
        raise AssertionError(f"`hessops {args.command}` loaded a model or data before refusing its command line")

    monkeypatch.setattr(setup, "load", loaded)
    monkeypatch.setattr(hessops.demo, "run_demo", loaded)


def one_line_error(capsys, status: int, expected: int = cli.EXIT_USAGE) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == expected and len(lines) == 1 and lines[0].startswith("hessops: "), err
    return lines[0]


BAD_VALUES = {
    "k-zero": (["eigs", "--k", "0"], "argument --k: 0 is out of range"),
    "k-negative": (["eigs", "--k", "-2"], "argument --k: -2 is out of range"),
    "k-not-whole": (["eigs", "--k", "2.5"], "argument --k: '2.5' is not a whole number"),
    "k-above-size": (["eigs", "--k", "2411"], "mlp-digits has 2,410 parameters"),
    "max-iters-below-k": (["eigs", "--k", "5", "--max-iters", "4"], "--max-iters 4 is less than --k 5"),
    "max-iters-zero": (["eigs", "--max-iters", "0"], "argument --max-iters: 0"),
    "tol-zero": (["eigs", "--tol", "0"], "argument --tol: 0 is out of range: pass a finite number > 0"),
    "tol-nan": (["eigs", "--tol", "nan"], "argument --tol: nan"),
    "value-tol-negative": (["eigs", "--value-tol", "-1e-6"], "argument --value-tol"),
    "which-unknown": (["eigs", "--which", "largest"], "argument --which: invalid choice"),
    "num-examples-zero": (["eigs", "--num-examples", "0"], "argument --num-examples: 0 is out of range"),
    "num-examples-above-train": (["eigs", "--num-examples", "1438"], "the digits train split has 1,437 examples"),
    "num-examples-above-test": (["eigs", "--test-split", "--num-examples", "361"], "the digits test split has 360"),
    "num-examples-above-mnist": (
        ["eigs", "--data", "mnist", "--num-examples", "60001"],
        "mnist train split has 60,000",
    ),
    "num-examples-above-cifar2": (
        ["density", "--model", "mlp-cifar2", "--num-examples", "10001"],
        "cifar2 train split",
    ),
    "batch-size-zero": (["eigs", "--batch-size", "0"], "argument --batch-size: 0"),
    "seed-negative": (["eigs", "--seed", "-1"], "argument --seed: -1 is out of range"),
    "seed-too-large": (["trace", "--seed", str(2**63)], "argument --seed"),
    "num-probes-zero": (["density", "--num-probes", "0"], "argument --num-probes: 0"),
    "lanczos-steps-zero": (["density", "--lanczos-steps", "0"], "argument --lanczos-steps: 0"),
    "sigma-negative": (["density", "--sigma", "-1"], "argument --sigma: -1 is out of range"),
    "sigma-zero": (["density", "--sigma", "0"], "argument --sigma: 0"),
    "grid-one-point": (["density", "--grid", "1"], "argument --grid: 1 is out of range: pass a whole number ≥ 2"),
    "trace-probes-zero": (["trace", "--probes", "0"], "argument --probes: 0"),
    "hutchpp-probes-three": (["trace", "--probes", "3"], "hutch++ needs at least 4"),
    "hutchinson-probes-one": (["trace", "--method", "hutchinson", "--probes", "1"], "argument --probes: 1"),
    "trace-method-unknown": (["trace", "--method", "exact"], "argument --method: invalid choice"),
    "logdet-c-nan": (["logdet", "--c", "nan"], "argument --c: nan is out of range: pass a finite number"),
    "logdet-probes-zero": (["logdet", "--probes", "0"], "argument --probes: 0"),
    "logdet-lanczos-steps-zero": (["logdet", "--lanczos-steps", "0"], "argument --lanczos-steps: 0"),
    "basin-threshold-zero": (["basin", "--threshold", "0"], "argument --threshold: 0 is out of range"),
    "basin-threshold-inf": (["basin", "--threshold", "inf"], "argument --threshold: inf"),
    "basin-c-inf": (["basin", "--c=-inf"], "argument --c: -inf"),
    "epochs-zero": (["track", "--epochs", "0"], "argument --epochs: 0"),
    "every-zero": (["track", "--every", "0"], "argument --every: 0"),
    "lr-zero": (["track", "--lr", "0"], "argument --lr: 0"),
    "lr-text": (["track", "--lr", "fast"], "argument --lr: 'fast' is not a number"),
    "momentum-one": (
        ["track", "--momentum", "1"],
        "argument --momentum: 1 is out of range: pass a finite number ≥ 0 and < 1",
    ),
    "weight-decay-negative": (["track", "--weight-decay", "-0.1"], "argument --weight-decay"),
    "sharpness-examples-zero": (["track", "--sharpness-examples", "0"], "argument --sharpness-examples: 0"),
    "timeout-zero": (["eigs", "--timeout", "0"], "argument --timeout: 0"),
    "timeout-nan": (["eigs", "--timeout", "nan"], "argument --timeout: nan"),
    "demo-k-zero": (["demo", "--k", "0"], "argument --k: 0"),
    "demo-k-above-size": (["demo", "--k", "2411"], "mlp-digits has 2,410 parameters"),
    "unknown-model": (["eigs", "--model", "mlp-digit"], "unknown model 'mlp-digit' (did you mean mlp-digits"),
    "model-without-loadable-data": (["eigs", "--model", "resnet18"], "resnet18 was made for imagenet"),
    "timm-without-data": (["eigs", "--model", "timm:resnet18"], "timm:resnet18 has no default dataset: pass --data"),
    "img-size-zero": (["eigs", "--model", "timm:vit_tiny_patch16_224", "--img-size", "0"], "argument --img-size: 0"),
    "patch-size-not-whole": (["eigs", "--patch-size", "2.5"], "argument --patch-size: '2.5' is not a whole number"),
    "num-classes-negative": (["eigs", "--num-classes", "-1"], "argument --num-classes: -1 is out of range"),
    "timm-sizes-on-zoo-model": (
        ["eigs", "--model", "vit-tiny-cifar", "--patch-size", "8"],
        "--patch-size: vit-tiny-cifar is built at its own sizes; these options are for --model timm:NAME",
    ),
    "patch-size-not-dividing": (
        ["eigs", "--model", "timm:vit_tiny_patch16_224", "--data", "cifar10", "--img-size", "32", "--patch-size", "5"],
        "--patch-size 5 does not divide --img-size 32: pass a patch size that tiles the image (e.g. 4)",
    ),
    "unknown-data": (["eigs", "--data", "imagenet"], "argument --data: unknown data 'imagenet'"),
    "missing-checkpoint": (["eigs", "--checkpoint", "no/such/model.pt"], "no/such/model.pt: no such file"),
    "unknown-operator": (["eigs", "--operator", "fisher"], "argument --operator: invalid choice"),
    "unknown-dtype": (["eigs", "--dtype", "float16"], "argument --dtype: invalid choice"),
    "download-digits": (["download", "digits"], "invalid choice: 'digits'"),
    "blocks-k-zero": (["blocks", "--k", "0"], "argument --k: 0 is out of range"),
    "blocks-k-above-size": (["blocks", "--k", "2411"], "mlp-digits has 2,410 parameters"),
    "blocks-max-iters-below-k": (["blocks", "--k", "3", "--max-iters", "2"], "--max-iters 2 is less than --k 3"),
    "blocks-which-unknown": (["blocks", "--which", "top"], "argument --which: invalid choice"),
    "blocks-tol-zero": (["blocks", "--tol", "0"], "argument --tol: 0 is out of range"),
    "blocks-operator-unknown": (["blocks", "--operator", "fisher"], "argument --operator: invalid choice"),
    "blocks-group-without-name": (["blocks", "--group", "=1"], "argument --group: '=1': pass NAME=PREFIX"),
    "blocks-group-without-prefix": (["blocks", "--group", "first"], "argument --group: 'first': pass NAME=PREFIX"),
    "blocks-group-empty-prefix": (["blocks", "--group", "a=1,"], "argument --group: 'a=1,': pass NAME=PREFIX"),
    "blocks-group-twice": (["blocks", "--group", "a=1", "--group", "a=3"], "--group a is given twice"),
    "gpt-unknown-size": (["eigs", "--model", "gpt:gpt3"], "unknown GPT size 'gpt3'"),
    "gpt-size-misspelt": (["eigs", "--model", "gpt:gpt-bytes-tiney"], "did you mean gpt:gpt-bytes-tiny?"),
    "hf-without-source": (["eigs", "--model", "hf:"], "argument --model: hf: needs a source"),
    "text-path-empty": (["eigs", "--model", "gpt:gpt-bytes-tiny", "--data", "text:"], "'text:' has an empty path"),
    "text-path-blank": (["eigs", "--model", "gpt:gpt-bytes-tiny", "--data", "text: "], "'text: ' has an empty path"),
    "text-path-missing": (["eigs", "--model", "gpt:gpt-bytes-tiny", "--data", "text:no/such.txt"], "no such file"),
    "data-misspelt-text": (["eigs", "--data", "txt"], "did you mean text?"),
    "language-model-on-images": (
        ["eigs", "--model", "gpt:gpt-bytes-tiny", "--data", "digits"],
        "is a language model: it reads text, not digits",
    ),
    "hf-model-on-images": (["density", "--model", "hf:gpt2", "--data", "mnist"], "hf:gpt2 is a language model"),
    "image-model-on-text": (["eigs", "--data", "text"], "--data text is text, for language models"),
    "timm-model-on-text": (["eigs", "--model", "timm:resnet18", "--data", "text"], "is text, for language models"),
    "text-test-split": (["eigs", "--model", "gpt:gpt-bytes-tiny", "--test-split"], "text has no test split"),
    "seq-len-one": (
        ["eigs", "--model", "gpt:gpt-bytes-tiny", "--seq-len", "1"],
        "argument --seq-len: 1 is out of range",
    ),
    "seq-len-not-whole": (["eigs", "--seq-len", "8.5"], "argument --seq-len: '8.5' is not a whole number"),
    "tokenizer-missing": (["eigs", "--model", "hf:gpt2", "--tokenizer", "no/such/folder"], "no such folder"),
    "tokenizer-on-images": (["eigs", "--tokenizer", "."], "--tokenizer tokenizes text"),
    "hf-override-without-value": (["eigs", "--model", "hf:gpt2", "--hf-override", "n_layer"], "pass KEY=VALUE"),
    "hf-override-bad-key": (["eigs", "--model", "hf:gpt2", "--hf-override", "n layer=2"], "pass KEY=VALUE"),
    "hf-override-on-gpt": (
        ["eigs", "--model", "gpt:gpt-bytes-tiny", "--hf-override", "n_layer=2"],
        "--hf-override changes a HuggingFace config: it needs --model hf:SOURCE",
    ),
    "track-language-model": (["track", "--model", "gpt:gpt-bytes-tiny"], "`hessops track` trains image classifiers"),
    "save-vectors-is-out": (["eigs", "--save-vectors", "a.json", "--out", "a.json"], "--save-vectors and --out are"),
    "save-vectors-folder": (["eigs", "--save-vectors", "."], "argument --save-vectors: . is a directory"),
    "landscape-dims-three": (["landscape", "--dims", "3"], "argument --dims: 3 is out of range"),
    "landscape-points-one": (["landscape", "--points", "1"], "argument --points: 1 is out of range"),
    "landscape-span-zero": (["landscape", "--span", "0"], "argument --span: 0 is out of range"),
    "landscape-directions-unknown": (["landscape", "--directions", "hessian"], "argument --directions: invalid choice"),
    "landscape-vectors-missing": (["landscape", "--directions", "eigen", "--vectors", "no/such.pt"], "no such file"),
    "landscape-vectors-with-random": (["landscape", "--vectors", __file__], "pass --directions eigen too"),
    "landscape-distributed": (["landscape", "--distributed"], "`hessops landscape` runs in one process"),
    "basis-unknown": (["eigs", "--basis", "ram"], "argument --basis: invalid choice"),
    "basis-path-without-disk": (["density", "--basis-path", "b.npy"], "--basis-path is the file of --basis disk"),
    "checkpoint-every-negative": (
        ["trace", "--resume", "t.ckpt", "--checkpoint-every", "-1"],
        "argument --checkpoint-every: -1 is out of range",
    ),
    "trace-has-no-basis": (["trace", "--basis", "disk"], "unrecognized arguments: --basis disk"),
    "no-command": ([], "the following arguments are required: COMMAND"),
    "unknown-option": (["eigs", "--kk", "3"], "unrecognized arguments: --kk 3"),
}


@pytest.mark.parametrize("args, message", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_value_is_refused_before_loading_in_one_line(capsys, nothing_loads, args, message):
    line = one_line_error(capsys, cli.main(args))
    assert line.startswith("hessops: error: ") and message in line, line
    assert line.endswith("--help`)")  # where to read what the option takes


OUTPUTS = {
    "out-is-a-directory": (["eigs", "--out", "{tmp}"], "is a directory"),
    "out-ends-with-a-slash": (["eigs", "--out", "{tmp}/new/"], "is a directory"),
    "out-under-a-file": (["eigs", "--out", "{tmp}/file.txt/result.json"], "file.txt is not a directory"),
    "plot-is-a-directory": (["density", "--plot", "{tmp}"], "is a directory"),
    "plot-not-a-figure-format": (["trace", "--plot", "{tmp}/trace.jpg"], "the extension: .png, .pdf, .svg"),
    "demo-plot-is-a-directory": (["demo", "--plot", "{tmp}"], "is a directory"),
    "out-and-plot-the-same": (["basin", "--out", "{tmp}/x.png", "--plot", "{tmp}/x.png"], "the same file"),
    "plot-on-models": (["models", "--plot", "{tmp}/zoo.png"], "`hessops models` has no figure to draw"),
    "plot-on-download": (["download", "mnist", "--plot={tmp}/mnist.png"], "`hessops download` has no figure"),
    "out-on-models": (["models", "--out", "{tmp}/zoo.json"], "`hessops models` has no result to write"),
    "blocks-plot-not-a-figure-format": (["blocks", "--plot", "{tmp}/blocks.jpg"], "the extension: .png, .pdf, .svg"),
    "blocks-out-and-plot-the-same": (["blocks", "--out", "{tmp}/b.png", "--plot", "{tmp}/b.png"], "the same file"),
}


@pytest.mark.parametrize("args, message", list(OUTPUTS.values()), ids=list(OUTPUTS))
def test_unwritable_output_is_refused_before_computing(tmp_path, capsys, nothing_loads, args, message):
    (tmp_path / "file.txt").write_text("")
    line = one_line_error(capsys, cli.main([a.replace("{tmp}", str(tmp_path)) for a in args]))
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing made


def test_out_in_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch, capsys, nothing_loads):
    """(os.access is stubbed: the tests may run as root, whom permissions do not bind.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    line = one_line_error(capsys, cli.main(["eigs", "--out", str(locked / "eigs.json")]))
    assert f"no permission to write in {locked}" in line


def test_an_output_folder_that_does_not_exist_yet_is_accepted():
    args = cli.build_parser().parse_args(["eigs", "--out", "not/yet/there/eigs.json", "--plot", "figs/eigs.svg"])
    assert cli.check(args) is None and args.out == Path("not/yet/there/eigs.json")


@pytest.mark.parametrize(
    "error, status",
    [
        (DistributedError("rank 1 stopped answering: check that every rank runs the same command"), cli.EXIT_FAILED),
        (InvalidArgumentError("k=3 must be at most 2"), cli.EXIT_USAGE),
        (ValueError("a reason\nspread over\nthree lines"), cli.EXIT_USAGE),
        (OutputError("cannot write x.json: No space left on device"), cli.EXIT_FAILED),
        (KeyboardInterrupt(), cli.EXIT_INTERRUPTED),
    ],
    ids=["distributed-error", "library-error", "multi-line-value-error", "output-error", "ctrl-c"],
)
def test_errors_from_deeper_down_are_one_line_with_their_status(monkeypatch, capsys, error, status):
    def fail(args):
        raise error

    monkeypatch.setattr(setup, "load", fail)
    line = one_line_error(capsys, cli.main(["eigs"]), status)
    assert line == "hessops: interrupted" if status == cli.EXIT_INTERRUPTED else " ".join(str(error).split()) in line


def test_every_option_has_help_and_shows_its_default():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {
        "eigs",
        "blocks",
        "density",
        "trace",
        "logdet",
        "basin",
        "landscape",
        "track",
        "demo",
        "download",
        "models",
    }
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"hessops {name} {action.dest} has no help"
            help_text = " ".join(action.help.split())
            if not action.option_strings:  # a positional argument: always given
                continue
            if action.default is None:  # the help says in words what happens without it
                assert "default" in help_text, f"hessops {name} {action.option_strings}: say what the default is"
            elif action.default is not False:
                assert f"(default: {action.default})" in text, f"hessops {name} {action.option_strings}"


def test_choices_are_the_library_constants():
    from hessops import constants
    from hessops.zoo import registry

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    choices = {(name, a.dest): a.choices for name, p in commands.items() for a in p.load()._actions if a.choices}
    assert choices[("eigs", "which")] is constants.WHICH and choices[("eigs", "operator")] is constants.OPERATOR_NAMES
    assert (
        choices[("blocks", "which")] is constants.WHICH and choices[("blocks", "operator")] is constants.OPERATOR_NAMES
    )
    assert (
        choices[("trace", "method")] is constants.TRACE_METHODS
        and choices[("basin", "method")] is constants.LOGDET_METHODS
    )
    assert choices[("download", "name")] is registry.DOWNLOADABLE  # == constants.DOWNLOADABLE (test below)
    for name in (*constants.DATASETS, constants.TEXT_DATA):  # --data also takes text:PATH, so it has no choices
        assert values.data_name(name) == name
    assert choices[("landscape", "directions")] is constants.LANDSCAPE_DIRECTIONS
    assert choices[("track", "hvp_mode")] is constants.HVP_MODES and choices[("logdet", "dtype")] is constants.DTYPES
    assert all(choices[(name, "basis")] is constants.BASIS_MODES for name in ("eigs", "density", "logdet", "basin"))


def test_gpt_sizes_are_the_named_configs():
    """The CLI's torch-free tuple of gpt:SIZE names is hessops.zoo.lm's table."""
    from hessops import constants
    from hessops.zoo.lm import GPT_CONFIGS

    assert constants.GPT_SIZES == tuple(GPT_CONFIGS)


def test_hf_override_values_are_read_as_json_else_text():
    parse = values.config_override
    assert [parse("n_layer=2"), parse("resid_pdrop=0.0"), parse("tie_word_embeddings=false")] == [
        ("n_layer", 2),
        ("resid_pdrop", 0.0),
        ("tie_word_embeddings", False),
    ]
    assert parse("activation_function=gelu_new") == ("activation_function", "gelu_new")


def test_one_dataset_registry():
    """Each dataset's facts are one entry of hessops.zoo.registry.DATASET_SPECS, which the CLI's --data,
    `hessops download` and --num-examples checks (without loading) and hessops.zoo.data read. The core's
    tuples of names (it may not import the zoo) are that registry's. Split sizes: digits (embedded) checked
    against the data itself, the others the published sizes (cifar2: airplane and bird, 5,000 + 5,000 train)."""
    from hessops import constants
    from hessops.zoo import data, registry

    specs = registry.DATASET_SPECS
    assert tuple(specs) == constants.DATASETS == values.DATASETS == data.DATA_NAMES
    assert registry.DOWNLOADABLE == constants.DOWNLOADABLE == tuple(n for n, s in specs.items() if s.downloadable)
    assert registry.NORMALIZATION == {name: (spec.mean, spec.std) for name, spec in specs.items()}
    train, test = data.load_dataset("digits", train=True), data.load_dataset("digits", train=False)
    assert specs["digits"].split_sizes == (len(train), len(test))
    assert tuple(train[0][0].shape) == specs["digits"].input_shape and len(train.classes) == specs["digits"].num_classes
    assert specs["mnist"].split_sizes == (60_000, 10_000) and specs["cifar2"].split_sizes == (10_000, 2_000)


TOY_COMMAND = """
def add_arguments(parser):
    parser.add_argument("--times", type=int, default=2, help="how many greetings")


def check(args):
    return "--times 0: greet at least once" if args.times == 0 else None


def run(args):
    print("hello " * args.times, "own options:", args.own_options)
"""


def test_a_command_is_one_module_and_one_registry_line(tmp_path, monkeypatch, capsys):
    """docs/cli.md's "Adding a command": a module (here on sys.path, outside the package) with add_arguments,
    check and run, and its line in hessops.cli.commands.COMMANDS, is listed by `hessops --help`, has its own
    --help, is checked and runs, with nothing else touched."""
    from hessops.cli import commands

    (tmp_path / "toy_command.py").write_text(TOY_COMMAND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(commands.COMMANDS, "toy", commands.Command("toy_command", "greet a few times"))

    assert cli.main(["--help"]) == 0
    assert "greet a few times" in capsys.readouterr().out
    assert cli.main(["toy", "--help"]) == 0
    assert "how many greetings (default: 2)" in capsys.readouterr().out
    assert cli.main(["toy", "--times", "3"]) == 0
    assert capsys.readouterr().out == "hello hello hello  own options: ('times',)\n"
    line = one_line_error(capsys, cli.main(["toy", "--times", "0"]))
    assert line == "hessops: error: --times 0: greet at least once (see `hessops toy --help`)"


def test_a_command_line_imports_its_own_command_only():
    """`hessops --help` reads the registry alone; `hessops trace ...` imports the trace module and no other
    command's."""
    script = (
        "import json, sys; from hessops.cli import main; main(sys.argv[1:]); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hessops.cli.commands.'))))"
    )
    loaded = []
    for argv in (["--help"], ["trace", "--probes", "3"]):
        run = subprocess.run(
            [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=HANG_GUARD_S
        )
        loaded.append(json.loads(run.stdout.strip().splitlines()[-1]))
    assert loaded == [[], ["hessops.cli.commands.trace"]]


def test_models_lists_sizes_and_inputs_from_the_registry(capsys, nothing_loads):
    from hessops.constants import GPT_SIZES

    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for spec in MODELS.values():
        row = next(line for line in lines if line.split()[0] == spec.name)
        assert f"{spec.n_params:,}" in row and "×".join(map(str, spec.input_shape)) in row and spec.description in row
    assert any(line.startswith("timm:NAME") for line in lines)
    gpt = next(line for line in lines if line.startswith("gpt:SIZE"))
    assert all(size in gpt for size in GPT_SIZES) and any(line.startswith("hf:SOURCE") for line in lines)


def test_download_offline_says_where_to_put_the_files_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    data = tmp_path / "data"
    line = one_line_error(capsys, cli.main(["download", "mnist", "--data-dir", str(data)]))
    assert "could not download mnist" in line and "Network is unreachable" in line
    assert f"put them in {data.resolve() / 'MNIST' / 'raw'}{os.sep}" in line
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        assert name in line
    assert not data.exists()  # torchvision had made data/MNIST/raw

    data.mkdir()
    line = one_line_error(capsys, cli.main(["download", "cifar2", "--data-dir", str(data)]))
    assert "cifar-10-python.tar.gz" in line and f"put it in {data.resolve()}{os.sep}" in line
    assert list(data.iterdir()) == []  # the folder was there before: kept, and left empty


def test_outputs_are_never_left_partial(tmp_path):
    """Results and figures are written through hessops._io.atomic_write: whole, or not at all."""
    from hessops._io import atomic_write

    path = tmp_path / "result.json"
    path.write_text('{"old": true}\n')

    def interrupted(file):
        file.write(b'{"new": tr')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == '{"old": true}\n' and [p.name for p in tmp_path.iterdir()] == ["result.json"]

    output.write_json(path, {"value": float("nan"), "nested": [1.5, float("inf")]})
    assert json.loads(path.read_text()) == {"value": None, "nested": [1.5, None]}
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # the usual permissions, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


HANG_GUARD_S = 3600  # subprocess waits guard against a hang only: tests bound work, not time

STARTUP = r"""
import json, sys
from hessops.cli import main
cases = [["--version"], ["--help"], *[[c, "--help"] for c in sys.argv[1:]], ["eigs", "--k", "0"], ["models"]]
statuses = [main(case) for case in cases]
heavy = sorted(m for m in ("torch", "cola", "numpy", "matplotlib", "torchvision", "sklearn") if m in sys.modules)
print(json.dumps({"statuses": statuses, "heavy": heavy}))
"""


def test_help_version_and_refusals_import_nothing_heavy():
    """--version, --help, each command's --help, a refused value and `hessops models` in one fresh process:
    none imports torch, CoLA, numpy or matplotlib (what made `hessops --version` take seconds)."""
    commands = ["eigs", "density", "trace", "logdet", "basin", "track", "demo", "download", "models"]
    run = subprocess.run(
        [sys.executable, "-c", STARTUP, *commands], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["statuses"] == [0, 0, *[0] * len(commands), 2, 0] and report["heavy"] == []


def _as_a_terminal_foreground_job() -> None:
    # A job started with `&` by a non-interactive shell inherits SIGINT as ignored; a user's Ctrl-C reaches a
    # foreground job, whose SIGINT is at its default: give the child that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_torch_loads_is_one_line():
    """SIGINT while `hessops eigs` imports torch (seen in -X importtime's report on stderr): one line, 130."""
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "hessops", "eigs", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_a_terminal_foreground_job,
    )
    try:
        cli_loaded, torch_loading = False, False
        for line in process.stderr:  # importtime reports each module when its import ends
            module = line.split("|")[-1].strip()
            cli_loaded = cli_loaded or module == "hessops.cli"
            if cli_loaded and module.startswith("torch."):
                torch_loading = True
                break
        assert torch_loading, "torch never started loading"  # stderr ended (the process exited) before it did
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=HANG_GUARD_S)
    finally:
        process.kill()
    lines = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert process.returncode == cli.EXIT_INTERRUPTED and lines == ["hessops: interrupted"], err[-3000:]


def test_a_bad_timeout_in_the_environment_is_refused_before_joining(monkeypatch):
    """$HESSOPS_DIST_TIMEOUT sets --timeout's default; a value that is not a positive number of seconds is a
    one-line CommandError, raised before the process group is joined."""
    monkeypatch.setenv("HESSOPS_DIST_TIMEOUT", "soon")
    with pytest.raises(CommandError, match="HESSOPS_DIST_TIMEOUT='soon': expected a positive number"):
        setup.start_distributed(argparse.Namespace(timeout=None, device="cpu"))
