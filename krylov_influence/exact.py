"""Exact influence from a dense Hessian: the oracle for small models (p up to a few thousand).

Everything here is float64 NumPy on the host, built from the engine's own operators (HVPs on
unit vectors, per-example gradients), so it checks the Arnoldi approximation and not the
engine. Scores follow the project's convention (no minus sign)::

    I(x, z) = g_zᵀ (H + δI)⁻¹ g_x,        S(x) = g_xᵀ (H + δI)⁻¹ g_x
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from krylov_influence.engine import InfluenceModel

__all__ = [
    "dense_hessian",
    "exact_influence",
    "exact_self_influence",
    "inverse_hessian",
    "per_example_gradients",
    "truncated_inverse_hessian",
]


def dense_hessian(model: InfluenceModel, batches: Iterable[Any], *, chunk: int = 256) -> np.ndarray:
    """The Hessian of the mean loss over ``batches``, from HVPs on unit vectors.

    Parameters
    ----------
    model : InfluenceModel
    batches : re-iterable of batches
    chunk : int
        Unit vectors per ``hvps`` call (bounds memory to chunk × p).

    Returns
    -------
    numpy.ndarray, shape (p, p), float64, symmetrised
    """
    p = model.num_parameters
    rows = []
    for start in range(0, p, chunk):
        stop = min(start + chunk, p)
        units = np.zeros((stop - start, p))
        units[np.arange(stop - start), np.arange(start, stop)] = 1.0
        rows.append(model.to_numpy(model.hvps(model.from_numpy(units), batches)))
    hessian = np.concatenate(rows, axis=0).astype(np.float64)
    return 0.5 * (hessian + hessian.T)


def per_example_gradients(model: InfluenceModel, batches: Iterable[Any]) -> np.ndarray:
    """Per-example gradients of every example in ``batches``, stacked in order.

    Returns
    -------
    numpy.ndarray, shape (N, p), float64
    """
    grads = [model.to_numpy(model.per_example_grads(b)).astype(np.float64) for b in batches]
    if not grads:
        raise ValueError("batches: the dataset is empty")
    return np.concatenate(grads, axis=0)


def inverse_hessian(hessian: np.ndarray, damping: float = 0.0) -> np.ndarray:
    """``(H + δI)⁻¹`` as a dense float64 matrix, shape (p, p)."""
    p = hessian.shape[0]
    return np.linalg.inv(hessian + damping * np.eye(p))


def truncated_inverse_hessian(
    hessian: np.ndarray, k: int, *, damping: float = 0.0, selection: str = "magnitude"
) -> np.ndarray:
    """``V_k diag(1/(λ+δ)) V_kᵀ`` from the exact top-``k`` eigenpairs of ``H``.

    This is what the Arnoldi calculator computes when ``subspace_dim = p``: its Ritz pairs are
    then exact eigenpairs.

    Parameters
    ----------
    hessian : numpy.ndarray, shape (p, p)
    k : int
    damping : float
    selection : {"magnitude", "positive", "algebraic"}

    Returns
    -------
    numpy.ndarray, shape (p, p)
    """
    from krylov_influence.eigen import select_eigenpairs

    values, vectors = np.linalg.eigh(hessian)
    keep = select_eigenpairs(values, k, selection)  # type: ignore[arg-type]
    kept = vectors[:, keep]
    return (kept / (values[keep] + damping)) @ kept.T


def exact_influence(
    model: InfluenceModel,
    train_set: Iterable[Any],
    queries: Iterable[Any],
    *,
    hessian_dataset: Iterable[Any] | None = None,
    damping: float = 0.0,
    inverse: np.ndarray | None = None,
) -> np.ndarray:
    """Exact pairwise scores ``g_zᵀ (H + δI)⁻¹ g_x``.

    Parameters
    ----------
    model : InfluenceModel
    train_set, queries : re-iterables of batches
    hessian_dataset : optional
        Data of the Hessian; default ``train_set``.
    damping : float
    inverse : numpy.ndarray, shape (p, p), optional
        A precomputed (possibly truncated) inverse to use instead of ``(H + δI)⁻¹``.

    Returns
    -------
    numpy.ndarray, shape (N_queries, N_train), float64
    """
    if inverse is None:
        hessian = dense_hessian(model, train_set if hessian_dataset is None else hessian_dataset)
        inverse = inverse_hessian(hessian, damping)
    return (
        per_example_gradients(model, queries) @ inverse @ per_example_gradients(model, train_set).T
    )


def exact_self_influence(
    model: InfluenceModel,
    train_set: Iterable[Any],
    *,
    hessian_dataset: Iterable[Any] | None = None,
    damping: float = 0.0,
    inverse: np.ndarray | None = None,
) -> np.ndarray:
    """Exact self-influence ``g_xᵀ (H + δI)⁻¹ g_x`` of every training example.

    Returns
    -------
    numpy.ndarray, shape (N,), float64
    """
    if inverse is None:
        hessian = dense_hessian(model, train_set if hessian_dataset is None else hessian_dataset)
        inverse = inverse_hessian(hessian, damping)
    grads = per_example_gradients(model, train_set)
    return np.einsum("np,pq,nq->n", grads, inverse, grads)
