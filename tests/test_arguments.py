"""Every public function and constructor of the analysis API refuses a bad argument with an error that names
it (InvalidArgumentError: both a ValueError and a TypeError), instead of an unrelated crash or a NaN.

All on tiny operators (a 27-parameter MLP Hessian, dense CoLA matrices): nothing here needs a tolerance
except the exact trace of the small operator (1e-12 relative: n products summed in float64)."""

from __future__ import annotations

import math

import cola
import pytest
import torch
from torch import nn
from toy_networks import mlp

import hessops
from hessops.operators.functional import all_finite


@pytest.fixture(scope="module")
def H():
    torch.manual_seed(0)
    model = mlp(4, 3, 3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    return hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])


@pytest.fixture(scope="module")
def A():
    """A 20 × 20 symmetric positive definite dense operator, eigenvalues 1..20."""
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    return cola.PSD(
        cola.SelfAdjoint(cola.ops.Dense(q @ torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64)) @ q.T))
    )


BAD = [
    ("eigs", dict(k=2.5), "k=2.5"),
    ("eigs", dict(k=True), "k=True"),
    ("eigs", dict(k=0), "k=0"),
    ("eigs", dict(k=21), "k=21"),
    ("eigs", dict(which="XX"), "which='XX'"),
    ("eigs", dict(tol=0.0), "tol=0"),
    ("eigs", dict(tol=float("nan")), "tol=nan"),
    ("eigs", dict(value_tol=float("inf")), "value_tol=inf"),
    ("eigs", dict(max_iters=0), "max_iters=0"),
    ("eigs", dict(k=3, max_iters=2), "max_iters=2"),
    ("eigs", dict(seed=1.5), "seed=1.5"),
    ("eigs", dict(verify=1), "verify=1"),
    ("eigs", dict(start=torch.zeros(20, dtype=torch.float64)), "start is the zero vector"),
    ("eigs", dict(start=torch.full((20,), float("nan"), dtype=torch.float64)), "start holds NaN"),
    ("eigs", dict(start=torch.ones(19, dtype=torch.float64)), "start has shape"),
    ("spectral_density", dict(lanczos_steps=0), "lanczos_steps=0"),
    ("spectral_density", dict(num_probes=0), "num_probes=0"),
    ("spectral_density", dict(num_probes=2.0), "num_probes=2.0"),
    ("spectral_density", dict(sigma=0.0), "sigma=0"),
    ("spectral_density", dict(sigma=-1.0), "sigma=-1"),
    ("spectral_density", dict(grid=1), "grid=1"),
    ("spectral_density", dict(grid=[0.0, 1.0]), "grid="),
    ("trace", dict(probes=0), "probes=0"),
    ("trace", dict(probes=3), "probes=3"),
    ("trace", dict(method="hutchinson", probes=1), "probes=1"),
    ("eigs", dict(basis="ram"), "basis='ram'"),
    ("eigs", dict(basis="host", basis_path="b.npy"), "basis_path='b.npy'"),
    ("spectral_density", dict(checkpoint="x.ckpt", checkpoint_every=-1.0), "checkpoint_every=-1"),
    ("trace", dict(checkpoint=3), "checkpoint must be a file path"),
    ("trace", dict(method="exact"), "method='exact'"),
    ("logdet", dict(probes=0), "probes=0"),
    ("logdet", dict(lanczos_steps=0), "lanczos_steps=0"),
    ("logdet", dict(method="lu"), "method='lu'"),
    ("basin_volume", dict(threshold=float("inf")), "threshold=inf"),
    ("basin_volume", dict(threshold=0.0), "threshold=0"),
    ("basin_volume", dict(threshold=1.0, c=float("nan")), "c=nan"),
    ("basin_volume", dict(threshold=1.0, probes=0, method="slq"), "probes=0"),
    ("basin_volume", dict(threshold=1.0, eigs_max_iters=0), "eigs_max_iters=0"),
    ("basin_volume", dict(threshold=1.0, smallest_eigenvalue=float("inf")), "smallest_eigenvalue=inf"),
    ("logdet", dict(eigs_max_iters=2.5), "eigs_max_iters=2.5"),
]


@pytest.mark.parametrize("name, kwargs, named", BAD, ids=[f"{n}-{m}" for n, _, m in BAD])
def test_a_bad_argument_is_named(A, name, kwargs, named):
    with pytest.raises(hessops.InvalidArgumentError) as caught:
        getattr(hessops, name)(A, **kwargs)
    assert named in str(caught.value)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, TypeError)


def test_log_unit_ball_volume_wants_a_dimension():
    for bad, named in ((2.5, "n=2.5"), (-1, "n=-1"), (True, "n=True")):
        with pytest.raises(hessops.InvalidArgumentError, match=named.replace(".", r"\.")):
            hessops.log_unit_ball_volume(bad)
    assert hessops.log_unit_ball_volume(0) == 0.0  # V_0 = 1


def test_regularized_wants_a_finite_c_and_proves_psd(H):
    for bad, named in ((float("nan"), "c=nan"), (float("inf"), "c=inf"), ("1", "c='1'")):
        with pytest.raises(hessops.InvalidArgumentError, match=named):
            hessops.Regularized(H, bad)
    G = hessops.GGN(H.problem.model, nn.CrossEntropyLoss(), H.problem.data)
    assert G.isa(cola.PSD) and (-2 * G).isa(cola.PSD)  # CoLA's trap: a negative multiple keeps PSD
    assert not hessops.Regularized(-2 * G, 1.0).isa(cola.PSD)
    assert hessops.Regularized(2 * G, 1.0).isa(cola.PSD) and hessops.Regularized(G, 0.0).isa(cola.PSD)
    assert not hessops.Regularized(G, -1.0).isa(cola.PSD)
    assert not hessops.Regularized(G + (-5.0) * cola.ops.I_like(G), 0.0).isa(cola.PSD)
    assert not hessops.Regularized(cola.ops.Diagonal(torch.tensor([1.0, -1.0], dtype=torch.float64)), 0.0).isa(cola.PSD)
    assert hessops.Regularized(cola.ops.Diagonal(torch.tensor([1.0, 0.0], dtype=torch.float64)), 0.0).isa(cola.PSD)


def test_operator_products_refuse_bad_vectors_by_name(H):
    n = H.shape[0]
    with pytest.raises(hessops.InvalidArgumentError, match="holds NaN or inf"):
        H @ torch.full((n,), float("nan"), dtype=torch.float64)
    with pytest.raises(hessops.InvalidArgumentError, match="holds NaN or inf"):
        H @ torch.tensor([math.inf] + [0.0] * (n - 1), dtype=torch.float64)
    inf_and_minus_inf = torch.zeros(n, dtype=torch.float64)
    inf_and_minus_inf[:2] = torch.tensor([math.inf, -math.inf])  # a sum of NaN, not of inf
    with pytest.raises(hessops.InvalidArgumentError, match="holds NaN or inf"):
        H @ inf_and_minus_inf
    huge = torch.full((n,), torch.finfo(torch.float64).max / 2, dtype=torch.float64)
    assert all_finite(huge) and not all_finite(inf_and_minus_inf)  # a finite vector whose sum overflows
    for shape in ((n, 1, 1), (n + 1,), (n - 1, 2)):
        with pytest.raises(hessops.InvalidArgumentError, match=r"got shape \(" + ", ".join(map(str, shape))):
            H @ torch.ones(shape, dtype=torch.float64)


def test_trackers_check_their_arguments(H):
    model, data = H.problem.model, H.problem.data
    for kwargs, named in (
        (dict(every=0), "every=0"),
        (dict(k=1.5), "k=1.5"),
        (dict(tol=-1.0), "tol=-1"),
        (dict(max_iters=0), "max_iters=0"),
        (dict(seed=None), "seed=None"),
        (dict(unit=3), "unit=3"),
    ):
        with pytest.raises(hessops.InvalidArgumentError, match=named.replace(".", r"\.")):
            hessops.SharpnessTracker(model, nn.CrossEntropyLoss(), data, **kwargs)
    with pytest.raises(hessops.InvalidArgumentError, match="model must be a torch.nn.Module"):
        hessops.GradNormTracker([model])


def test_trace_with_more_probes_than_dimensions_is_exact(A, H):
    """Before: Hutch++ crashed whenever probes // 3 > n. Now probes ≥ n returns the exact trace (n products)."""
    for method in ("hutch++", "hutchinson"):
        result = hessops.trace(A, probes=100, method=method)
        assert result.method == "exact" and result.std_error == 0.0 and result.n_matvecs == 20
        assert result.estimate == pytest.approx(210.0, rel=1e-12)  # 1 + 2 + ... + 20
    result = hessops.trace(H)  # n = 27 < the default 100 probes
    assert result.method == "exact" and result.estimate == pytest.approx(
        float(torch.diagonal(H.to_dense()).sum()), rel=1e-12
    )


def test_half_precision_operators_are_refused_with_the_fix():
    """A bfloat16 model's operator: eigenvalues were 2-12x too small with converged=True. Refused everywhere,
    and the fix (dtype=torch.float32) works."""
    torch.manual_seed(0)
    model = mlp(4, 3, 3).to(torch.bfloat16)
    x, y = torch.randn(12, 4, dtype=torch.bfloat16), torch.randint(0, 3, (12,))
    low = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)])
    for call in (
        lambda: hessops.eigs(low, 1),
        lambda: hessops.spectral_density(low),
        lambda: hessops.trace(low),
        lambda: hessops.logdet(low),
    ):
        with pytest.raises(
            hessops.DtypeMismatchError, match=r"dtype=torch\.float32, which evaluates the model in float32"
        ):
            call()
    fixed = hessops.Hessian(model, nn.CrossEntropyLoss(), [(x, y)], dtype=torch.float32)
    assert hessops.eigs(fixed, 1, "LA", tol=1e-4).converged
