"""Where the Lanczos basis lives: on the operator's device, in host memory, in a memory-mapped file, or nowhere.

A Lanczos run of ``m`` steps from ``P`` start vectors of size ``n`` keeps an ``m × n × P`` basis to
re-orthogonalize against: 300 steps of a 124M-parameter model take 150 GB in float32. The products stay on
the operator's device in every mode; only the basis moves:

- ``"device"``: a tensor on the operator's device (fastest; the basis must fit there).
- ``"host"``: a tensor in CPU memory. The re-orthogonalization runs on the CPU, to which ``w`` (``n × P``)
  travels and from which it returns once per step: it reads the whole basis twice per Gram–Schmidt pass
  at 2 flops per element, so it is bound by memory bandwidth, and the host reads its own memory faster
  than PCIe moves it to a GPU (about 25 GB/s on PCIe 4.0 x16), so streaming the basis to the device would
  be slower.
- ``"disk"``: a ``numpy.memmap`` file (``basis_path``, by default a temporary file, unlinked once mapped),
  re-orthogonalized in chunks of steps of at most :data:`DISK_CHUNK_BYTES`. Each step reads the whole
  file four times, so a basis larger than RAM makes the run I/O-bound; it is used only when asked.
- ``"none"``: no basis and no re-orthogonalization (eigenvalues only). Rounding then makes converged Ritz
  values reappear as copies ("ghosts"); :func:`cullum_willoughby` is the guard. Ritz vectors cost a second
  pass that re-runs the recurrence (the same products again).
- ``"auto"`` (:func:`choose_mode`): device if the basis fits in half of the free device memory, else host
  if it fits in half of the available host memory, else none.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hessops import constants
from hessops.errors import InvalidArgumentError
from hessops.numerics import basis_coefficients

BASIS_MODES = constants.BASIS_MODES
DISK_CHUNK_BYTES = 256 * 2**20


def available_host_bytes() -> int:
    """The host memory available to a new allocation (``MemAvailable`` of ``/proc/meminfo``; where there is
    no such file, the physical memory from ``os.sysconf``)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_device_bytes(device: torch.device) -> int:
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` for CUDA, the available host memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_bytes()


def choose_mode(mode: str, nbytes: int, device: torch.device) -> str:
    """The mode ``"auto"`` stands for, for a basis of ``nbytes`` on ``device`` (any other mode is returned as
    it is): device if it fits in half of the free device memory, else host if it fits in half of the
    available host memory (a CPU device has no separate host memory), else none."""
    if mode != "auto":
        return mode
    if nbytes <= free_device_bytes(device) // 2:
        return "device"
    if device.type != "cpu" and nbytes <= available_host_bytes() // 2:
        return "host"
    return "none"


def steps_in_memory(n: int, P: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many Lanczos steps of ``P`` vectors of size ``n`` fit in half of the free memory of ``device``: the
    budget :func:`choose_mode` gives a basis there."""
    return free_device_bytes(device) // 2 // max(1, n * P * dtype.itemsize)


def check_mode(mode: str, path: str | os.PathLike | None) -> str:
    """``mode`` when it is one of :data:`BASIS_MODES` (and ``path`` only comes with ``"disk"``)."""
    if not isinstance(mode, str) or mode not in BASIS_MODES:
        raise InvalidArgumentError(f"basis={mode!r}: choose one of {BASIS_MODES}")
    if path is not None and mode != "disk":
        raise InvalidArgumentError(f"basis_path={str(path)!r} is for basis='disk', not basis={mode!r}: leave it out")
    return mode


class Basis:
    """The Lanczos vectors ``q_0, …, q_{m-1}`` (each ``n × P``) of one run, wherever they live."""

    mode = "device"

    def __init__(self, capacity: int, n: int, P: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.n, self.P, self.dtype, self.device = capacity, n, P, dtype, device
        self.steps = 0
        self._data = torch.empty(min(capacity, 16), n, P, dtype=dtype, device=self._home)

    @property
    def _home(self) -> torch.device:
        return self.device

    def append(self, q: Tensor) -> None:
        """Store ``q`` (on the operator's device) as the next vector."""
        if self.steps == self._data.shape[0]:
            grown = torch.empty(min(2 * self.steps, self.capacity), self.n, self.P, dtype=self.dtype, device=self._home)
            grown[: self.steps] = self._data[: self.steps]
            self._data = grown
        self._data[self.steps] = q.to(self._home)
        self.steps += 1

    def truncate(self, steps: int) -> None:
        """Forget the vectors after the first ``steps``."""
        self.steps = steps

    def vectors(self) -> Tensor:
        """The ``(m, n, P)`` tensor of the stored vectors (in the basis's memory)."""
        return self._data[: self.steps]

    def orthogonalize(self, w: Tensor) -> Tensor:
        """``w − Q Qᵀ w`` for each column ``p`` against its own vectors ``Q_p`` (classical Gram–Schmidt, once)."""
        Q = self.vectors()
        local = w.to(self._home)
        local = local - torch.einsum("mnp,mp->np", Q, basis_coefficients(Q, local).to(local.dtype))
        return local.to(w.device)

    def combine(self, coefficients: Tensor, p: int = 0) -> Tensor:
        """``Q_p S`` (``n × k``) on the operator's device for coefficients ``S`` (``m × k``)."""
        Q = self.vectors()[:, :, p]
        return torch.einsum("mn,mk->nk", Q, coefficients.to(Q)).to(self.device)

    def saved(self, steps: int) -> Tensor | None:
        """The first ``steps`` vectors as a compact CPU tensor for a checkpoint (``None`` where the storage is
        its own record: the disk file)."""
        return self._data[:steps].to("cpu", copy=True)

    def restore(self, vectors: Tensor | None, steps: int) -> None:
        """Take back the ``steps`` vectors that :meth:`saved` gave."""
        self._data = torch.empty(
            max(steps, min(self.capacity, 16)), self.n, self.P, dtype=self.dtype, device=self._home
        )
        self._data[:steps] = vectors.to(self._home)
        self.steps = steps

    def close(self) -> None:
        """Release the storage (the disk mode deletes its temporary file)."""


class HostBasis(Basis):
    """The vectors in CPU memory; products stay on the device."""

    mode = "host"

    @property
    def _home(self) -> torch.device:
        return torch.device("cpu")


class DiskBasis(Basis):
    """The vectors in a ``numpy.memmap`` file of ``capacity × n × P`` entries at ``path`` (default: a temporary
    file). Unless ``keep``, the file's name is removed as soon as it is mapped: the mapping holds its pages
    until the basis is released, and nothing is left behind however the process ends (SIGTERM, SIGKILL, an
    error whose traceback is held). Where a mapped file cannot be removed (Windows), it is deleted by
    :meth:`close`, or when the basis is garbage-collected."""

    mode = "disk"

    def __init__(
        self,
        capacity: int,
        n: int,
        P: int,
        dtype: torch.dtype,
        device: torch.device,
        path: str | os.PathLike | None = None,
        *,
        keep: bool = False,
        reopen: bool = False,
    ):
        self.capacity, self.n, self.P, self.dtype, self.device = capacity, n, P, dtype, device
        self.steps = 0
        if path is None:
            handle, name = tempfile.mkstemp(prefix="hessops-basis-", suffix=".npy")
            os.close(handle)
            path, keep = Path(name), False
        elif not keep and Path(path).exists():
            raise InvalidArgumentError(
                f"basis_path={str(path)!r} exists: the disk basis would overwrite it and delete it afterwards; "
                "delete it or pass another path"
            )
        self.path = Path(path)
        numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._file = np.memmap(self.path, dtype=numpy_dtype, mode="r+" if reopen else "w+", shape=(capacity, n, P))
        self._remove = None if keep or _unlinked(self.path) else weakref.finalize(self, _unlink, self.path)
        self._chunk = max(1, DISK_CHUNK_BYTES // max(1, n * P * numpy_dtype.itemsize))

    def append(self, q: Tensor) -> None:
        """Store ``q`` as the next vector."""
        self._file[self.steps] = q.detach().cpu().numpy()
        self.steps += 1

    def vectors(self) -> Tensor:
        """The stored vectors (a view of the file, or a refusal without a basis)."""
        return torch.from_numpy(self._file[: self.steps])

    def orthogonalize(self, w: Tensor) -> Tensor:
        """``w − Q Qᵀ w``, as :meth:`Basis.orthogonalize`."""
        local = w.cpu()
        coefficients = torch.cat(
            [
                basis_coefficients(torch.from_numpy(self._file[i : min(i + self._chunk, self.steps)]), local)
                for i in range(0, self.steps, self._chunk)
            ]
        )
        for i in range(0, self.steps, self._chunk):
            chunk = torch.from_numpy(self._file[i : min(i + self._chunk, self.steps)])
            local = local - torch.einsum("mnp,mp->np", chunk, coefficients[i : i + chunk.shape[0]].to(local.dtype))
        return local.to(w.device)

    def combine(self, coefficients: Tensor, p: int = 0) -> Tensor:
        """``Q_p S``, as :meth:`Basis.combine`."""
        result = torch.zeros(self.n, coefficients.shape[1], dtype=self.dtype)
        coefficients = coefficients.to(self.dtype)
        for i in range(0, self.steps, self._chunk):
            chunk = torch.from_numpy(self._file[i : min(i + self._chunk, self.steps), :, p])
            result += torch.einsum("mn,mk->nk", chunk, coefficients[i : i + chunk.shape[0]])
        return result.to(self.device)

    def saved(self, steps: int) -> None:
        """What a checkpoint stores of the vectors: nothing (the file, flushed, is its own record)."""
        self._file.flush()
        return None

    def restore(self, vectors: Tensor | None, steps: int) -> None:
        """Count the ``steps`` vectors already there."""
        self.steps = steps

    def close(self) -> None:
        """Release the file's mapping (and delete the file unless kept, where that waited for the release)."""
        self._file = None
        if self._remove is not None:
            self._remove()


class NoBasis(Basis):
    """No vectors at all: :meth:`orthogonalize` is never called, :meth:`combine` needs a second pass
    (:meth:`hessops.linalg.lanczos.LanczosState.ritz_vectors` runs it)."""

    mode = "none"

    def __init__(self, capacity: int, n: int, P: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.n, self.P, self.dtype, self.device = capacity, n, P, dtype, device
        self.steps = 0

    def append(self, q: Tensor) -> None:
        """Store ``q`` as the next vector."""
        self.steps += 1

    def saved(self, steps: int) -> None:
        """What a checkpoint stores of the vectors: nothing (the file, flushed, is its own record)."""
        return None

    def restore(self, vectors: Tensor | None, steps: int) -> None:
        """Count the ``steps`` vectors already there."""
        self.steps = steps

    def vectors(self) -> Tensor:
        """The stored vectors (a view of the file, or a refusal without a basis)."""
        raise InvalidArgumentError(
            "this Lanczos run kept no basis (basis='none'): get Ritz vectors from state.ritz_vectors(...), which "
            "re-runs the recurrence, or run with basis='device', 'host' or 'disk'"
        )

    def orthogonalize(self, w: Tensor) -> Tensor:
        """``w − Q Qᵀ w``, as :meth:`Basis.orthogonalize`."""
        return self.vectors()

    def combine(self, coefficients: Tensor, p: int = 0) -> Tensor:
        """``Q_p S``, as :meth:`Basis.combine`."""
        return self.vectors()


def make_basis(
    mode: str,
    capacity: int,
    start: Tensor,
    path: str | os.PathLike | None = None,
    *,
    keep: bool = False,
    reopen: bool = False,
) -> Basis:
    """An empty basis of ``mode`` (not ``"auto"``) for ``capacity`` steps of the recurrences started at ``start``."""
    n, P = start.shape
    shape = (capacity, n, P, start.dtype, start.device)
    if mode == "disk":
        return DiskBasis(*shape, path, keep=keep, reopen=reopen)
    return {"device": Basis, "host": HostBasis, "none": NoBasis}[mode](*shape)


def cullum_willoughby(T: Tensor, theta: Tensor, tolerance: float) -> Tensor:
    """A mask over the ascending Ritz values ``theta`` of the tridiagonal ``T`` keeping one copy of each.

    Without re-orthogonalization, converged Ritz values come back as near-identical copies, and spurious
    values appear between them. Cullum & Willoughby (*Lanczos Algorithms for Large Symmetric Eigenvalue
    Computations*, 1985, §4.5): a cluster of Ritz values within ``tolerance`` of each other counts once;
    a simple Ritz value that is also an eigenvalue of ``T`` with its first row and column removed (to within
    ``tolerance``) is spurious and dropped, except beyond every value kept (below the smallest, above the
    largest). The test flags any Ritz value whose eigenvector of ``T`` has a negligible first component, and so
    also a genuine eigenvalue whose eigenvector the start vector barely touches: one that only rounding or a
    start component of 1e-8 brings in, such as a large negative Hessian eigenvalue. At the ends of the
    spectrum, what eigs asks for, losing it would report the next eigenvalue as the extreme one, converged;
    kept, its Ritz vector's verified residual in :func:`hessops.eigs` shows whether it is genuine."""
    first, spurious = ghost_masks(T, theta, tolerance)
    return first & ~spurious


def ghost_masks(
    T: Tensor,
    theta: Tensor,
    tolerance: float,
    weights: Tensor | None = None,
    spurious_tolerance: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The two masks of :func:`cullum_willoughby` over the ascending Ritz values ``theta``: one copy of each
    cluster (values within ``tolerance`` of the next; with ``weights``, the first components of their
    eigenvectors of ``T``, the copy of largest weight, else the first), and the simple values flagged as
    spurious (within ``spurious_tolerance``, default ``tolerance``, of an eigenvalue of ``T`` without its first
    row and column; ends of the spectrum exempt).

    Copies of a converged eigenvalue differ by the operator's rounding (float32: 0.04 on a 288 of a 4M-parameter
    operator), but the spurious test compares eigenvalues of two tridiagonal matrices computed in float64: a
    genuine eigenvalue whose eigenvector has start weight ``s₁`` lies about ``s₁²·gap`` from one of ``T``'s
    reduced matrix, and a random start gives weights near ``1/√n``; with the operator's float32 tolerance the
    test flagged genuine eigenvalues of every 4M-parameter run (s₁² ≈ 1e-8), with float64's only the values
    that are spurious (s₁² ≤ 1e-12 there)."""
    m = theta.shape[0]
    keep = torch.ones(m, dtype=torch.bool)
    if m < 2:
        return keep, ~keep
    spurious_tolerance = tolerance if spurious_tolerance is None else spurious_tolerance
    reduced = torch.linalg.eigvalsh(T[1:, 1:])
    close_prev = torch.cat([torch.tensor([False]), theta[1:] - theta[:-1] <= tolerance])
    close_next = torch.cat([close_prev[1:], torch.tensor([False])])
    simple = ~close_prev & ~close_next
    spurious = simple & ((theta[:, None] - reduced[None, :]).abs().min(dim=1).values <= spurious_tolerance)
    representative = ~close_prev
    if weights is not None:
        # the copy most tied to the start vector stands for the cluster: on a 4M-parameter float32 operator it was
        # the most accurate copy for every eigenvalue of ten, where the one of smallest residual estimate gave a Ritz
        # vector 1.6 from converged (its estimate ignores the vector's norm, which copies share out)
        cluster = torch.cumsum(~close_prev, 0) - 1
        representative = torch.zeros(m, dtype=torch.bool)
        for c in range(int(cluster[-1]) + 1):
            members = (cluster == c).nonzero().flatten()
            representative[members[weights[members].abs().argmax()]] = True
    good = (representative & ~spurious).nonzero().flatten()
    index = torch.arange(m)
    spurious &= (index > good.min()) & (index < good.max()) if len(good) else torch.zeros_like(spurious)
    return keep & representative, spurious


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _unlinked(path: Path) -> bool:
    """Whether ``path``, a file this process has mapped, could be removed at once (POSIX; not Windows)."""
    try:
        path.unlink()
    except OSError:
        return False
    return True
