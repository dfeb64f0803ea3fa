r"""The first-order witness: each operator's products checked, on their first use, against first derivatives only.

Every product formulation is checked against double backward (hessops/operators/hvp_tuning.py), but where torch's
second derivatives are themselves wrong (weight norm in torch 2.14.1: hessops/operators/_written_out.py,
docs/torch-pitfalls.md) every formulation agrees on the wrong matrix. First-order autograd and plain forward
passes are not where torch's bugs are, so on the first product of an operator (:func:`check`) its products
:math:`C d` on a *slice* (the first :func:`slice_examples` examples of the batch at hand; unit directions
:math:`d` drawn from a fixed seed) are compared with a witness that uses no second derivative:

- Hessian: central differences of the gradient, :math:`D_h = (\nabla L(\theta + h d) - \nabla L(\theta - h d)) / 2h`,
  against double backward (the reference every other formulation is checked against on its first use, by
  hessops/operators/hvp_tuning.py: so the witness vouches for them all, and leaves the tuner's state alone);
- GGN: :math:`J^\top \tilde H_\ell \tilde u` with :math:`\tilde u = (f(\theta + h d) - f(\theta - h d)) / 2h` the
  central difference of the model's outputs, :math:`\tilde H_\ell \tilde u` the central difference of the loss's
  output gradient along :math:`\tilde u` and :math:`J^\top` one first-order backward;
- empirical and Monte-Carlo Fisher: :math:`J^\top M \tilde u`, :math:`M` the operator's own output-space matrix
  (built from first derivatives of the loss only; the labels drawn as the operator draws them);
- an operator of another kind (docs/extending.md) gets the symmetry probe only.

**Steps and tolerance.** :math:`h = \varepsilon_w^{1/3} \max(\lVert\theta\rVert, 1)` for :math:`\lVert d\rVert = 1`
(the outputs' step likewise, scaled by :math:`\max(\lVert f\rVert, 1)`), where :math:`\varepsilon_w` is the larger
of the witness dtype's eps and the measured product noise (below; only where the witness runs in the operator's
dtype, since a float32 operator's noise is its own rounding, not the float64 copy's): the step that balances the
truncation error :math:`O(h^2)` against the rounding error :math:`O(\varepsilon_w / h)`. Each witness is computed
with :math:`h` and :math:`2h`; the Richardson value :math:`W = (4 D_h - D_{2h}) / 3` is the witness and
:math:`e = \lVert D_h - D_{2h}\rVert` estimates what finite differences get wrong (three times the truncation
error of :math:`D_h`, and at least the rounding error of both). A product passes when

.. math:: \lVert C d - W\rVert \le 10\, e + \rho \max(\lVert W\rVert, \lVert C d\rVert), \qquad
          \rho = 10\sqrt{\varepsilon}\ \text{of the operator's dtype}

(:func:`hessops.operators.hvp_tuning.tolerance`: 1.5e-7 in float64, 3.5e-3 in float32; correct products
measured 1e-9 to 1e-11 off :math:`W` in float64, torch's weight norm 5-36 %). The witness runs in float64 on a
float64 copy of the parameters, buffers and slice, except for a lower-precision operator of more than
:data:`FLOAT64_LIMIT` parameters (:func:`in_float64`) or a model that cannot run in float64: then in the model's
own dtype, whose error estimate :math:`e` is larger, and so the tolerance (a float32 witness's
tolerance measured 0.6-1.5 % on the test models, so torch's weight norm, 5-36 % off, still fails).
A product that fails is refused,
:class:`~hessops.errors.WitnessError`, naming the layers hessops suspects.

**The noise of the products**: the symmetry defect
:math:`\delta = |w^\top C v - v^\top C w| / (\lVert w\rVert \lVert Cv\rVert + \lVert v\rVert \lVert Cw\rVert)`,
the largest over the pairs of :data:`DIRECTIONS` directions, is the operator's ``product_noise``: about
:math:`\varepsilon` of the dtype for a model computed in it, far more for a float64 model that computes in float32
inside (a HuggingFace Llama's RMSNorm and rotary embeddings), which then gets one
:class:`~hessops.errors.ProductNoiseWarning` (above :data:`NOISE_WARNING` times eps).

**Cost**: one call of the operator's batch product on the slice with :data:`DIRECTIONS` columns (one column
at a time, so that no first product imports sympy: hessops/operators/_autograd.py), and for each of the :data:`CHECKED`
checked directions four evaluations at shifted parameters: for the Hessian a forward and a first-order backward
each (8 of each in all); for the others a forward each, plus one forward at :math:`\theta` shared by all and a
first-order backward per witness (9 forwards, 4 backwards in all). Once per model and kind of operator in a
process (a later operator on the same model reuses the verdict, ``source="in-process"``). ``witness=False`` on
the operator, or ``HESSOPS_WITNESS=0`` in the
environment, turns it off. What it did is :class:`WitnessReport`, exposed as ``op.witness_report``.
"""

from __future__ import annotations

import math
import os
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from hessops import constants
from hessops.errors import ProductNoiseWarning, WitnessError
from hessops.operators import _hvp
from hessops.operators._written_out import weight_norm_layers
from hessops.operators.functional import (
    ParamTree,
    cast_floating,
    flat_to_tree,
    model_state,
    split_examples,
    write_tree_,
)
from hessops.operators.hvp_tuning import tolerance

WITNESS_EXAMPLES = 4  # examples of the first batch the witness runs on
DIRECTIONS = 3  # random unit directions multiplied: the symmetry probe runs on each pair
CHECKED = 2  # of which the first CHECKED are checked against finite differences
SAFETY = 10.0  # the multiple of the finite differences' error estimate e that a product may be off
FLOAT64_LIMIT = 20_000_000  # parameters: a larger lower-precision operator's witness runs in its own dtype
NOISE_WARNING = constants.NOISE_WARNING  # warn when the measured product noise exceeds this many eps of the dtype
# The verdict for a model in this process: model -> {key: WitnessReport}, held weakly (it dies with the model).
_WITNESSED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, WitnessReport]] = weakref.WeakKeyDictionary()


@dataclass
class WitnessReport:
    """What the first-order witness did for one operator.

    ``source``: ``"checked"`` (run here), ``"in-process"`` (the verdict of an earlier operator of the same kind on
    the same model), ``"disabled"`` (``witness=False`` or ``HESSOPS_WITNESS=0``) or ``"skipped: why"``.
    ``passed``: the verdict (``None`` when nothing was checked). ``precision``: the dtype the witness evaluated in.
    ``step``: the relative step :math:`\\varepsilon_w^{1/3}`. ``errors``: each checked direction's
    :math:`\\lVert Cd - W\\rVert / \\lVert W\\rVert`; ``tolerances``: the same for the tolerance;
    ``fd_errors``: :math:`e / \\lVert W\\rVert`. ``noise``: the symmetry defect (the operator's
    ``product_noise``). ``products``: columns the operator multiplied on the slice; ``evaluations``: forward passes
    of the model the witness made, ``backwards``: its first-order backward passes. ``written_out``:
    the layers whose second derivatives hessops computes in plain operations (weight norm). ``seconds``: its cost."""

    operator: str
    source: str
    passed: bool | None = None
    examples: int = 0
    precision: str = ""
    step: float = 0.0
    errors: list[float] = field(default_factory=list)
    tolerances: list[float] = field(default_factory=list)
    fd_errors: list[float] = field(default_factory=list)
    noise: float | None = None
    products: int = 0
    evaluations: int = 0
    backwards: int = 0
    written_out: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def enabled() -> bool:
    """``False`` when the environment sets ``HESSOPS_WITNESS=0`` (also ``false``, ``no``, ``off``)."""
    return os.environ.get("HESSOPS_WITNESS", "1").strip().lower() not in ("0", "false", "no", "off")


def flat(tree: ParamTree) -> Tensor:
    """A tuple of ``(c, *shape)`` tensors as one ``(c, n)`` matrix, in the flat vector's order."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tree], dim=1)


def shifted(params: ParamTree, direction: ParamTree, h: float) -> ParamTree:
    """:math:`\\theta + h d`, leaf by leaf (one new tensor per leaf)."""
    return tuple(torch.add(p, d, alpha=h) for p, d in zip(params, direction))


def central(fn: Callable[[float], Tensor | ParamTree], h: float) -> Tensor | ParamTree:
    """``(fn(h) - fn(-h)) / 2h``: the central difference of ``fn`` (a tensor, or a tuple of tensors) along the step
    ``h``, in place in ``fn(h)``'s fresh result (no parameter-sized temporaries: at 124M parameters each one costs
    a second of fresh pages)."""
    plus, minus = fn(h), fn(-h)
    if isinstance(plus, tuple):
        for a, b in zip(plus, minus):
            a.sub_(b).div_(2 * h)
        return plus
    return plus.sub_(minus).div_(2 * h)


def tree_norm(tree: ParamTree) -> float:
    """The Euclidean norm of a tuple of tensors, in float64."""
    return sum(float(gram_diagonal(t.reshape(1, -1))) for t in tree) ** 0.5


def symmetry_defect(directions: Tensor, products: Tensor) -> float:
    """The largest :math:`|d_i^\\top C d_j - d_j^\\top C d_i| / (\\lVert d_i\\rVert \\lVert Cd_j\\rVert +
    \\lVert d_j\\rVert \\lVert Cd_i\\rVert)` over the pairs ``i < j`` of the rows of ``directions`` and ``products``
    (sums in float64, a slab of columns at a time: :func:`gram`)."""
    gram_dc, norms_d, norms_c = gram(directions, products), row_norms(directions), row_norms(products)
    worst = 0.0
    for i in range(len(directions)):
        for j in range(i + 1, len(directions)):
            scale = float(norms_d[i] * norms_c[j] + norms_d[j] * norms_c[i])
            if scale > 0:
                worst = max(worst, abs(float(gram_dc[i, j] - gram_dc[j, i])) / scale)
    return worst


SLAB = 1 << 20  # columns of a float64 reduction at a time: parameter-sized float64 copies cost more than the sums


def gram(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` in float64 for ``(r, n)`` matrices, summed over slabs of :data:`SLAB` columns (no float64 copy of
    either matrix is made)."""
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], SLAB):
        total += a[:, start : start + SLAB].double() @ b[:, start : start + SLAB].double().T
    return total


def row_norms(a: Tensor) -> Tensor:
    """The Euclidean norm of each row of ``a`` in float64, over slabs of :data:`SLAB` columns."""
    return gram_diagonal(a).sqrt()


def gram_diagonal(a: Tensor) -> Tensor:
    """The squared norm of each row of ``a`` (a 2-d matrix, or one row), in float64 over slabs."""
    a = a.reshape(-1, a.shape[-1])
    total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], SLAB):
        total += a[:, start : start + SLAB].double().square().sum(dim=1)
    return total


def _directions(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:data:`DIRECTIONS` random unit directions from a fixed seed, drawn in ``dtype`` (float32 for the
    half-precision ones): a float64 draw of three parameter-sized vectors took 10.6 s of a GPT-2-small's first
    product (benchmarks/RESULTS.md)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    drawn = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    d = torch.randn(DIRECTIONS, n, generator=generator, dtype=drawn)
    d /= row_norms(d).to(drawn).unsqueeze(1)
    return d.to(device=device, dtype=dtype)


class Probe:
    """First-order evaluations of the model on the witness's slice, never a second derivative: ``evaluations``
    counts the forward passes, ``backwards`` the first-order backward passes."""

    def __init__(self) -> None:
        self.evaluations = 0
        self.backwards = 0
        self._linearized: tuple | None = None

    def gradient(self, batch, params: ParamTree) -> ParamTree:
        """:math:`\\nabla_\\theta L_b(\\theta)` at ``params`` on ``batch`` (a
        :class:`~hessops.operators.Batch`), leaf by leaf in the flat order (not concatenated: a parameter-sized
        copy per evaluation)."""
        self.evaluations += 1
        self.backwards += 1
        with torch.enable_grad():
            p = tuple(t.detach().requires_grad_() for t in params)
            loss = batch.loss(batch.outputs(p))
            return tuple(torch.autograd.grad(loss, p, allow_unused=True, materialize_grads=True))

    def outputs(self, batch, params: ParamTree, model: nn.Module) -> Tensor:
        """The outputs of ``model`` (sharing the operator's parameter names) at ``params`` on ``batch``."""
        self.evaluations += 1
        with torch.no_grad():
            return batch.outputs(params, model)

    def linearized(self, batch, model: nn.Module) -> Tensor:
        """The outputs of ``model`` at :math:`\\theta` (``batch.params``), detached; their graph is kept for
        :meth:`pullback` (one forward for every witness of the slice)."""
        if self._linearized is None:
            self.evaluations += 1
            with torch.enable_grad():
                p = tuple(t.detach().requires_grad_() for t in batch.params)
                self._linearized = (p, batch.outputs(p, model))
        return self._linearized[1].detach()

    def pullback(self, cotangent: Tensor) -> Tensor:
        """:math:`J^\\top u` at :math:`\\theta` for ``cotangent`` :math:`u` shaped like the outputs of
        :meth:`linearized`, flat: one first-order backward of :math:`\\langle f(\\theta), u\\rangle`."""
        self.backwards += 1
        p, outputs = self._linearized
        with torch.enable_grad():
            total = (outputs * cotangent).sum()
            grads = torch.autograd.grad(total, p, retain_graph=True, allow_unused=True, materialize_grads=True)
        return torch.cat([g.reshape(-1) for g in grads])


def check(op, batch) -> WitnessReport | None:
    """The witness's verdict for ``op`` (a :class:`~hessops.CurvatureOperator`) from a slice of ``batch`` (the first
    batch of its first product), or an earlier operator's on the same model in this process; see the module's
    docstring. ``None`` when the slice counts no target (all ignored): the next batch is tried. Raises nothing:
    the caller refuses a failed verdict (:func:`refusal`)."""
    problem, name = op.problem, type(op).__name__
    if not (problem.witness and enabled()):
        return WitnessReport(name, "disabled")
    if problem.allow_train_mode:
        return WitnessReport(name, "skipped: allow_train_mode (the model may be random, or depend on the batching)")
    key = op._witness_key()
    earlier = _WITNESSED.get(problem.model, {}).get(key)
    if earlier is not None:
        return WitnessReport(**{**earlier.to_dict(), "source": "in-process", "seconds": 0.0})
    began = time.perf_counter()
    report = _run(op, batch)
    if report is None:
        return None
    report.seconds = time.perf_counter() - began
    _WITNESSED.setdefault(problem.model, {})[key] = report
    return report


def _run(op, batch) -> WitnessReport | None:
    problem = op.problem
    inputs, targets, examples = split_examples(batch.inputs, batch.targets, batch.size, slice_examples(op))[0]
    if problem.loss_fn.batch_weight(targets, examples) == 0:
        return None
    piece = type(batch)(inputs, targets, examples, batch.index, batch.part, batch.params, batch.constants, problem)
    d = _directions(op.shape[0], op.dtype, op.device)
    blocks = [flat_to_tree(d[i : i + 1], problem.shapes) for i in range(DIRECTIONS)]
    report = WitnessReport(type(op).__name__, "checked", examples=examples, products=DIRECTIONS)
    products, _ = op._guarded_products(piece, blocks, witness=True)
    rows = torch.empty(len(products), op.shape[0], dtype=op.dtype, device=op.device)
    for i, product in enumerate(products):  # written in place: one parameter-sized copy each, no temporaries
        write_tree_(rows[i : i + 1], product)
    products = rows
    report.noise = symmetry_defect(d, products)
    report.written_out = op._written_out_layers()
    probe = Probe()
    try:
        verdicts = _compare(op, probe, _in_float64(op, piece) if in_float64(op) else piece, blocks, products, report)
    except Exception:
        if op.dtype == torch.float64 or not in_float64(op):
            raise
        probe._linearized = None  # the model cannot run in float64 (a cast inside, memory): its own dtype
        verdicts = _compare(op, probe, piece, blocks, products, report)
    checked = [v for v in verdicts if v is not None]
    report.passed = all(checked) if checked else None
    report.evaluations, report.backwards = probe.evaluations, probe.backwards
    return report


def _compare(op, probe: Probe, witness, blocks: list[ParamTree], products: Tensor, report: WitnessReport) -> list:
    """Check the first :data:`CHECKED` products against the witness evaluated on ``witness`` (the slice, in the
    dtype it is in); fills ``report``'s precision, step and errors and returns each direction's verdict (``None``
    where the witness is not finite)."""
    precision = witness.params[0].dtype
    report.precision = str(precision).removeprefix("torch.")
    noise = min(report.noise, NOISE_STEP_CAP) if precision == op.dtype else 0.0  # else the products' own rounding
    report.step = max(torch.finfo(precision).eps, noise) ** (1 / 3)
    report.errors, report.tolerances, report.fd_errors = [], [], []
    rho, verdicts = tolerance(op.dtype), []
    for i in range(CHECKED):
        direction = tuple(t[0].to(precision) for t in blocks[i])
        one = op._first_order(probe, witness, direction, report.step)
        if one is None:  # an operator of a kind without a first-order witness
            break
        two = op._first_order(probe, witness, direction, 2 * report.step)
        error, allowed, fd_error = agreement(products[i], one, two, rho)
        report.errors.append(error)
        report.tolerances.append(allowed)
        report.fd_errors.append(fd_error)
        finite = math.isfinite(error) and math.isfinite(allowed)  # a witness that overflowed checks nothing
        verdicts.append(error <= allowed if finite else None)
    return verdicts


def agreement(
    product: Tensor, one: Tensor | ParamTree, two: Tensor | ParamTree, rho: float
) -> tuple[float, float, float]:
    r"""How far ``product`` :math:`Cd` is from the witness :math:`W = (4D_h - D_{2h})/3` of the central differences
    ``one`` :math:`D_h` and ``two`` :math:`D_{2h}` (flat, or leaf by leaf in the flat order), and how far it may
    be: ``(error, allowed, fd_error)``, each
    relative to :math:`\lVert W\rVert`, with ``allowed`` :math:`= 10e + \rho \max(\lVert W\rVert,
    \lVert Cd\rVert)` and ``fd_error`` :math:`= e = \lVert D_h - D_{2h}\rVert`; computed in float64, a slab of
    entries at a time."""
    sums = torch.zeros(4, dtype=torch.float64, device=product.device)  # |W|², |Cd|², |D_h - D_2h|², |Cd - W|²
    ones, twos = _pieces(one), _pieces(two)
    products = product.reshape(-1).split([t.numel() for t in ones])
    for leaf_product, leaf_one, leaf_two in zip(products, ones, twos):
        for start in range(0, leaf_product.numel(), SLAB):
            piece = slice(start, start + SLAB)
            d_h, d_2h, c = leaf_one[piece].double(), leaf_two[piece].double(), leaf_product[piece].double()
            w = (4 * d_h - d_2h) / 3
            sums += torch.stack(
                [w.square().sum(), c.square().sum(), (d_h - d_2h).square().sum(), (c - w).square().sum()]
            )
    w_norm, c_norm, fd_error, error = (float(x) for x in sums.sqrt())
    allowed = SAFETY * fd_error + rho * max(w_norm, c_norm)
    scale = max(w_norm, torch.finfo(torch.float64).tiny)
    return error / scale, allowed / scale, fd_error / scale


def _pieces(x: Tensor | ParamTree) -> list[Tensor]:
    """A flat tensor, or a tuple of tensors in the flat order, as a list of flat pieces (views)."""
    return [t.reshape(-1) for t in x] if isinstance(x, tuple) else [x.reshape(-1)]


# The measured noise widens the witness's steps (a model computing in float32 inside is that noisy) up to this
# level: a larger symmetry defect is an asymmetric product, not noise, and must not blunt the check.
NOISE_STEP_CAP = 1e-6


def slice_examples(op) -> int:
    """How many examples of a batch a first-use check runs on: :data:`WITNESS_EXAMPLES`, or one for an operator of
    more than :data:`FLOAT64_LIMIT` parameters, where each example's evaluations cost seconds (a check's power does
    not grow with the slice: every example runs the same layers)."""
    return WITNESS_EXAMPLES if op.shape[0] <= FLOAT64_LIMIT else 1


def in_float64(op) -> bool:
    """Whether the witness evaluates in float64: for a float64 operator, and for a lower-precision one of at
    most :data:`FLOAT64_LIMIT` parameters (above it a float64 copy of the model costs more than the check is
    worth: at GPT-2 small's 124M, 21 s of float64 gradients and 7 s of casts on the CPU, 1 GB more memory,
    and float64 runs 2-64 times slower than float32 on GPUs)."""
    return op.dtype == torch.float64 or op.shape[0] <= FLOAT64_LIMIT


def _in_float64(op, piece):
    """The slice as a float64 copy: parameters, buffers, frozen parameters and floating inputs and targets cast."""
    if op.dtype == torch.float64:
        return piece
    params, constants = model_state(op.problem, torch.float64)
    return type(piece)(
        cast_floating(piece.inputs, torch.float64),
        cast_floating(piece.targets, torch.float64),
        piece.size,
        piece.index,
        piece.part,
        params,
        constants,
        op.problem,
    )


def refusal(op, report: WitnessReport) -> WitnessError:
    """The error that refuses ``op`` after a failed witness: how far off, where hessops suspects the cause, the fix."""
    finite = [i for i, e in enumerate(report.errors) if math.isfinite(e) and math.isfinite(report.tolerances[i])]
    worst = max(finite, key=lambda i: report.errors[i] / max(report.tolerances[i], 1e-300))
    where = suspects(op.problem.model)
    return WitnessError(
        f"{report.operator}'s products are {report.errors[worst]:.2g} off the first-order witness (central finite "
        f"differences, tolerance {report.tolerances[worst]:.1g}) on the first {report.examples} examples: torch's "
        f"second derivatives are wrong through some layer of this model{where}. Write that layer out in plain "
        "operations, or use an operator that needs first derivatives only (EmpiricalFisher); witness=False (or "
        "HESSOPS_WITNESS=0) skips this check at the risk of a wrong matrix (docs/torch-pitfalls.md)"
    )


def suspects(model: nn.Module) -> str:
    """`` (hessops suspects ...)``: the layers of ``model`` whose second derivatives torch may get wrong (weight norm,
    normalization layers), for messages; empty when it holds none."""
    found = weight_norm_layers(model) + [f"{t} layers" for t in _hvp.suspect_modules(model)]
    return f" (hessops suspects {', '.join(found)})" if found else ""


def warn_noise(op, report: WitnessReport) -> None:
    """One :class:`~hessops.errors.ProductNoiseWarning` when the measured noise exceeds :data:`NOISE_WARNING` eps."""
    eps = torch.finfo(op.dtype).eps
    if report.source != "checked" or report.passed is False or (report.noise or 0.0) <= NOISE_WARNING * eps:
        return
    dtype = str(op.dtype).removeprefix("torch.")
    warnings.warn(
        f"a {dtype} {report.operator} whose products carry {report.noise:.1g} relative noise ({report.noise / eps:.0e} "
        f"eps of {dtype}, measured as their asymmetry): the model computes in lower precision somewhere inside "
        "(float32 RMSNorm or rotary embeddings, a cast in forward); eigs' error bounds take that lower precision's "
        "rounding (hessops.analysis.spectrum.rounding), not the dtype's",
        ProductNoiseWarning,
        stacklevel=5,
    )
