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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from krylov_influence import _xp
from krylov_influence.errors import NonFiniteError

__all__ = ["ArnoldiResult", "LinearOperator", "MatrixOperator", "arnoldi_iteration"]


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

    def to_device(host_vector: np.ndarray) -> Any:
        return xp.asarray(host_vector, dtype=work_dtype, device=device)

    if block_size > 1:
        return _block_arnoldi(
            operator,
            n,
            int(block_size),
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
        )

    start = rng.standard_normal(p)
    basis = xp.zeros((n, p), dtype=work_dtype, device=device)
    basis = _xp.set_row(xp, basis, 0, to_device(start / np.linalg.norm(start)))
    hessenberg = np.zeros((n, n), dtype=np.float64)
    restarts: list[int] = []
    norm_estimate = 0.0
    residual_norm = 0.0

    for j in range(n):
        q = basis[j, ...]
        w = operator.mv(q if op_dtype == work_dtype else xp.astype(q, op_dtype))
        if w.dtype != work_dtype:
            w = xp.astype(w, work_dtype)
        active = basis[: _padded_rows(j + 1, n), ...]
        w, coeffs, product_norm, beta = _orthogonalise(xp, active, w, host)
        coeffs = coeffs[: j + 1]
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
            nxt = _fresh_direction(xp, active, rng, to_device, host)
        else:
            hessenberg[j + 1, j] = beta
            nxt = w * (1.0 / beta)
        basis = _xp.set_row(xp, basis, j + 1, nxt)

    return ArnoldiResult(
        basis=basis,
        hessenberg=hessenberg,
        residual_norm=float(residual_norm),
        restarts=tuple(restarts),
        orthogonality_loss=_orthogonality_loss(xp, basis, host) if check_orthogonality else None,
        operator_norm_estimate=float(norm_estimate),
    )


def _orthogonality_loss(xp: Any, basis: Any, host: Callable[[Any], np.ndarray]) -> float:
    """``max |Q Qᵀ − I|`` (one n × n × p product)."""
    gram = host(xp.matmul(basis, xp.permute_dims(basis, (1, 0)))).astype(np.float64)
    return float(np.max(np.abs(gram - np.eye(int(basis.shape[0])))))


def _block_arnoldi(
    operator: LinearOperator,
    n: int,
    b: int,
    *,
    xp: Any,
    work_dtype: Any,
    op_dtype: Any,
    device: Any,
    rng: np.random.Generator,
    rtol: float,
    host: Callable[[Any], np.ndarray],
    to_device: Callable[[np.ndarray], Any],
    progress: Callable[[int], None] | None,
    check_orthogonality: bool,
) -> ArnoldiResult:
    """Block Arnoldi with b products per step (see :func:`arnoldi_iteration`).

    Each step multiplies the newest m ≤ b basis rows ``Q_j`` at once, then orthonormalises
    the products one by one against the whole basis so far (CGS2, as in the single-vector
    iteration; a block Gram-Schmidt followed by an orthonormalisation of the block alone
    loses orthogonality when a product lies nearly inside the basis). A residual at round-off
    level is a breakdown of that row: a fresh random direction orthogonal to everything takes
    its place and its coupling is dropped, as in the single-vector iteration.
    """
    p = int(operator.shape[0])
    multiply = getattr(operator, "mm", None)

    def products(rows: Any) -> Any:
        rows = rows if op_dtype == work_dtype else xp.astype(rows, op_dtype)
        if multiply is not None:
            out = multiply(rows)
        else:
            out = xp.stack([operator.mv(rows[i, ...]) for i in range(int(rows.shape[0]))])
        return out if out.dtype == work_dtype else xp.astype(out, work_dtype)

    start, _ = np.linalg.qr(rng.standard_normal((p, b)))  # b orthonormal columns
    basis = xp.zeros((n, p), dtype=work_dtype, device=device)
    for i in range(b):
        basis = _xp.set_row(xp, basis, i, to_device(np.ascontiguousarray(start[:, i])))
    hessenberg = np.zeros((n, n), dtype=np.float64)
    restarts: list[int] = []
    norm_estimate = 0.0
    dropped: list[tuple[int, Any]] = []  # (column, residual row) outside the basis
    j = 0  # first row of the current block
    while j < n:
        m = min(b, n - j)
        w = products(basis[j : j + m, ...])
        filled = j + m
        following = min(b, n - filled)  # rows of the next block
        fast = _block_fast_path(
            xp, basis, w, filled, following, n, host, rtol=rtol, norm_estimate=norm_estimate
        )
        if fast is not None:
            basis, columns, norm_estimate, residual_rows = fast
            hessenberg[:, j:filled] = columns
            dropped += [(j + i, row) for i, row in residual_rows]
            if progress is not None:
                progress(m)
            j = filled
            continue
        for i in range(m):  # a breakdown or non-finite values: row by row, as in Arnoldi
            # CGS2 of A q_{j+i} against the whole basis so far, including the rows of the
            # next block already accepted: the single-vector iteration's robustness, with the
            # products shared. Row i is Σ_l R[l, i] q_{filled + l} plus the basis part.
            accepted = filled + min(i, following)
            active = basis[: _padded_rows(accepted, n), ...]
            row, coefficients, product_norm, beta = _orthogonalise(xp, active, w[i, ...], host)
            coefficients = coefficients[:accepted]
            if not (np.all(np.isfinite(coefficients)) and math.isfinite(beta + product_norm)):
                raise NonFiniteError(
                    f"the operator products of block Arnoldi rows {j + 1}..{filled} of {n} "
                    "returned non-finite values (NaN or Inf): check the loss and the Hessian "
                    "data"
                )
            hessenberg[:accepted, j + i] = coefficients
            norm_estimate = max(norm_estimate, product_norm)
            if i >= following:  # the basis is full: this row's remainder is residual
                dropped.append((j + i, row))
                continue
            if beta <= rtol * norm_estimate:
                restarts.append(filled)
                nxt = _fresh_direction(xp, active, rng, to_device, host)
            else:
                hessenberg[filled + i, j + i] = beta
                nxt = row * (1.0 / beta)
            basis = _xp.set_row(xp, basis, filled + i, nxt)
        if progress is not None:
            progress(m)
        j = filled
    residual = xp.stack([row for _, row in dropped])
    gram = host(xp.matmul(residual, xp.permute_dims(residual, (1, 0)))).astype(np.float64)
    return ArnoldiResult(
        basis=basis,
        hessenberg=hessenberg,
        residual_norm=float(math.sqrt(max(0.0, float(np.max(np.diag(gram)))))),
        restarts=tuple(restarts),
        orthogonality_loss=_orthogonality_loss(xp, basis, host) if check_orthogonality else None,
        operator_norm_estimate=float(norm_estimate),
        residual_gram=gram,
        residual_columns=tuple(column for column, _ in dropped),
    )


_ROW_BLOCK = 32


def _padded_rows(rows: int, limit: int) -> int:
    """``rows`` rounded up to a multiple of 32 (at most ``limit``).

    The rows past the filled ones are exact zeros and add nothing to the projections, while
    the basis slices take only ⌈n/32⌉ distinct shapes: frameworks that compile per shape
    (JAX, XLA) compile a handful of kernels instead of one per iteration.
    """
    return min(limit, -(-rows // _ROW_BLOCK) * _ROW_BLOCK)


def _block_fast_path(
    xp: Any,
    basis: Any,
    w: Any,
    filled: int,
    following: int,
    n: int,
    host: Callable[[Any], np.ndarray],
    *,
    rtol: float,
    norm_estimate: float,
) -> tuple[Any, np.ndarray, float, list[tuple[int, Any]]] | None:
    """One block's orthonormalisation in one (compiled) program and one host transfer.

    The same CGS2 sequence as the row-by-row loop of :func:`_block_arnoldi`, assuming no
    breakdown; ``None`` when a residual is at round-off level or anything is non-finite, and
    the caller then redoes the block row by row (restarting or raising as needed).

    Returns
    -------
    basis, columns (n, m) of the Hessenberg matrix, the updated norm estimate, and the
    residual rows ``(i, row)`` of the products that did not fit in the basis.
    """
    m = int(w.shape[0])
    rows = _padded_rows(filled, n)
    out, packed = _block_step_for(xp, following)(basis[:rows, ...], w)
    packed = host(packed).astype(np.float64)  # (m, rows + following + 2)
    if not np.all(np.isfinite(packed)):
        return None
    norms, betas = packed[:, -2], packed[:, -1]
    estimate = norm_estimate
    columns = np.zeros((n, m))
    for i in range(m):
        estimate = max(estimate, float(norms[i]))
        accepted = min(i, following)
        columns[:filled, i] = packed[i, :filled]
        columns[filled : filled + accepted, i] = packed[i, rows : rows + accepted]
        if i < following:
            if betas[i] <= rtol * estimate:
                return None
            columns[filled + i, i] = betas[i]
    for i in range(following):
        basis = _xp.set_row(xp, basis, filled + i, out[i, ...])
    residual = [(i, out[i, ...]) for i in range(following, m)]
    return basis, columns, estimate, residual


@functools.cache
def _block_step_for(xp: Any, following: int) -> Callable[[Any, Any], tuple[Any, Any]]:
    """``(active basis (r, p), products (m, p)) -> (rows (m, p), packed (m, r + following + 2))``.

    Row i of the products is CGS2-orthogonalised against the active basis and the first
    ``min(i, following)`` new rows; the first ``following`` results are normalised (the next
    block), the others are residuals. ``packed[i]`` holds the coefficients against the active
    rows, then against the new rows (zero-padded), then the norms before and after. Compiled
    by the namespace's ``compile_function`` hook when it has one.
    """
    step = _cgs2_for(xp, compiled=False)

    def block_step(active: Any, products: Any) -> tuple[Any, Any]:
        r = int(active.shape[0])
        new_rows: list[Any] = []
        results, packs = [], []
        for i in range(int(products.shape[0])):
            accepted = new_rows[: min(i, following)]
            against = xp.concat([active, xp.stack(accepted)], axis=0) if accepted else active
            row, packed = step(against, products[i, ...])
            a = int(against.shape[0])
            pad = products[0, : r + following - a] * 0.0  # zeros, without a device argument
            packs.append(xp.concat([packed[:a] + packed[a : 2 * a], pad, packed[2 * a :]]))
            if i < following:
                row = row / packed[2 * a + 1]
                new_rows.append(row)
            results.append(row)
        return xp.stack(results), xp.stack(packs)

    compile_hook = getattr(xp, "compile_function", None)
    return block_step if compile_hook is None else compile_hook(block_step)


def _orthogonalise(
    xp: Any, basis: Any, w: Any, host: Callable[[Any], np.ndarray]
) -> tuple[Any, np.ndarray, float, float]:
    """CGS2: remove ``basis`` components from ``w`` twice, as matrix products.

    Returns the orthogonalised vector, the summed coefficients in float64 (the Hessenberg
    column), ``‖w‖`` before and after. One host transfer per call.
    """
    w, packed = _cgs2_for(xp)(basis, w)
    packed = host(packed).astype(np.float64)
    m = int(basis.shape[0])
    coeffs = packed[:m] + packed[m : 2 * m]
    return w, coeffs, float(packed[-2]), float(packed[-1])


@functools.cache
def _cgs2_for(xp: Any, compiled: bool = True) -> Callable[[Any, Any], tuple[Any, Any]]:
    """The CGS2 step in ``xp``, compiled by the namespace's ``compile_function`` hook if any.

    Eagerly, the step is ten small dispatches; where each costs tens of microseconds (JAX,
    TensorFlow) they outweigh the arithmetic of a small model, so one compiled program per
    basis shape (a handful, thanks to :func:`_padded_rows`) replaces them.
    """

    def step(basis: Any, w: Any) -> tuple[Any, Any]:
        product_norm = xp.linalg.vector_norm(w)
        first = xp.matmul(basis, w)
        w = w - xp.matmul(first, basis)
        second = xp.matmul(basis, w)
        w = w - xp.matmul(second, basis)
        beta = xp.linalg.vector_norm(w)
        return w, xp.concat([first, second, xp.stack([product_norm, beta])])

    compile_hook = getattr(xp, "compile_function", None) if compiled else None
    return step if compile_hook is None else compile_hook(step)


def _fresh_direction(
    xp: Any,
    basis: Any,
    rng: np.random.Generator,
    to_device: Callable[[np.ndarray], Any],
    host: Callable[[Any], np.ndarray],
) -> Any:
    """A unit vector orthogonal to ``basis``, from the host generator (for restarts)."""
    threshold = math.sqrt(float(np.finfo(np.float32).eps))
    for _ in range(8):
        draw = rng.standard_normal(int(basis.shape[1]))
        r = to_device(draw / np.linalg.norm(draw))
        for _pass in range(2):
            r = r - xp.matmul(xp.matmul(basis, r), basis)
        norm = float(host(xp.linalg.vector_norm(r)))
        if norm > threshold:
            return r * (1.0 / norm)
    raise RuntimeError(  # pragma: no cover - needs 8 draws inside the span of the basis
        "could not draw a restart vector orthogonal to the Krylov basis"
    )
