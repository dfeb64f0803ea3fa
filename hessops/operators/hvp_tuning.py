"""Which Hessian-vector product formulation a :class:`~hessops.Hessian` uses: validated, then timed.

A fast path is a guest: every formulation but double backward (``"autograd"``, the reference) is checked
against it before it is used, and the whole mechanism is switched off by ``hvp_mode="autograd"`` or the
environment variable ``HESSOPS_HVP_TUNING=0`` (then ``"auto"`` means ``"autograd"``).

``"auto"`` starts with double backward, the reference, and tunes only once a run has shown it is long
enough to repay tuning: after :data:`TUNE_AFTER_PRODUCTS` products of one kind (one column, or a block of
columns), when they took at least :data:`MIN_PRODUCT_SECONDS` each, or once cheaper ones have added up to
:data:`TUNE_AFTER_SECONDS` (:func:`worth_tuning`). Each other
formulation's first call in a process costs 0.5-4 s of torch.func tracing and warm-up, whatever the
model, while on the CPU double backward was the fastest on a ResNet-18, and on a small CNN the best took
about 30 % less time (benchmarks/RESULTS.md): tuning at the first product made a fresh process's top-2
eigenvalues of a ResNet-18 1.4-1.6× slower than PyHessian (issue 11's measurement). A short
run (eigenvalues to a tolerance: about ten products) thus pays nothing, and a long one (a density, a
tracker) pays at most a few slice products after twenty full ones. Then ``"auto"``

1. runs the reference on a *slice*: the first :data:`TUNE_EXAMPLES` examples of the batch at hand and its
   first :data:`TUNE_COLUMNS` columns (one for single products);
2. runs each candidate of that kind not known to be wrong on the model's modules
   (:data:`~hessops.operators._hvp.KNOWN_WRONG`) on the same slice and sets aside, with one
   :class:`~hessops.errors.HvpFormulationWarning`, any whose relative Frobenius error exceeds
   :func:`tolerance`; one that torch cannot run is set aside too; one that agrees is timed once more on
   the slice (its first run paid torch.func's first-call costs);
3. keeps the fastest of those timed.

**The tuner's cost is bounded by what the run has spent** (:func:`budget`): it starts a step (the
reference's slice run, or a candidate's check and timing) only while what it has spent so far, the sum of
its timed slice runs, is under :data:`TUNING_BUDGET` (10 %) of the seconds the products of that kind have
taken in this operator; candidates it did not reach are not tried (``excluded`` says so). So it costs at most
10 % of the time already spent plus one step, and a run that ends right after tuning is at most that much
slower than double backward alone, while a run that goes on keeps whatever the tuning found. The
candidates are tried in the order of :data:`CANDIDATES`.

The user's own errors (a shape error in the model, a failing loss) come from the reference, as themselves;
an operation torch cannot differentiate twice gives one :class:`~hessops.errors.HvpFormulationError`
chained to torch's error (:func:`run_reference`).

The choice is kept for the model in this process, and on disk (a small JSON file in ``HESSOPS_CACHE_DIR``,
default ``~/.cache/hessops``) keyed by the model's structure, the device, dtype, thread count, torch version
and kind; a choice read from disk is validated on the slice (two slice runs) before its first use in a
process. An explicit ``hvp_mode`` other than ``"autograd"`` is validated the same way on its first product,
and refused with :class:`~hessops.errors.HvpFormulationError` if it disagrees. What the tuner did, and what
it cost, is :class:`Tuning`, exposed as ``Hessian.hvp_tuning``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from hessops._io import atomic_write
from hessops.errors import HvpFormulationError, HvpFormulationWarning, OutputError
from hessops.operators import _hvp

# What "auto" may choose, for single vectors and for blocks of columns (the reference is always among them).
CANDIDATES = {
    "single": ("autograd", "reverse-over-forward", "forward-over-reverse"),
    "block": ("autograd", "autograd-loop", "reverse-over-reverse", "forward-over-reverse"),
}
TUNE_EXAMPLES = 8  # examples of the first batch that validation and timing run on
TUNE_COLUMNS = 4  # columns of the first block that validation and timing run on
CACHE_FILE = "hvp-tuning.json"
# "auto" tunes a kind of product only after this many products of it, and only if they took at least
# MIN_PRODUCT_SECONDS each: each other formulation's first call in a process costs 0.5-4 s (torch.func
# tracing; measured on the CIFAR CNN, 2 CPU cores), more than tuning can save on fewer or cheaper products
# (on the CPU double backward was the fastest on a ResNet-18; on a small CNN the best took ~30 % less time).
TUNE_AFTER_PRODUCTS = 20
MIN_PRODUCT_SECONDS = 2.0
# ... or once cheaper products of one kind have added up to this many seconds: a long run of small products (a
# density or Hutch++ on a small model, all blocks) then tunes within its budget. Measured (benchmarks/RESULTS.md,
# "Cheap products tuned once they add up"): a 5,100-parameter CNN's SLQ density, 8 probes x 200 steps, took
# 39 s instead of 58 s (reverse-over-reverse for its blocks, found in 0.8 s), a 100-step one 22 s instead of 25 s.
TUNE_AFTER_SECONDS = 10.0
# The tuner starts a step only while its slice runs have cost less than this fraction of the seconds the
# products of that kind have taken so far (budget()): it can then cost a run at most ~10 % plus one step.
TUNING_BUDGET = 0.1
# The validated choice for a model in this process: model -> {(device, dtype, names, kind): mode}. Held
# weakly, so that a model's choice dies with it (an id() key would pass it on to a later model at the same address).
_TUNED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]] = weakref.WeakKeyDictionary()
# The workloads of a model on which the compiled product was tried in this process (hessops/operators/compiled.py).
_COMPILE_TRIED: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = weakref.WeakKeyDictionary()


@dataclass
class Tuning:
    """What the tuner did for one kind of product (``"single"`` or ``"block"``).

    ``source``: ``"timed"`` (validated and timed here), ``"disk cache"`` (read from disk, validated here),
    ``"in-process"`` (chosen earlier in this process for the same model), ``"cheap product"`` (the first
    :data:`TUNE_AFTER_PRODUCTS` products took under :data:`MIN_PRODUCT_SECONDS` each: double backward, untuned
    so far; tuned once they add up to :data:`TUNE_AFTER_SECONDS`),
    ``"explicit"`` (an ``hvp_mode`` validated here), ``"compile trial"`` (the compiled product, kept after a trial
    on a long run: :mod:`hessops.operators.compiled`), ``"finite differences"`` (``hvp_mode="finite-difference"``: not
    checked against double backward, its error measured instead: hessops/operators/finite_difference.py),
    ``"reference"`` (double backward: nothing to check),
    ``"disabled"`` (``HESSOPS_HVP_TUNING=0``) or ``"low precision"`` (a half-precision dtype, where rounding hides
    wrong formulations: double backward). ``seconds``: the tuner's whole cost. ``examples`` and ``columns``: the
    slice it ran on; ``runs``: slice products it computed. ``errors``: each candidate's relative error against
    double backward on the slice; ``times``: its timed slice run (s); ``excluded``: why a formulation was not a
    candidate, or was not tried (the tuning budget, :func:`budget`, was spent). ``compile_trial``: what trying the
    compiled product on a whole batch found (its compile and product seconds, the baseline's, its error, whether it
    was kept, or why not); empty when it was not tried."""

    kind: str
    mode: str
    source: str
    seconds: float = 0.0
    examples: int = 0
    columns: int = 0
    runs: int = 0
    tolerance: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    compile_trial: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def tolerance(dtype: torch.dtype) -> float:
    r"""The largest relative Frobenius error :math:`\|HV - H_{ref}V\|_F / \|H_{ref}V\|_F` of a formulation
    that counts as rounding: :math:`10\sqrt{\varepsilon}` of the dtype (1.5e-7 in float64, 3.5e-3 in float32).
    Correct formulations differ from double backward by a few :math:`\varepsilon` times the conditioning of
    the sums involved (measured: at most 5e-16 in float64, 2e-7 in float32 on the test models); the wrong
    ones measured are 10-100 % off, so the square root leaves orders of magnitude on both sides."""
    return 10 * torch.finfo(dtype).eps ** 0.5


def enabled() -> bool:
    """``False`` when the environment sets ``HESSOPS_HVP_TUNING=0``: ``"auto"`` then means ``"autograd"``."""
    return os.environ.get("HESSOPS_HVP_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """``$HESSOPS_CACHE_DIR``, default ``~/.cache/hessops``."""
    return Path(os.environ.get("HESSOPS_CACHE_DIR") or Path.home() / ".cache" / "hessops")


def cache_key(
    model: nn.Module, names: tuple[str, ...], shapes, device: torch.device, dtype: torch.dtype, kind: str
) -> str:
    """A digest of what decides the fastest formulation: module types (and train/eval), parameter names and
    shapes, the device (its name for a GPU, the thread count on the CPU), dtype, torch version and kind."""
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    payload = {
        "modules": [
            [name, f"{type(m).__module__}.{type(m).__qualname__}", m.training] for name, m in model.named_modules()
        ],
        "params": [[n, list(s)] for n, s in zip(names, shapes)],
        "device": hardware,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "kind": kind,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache() -> dict:
    try:
        entries = json.loads((cache_dir() / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: tune afresh
    return entries if isinstance(entries, dict) else {}


def read_entry(key: str):
    """The value kept on disk under ``key`` (``None`` when there is none)."""
    return _read_cache().get(key)


def _write_cache(key: str, value) -> None:
    entries = _read_cache()
    entries[key] = value
    path = cache_dir() / CACHE_FILE
    text = json.dumps(entries, indent=1, sort_keys=True)
    try:
        atomic_write(path, lambda file: file.write(text.encode()))
    except OutputError:
        pass  # a read-only home: the choice still holds in this process


def relative_error(products: list[tuple[Tensor, ...]], reference: list[tuple[Tensor, ...]]) -> float:
    """Relative Frobenius error of a formulation's products against the reference's (0 when both vanish)."""
    diff = sum(float((a - b).double().square().sum()) for pa, pb in zip(products, reference) for a, b in zip(pa, pb))
    norm = sum(float(b.double().square().sum()) for pb in reference for b in pb)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return (diff / norm) ** 0.5


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(mode: str, call: Callable, device: torch.device):
    """``(call(), seconds)``, the device's queue drained on both sides."""
    _synchronize(device)
    began = time.perf_counter()
    outcome = call()
    _synchronize(device)
    return outcome, time.perf_counter() - began


def interrupted(error: BaseException) -> bool:
    """A Ctrl-C that torch handed back wrapped in a RuntimeError: not a failed formulation."""
    return isinstance(error.__context__, KeyboardInterrupt) or "KeyboardInterrupt" in str(error)


def _cannot_differentiate(error: BaseException) -> bool:
    """torch's words for an operation without the derivative a formulation needs."""
    text = str(error)
    return isinstance(error, (RuntimeError, NotImplementedError)) and (
        ("derivative for" in text and "not implemented" in text)
        or "forward AD" in text
        or "does not support" in text
        or "once_differentiable" in text
        or "functorch transforms" in text
    )


def run_reference(call: Callable):
    """``call()``, a double-backward computation: the user's own errors pass as they are; an operation torch
    cannot differentiate twice becomes one :class:`~hessops.errors.HvpFormulationError`, chained."""
    try:
        return call()
    except Exception as error:
        if interrupted(error):
            raise KeyboardInterrupt from error
        if _cannot_differentiate(error):
            raise HvpFormulationError(
                f"torch cannot differentiate this model twice ({type(error).__name__}: {str(error).splitlines()[0]}): "
                "every exact Hessian-vector product needs second derivatives of the model. Replace that "
                "operation by one torch can differentiate twice, or take the GGN (hessops.GGN)"
            ) from error
        raise  # the user's model or loss failed: their error, as it is


def in_process(model: nn.Module, key: tuple) -> bool:
    """Whether a formulation was already chosen for this model and workload in this process."""
    return key in _TUNED.get(model, {})


def remember(model: nn.Module, key: tuple, mode: str) -> None:
    """Keep ``mode`` as the formulation for ``model`` and workload ``key`` in this process."""
    _TUNED.setdefault(model, {})[key] = mode


def compile_tried(model: nn.Module, key: tuple, mark: bool = False) -> bool:
    """Whether the compiled product was tried for ``model`` and workload ``key`` in this process (``mark``: it is
    now)."""
    tried = _COMPILE_TRIED.setdefault(model, set())
    if mark:
        tried.add(key)
    return key in tried


def write_entry(key: str, value) -> None:
    """Keep ``value`` on disk under ``key`` (:func:`cache_dir`); a read-only home keeps nothing."""
    _write_cache(key, value)


def budget(spent: float) -> float:
    """The seconds of slice runs ``"auto"`` may spend tuning a kind of product whose products have taken
    ``spent`` seconds so far: :data:`TUNING_BUDGET` of them. A step that starts under it runs to its end."""
    return TUNING_BUDGET * spent


def worth_tuning(products: int, seconds: float) -> bool | None:
    """Whether ``"auto"`` should tune a kind of product after ``products`` of them took ``seconds``:
    ``None`` while too few have run to tell, then ``True`` when they took at least
    :data:`MIN_PRODUCT_SECONDS` each or :data:`TUNE_AFTER_SECONDS` in all (asked again as a run adds up)."""
    if products < TUNE_AFTER_PRODUCTS:
        return None
    return seconds >= MIN_PRODUCT_SECONDS * products or seconds >= TUNE_AFTER_SECONDS


@dataclass
class Slice:
    """The part of the first batch that the tuner runs on: ``run(mode)`` computes ``mode``'s products there."""

    run: Callable[[str], tuple]
    examples: int
    columns: int
    device: torch.device


def select(
    requested: str,
    kind: str,
    model: nn.Module,
    key: tuple,
    disk_key: Callable[[], str],
    probe: Slice,
    dtype: torch.dtype,
    *,
    spent: float,
) -> Tuning:
    """The formulation for products of ``kind`` on ``model``, with what choosing it cost; ``spent``: the
    seconds the products of that kind have taken so far, which bound what ``"auto"`` spends (:func:`budget`)."""
    began = time.perf_counter()
    tuning = _select(requested, kind, model, key, disk_key, probe, dtype, spent)
    tuning.seconds = time.perf_counter() - began
    return tuning


def _select(requested, kind, model, key, disk_key, probe: Slice, dtype, spent: float) -> Tuning:
    settled = _settled(requested, kind, model, key, dtype)
    if settled is not None:
        return settled
    tuning = Tuning(
        kind, _hvp.REFERENCE, "timed", examples=probe.examples, columns=probe.columns, tolerance=tolerance(dtype)
    )
    allowance = budget(spent) if requested == "auto" else float("inf")  # an explicit mode is always checked
    trials = _Trials(tuning, probe, allowance)
    if requested != "auto":
        return _explicit(trials, requested, model)
    candidates = _candidates(kind, model, tuning)
    entry = disk_key()
    cached = _read_cache().get(entry)
    if cached in candidates and trials.cost < allowance:
        if cached == _hvp.REFERENCE or trials.check(cached) is not None:
            tuning.mode, tuning.source = cached, "disk cache"
            _TUNED.setdefault(model, {})[key] = cached
            return tuning
    valid, untried = _try(trials, candidates, spent)
    disagreeing = {m: why for m, why in tuning.excluded.items() if m in tuning.errors}
    if disagreeing:
        warnings.warn(
            "Hessian-vector product formulation(s) set aside: "
            + "; ".join(f"{m} is {why}" for m, why in disagreeing.items())
            + f"{_suspects(model)}. hessops uses the others (docs/torch-pitfalls.md)",
            HvpFormulationWarning,
            stacklevel=6,
        )
    tuning.mode = min(valid, key=tuning.times.get)
    _TUNED.setdefault(model, {})[key] = tuning.mode
    if not untried:  # a choice among some candidates only is kept for this process, not for the next
        _write_cache(entry, tuning.mode)
    return tuning


def _settled(requested: str, kind: str, model: nn.Module, key: tuple, dtype: torch.dtype) -> Tuning | None:
    """The formulation when no slice need run: the reference asked for, tuning disabled, a low precision (whose
    rounding hides a wrong formulation), or a choice made earlier in this process; else ``None``."""
    if requested == _hvp.REFERENCE:
        return Tuning(kind, requested, "reference")
    if requested == "auto" and not enabled():
        return Tuning(kind, _hvp.REFERENCE, "disabled")
    if requested == "auto" and torch.finfo(dtype).eps > 1e-6:
        return Tuning(kind, _hvp.REFERENCE, "low precision")
    if requested == "auto" and key in _TUNED.get(model, {}):
        return Tuning(kind, _TUNED[model][key], "in-process")
    return None


class _Trials:
    """The slice runs of one tuning, recorded in ``tuning``: each timed (``cost``: their seconds so far, against
    the ``allowance``), the reference's first, and each other formulation's checked against its products."""

    def __init__(self, tuning: Tuning, probe: Slice, allowance: float) -> None:
        self.tuning, self.probe, self.allowance, self.cost = tuning, probe, allowance, 0.0
        self.reference, tuning.times[_hvp.REFERENCE] = self.timed(
            _hvp.REFERENCE, lambda: run_reference(lambda: probe.run(_hvp.REFERENCE)[0])
        )
        tuning.errors[_hvp.REFERENCE] = 0.0

    def timed(self, mode: str, call: Callable):
        """``call()``'s outcome and seconds (:func:`_timed`), counted in the runs and the cost."""
        self.tuning.runs += 1
        outcome, seconds = _timed(mode, call, self.probe.device)
        self.cost += seconds
        return outcome, seconds

    def check(self, mode: str) -> tuple | None:
        """The slice products of ``mode`` when it agrees with the reference, else ``None`` (and why)."""
        tuning = self.tuning
        try:
            products, seconds = self.timed(mode, lambda: self.probe.run(mode)[0])
        except HvpFormulationError as error:  # torch.compile failed on the model
            tuning.excluded[mode] = f"torch cannot run it here: {str(error).splitlines()[0]}"
            return None
        except Exception as error:
            if interrupted(error):
                raise KeyboardInterrupt from error
            if not _cannot_differentiate(error):
                raise
            tuning.excluded[mode] = f"torch cannot run it here: {str(error).splitlines()[0]}"
            return None
        tuning.errors[mode] = error = relative_error(products, self.reference)
        tuning.times[mode] = seconds
        if error > tuning.tolerance:
            tuning.excluded[mode] = f"{error:.2g} off double backward (tolerance {tuning.tolerance:.1g})"
            return None
        return products


def _explicit(trials: _Trials, requested: str, model: nn.Module) -> Tuning:
    """The formulation asked for by name, once checked against the reference; raises
    :class:`HvpFormulationError` when it disagrees or cannot run."""
    tuning = trials.tuning
    tuning.source, tuning.mode = "explicit", requested
    if trials.check(requested) is None:
        if requested not in tuning.errors:  # it did not run
            raise HvpFormulationError(
                f"hvp_mode={requested!r} cannot be used on this model: {tuning.excluded[requested]}. "
                "Use hvp_mode='auto' (validated) or 'autograd'"
            )
        raise HvpFormulationError(
            f"hvp_mode={requested!r} is wrong on this model: {tuning.excluded[requested]} on the first "
            f"{trials.probe.examples} examples{_suspects(model)}. Use hvp_mode='auto' (validated) or 'autograd'"
        )
    return tuning


def _candidates(kind: str, model: nn.Module, tuning: Tuning) -> list[str]:
    """The formulations of ``kind`` not known to be wrong on ``model`` (those are excluded in ``tuning``)."""
    candidates = []
    for mode in CANDIDATES[kind]:
        wrong = _hvp.known_wrong_on(mode, model)
        if wrong:
            tuning.excluded[mode] = f"known wrong through {', '.join(wrong)} (docs/torch-pitfalls.md)"
        else:
            candidates.append(mode)
    return candidates


def _try(trials: _Trials, candidates: list[str], spent: float) -> tuple[list[str], bool]:
    """Check and time each candidate while the allowance lasts: ``(valid, untried)``, the formulations that agree
    with the reference (the reference first) and whether the budget left some untried."""
    tuning, probe = trials.tuning, trials.probe
    valid, untried = [_hvp.REFERENCE], False
    for mode in candidates:
        if mode == _hvp.REFERENCE or mode in tuning.excluded:
            continue
        if trials.cost >= trials.allowance:
            untried = True
            tuning.excluded[mode] = (
                f"not tried: the tuner had spent its budget, {TUNING_BUDGET:.0%} of the {spent:.3g} s the products took"
            )
        elif trials.check(mode) is not None:  # its first run paid the first-call costs: time it once more
            _, tuning.times[mode] = trials.timed(mode, lambda mode=mode: probe.run(mode))
            valid.append(mode)
    return valid, untried


def _suspects(model: nn.Module) -> str:
    types = _hvp.suspect_modules(model)
    return f" (the model holds {', '.join(types)}: the likely cause)" if types else ""
