"""Block Arnoldi: b operator products per step, one vectorised pass over the data each.

Private to :func:`krylov_influence.arnoldi.arnoldi_iteration` (``block_size`` > 1), which
documents the behaviour; see its module notes for when blocks are safe.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from krylov_influence import _xp
from krylov_influence._gram_schmidt import (
    cgs2_for,
    fresh_direction,
    orthogonalise,
    orthogonality_loss,
    padded_rows,
)
from krylov_influence.arnoldi import ArnoldiResult, ArnoldiState, LinearOperator
from krylov_influence.errors import NonFiniteError

__all__ = ["block_arnoldi"]


def block_arnoldi(
    operator: LinearOperator,
    n: int,
    b: int,
    *,
    host_rows: Any = None,
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
    resume: ArnoldiState | None = None,
    restored_basis: Callable[[], Any] | None = None,
    due: Callable[[int], bool] = lambda products: False,
    save_state: Callable[..., None] | None = None,
) -> ArnoldiResult:
    """Block Arnoldi with b products per step (see :func:`arnoldi_iteration`).

    Each step multiplies the newest m ≤ b basis rows ``Q_j`` at once, then orthonormalises
    the products one by one against the whole basis so far (CGS2, as in the single-vector
    iteration; a block Gram-Schmidt followed by an orthonormalisation of the block alone
    loses orthogonality when a product lies nearly inside the basis). A residual at round-off
    level is a breakdown of that row: a fresh random direction orthogonal to everything takes
    its place and its coupling is dropped, as in the single-vector iteration.

    Checkpoints (``due``/``save_state``, from :func:`arnoldi_iteration`) are taken between
    blocks while no residual row has been set aside, i.e. before the basis is full.

    With ``host_rows`` (the single-vector iteration's ``_HostRows``: a basis in host memory or
    on disk) the block's rows go to the device for the products and every product is
    orthogonalised row by row on the host (``HostBasis.cgs2`` over column blocks), the same
    sequence as the device's row-by-row path.
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

    rows = _Basis(xp, host_rows, host, to_device)
    if resume is None:
        start, _ = np.linalg.qr(rng.standard_normal((p, b)))  # b orthonormal columns
        if host_rows is None:
            rows.basis = xp.zeros((n, p), dtype=work_dtype, device=device)
        for i in range(b):
            rows.set_host(i, np.ascontiguousarray(start[:, i]))
        hessenberg = np.zeros((n, n), dtype=np.float64)
        restarts: list[int] = []
        norm_estimate = 0.0
        j = 0  # first row of the current block
    else:
        if host_rows is None:
            assert restored_basis is not None
            rows.basis = restored_basis()
        else:
            host_rows.restore(resume.basis_rows)
        hessenberg = resume.hessenberg.copy()
        restarts = list(resume.restarts)
        norm_estimate = resume.norm_estimate
        j = resume.products
    dropped: list[tuple[int, Any]] = []  # (column, residual row) outside the basis
    while j < n:
        m = min(b, n - j)
        w = products(rows.block(j, m))
        filled = j + m
        following = min(b, n - filled)  # rows of the next block
        fast = None
        if host_rows is None:
            fast = _block_fast_path(
                xp,
                rows.basis,
                w,
                filled,
                following,
                n,
                host,
                rtol=rtol,
                norm_estimate=norm_estimate,
            )
        if fast is not None:
            rows.basis, columns, norm_estimate, residual_rows = fast
            hessenberg[:, j:filled] = columns
            dropped += [(j + i, row) for i, row in residual_rows]
            if progress is not None:
                progress(m)
            j = filled
            _maybe_checkpoint(
                j, n, b, dropped, due, save_state, rows.state, hessenberg, restarts, norm_estimate
            )
            continue
        for i in range(m):  # a breakdown or non-finite values: row by row, as in Arnoldi
            # CGS2 of A q_{j+i} against the whole basis so far, including the rows of the
            # next block already accepted: the single-vector iteration's robustness, with the
            # products shared. Row i is Σ_l R[l, i] q_{filled + l} plus the basis part.
            accepted = filled + min(i, following)
            row, coefficients, product_norm, beta = rows.orthogonalise(accepted, w[i, ...], n)
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
                nxt = rows.fresh_direction(accepted, rng, n)
            else:
                hessenberg[filled + i, j + i] = beta
                nxt = row * (1.0 / beta)
            rows.set(filled + i, nxt)
        if progress is not None:
            progress(m)
        j = filled
        _maybe_checkpoint(
            j, n, b, dropped, due, save_state, rows.state, hessenberg, restarts, norm_estimate
        )
    if host_rows is None:
        residual = xp.stack([row for _, row in dropped])
        gram = host(xp.matmul(residual, xp.permute_dims(residual, (1, 0)))).astype(np.float64)
    else:
        residual = np.stack([np.asarray(row, dtype=np.float64) for _, row in dropped])
        gram = residual @ residual.T
    return ArnoldiResult(
        basis=rows.state,
        hessenberg=hessenberg,
        residual_norm=float(math.sqrt(max(0.0, float(np.max(np.diag(gram)))))),
        restarts=tuple(restarts),
        orthogonality_loss=rows.orthogonality_loss() if check_orthogonality else None,
        operator_norm_estimate=float(norm_estimate),
        residual_gram=gram,
        residual_columns=tuple(column for column, _ in dropped),
    )


class _Basis:
    """The block iteration's basis: an (n, p) array of the operator's namespace, or the
    single-vector iteration's ``_HostRows`` (host memory or disk)."""

    def __init__(self, xp: Any, host_rows: Any, host: Callable[[Any], np.ndarray], to_device: Any):
        self.xp, self.host_rows, self.host, self.to_device = xp, host_rows, host, to_device
        self.basis: Any = None

    @property
    def state(self) -> Any:
        """What the result and checkpoints hold: the device array, or the ``HostBasis``."""
        return self.basis if self.host_rows is None else self.host_rows.result()

    def set_host(self, index: int, row: np.ndarray) -> None:
        if self.host_rows is None:
            self.basis = _xp.set_row(self.xp, self.basis, index, self.to_device(row))
        else:
            self.host_rows.set(index, row)

    def set(self, index: int, row: Any) -> None:
        if self.host_rows is None:
            self.basis = _xp.set_row(self.xp, self.basis, index, row)
        else:
            self.host_rows.set(index, row)

    def block(self, first: int, count: int) -> Any:
        """Rows ``first .. first + count`` on the device, (count, p)."""
        if self.host_rows is None:
            return self.basis[first : first + count, ...]
        return self.to_device(np.asarray(self.host_rows.basis.array[first : first + count]))

    def orthogonalise(self, rows: int, w: Any, n: int) -> tuple[Any, np.ndarray, float, float]:
        if self.host_rows is None:
            active = self.basis[: padded_rows(rows, n), ...]
            return orthogonalise(self.xp, active, w, self.host)
        return self.host_rows.orthogonalise(rows, w)

    def fresh_direction(self, rows: int, rng: np.random.Generator, n: int) -> Any:
        if self.host_rows is None:
            active = self.basis[: padded_rows(rows, n), ...]
            return fresh_direction(self.xp, active, rng, self.to_device, self.host)
        return self.host_rows.fresh_direction(rows, rng)

    def orthogonality_loss(self) -> float:
        if self.host_rows is None:
            return orthogonality_loss(self.xp, self.basis, self.host)
        return self.host_rows.orthogonality_loss()


def _maybe_checkpoint(
    products: int,
    n: int,
    b: int,
    dropped: list[tuple[int, Any]],
    due: Callable[[int], bool],
    save_state: Callable[..., None] | None,
    basis: Any,
    hessenberg: np.ndarray,
    restarts: list[int],
    norm_estimate: float,
) -> None:
    """Checkpoint after a block when one is due and no residual row is set aside yet."""
    if dropped or products >= n or not due(products):
        return
    assert save_state is not None
    rows = products + min(b, n - products)  # the next block's rows are already set
    save_state(products, basis, rows, hessenberg, restarts, norm_estimate)


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

    The same CGS2 sequence as the row-by-row loop of :func:`block_arnoldi`, assuming no
    breakdown; ``None`` when a residual is at round-off level or anything is non-finite, and
    the caller then redoes the block row by row (restarting or raising as needed).

    Returns
    -------
    basis, columns (n, m) of the Hessenberg matrix, the updated norm estimate, and the
    residual rows ``(i, row)`` of the products that did not fit in the basis.
    """
    m = int(w.shape[0])
    rows = padded_rows(filled, n)
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
    step = cgs2_for(xp, compiled=False)

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
