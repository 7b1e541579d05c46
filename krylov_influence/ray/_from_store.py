"""Scores of queries against the influence vectors of a store: no training gradient recomputed.

A store written by :func:`~krylov_influence.ray.score_training_set` holds the influence
vectors ``v_x = diag(1/(λ+δ)) G g_x`` of every training example (N × k). The score of a query
``z`` is ``I(x, z) = (G g_z) · v_x``, so once the store exists, scoring new queries costs one
projection per query (on the driver, with the calculator's model) and a read of the store,
chunk by chunk (memory ``O(Q · (k + chunk))`` whatever ``N``): no training example is read
and no training gradient is computed. The store is first checked to belong to the calculator
(:class:`~krylov_influence.ray._store.ScoreStore`: eigenbasis digest, parameter fingerprint,
dtype, rank, finished, with vectors).

With the spectral complement a score also needs ``g_zᵀ g_x``, the training gradients' inner
product with the query's, which the k-vectors do not hold: such a calculator is refused here
(use :func:`~krylov_influence.ray.top_k_training_set`, which recomputes the training
gradients on the actors).

The top-k search is the calculator's own (:class:`~krylov_influence.topk.LinearNearestNeighbors`
over the store's chunks), so the results equal the calculator's ``top_k`` with the same fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from krylov_influence._streaming import require_finite
from krylov_influence.ray._store import ScoreStore
from krylov_influence.ray._topk import RayTopK, project_queries
from krylov_influence.topk import ORDER, LinearNearestNeighbors, as_order

__all__ = ["scores_from_store", "top_k_from_store"]


def _checked(calculator: Any, store_path: Any) -> tuple[Any, ScoreStore]:
    placement = calculator._placed(None)
    if placement.complement_weight is not None:
        raise ValueError(
            "calculator: has a spectral complement, whose scores need the inner products of "
            "query and training gradients, which a store of k-dimensional influence vectors "
            "does not hold; use top_k_training_set (training gradients recomputed on the "
            "actors) or a calculator fitted with complement='none'"
        )
    return placement, ScoreStore(store_path, calculator)


def scores_from_store(
    calculator: Any, queries: Iterable[Any], store_path: Any, *, rows: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Scores of every query against every training example of a store, block by block.

    Parameters
    ----------
    calculator : ArnoldiInfluenceCalculator
        The calculator the store was written with (checked), without spectral complement.
    queries : iterable of batches
        The queries z, batches of the calculator's model, projected once on the driver.
    store_path : str or os.PathLike
        A finished store of :func:`score_training_set` with vectors.
    rows : int, optional
        Training examples per block (default the store's chunk).

    Yields
    ------
    (start, scores)
        ``scores`` : numpy.ndarray of shape (Q, B), the model's dtype:
        ``scores[i, j] = I(x_{start + j}, z_i)``, training examples by global id.

    Raises
    ------
    ValueError
        If the calculator has a spectral complement, or ``queries`` is empty.
    IncompatibleStoreError
        If the store is missing, unfinished, without vectors, or of another fit/model/dtype.
    """
    placement, store = _checked(calculator, store_path)
    model, xp = placement.model, placement.xp
    projected = model.from_numpy(project_queries(placement, queries)[0])
    for start, vectors in store.vector_blocks(rows):
        scores = xp.matmul(projected, xp.permute_dims(model.from_numpy(vectors), (1, 0)))
        require_finite(xp, scores, "scores", "store_path", start)
        yield start, np.asarray(model.to_numpy(scores))


def top_k_from_store(
    calculator: Any,
    queries: Iterable[Any],
    store_path: Any,
    k: int = 5,
    order: ORDER = ORDER.DESCENDING,
) -> RayTopK:
    """For each query, the ``k`` best training examples, from the vectors of a store.

    Equals the calculator's ``top_k(queries, train_set, k, order=order)`` on the data the
    store was written from (same values to round-off, same ids up to ties).

    Parameters
    ----------
    calculator : ArnoldiInfluenceCalculator
        The calculator the store was written with (checked), without spectral complement.
    queries : iterable of batches
    store_path : str or os.PathLike
        A finished store of :func:`score_training_set` with vectors.
    k : int, default 5
        ``1 ≤ k ≤ N``.
    order : ORDER, default ORDER.DESCENDING

    Returns
    -------
    RayTopK
        ``values`` (Q, k), ``indices`` (Q, k) int64 global ids.

    Raises
    ------
    ValueError
        As :func:`scores_from_store`, and on ``k`` above ``N``.
    IncompatibleStoreError
        As :func:`scores_from_store`.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: expected a positive integer")
    order = as_order(order)
    placement, store = _checked(calculator, store_path)
    if k > store.num_examples:
        raise ValueError(
            f"k={k}: expected at most the number of training examples ({store.num_examples})"
        )
    model, xp = placement.model, placement.xp
    projected = model.from_numpy(project_queries(placement, queries)[0])
    search = LinearNearestNeighbors()
    search.build(
        lambda: ((start, model.from_numpy(v)) for start, v in store.vector_blocks()),
        num_examples=store.num_examples,
        xp=xp,
    )
    values, indices = search.query(projected, int(k), order)
    require_finite(xp, values, "top-k scores", "queries", 0)
    return RayTopK(
        np.asarray(model.to_numpy(values)), np.asarray(model.to_numpy(indices)).astype(np.int64)
    )
