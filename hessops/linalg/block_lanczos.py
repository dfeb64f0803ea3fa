"""Block Lanczos with full re-orthogonalization and thick restarts: the Krylov run of :func:`hessops.eigs` when it
multiplies several vectors a step (``block_size``) or keeps a basis of bounded size (``basis_size``).

One step multiplies a block ``X`` of ``b`` orthonormal vectors, orthogonalizes ``W = A X`` twice against the
whole basis ``Q`` (classical Gram–Schmidt; the coefficients fill the projected matrix ``H = QᵀAQ``) and
orthonormalizes the rest into the next block: ``A Q = Q H + X' B Eᵀ`` with ``B`` the ``b × b`` coupling and ``E``
the last block's columns, so the Ritz pair ``(θ, Qs)`` of ``H`` has the residual ``‖B s_last‖`` (block Lanczos:
Golub & Underwood 1977). A block finds up to ``b`` copies of a repeated eigenvalue in one run, and costs ``b``
products a step: it pays where a block of products costs little more than one (a GPU a single product does not
fill; small models on a CPU).

When the basis is full the run restarts thick (Wu & Simon, *SIAM J. Matrix Anal. Appl.* 22(2), 2000): it keeps
the ``ℓ`` Ritz vectors nearest the wanted end, ``Y = Q S_ℓ`` (rotated in place, no second copy of the basis),
whose projected matrix is ``diag(θ_ℓ)``, and goes on from the pending block ``X'``: ``A Y = Y Θ + X' B S_lastᵀ``
holds, so the next step's Gram–Schmidt coefficients restore the coupling and the relation ``A Q = Q H + X' B Eᵀ``
stays exact. A run whose ``n × m`` basis would not fit in memory thus converges in a basis of what fits, instead
of dropping the basis (no re-orthogonalization, a second pass for the vectors).

Unlike :func:`hessops.linalg.lanczos.lanczos` this run keeps its basis on the operator's device (a thick restart
is how it fits there) and saves no checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hessops._cola import cola
from hessops.numerics import column_norms, inner_products

# the basis is rotated at a restart, and combined into Ritz vectors, this many entries of each vector at a time
ROTATION_COLUMNS = 1 << 16


@dataclass
class BlockState:
    """A block Lanczos run after its last step: ``A Q = Q H + X' B Eᵀ``.

    ``rows`` holds the orthonormal basis ``Q`` as its first ``size`` rows (``(capacity, n)``, on the operator's
    device); ``projected`` is ``H = QᵀAQ`` (``size × size``, float64 on the CPU); ``coupling`` is ``B`` (``b' × b``,
    float64: the next block's coefficients in the last block's ``b`` columns; no rows once the basis spans the
    whole space); ``steps`` counts the vectors multiplied over the run, restarts included (``n_matvecs`` the
    products), ``restarts`` the thick restarts."""

    rows: Tensor | None
    projected: Tensor
    coupling: Tensor
    size: int
    steps: int
    n_matvecs: int
    restarts: int
    mode: str = "device"

    def ritz(self, p: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values ``θ`` (ascending), the eigenvectors ``S`` of ``H``, and the residuals ``‖B s_last‖`` (exact
        in exact arithmetic: ``A Q s − θ Q s = X' B s_last``). ``p`` is 0: a block run is one run."""
        theta, S = torch.linalg.eigh(self.projected)
        last = S[self.size - self.coupling.shape[1] :]
        residuals = torch.linalg.vector_norm(self.coupling @ last, dim=0)
        return theta, S, residuals

    def ritz_vectors(self, coefficients: Tensor, p: int = 0) -> Tensor:
        """The Ritz vectors ``Q S`` (``n × k``, on the operator's device) for eigenvectors ``S`` (``size × k``) of
        ``H``."""
        Q = self.rows[: self.size]
        coefficients = coefficients.to(device=Q.device, dtype=Q.dtype)
        out = torch.empty(Q.shape[1], coefficients.shape[1], dtype=Q.dtype, device=Q.device)
        for i in range(0, Q.shape[1], ROTATION_COLUMNS):
            out[i : i + ROTATION_COLUMNS] = Q[:, i : i + ROTATION_COLUMNS].T @ coefficients
        return out

    def close(self) -> None:
        """Release the basis."""
        self.rows = None


def kept_count(capacity: int, block: int, wanted: int) -> int:
    """How many Ritz vectors a thick restart keeps in a basis of ``capacity`` vectors grown ``block`` at a time, for
    ``wanted`` eigenpairs: the wanted ones and half of the room beyond them, leaving at least two blocks free (so
    that each cycle adds a step or more)."""
    return max(wanted, min(capacity - 2 * block, wanted + (capacity - wanted) // 2))


def block_lanczos(
    op: cola.ops.LinearOperator,
    start: Tensor,
    max_steps: int,
    *,
    capacity: int,
    keep: Callable[[Tensor, int], Tensor],
    wanted: int,
    stop: Callable[[BlockState], bool] | None = None,
    seed: int = 0,
    progress: bool = False,
    description: str = "block Lanczos",
) -> BlockState:
    """Run block Lanczos from the ``b`` columns of ``start`` (``(n, b)``) until ``stop(state)`` says so after a
    step, ``max_steps`` vectors have been multiplied, or the basis spans the whole space.

    A basis of ``capacity`` vectors that is full restarts thick, keeping :func:`kept_count` Ritz vectors chosen by
    ``keep(theta, count)`` (the indices of ``count`` of the ascending Ritz values ``theta``, the wanted end first).
    Columns that become dependent (an invariant subspace found) are replaced by seeded random vectors orthogonal to
    the basis.

    Returns:
        The :class:`BlockState` after the last step."""
    n, b = start.shape
    capacity = min(capacity, n)
    run = _Run(op, capacity, start, torch.Generator(device="cpu").manual_seed(seed + 7919))
    block, _ = run.orthonormalize(start.clone(), 0)
    bar = tqdm(total=max_steps, desc=description, disable=not progress, leave=False, unit="step")
    try:
        while True:
            block = run.step(block)
            bar.update(run.state.coupling.shape[1])
            if run.state.size == n or run.state.steps >= max_steps or (stop is not None and stop(run.state)):
                return run.state
            if run.state.size + block.shape[1] > capacity and capacity < n:
                run.restart(keep, kept_count(capacity, b, wanted))
            block = block[:, : min(block.shape[1], capacity - run.state.size)]
    finally:
        bar.close()


class _Run:
    """The moving parts of :func:`block_lanczos`: the basis ``rows``, the projected matrix, and the state."""

    def __init__(self, op, capacity: int, start: Tensor, generator: torch.Generator) -> None:
        self.op, self.capacity, self.generator = op, capacity, generator
        # grown by doubling as the basis fills (a run that converges early never touches the rest)
        first = min(capacity, max(16, 2 * start.shape[1]))
        self.rows = torch.empty(first, start.shape[0], dtype=start.dtype, device=start.device)
        self.projected = torch.zeros(capacity, capacity, dtype=torch.float64)
        self.eps, self.scale = torch.finfo(start.dtype).eps, 0.0
        empty = torch.zeros(0, 0, dtype=torch.float64)
        self.state = BlockState(self.rows, empty, empty, 0, 0, 0, 0)

    def room(self, size: int) -> None:
        """Grow the basis's storage to hold ``size`` vectors."""
        if size > self.rows.shape[0]:
            rows = min(self.capacity, max(size, 2 * self.rows.shape[0]))
            grown = torch.empty(rows, self.rows.shape[1], dtype=self.rows.dtype, device=self.rows.device)
            grown[: self.state.size] = self.rows[: self.state.size]
            self.rows = self.state.rows = grown

    def basis(self, size: int) -> Tensor:
        """The first ``size`` basis vectors as columns ``(n, size)`` (a view)."""
        return self.rows[:size].T

    def step(self, block: Tensor) -> Tensor:
        """Multiply ``block`` (orthonormal, orthogonal to the basis), add it to the basis with its column of
        ``H``, and return the next block."""
        size, width = self.state.size, block.shape[1]
        product = self.op @ block
        if product.data_ptr() == block.data_ptr():  # an operator that returns its input
            product = product.clone()
        self.room(size + width)
        self.rows[size : size + width] = block.T
        Q = self.basis(size + width)
        column = torch.zeros(size + width, width, dtype=torch.float64)
        for _ in range(2):  # classical Gram-Schmidt, twice is enough
            coefficients = inner_products(Q, product)
            product.addmm_(Q, coefficients.to(product), alpha=-1)
            column += coefficients.cpu()
        diagonal = column[size:]
        column[size:] = 0.5 * (diagonal + diagonal.T)
        self.projected[: size + width, size : size + width] = column
        self.projected[size : size + width, : size + width] = column.T
        self.scale = max(self.scale, float(column.abs().sum(0).max()))
        following, coupling = self.orthonormalize(product, size + width)
        state = self.state
        state.size, state.steps, state.n_matvecs = size + width, state.steps + width, state.n_matvecs + width
        state.projected = self.projected[: state.size, : state.size].clone()
        state.coupling = coupling if state.size < self.rows.shape[1] else coupling[:0]  # the whole space: exact
        return following

    def orthonormalize(self, block: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """``block = X B`` (modified Gram–Schmidt, each column twice) with ``X`` orthonormal and orthogonal to the
        first ``size`` basis vectors; a column left with a norm at rounding level is replaced by a random one (its
        ``B`` entry 0). Returns ``X`` (in place of ``block``) and ``B`` (float64, upper triangular)."""
        width = block.shape[1]
        coupling = torch.zeros(width, width, dtype=torch.float64)
        tiny = 100 * self.eps * self.scale
        for j in range(width):
            column = block[:, j : j + 1]
            for _ in range(2):
                if j:
                    coefficients = inner_products(block[:, :j], column)
                    column -= block[:, :j] @ coefficients.to(column)
                    coupling[:j, j] += coefficients[:, 0].cpu()
            norm = float(column_norms(column))
            if norm > tiny and norm > 0:
                column /= norm
                coupling[j, j] = norm
            else:
                column.copy_(self.fresh(block[:, :j], size))
            self.scale = max(self.scale, norm)
        return block, coupling

    def fresh(self, earlier: Tensor, size: int) -> Tensor:
        """A seeded random unit vector orthogonal to the first ``size`` basis vectors and to ``earlier``."""
        vector = torch.randn(earlier.shape[0], 1, generator=self.generator, dtype=earlier.dtype).to(earlier.device)
        for _ in range(2):
            for Q in (self.basis(size), earlier):  # apart: joined, they would be a copy of the basis
                if Q.shape[1]:
                    vector -= Q @ inner_products(Q, vector).to(vector)
        return vector / column_norms(vector)

    def restart(self, keep: Callable[[Tensor, int], Tensor], count: int) -> None:
        """Keep ``count`` Ritz vectors (``keep`` chooses them) as the first basis vectors, ``H`` their values."""
        theta, S = torch.linalg.eigh(self.state.projected)
        chosen = keep(theta, count)
        coefficients = S[:, chosen].T.to(self.rows)
        Q = self.rows[: self.state.size]
        for i in range(0, Q.shape[1], ROTATION_COLUMNS):
            Q[:count, i : i + ROTATION_COLUMNS] = coefficients @ Q[:, i : i + ROTATION_COLUMNS]
        self.projected.zero_()
        self.projected[:count, :count] = torch.diag(theta[chosen])
        self.state.size, self.state.restarts = count, self.state.restarts + 1
