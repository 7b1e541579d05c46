"""Classical Gram-Schmidt applied twice (CGS2) as matrix products, for the Arnoldi iterations.

Shared by :mod:`krylov_influence.arnoldi` and :mod:`krylov_influence._block_arnoldi`: one
reorthogonalised step against a basis (compiled by the namespace's ``compile_function`` hook
when it has one), restart directions, the orthogonality check, and the row padding that keeps
the number of distinct basis shapes small.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "cgs2_for",
    "fresh_direction",
    "fused_step_for",
    "orthogonalise",
    "orthogonality_loss",
    "padded_rows",
    "unpack",
]


def orthogonality_loss(xp: Any, basis: Any, host: Callable[[Any], np.ndarray]) -> float:
    """``max |Q Qᵀ − I|`` (one n × n × p product)."""
    gram = host(xp.matmul(basis, xp.permute_dims(basis, (1, 0)))).astype(np.float64)
    return float(np.max(np.abs(gram - np.eye(int(basis.shape[0])))))


_ROW_BLOCK = 32


def padded_rows(rows: int, limit: int) -> int:
    """``rows`` rounded up to a multiple of 32 (at most ``limit``).

    The rows past the filled ones are exact zeros and add nothing to the projections, while
    the basis slices take only ⌈n/32⌉ distinct shapes: frameworks that compile per shape
    (JAX, XLA) compile a handful of kernels instead of one per iteration.
    """
    return min(limit, -(-rows // _ROW_BLOCK) * _ROW_BLOCK)


def orthogonalise(
    xp: Any, basis: Any, w: Any, host: Callable[[Any], np.ndarray]
) -> tuple[Any, np.ndarray, float, float]:
    """CGS2: remove ``basis`` components from ``w`` twice, as matrix products.

    Returns the orthogonalised vector, the summed coefficients in float64 (the Hessenberg
    column), ``‖w‖`` before and after. One host transfer per call.
    """
    w, packed = cgs2_for(xp)(basis, w)
    return (w, *unpack(packed, int(basis.shape[0]), host))


def unpack(
    packed: Any, rows: int, host: Callable[[Any], np.ndarray]
) -> tuple[np.ndarray, float, float]:
    """The summed coefficients (float64, ``rows``), ``‖w‖`` and ``β`` of a CGS2 ``packed``
    result: one host transfer."""
    values = host(packed).astype(np.float64)
    return values[:rows] + values[rows : 2 * rows], float(values[-2]), float(values[-1])


@functools.cache
def cgs2_for(xp: Any, compiled: bool = True) -> Callable[[Any, Any], tuple[Any, Any]]:
    """The CGS2 step in ``xp``, compiled by the namespace's ``compile_function`` hook if any.

    Eagerly, the step is ten small dispatches; where each costs tens of microseconds (JAX,
    TensorFlow) they outweigh the arithmetic of a small model, so one compiled program per
    basis shape (a handful, thanks to :func:`padded_rows`) replaces them.
    """

    def step(basis: Any, w: Any) -> tuple[Any, Any]:
        return _cgs2(xp, basis, w)

    compile_hook = getattr(xp, "compile_function", None) if compiled else None
    return step if compile_hook is None else compile_hook(step)


def _cgs2(xp: Any, basis: Any, w: Any) -> tuple[Any, Any]:
    """``w`` orthogonalised twice against ``basis``; packed ``[first, second, ‖w‖, β]``."""
    product_norm = xp.linalg.vector_norm(w)
    first = xp.matmul(basis, w)
    w = w - xp.matmul(first, basis)
    second = xp.matmul(basis, w)
    w = w - xp.matmul(second, basis)
    beta = xp.linalg.vector_norm(w)
    return w, xp.concat([first, second, xp.stack([product_norm, beta])])


@functools.cache
def fused_step_for(xp: Any, active_rows: int) -> Callable[[Any, Any, Any], Any] | None:
    """One compiled program per Arnoldi step: CGS2 against the first ``active_rows`` rows of
    the basis, then ``w / β`` written as row ``index``; ``None`` where it does not pay.

    ``step(basis, w, index) -> (basis, w, row, packed)``, ``packed`` as :func:`cgs2_for`'s.
    Eagerly a step is a dozen dispatches (two slices, the CGS2 products, the scaling, the row
    update), which cost more than the arithmetic of a small model where each dispatch takes
    tens of microseconds (TensorFlow, JAX): one program replaces them. Needs the namespace's
    ``compile_function`` hook to accept ``donate_argnums`` (JAX then updates the basis in its
    own buffer; a copy of the (n, p) basis per step would cost more than it saves) and a
    ``set_row`` hook that takes a traced index; ``None`` otherwise. The row is written
    whatever ``β``: the caller replaces it when the step breaks down.
    """
    compile_hook = getattr(xp, "compile_function", None)
    if compile_hook is None or getattr(xp, "set_row", None) is None:
        return None

    def step(basis: Any, w: Any, index: Any) -> tuple[Any, Any, Any, Any]:
        w, packed = _cgs2(xp, basis[:active_rows, ...], w)
        row = w * (1.0 / packed[-1])
        return xp.set_row(basis, index, row), w, row, packed

    try:
        return compile_hook(step, donate_argnums=(0,))
    except TypeError:  # a hook without donation
        return None


def fresh_direction(
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
