"""hessops operators inside CoLA's own routines, and the CoLA traps they guard (docs/cola-pitfalls.md)."""

from __future__ import annotations

import cola
import pytest
import torch
from reference import dense_ggn, reference_hessian, relative_error
from torch import nn
from toy_networks import bn_mlp, mlp

import hessops


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model, x, y = bn_mlp().double(), torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    return model, nn.CrossEntropyLoss(), [(x[:16], y[:16]), (x[16:], y[16:])]


def test_annotations(problem):
    H, G = hessops.Hessian(*problem), hessops.GGN(*problem)
    assert H.isa(cola.SelfAdjoint) and not H.isa(cola.PSD)
    for op in (G, hessops.EmpiricalFisher(*problem), hessops.MCFisher(*problem)):
        assert op.isa(cola.PSD) and op.isa(cola.SelfAdjoint)
    assert hessops.Regularized(G, 0.1).isa(cola.PSD)
    assert not hessops.Regularized(G, -0.1).isa(cola.PSD) and hessops.Regularized(G, -0.1).isa(cola.SelfAdjoint)
    assert not hessops.Regularized(H, 0.1).isa(cola.PSD) and hessops.Regularized(H, 0.1).isa(cola.SelfAdjoint)


def test_copies_made_by_cola_still_work(problem):
    """Annotation wrappers rebuild the operator from its pytree without __init__."""
    H = hessops.Hessian(*problem)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    wrapped = cola.PSD(H)
    assert wrapped is not H and wrapped.isa(cola.PSD)
    torch.testing.assert_close(wrapped @ v, H @ v, rtol=0, atol=0)
    assert wrapped.device == H.device and wrapped.dtype == H.dtype


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_cola_lanczos_eigenvalues_match_eigvalsh(problem, kind):
    """Lanczos run to convergence recovers the top-5 eigenvalues to 1e-8 relative to λmax."""
    op = (hessops.Hessian if kind == "hessian" else hessops.GGN)(*problem)
    dense = reference_hessian if kind == "hessian" else dense_ggn  # tests/reference.py
    exact = torch.linalg.eigvalsh(dense(*problem))
    values, vectors = cola.eig(op, 5, which="LM", alg=cola.Lanczos(max_iters=op.shape[0], tol=1e-12, key=0))
    top = torch.sort(values.real, descending=True).values
    torch.testing.assert_close(top, exact.flip(0)[:5], rtol=0, atol=1e-8 * float(exact.abs().max()))


def test_cola_which_LM_is_largest_algebraic_not_magnitude():
    """The trap the README warns of: CoLA's which="LM" takes the top of the sorted spectrum."""
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    spectrum = torch.tensor([-10.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    A = cola.SelfAdjoint(cola.ops.Dense(q @ torch.diag(spectrum) @ q.T))
    values, _ = cola.eig(A, 1, which="LM", alg=cola.Lanczos(max_iters=4, key=0))
    assert float(values.real[0]) == pytest.approx(3.0)  # not -10, the largest in magnitude


def test_trace_and_diag(problem):
    H = hessops.Hessian(*problem)
    dense = H.to_dense()
    assert float(cola.linalg.trace(H)) == pytest.approx(float(dense.trace()), rel=1e-10)
    assert relative_error(cola.linalg.diag(H), dense.diagonal()) < 1e-10


@pytest.mark.parametrize("c", [1e-3, 1.0])
def test_logdet_of_regularized_matches_slogdet(problem, c):
    G = hessops.GGN(*problem)
    R = hessops.Regularized(G, c)
    dense = G.to_dense() + c * torch.eye(G.shape[0], dtype=torch.float64)
    sign, expected = torch.linalg.slogdet(dense)
    assert float(sign) == 1.0
    assert float(cola.linalg.logdet(R)) == pytest.approx(float(expected), rel=1e-10)
    assert float(cola.linalg.logdet(R, cola.Cholesky())) == pytest.approx(float(expected), rel=1e-10)
    assert relative_error(R.to_dense(), dense) < 1e-12


def test_logdet_of_a_regularized_indefinite_hessian(problem):
    H = hessops.Hessian(*problem)
    dense = H.to_dense()
    c = float(-torch.linalg.eigvalsh(dense).min()) + 0.5  # H + cI is positive definite
    R = hessops.Regularized(H, c)
    _, expected = torch.linalg.slogdet(dense + c * torch.eye(H.shape[0], dtype=torch.float64))
    assert float(cola.linalg.logdet(R)) == pytest.approx(float(expected), rel=1e-10)


def test_colas_plus_identity_works_but_gets_its_annotations_wrong(problem):
    """`op + c * I_like(op)` works with beartype < 0.23 (pinned), but the Sum's annotations are the
    intersection of its terms': a self-adjoint Hessian + cI loses SelfAdjoint (Lanczos then refuses it), and
    c·I counts as PSD whatever the sign of c, so GGN − 5I is called PSD although it is indefinite.
    hessops.Regularized annotates both correctly."""
    H, G = hessops.Hessian(*problem), hessops.GGN(*problem)
    assert not (H + 0.5 * cola.ops.I_like(H)).isa(cola.SelfAdjoint)
    assert hessops.Regularized(H, 0.5).isa(cola.SelfAdjoint)
    shifted = G + (-5.0) * cola.ops.I_like(G)
    assert shifted.isa(cola.PSD) and float(torch.linalg.eigvalsh(shifted.to_dense()).min()) < -4.9  # CoLA's error
    assert not hessops.Regularized(G, -5.0).isa(cola.PSD)
    assert cola.SelfAdjoint(H + 0.5 * cola.ops.I_like(H)).isa(cola.SelfAdjoint)  # the re-wrap workaround
    v = torch.randn(G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(shifted @ v, hessops.Regularized(G, -5.0) @ v, rtol=1e-12, atol=1e-14)


def test_regularized_refuses_what_it_cannot_wrap(problem):
    with pytest.raises(TypeError, match="CoLA LinearOperator"):
        hessops.Regularized(torch.eye(3), 1.0)


def test_cuda_device_is_normalized(monkeypatch):
    """CoLA's Sum asserts equal devices, and torch.device('cuda') != torch.device('cuda:0')."""
    from hessops.operators.functional import normalize_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert normalize_device("cuda") == torch.device("cuda:0")
    assert normalize_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_operators_on_gpu_match_cpu():
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    for cls in (hessops.Hessian, hessops.GGN, hessops.EmpiricalFisher, hessops.MCFisher):
        cpu = cls(model, nn.CrossEntropyLoss(), data) @ v
        model_gpu = mlp().double().cuda()
        model_gpu.load_state_dict(model.state_dict())
        gpu_data = [(a.cuda(), b.cuda()) for a, b in data]
        op = cls(model_gpu, nn.CrossEntropyLoss(), gpu_data)
        assert op.device == torch.device("cuda", torch.cuda.current_device())
        if cls is not hessops.MCFisher:  # sampled labels differ between CPU and GPU generators
            assert relative_error((op @ v.cuda()).cpu(), cpu) < 1e-10
        R = hessops.Regularized(op, 1.0)
        assert (R + 0.0).device == op.device


def test_colas_product_with_identity_is_ambiguous(problem):
    """`op @ I_like(op)` raises plum's AmbiguousLookupError under every beartype: use op.to_dense()."""
    from plum import AmbiguousLookupError

    G = hessops.GGN(*problem)
    with pytest.raises(AmbiguousLookupError):
        G @ cola.ops.I_like(G)
    assert G.to_dense().shape == G.shape


def test_colas_lanczos_logdet_drops_the_sign():
    """The reason hessops.logdet exists: cola.linalg.logdet with Lanczos returns |log det|."""
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    eigenvalues = torch.linspace(0.1, 2.0, 40, dtype=torch.float64)  # log det < 0
    A = cola.PSD(cola.ops.Dense(q @ torch.diag(eigenvalues) @ q.T))
    truth = float(eigenvalues.log().sum())
    assert truth < 0
    assert float(cola.linalg.logdet(A, cola.Lanczos(max_iters=40), cola.Exact())) == pytest.approx(-truth, rel=1e-8)
    assert hessops.logdet(A).estimate == pytest.approx(truth, rel=1e-12)


def test_colas_stochastic_traces(problem):
    """HutchPP raises NotImplementedError; Hutch ignores bs (same columns per call) and returns no error."""
    G = hessops.GGN(*problem)
    with pytest.raises(NotImplementedError):
        cola.linalg.trace(G, cola.linalg.HutchPP())
    columns = {}
    for bs in (10, 100):
        seen = []

        class Counting(cola.ops.LinearOperator):
            def __init__(self, A):
                super().__init__(A.dtype, A.shape)
                self.A = A

            def _matmat(self, X):
                seen.append(X.shape[1])
                return self.A @ X

        estimate = cola.linalg.trace(cola.PSD(Counting(G)), cola.linalg.Hutch(bs=bs, key=0))
        assert estimate.dim() == 0  # a bare number: no standard error
        columns[bs] = seen[0]
    assert columns[10] == columns[100]
