"""Arnoldi iteration over a symmetric operator: an orthonormal Krylov basis and its Hessenberg.

``subspace_dim`` (n) operator products build an n-dimensional orthonormal basis ``Q`` (n × p,
rows) and the n × n upper-Hessenberg matrix ``H_n = Q A Qᵀ`` such that

    A Qᵀ = Qᵀ H_n + β q_{n+1} e_nᵀ        (up to round-off),

with β the final residual norm. The basis lives in the operator's namespace, dtype and device;
``H_n`` is accumulated in float64 on the host.

Numerics (see REFERENCE.md §1):

- classical Gram-Schmidt applied twice (CGS2) as two matrix products per step, which keeps
  ``Q`` orthonormal to working precision even in float32 on ill-conditioned spectra;
- the start vector is drawn on the host from ``numpy.random.default_rng(seed)``, so every engine
  starts from the same vector;
- breakdown (``β ≤ rtol · ‖A‖``, a *relative* test against the running estimate of ‖A‖) means
  the Krylov space is invariant: the iteration restarts with a fresh random vector orthogonal
  to the basis instead of dividing by β, so repeated eigenvalues are captured and
  ``subspace_dim = p`` always spans the whole space;
- a non-finite product raises :class:`~krylov_influence.errors.NonFiniteError` naming the
  iteration.

Block Arnoldi (``block_size`` b > 1) starts from b orthonormal vectors and applies the operator
to b basis vectors at a time (``operator.mm``), so engines that vectorise Hessian-vector
products over several vectors share one pass over the data between them. ``H_n`` is then a
band Hessenberg matrix with b subdiagonals; the basis spans the block Krylov space of
dimension n. The same n products reach a polynomial degree of about n/b instead of n, which
is why b = 1 (the paper's method) is the default; on Hessians whose top eigenvalues separate
well, small blocks give the same top-k pairs to round-off for a fraction of the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from krylov_influence import _xp
from krylov_influence._gram_schmidt import (
    fresh_direction,
    fused_step_for,
    orthogonalise,
    orthogonality_loss,
    padded_rows,
    unpack,
)
from krylov_influence._host_basis import HostBasis
from krylov_influence.errors import NonFiniteError

__all__ = [
    "ArnoldiResult",
    "ArnoldiState",
    "LinearOperator",
    "MatrixOperator",
    "arnoldi_iteration",
]


class LinearOperator(Protocol):
    """What :func:`arnoldi_iteration` needs: a square operator with a matrix-vector product.

    Block Arnoldi also uses ``mm(vectors)`` (rows (m, p) -> rows (m, p)) when the operator has
    it, and stacks ``mv`` products otherwise.
    """

    shape: tuple[int, int]

    def mv(self, vector: Any) -> Any:
        """Return the operator applied to ``vector`` (shape (p,))."""
        ...


class MatrixOperator:
    """A dense matrix as a :class:`LinearOperator` (for tests and small problems).

    Parameters
    ----------
    matrix : array, shape (p, p)
        In any array-API namespace.
    """

    symmetric = False

    def __init__(self, matrix: Any):
        self.matrix = matrix
        self.xp = _xp.array_namespace(matrix)
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.dtype = matrix.dtype
        self.device = _xp.device_of(matrix)
        self.calls = 0

    def mv(self, vector: Any) -> Any:
        self.calls += 1
        return self.xp.matmul(self.matrix, vector)

    def mm(self, vectors: Any) -> Any:
        self.calls += int(vectors.shape[0])
        return self.xp.matmul(vectors, self.xp.permute_dims(self.matrix, (1, 0)))


@dataclass(frozen=True)
class ArnoldiResult:
    """The output of :func:`arnoldi_iteration`.

    Attributes
    ----------
    basis : array, shape (n, p)
        Orthonormal rows ``q_1 .. q_n`` in the operator's namespace and the working dtype.
    hessenberg : numpy.ndarray, shape (n, n), float64
        ``Q A Qᵀ`` (upper Hessenberg; tridiagonal up to round-off for a symmetric operator).
    residual_norm : float
        ``β = h_{n+1,n}``, the norm of the part of ``A q_n`` outside the basis.
    restarts : tuple of int
        Iterations (1-based) after which a breakdown made the iteration restart.
    orthogonality_loss : float or None
        ``max |Q Qᵀ − I|`` (None when not checked).
    operator_norm_estimate : float
        ``max_j ‖A q_j‖``, a lower bound of ‖A‖ used as the breakdown scale.
    residual_gram : numpy.ndarray or None, shape (r, r)
        Block Arnoldi: ``R Rᵀ`` for the rows ``R`` of the parts of ``A q_c`` outside the basis,
        one per column ``c`` of ``residual_columns`` (the last block, and the rows of the block
        before it that did not fit in the basis when b does not divide n). The residual of a
        Ritz vector with coordinates ``s`` is ``sqrt(s_Cᵀ R Rᵀ s_C)``. ``None`` for b = 1,
        where it is ``β |s_n|``.
    residual_columns : tuple of int
        The columns ``C`` of ``residual_gram`` (0-based).
    """

    basis: Any
    hessenberg: np.ndarray
    residual_norm: float
    restarts: tuple[int, ...] = field(default=())
    orthogonality_loss: float | None = None
    operator_norm_estimate: float = 0.0
    residual_gram: np.ndarray | None = None
    residual_columns: tuple[int, ...] = ()

    @property
    def subspace_dim(self) -> int:
        """``n``, the dimension of the Krylov basis."""
        return int(self.hessenberg.shape[0])


@dataclass(frozen=True)
class ArnoldiState:
    """Where an Arnoldi iteration stands between two steps: enough to continue it exactly.

    Written by :func:`arnoldi_iteration` through its ``checkpoint`` callback and accepted back
    as ``resume``; the continued iteration takes the same steps, with the same restart
    vectors, as one that never stopped.

    Attributes
    ----------
    products : int
        Operator products done: the first ``products`` columns of ``hessenberg`` are final.
    basis_rows : numpy.ndarray, shape (r, p)
        The basis rows set so far (``r ≥ products``), in the working dtype, on the host.
    hessenberg : numpy.ndarray, shape (n, n), float64
    restarts : tuple of int
    norm_estimate : float
    rng_state : dict
        ``numpy.random.Generator.bit_generator.state`` of the generator of restart vectors.
    block_size : int
    """

    products: int
    basis_rows: np.ndarray
    hessenberg: np.ndarray
    restarts: tuple[int, ...]
    norm_estimate: float
    rng_state: dict[str, Any]
    block_size: int


def arnoldi_iteration(
    operator: LinearOperator,
    subspace_dim: int,
    *,
    seed: int = 0,
    dtype: Any = None,
    xp: Any = None,
    device: Any = None,
    breakdown_rtol: float | None = None,
    check_orthogonality: bool = True,
    to_numpy: Callable[[Any], np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
    block_size: int = 1,
    resume: ArnoldiState | None = None,
    checkpoint: Callable[[ArnoldiState], None] | None = None,
    checkpoint_every: int = 0,
    host_basis: HostBasis | None = None,
) -> ArnoldiResult:
    """Build an orthonormal Krylov basis of ``operator`` with ``subspace_dim`` products.

    Parameters
    ----------
    operator : LinearOperator
        Symmetric operator of shape (p, p) with ``mv``; may carry ``xp``, ``dtype`` and
        ``device`` attributes used as defaults.
    subspace_dim : int
        ``n``, the number of operator products and the dimension of the basis (1 ≤ n ≤ p).
    seed : int
        Seed of the host generator of the start vector (and of restart vectors).
    dtype : optional
        Working dtype of the basis (``"float32"``/``"float64"`` or a namespace dtype); default
        the operator's. Products are computed in the operator's dtype and cast.
    xp, device : optional
        Namespace and device of the basis; default the operator's.
    breakdown_rtol : float, optional
        Relative breakdown tolerance; default ``10 · sqrt(p) · eps(dtype)``, the round-off
        level of a reorthogonalised residual.
    check_orthogonality : bool
        Measure ``max |Q Qᵀ − I|`` at the end (one n × n × p product).
    to_numpy : callable, optional
        Host conversion for arrays of ``xp`` (default :func:`krylov_influence._xp.to_numpy`).
    progress : callable, optional
        Called with the number of products after each product or block (``tqdm.update``).
    block_size : int, default 1
        ``b``: operator products per step (``1 ≤ b ≤ n``); b > 1 is block Arnoldi (see the
        module notes), starting from b orthonormal vectors of the same generator.
    resume : ArnoldiState, optional
        Continue from this state (written by ``checkpoint`` of an earlier call with the same
        operator and arguments) instead of starting; the result equals the uninterrupted one.
    checkpoint : callable, optional
        Called with an :class:`ArnoldiState` every ``checkpoint_every`` products (at the end
        of the step that reaches them; never after the last step). It receives host copies.
    checkpoint_every : int, default 0
        Products between checkpoints (0: none).
    host_basis : HostBasis, optional
        Keep the basis off the device, in this allocated (n, p) host array or memory-mapped
        file (:mod:`krylov_influence._host_basis`): Gram–Schmidt then runs on the host over
        blocks of columns and each step moves one p-vector each way. The result's ``basis`` is
        then this ``HostBasis``. Single-vector Arnoldi only (``block_size = 1``).

    Returns
    -------
    ArnoldiResult

    Raises
    ------
    ValueError
        If ``subspace_dim`` is not in ``[1, p]`` or ``block_size`` not in ``[1, n]``.
    NonFiniteError
        If a product contains NaN or Inf.
    """
    p = int(operator.shape[0])
    if isinstance(subspace_dim, bool) or not isinstance(subspace_dim, (int, np.integer)):
        raise TypeError(f"subspace_dim={subspace_dim!r}: expected an integer")
    n = int(subspace_dim)
    if not 1 <= n <= p:
        raise ValueError(
            f"subspace_dim={n}: expected 1 <= subspace_dim <= p = {p} (the number of parameters)"
        )
    xp = xp if xp is not None else operator.xp  # type: ignore[attr-defined]
    device = device if device is not None else getattr(operator, "device", None)
    op_dtype = getattr(operator, "dtype", None)
    work_dtype = getattr(xp, _xp.dtype_name(dtype if dtype is not None else op_dtype))
    op_dtype = work_dtype if op_dtype is None else op_dtype
    host = to_numpy if to_numpy is not None else (lambda a: _xp.to_numpy(a, xp))
    rtol = (
        breakdown_rtol
        if breakdown_rtol is not None
        else 10.0 * math.sqrt(p) * _xp.eps(xp, work_dtype)
    )
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size={block_size!r}: expected an integer")
    if not 1 <= block_size <= n:
        raise ValueError(f"block_size={block_size}: expected 1 <= block_size <= subspace_dim = {n}")
    rng = np.random.default_rng(seed)
    if resume is not None:
        _check_resume(resume, n, p, int(block_size))
        rng.bit_generator.state = resume.rng_state
        if progress is not None:
            progress(resume.products)

    def to_device(host_vector: np.ndarray) -> Any:
        return xp.asarray(host_vector, dtype=work_dtype, device=device)

    due = _checkpoint_schedule(checkpoint, checkpoint_every, n, resume)

    def save_state(
        products: int,
        basis: Any,
        rows: int,
        hessenberg: np.ndarray,
        restarts: list[int],
        norm_estimate: float,
    ) -> None:
        assert checkpoint is not None
        kept = basis.array[:rows] if isinstance(basis, HostBasis) else host(basis[:rows, ...])
        checkpoint(
            ArnoldiState(
                products=products,
                basis_rows=np.array(kept, copy=True),
                hessenberg=hessenberg.copy(),
                restarts=tuple(restarts),
                norm_estimate=float(norm_estimate),
                rng_state=dict(rng.bit_generator.state),
                block_size=int(block_size),
            )
        )

    def restored_basis() -> Any:
        assert resume is not None
        basis = xp.zeros((n, p), dtype=work_dtype, device=device)
        for i in range(resume.basis_rows.shape[0]):
            basis = _xp.set_row(xp, basis, i, to_device(resume.basis_rows[i]))
        return basis

    if host_basis is not None:
        if host_basis.shape != (n, p):
            raise ValueError(f"host_basis: expected shape ({n}, {p}), got {host_basis.shape}")

        rows_store: _Rows = _HostRows(host_basis, host, to_device)
    else:
        rows_store = _DeviceRows(
            xp.zeros((n, p), dtype=work_dtype, device=device), xp, host, to_device
        )
    if block_size > 1:
        from krylov_influence._block_arnoldi import block_arnoldi  # imports this module

        return block_arnoldi(
            operator,
            n,
            int(block_size),
            host_rows=rows_store if isinstance(rows_store, _HostRows) else None,
            xp=xp,
            work_dtype=work_dtype,
            op_dtype=op_dtype,
            device=device,
            rng=rng,
            rtol=rtol,
            host=host,
            to_device=to_device,
            progress=progress,
            check_orthogonality=check_orthogonality,
            resume=resume,
            restored_basis=restored_basis,
            due=due,
            save_state=save_state,
        )

    if resume is None:
        start = rng.standard_normal(p)
        rows_store.start((start / np.linalg.norm(start)).astype(np.float64))
        hessenberg = np.zeros((n, n), dtype=np.float64)
        restarts: list[int] = []
        norm_estimate = 0.0
        first = 0
    else:
        rows_store.restore(resume.basis_rows)
        hessenberg = resume.hessenberg.copy()
        restarts = list(resume.restarts)
        norm_estimate = resume.norm_estimate
        first = resume.products
    residual_norm = 0.0

    for j in range(first, n):
        q = rows_store.row(j)
        w = operator.mv(q if op_dtype == work_dtype else xp.astype(q, op_dtype))
        if w.dtype != work_dtype:
            w = xp.astype(w, work_dtype)
        w, coeffs, product_norm, beta = rows_store.orthogonalise(j + 1, w)
        if not (np.all(np.isfinite(coeffs)) and math.isfinite(beta + product_norm)):
            raise NonFiniteError(
                f"the operator product at Arnoldi iteration {j + 1} of {n} returned non-finite "
                "values (NaN or Inf): check the loss and the Hessian data"
            )
        hessenberg[: j + 1, j] = coeffs
        norm_estimate = max(norm_estimate, product_norm)
        if progress is not None:
            progress(1)
        if j + 1 == n:
            residual_norm = beta
            break
        if beta <= rtol * norm_estimate:
            # Invariant subspace: never divide by a round-off-sized beta. The dropped coupling
            # q_{j+1}ᵀ A q_j is below rtol·‖A‖, so H_n stays Q A Qᵀ to working precision.
            restarts.append(j + 1)
            rows_store.set(j + 1, rows_store.fresh_direction(j + 1, rng))
        else:
            hessenberg[j + 1, j] = beta
            rows_store.accept(j + 1, w, beta)
        if due(j + 1):
            assert checkpoint is not None
            checkpoint(
                ArnoldiState(
                    products=j + 1,
                    basis_rows=rows_store.host_rows(j + 2),
                    hessenberg=hessenberg.copy(),
                    restarts=tuple(restarts),
                    norm_estimate=float(norm_estimate),
                    rng_state=dict(rng.bit_generator.state),
                    block_size=1,
                )
            )

    return ArnoldiResult(
        basis=rows_store.result(),
        hessenberg=hessenberg,
        residual_norm=float(residual_norm),
        restarts=tuple(restarts),
        orthogonality_loss=rows_store.orthogonality_loss() if check_orthogonality else None,
        operator_norm_estimate=float(norm_estimate),
    )


def _check_resume(state: ArnoldiState, n: int, p: int, block_size: int) -> None:
    """Refuse a state that cannot belong to this iteration (shapes and settings)."""
    rows = state.basis_rows.shape[0] if state.basis_rows.ndim == 2 else -1
    problems = []
    if state.hessenberg.shape != (n, n):
        problems.append(f"a Hessenberg matrix of shape {state.hessenberg.shape}, not ({n}, {n})")
    if state.basis_rows.ndim != 2 or state.basis_rows.shape[1] != p:
        problems.append(f"basis rows of shape {state.basis_rows.shape}, not (r, {p})")
    if state.block_size != block_size:
        problems.append(f"block_size {state.block_size}, not {block_size}")
    if not 1 <= state.products < n or not state.products <= rows <= n:
        problems.append(f"{state.products} products with {rows} basis rows (n = {n})")
    if problems:
        raise ValueError("resume: the state does not fit this iteration: " + "; ".join(problems))


def _checkpoint_schedule(
    checkpoint: Callable[[ArnoldiState], None] | None,
    every: int,
    n: int,
    resume: ArnoldiState | None,
) -> Callable[[int], bool]:
    """``due(products)``: whether the step that reached ``products`` products checkpoints.

    Every time the count crosses a multiple of ``every`` (blocks may jump past one), never
    at ``n`` (the fit is done).
    """
    if checkpoint is None or every <= 0:
        return lambda products: False
    last = [resume.products if resume is not None else 0]

    def due(products: int) -> bool:
        if products >= n or products // every == last[0] // every:
            return False
        last[0] = products
        return True

    return due


class _Rows(Protocol):
    """Where the single-vector iteration keeps its basis rows (device, or host/disk)."""

    def start(self, vector: np.ndarray) -> None: ...
    def restore(self, rows: np.ndarray) -> None: ...
    def row(self, index: int) -> Any: ...
    def orthogonalise(self, rows: int, w: Any) -> tuple[Any, np.ndarray, float, float]: ...
    def fresh_direction(self, rows: int, rng: np.random.Generator) -> Any: ...
    def set(self, index: int, row: Any) -> None: ...
    def accept(self, index: int, w: Any, beta: float) -> None: ...
    def host_rows(self, rows: int) -> np.ndarray: ...
    def orthogonality_loss(self) -> float: ...
    def result(self) -> Any: ...


class _DeviceRows:
    """The basis as an (n, p) array of the operator's namespace: CGS2 as compiled products.

    Where the namespace compiles a whole step (:func:`fused_step_for`), :meth:`orthogonalise`
    also writes the normalised vector as the next row and keeps it at hand for :meth:`row`;
    :meth:`accept` then has nothing left to do, and a breakdown overwrites the row.
    """

    def __init__(self, zeros: Any, xp: Any, host: Callable[[Any], np.ndarray], to_device: Any):
        self.basis, self.xp, self.host, self.to_device = zeros, xp, host, to_device
        self.n = int(zeros.shape[0])
        self._written: tuple[int, Any] | None = None  # (index, row) of the last fused step

    def start(self, vector: np.ndarray) -> None:
        self.set(0, self.to_device(vector))

    def restore(self, rows: np.ndarray) -> None:
        for i in range(rows.shape[0]):
            self.set(i, self.to_device(rows[i]))

    def _active(self, rows: int) -> Any:
        return self.basis[: padded_rows(rows, self.n), ...]

    def row(self, index: int) -> Any:
        if self._written is not None and self._written[0] == index:
            return self._written[1]
        return self.basis[index, ...]

    def orthogonalise(self, rows: int, w: Any) -> tuple[Any, np.ndarray, float, float]:
        self._written = None
        active = padded_rows(rows, self.n)
        step = fused_step_for(self.xp, active) if rows < self.n else None
        if step is None:
            w, coeffs, product_norm, beta = orthogonalise(self.xp, self._active(rows), w, self.host)
            return w, coeffs[:rows], product_norm, beta
        index = self.xp.asarray(rows, dtype=self.xp.int32, device=_xp.device_of(w))
        self.basis, w, row, packed = step(self.basis, w, index)
        self._written = (rows, row)
        coeffs, product_norm, beta = unpack(packed, active, self.host)
        return w, coeffs[:rows], product_norm, beta

    def accept(self, index: int, w: Any, beta: float) -> None:
        """Row ``index`` becomes ``w / beta`` (written already by a fused step)."""
        if self._written is None or self._written[0] != index:
            self.set(index, w * (1.0 / beta))

    def fresh_direction(self, rows: int, rng: np.random.Generator) -> Any:
        if self._written is not None and self._written[0] == rows:
            # A fused step wrote w / β there (inf or NaN when β = 0); the rows past the basis
            # must be exact zeros, since the padded slices include them.
            row = self._written[1]
            zeros = self.xp.zeros(row.shape, dtype=row.dtype, device=_xp.device_of(row))
            self.set(rows, zeros)
        return fresh_direction(self.xp, self._active(rows), rng, self.to_device, self.host)

    def set(self, index: int, row: Any) -> None:
        self._written = None
        self.basis = _xp.set_row(self.xp, self.basis, index, row)

    def host_rows(self, rows: int) -> np.ndarray:
        return np.array(self.host(self.basis[:rows, ...]), copy=True)

    def orthogonality_loss(self) -> float:
        return orthogonality_loss(self.xp, self.basis, self.host)

    def result(self) -> Any:
        return self.basis


class _HostRows:
    """The basis in a :class:`HostBasis` (host memory or disk): CGS2 over column blocks on the
    host, one p-vector moved each way per step."""

    def __init__(self, basis: HostBasis, host: Callable[[Any], np.ndarray], to_device: Any):
        self.basis, self.host, self.to_device = basis, host, to_device

    def start(self, vector: np.ndarray) -> None:
        self.basis.array[0] = vector.astype(self.basis.dtype)

    def restore(self, rows: np.ndarray) -> None:
        self.basis.array[: rows.shape[0]] = rows

    def row(self, index: int) -> Any:
        return self.to_device(np.asarray(self.basis.array[index]))

    def orthogonalise(self, rows: int, w: Any) -> tuple[Any, np.ndarray, float, float]:
        w_host = np.array(self.host(w), dtype=self.basis.dtype, copy=True)
        return self.basis.cgs2(rows, w_host)

    def fresh_direction(self, rows: int, rng: np.random.Generator) -> Any:
        return self.basis.fresh_direction(rows, rng)

    def set(self, index: int, row: Any) -> None:
        self.basis.array[index] = np.asarray(row, dtype=self.basis.dtype)

    def accept(self, index: int, w: Any, beta: float) -> None:
        self.set(index, w * (1.0 / beta))

    def host_rows(self, rows: int) -> np.ndarray:
        return np.array(self.basis.array[:rows], copy=True)

    def orthogonality_loss(self) -> float:
        return self.basis.orthogonality_loss()

    def result(self) -> HostBasis:
        return self.basis
