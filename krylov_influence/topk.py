"""Exact streaming top-k over influence vectors, in bounded memory.

Training examples are k-dimensional influence vectors ``v_j = diag(1/(λ+δ)) G g_j`` and a
query is its projection ``P_z = G g_z``, so the score ``I(x_j, z) = P_z · v_j`` is an inner
product and "the most influential training examples of z" is a maximum-inner-product search.

The search here is exact and blocked: the training vectors arrive block by block (one
training batch at a time, from memory, from disk or recomputed), every block is scored
against all the queries of one query batch at once, and a running top-k per query is merged
with the block's scores. Memory is ``O(Q · (k + B))`` for ``Q`` queries, blocks of ``B`` and
``k`` results, whatever the number of training examples. Ties keep the smaller training index.

:class:`BaseNearestNeighbors` is the interface a faster (e.g. approximate) search implements;
:class:`LinearNearestNeighbors` is the exact default.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

from krylov_influence._xp import device_of, index_dtype

__all__ = [
    "ORDER",
    "BaseNearestNeighbors",
    "LinearNearestNeighbors",
    "RunningTopK",
    "TopKBatch",
    "TrainingTopK",
    "as_order",
    "merge_top_k",
    "stable_smallest_k",
]


class ORDER(enum.Enum):
    """Which end of the scores a top-k search keeps (influenciae's names and values).

    Attributes
    ----------
    ASCENDING : 1
        The k *lowest* scores, lowest first (e.g. opponents, or the least self-influential).
    DESCENDING : 2
        The k *highest* scores, highest first (proponents, the most self-influential).
    """

    ASCENDING = 1
    DESCENDING = 2


def as_order(order: Any, name: str = "order") -> ORDER:
    """Return ``order`` as an :class:`ORDER` member (also accepts its value, 1 or 2).

    Raises
    ------
    ValueError
        Naming ``name``, if ``order`` is neither.
    """
    if isinstance(order, ORDER):
        return order
    if isinstance(order, int) and not isinstance(order, bool):
        for member in ORDER:
            if member.value == order:
                return member
    raise ValueError(f"{name}={order!r}: expected ORDER.ASCENDING (1) or ORDER.DESCENDING (2)")


class TopKBatch(NamedTuple):
    """One batch of :meth:`ArnoldiInfluenceCalculator.top_k` results.

    Positions follow influenciae's ``(samples_to_evaluate, influence_values,
    training_samples)``, with the training *indices* in the place of the samples.

    Attributes
    ----------
    queries : batch
        The batch of ``dataset_to_evaluate``, untouched (B_query examples).
    values : array, shape (B_query, k)
        ``values[i, r]`` is the r-th best score ``I(x, z_i)`` over the training set, best
        first (highest for ``ORDER.DESCENDING``, lowest for ``ORDER.ASCENDING``).
    indices : array of int, shape (B_query, k)
        The namespace's index dtype: int64 (int32 in JAX without x64).
        Global training indices of those scores: position in the order of ``train_set``,
        counting from 0 across batches. Map one to its batch and row with
        :meth:`ArnoldiInfluenceCalculator.locate_examples`.
    """

    queries: Any
    values: Any
    indices: Any


class TrainingTopK(NamedTuple):
    """Result of :meth:`ArnoldiInfluenceCalculator.compute_top_k_from_training_dataset`.

    Positions follow influenciae's ``(training_samples, influences_values)``, with the
    *indices* of the samples in the place of the samples.

    Attributes
    ----------
    indices : array of int, shape (k,)
        The namespace's index dtype: int64 (int32 in JAX without x64).
        Global training indices, best first.
    values : array, shape (k,)
        Their self-influence ``g_xᵀ H⁻¹ g_x``, best first.
    """

    indices: Any
    values: Any


class RunningTopK:
    """The k best scores per row seen so far, merged one block of columns at a time.

    Parameters
    ----------
    k : int
        Number of results per row.
    order : ORDER
        ``DESCENDING`` keeps the highest scores, ``ASCENDING`` the lowest.
    xp : namespace
        Array namespace of the scores.
    device : optional
        Device of the index arrays (that of the scores).

    Notes
    -----
    Each :meth:`update` selects among ``k + B`` candidates per row
    (:func:`stable_smallest_k`), so a full scan of ``N`` columns in blocks of ``B`` costs
    ``O(N/B · (k + B))`` per row and holds ``(k + B)`` candidates per row at a time. The
    selection is stable and the running results come first, so equal scores keep the smaller
    column index.
    """

    def __init__(self, k: int, order: ORDER, *, xp: Any, device: Any = None):
        self.k = int(k)
        self.order = as_order(order)
        self.xp = xp
        self.device = device
        self.seen = 0
        self._values: Any = None
        self._indices: Any = None

    def update(self, scores: Any, start: int) -> None:
        """Merge a block of scores whose column ``j`` is global index ``start + j``.

        Parameters
        ----------
        scores : array, shape (Q, B)
        start : int
            Global index of the block's first column.
        """
        xp = self.xp
        rows, width = int(scores.shape[0]), int(scores.shape[1])
        integer = index_dtype(xp, self.device)
        columns = xp.arange(start, start + width, dtype=integer, device=self.device)
        # Broadcast (1, B) against (Q, 1) by addition: no broadcast_to needed in the namespace.
        indices = xp.reshape(columns, (1, width)) + xp.zeros(
            (rows, 1), dtype=integer, device=self.device
        )
        if self._values is not None:
            scores = xp.concat([self._values, scores], axis=1)
            indices = xp.concat([self._indices, indices], axis=1)
        # Descending order by selecting the smallest negated scores keeps the selection stable
        # in every namespace (the earlier, smaller index wins a tie).
        key = -scores if self.order is ORDER.DESCENDING else scores
        best = stable_smallest_k(xp, key, min(self.k, int(scores.shape[1])))
        self._values = xp.take_along_axis(scores, best, axis=1)
        self._indices = xp.take_along_axis(indices, best, axis=1)
        self.seen += width

    def result(self) -> tuple[Any, Any]:
        """The best ``k`` scores and their global indices, best first.

        Returns
        -------
        values : array, shape (Q, k)
        indices : array of int64, shape (Q, k)

        Raises
        ------
        ValueError
            If fewer than ``k`` columns were seen (``k`` larger than the training set).
        """
        if self.seen < self.k:
            raise ValueError(
                f"k={self.k}: expected at most the number of training examples ({self.seen})"
            )
        return self._values, self._indices


def merge_top_k(
    values: np.ndarray,
    indices: np.ndarray,
    more_values: np.ndarray,
    more_indices: np.ndarray,
    k: int,
    order: ORDER,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two partial top-k results with arbitrary global indices, on the host (NumPy).

    The selection orders candidates by score (best first) and then by global index
    (smaller first), a total order, so the result does not depend on the order in which
    partial results arrive, and equals :class:`RunningTopK` over all the columns in index
    order (ties keep the smaller index). Partial results over disjoint sets of columns, each
    the best ``min(k, size)`` of its set under that order, merge to the exact top-k of the
    union: the best ``k`` of the union are among the best ``k`` of each part.

    Parameters
    ----------
    values, indices : numpy.ndarray, shape (Q, a)
        A partial result (``a`` may be 0); indices integers.
    more_values, more_indices : numpy.ndarray, shape (Q, b)
        Another, over other columns.
    k : int
        Results kept per row (fewer when ``a + b < k``).
    order : ORDER

    Returns
    -------
    values : numpy.ndarray, shape (Q, min(k, a + b))
    indices : numpy.ndarray of int64, shape (Q, min(k, a + b))
    """
    order = as_order(order)
    scores = np.concatenate([values, more_values], axis=1)
    columns = np.concatenate([indices, more_indices], axis=1).astype(np.int64)
    key = -scores if order is ORDER.DESCENDING else scores
    # lexsort sorts by the last key first: by score, then by index among equal scores.
    best = np.lexsort((columns, key), axis=1)[:, : min(int(k), scores.shape[1])]
    return np.take_along_axis(scores, best, axis=1), np.take_along_axis(columns, best, axis=1)


def stable_smallest_k(xp: Any, keys: Any, k: int) -> Any:
    """Column positions of the ``k`` smallest keys of every row, as a stable sort orders them.

    Equal to ``argsort(keys, axis=1, stable=True)[:, :k]`` (smallest first, ties to the
    smaller position) without sorting whole rows: a sort of ``W`` columns costs
    ``O(W log W)`` per row, a selection ``O(W)``.

    Parameters
    ----------
    xp : namespace
        May supply ``stable_smallest_k(keys, k)`` with these exact semantics (JAX's
        ``lax.top_k`` and TensorFlow's ``math.top_k`` are stable).
    keys : array, shape (Q, W)
        Finite (scores of finite influence vectors).
    k : int
        ``1 ≤ k ≤ W``.

    Returns
    -------
    array of int, shape (Q, k)

    Notes
    -----
    Without a hook, an unstable selection (``Tensor.topk``, ``numpy.argpartition``) finds the
    k-th smallest key ``t`` of every row; every key ``≤ t`` is a candidate (exactly k per row
    unless there are ties at ``t``); the candidates, in column order, are then sorted stably.
    Namespaces with no selection at all sort whole rows.
    """
    hook = getattr(xp, "stable_smallest_k", None)
    if hook is not None:
        return hook(keys, k)
    width = int(keys.shape[1])
    picked = _unstable_smallest_k(keys, k) if 4 * k < width else None
    if picked is None:  # small rows, or no selection primitive: sorting is as good
        # Slicing past the end is unspecified in the array API: k ≤ W here.
        return xp.argsort(keys, axis=1, stable=True)[:, :k]
    threshold = xp.max(xp.take_along_axis(keys, picked, axis=1), axis=1, keepdims=True)
    inside = keys <= threshold
    integer = index_dtype(xp, device_of(keys))
    most = int(xp.max(xp.sum(xp.astype(inside, integer), axis=1)))
    if most > k:  # ties at the threshold: take every candidate, padded with outsiders
        device = device_of(keys)
        positions = xp.reshape(xp.arange(width, dtype=integer, device=device), (1, width))
        rank = xp.where(inside, positions, xp.asarray(width, dtype=integer, device=device))
        picked = _unstable_smallest_k(rank, most)
    candidates = xp.take_along_axis(picked, xp.argsort(picked, axis=1), axis=1)
    candidate_keys = xp.take_along_axis(keys, candidates, axis=1)
    if most > k:  # the padding sorts after every candidate
        within = xp.take_along_axis(inside, candidates, axis=1)
        infinity = xp.asarray(float("inf"), dtype=keys.dtype, device=device_of(keys))
        candidate_keys = xp.where(within, candidate_keys, infinity)
    order = xp.argsort(candidate_keys, axis=1, stable=True)[:, :k]
    return xp.take_along_axis(candidates, order, axis=1)


def _unstable_smallest_k(values: Any, k: int) -> Any:
    """Positions of some ``k`` smallest values per row, in no order; ``None`` if no primitive."""
    if isinstance(values, np.ndarray):
        return np.argpartition(values, k - 1, axis=1)[:, :k]
    topk = getattr(values, "topk", None)  # torch.Tensor, found by duck typing: no import
    if topk is not None:
        return topk(k, dim=1, largest=False, sorted=False).indices
    return None


BlockSource = Callable[[], Iterable[tuple[int, Any]]]


class BaseNearestNeighbors(abc.ABC):
    """Maximum-inner-product search over training influence vectors (the ``top_k`` backend).

    ``top_k`` calls :meth:`build` once with a source of training blocks, then :meth:`query`
    once per batch of queries. An implementation may index the vectors in ``build`` (an
    approximate search would) or scan the source at query time (the exact default).
    """

    @abc.abstractmethod
    def build(self, blocks: BlockSource, *, num_examples: int | None, xp: Any) -> None:
        """Prepare the search over the training vectors.

        Parameters
        ----------
        blocks : callable returning an iterable of ``(start, vectors)``
            Each call iterates over the whole training set afresh: ``vectors`` has shape
            (B, d) and holds the influence vectors of examples ``start .. start + B - 1``.
        num_examples : int or None
            ``N`` when known in advance (``None`` when the vectors are recomputed on the fly).
        xp : namespace
            Array namespace of the vectors and queries.
        """

    @abc.abstractmethod
    def query(self, queries: Any, k: int, order: ORDER) -> tuple[Any, Any]:
        """The ``k`` training examples of highest (lowest) score for every query.

        Parameters
        ----------
        queries : array, shape (Q, d)
            Projected query gradients ``G g_z``; the score of training example ``j`` is
            ``queries @ vectors[j]``.
        k : int
        order : ORDER

        Returns
        -------
        values : array, shape (Q, k)
            Scores, best first.
        indices : array of int, shape (Q, k)
            Global training indices (position in the order of the training set), in the
            namespace's index dtype.
        """


class LinearNearestNeighbors(BaseNearestNeighbors):
    """Exact search: a blocked scan with a running top-k (see :class:`RunningTopK`).

    Holds no training vectors itself: each :meth:`query` streams the blocks of the source
    given to :meth:`build`, joining consecutive blocks until they reach ``block_columns``
    training examples, so that small training batches cost one product and one selection
    per ``block_columns`` examples rather than per batch. Memory is
    ``O(Q · (k + block_columns + B))``.

    Parameters
    ----------
    block_columns : int, default 4096
        Training examples scored at once (the width of one score block).
    """

    def __init__(self, block_columns: int = 4096) -> None:
        if (
            isinstance(block_columns, bool)
            or not isinstance(block_columns, int)
            or block_columns < 1
        ):
            raise ValueError(f"block_columns={block_columns!r}: expected a positive integer")
        self.block_columns = block_columns
        self._blocks: BlockSource | None = None
        self._xp: Any = None

    def build(self, blocks: BlockSource, *, num_examples: int | None, xp: Any) -> None:
        self._blocks = blocks
        self._xp = xp

    def query(self, queries: Any, k: int, order: ORDER) -> tuple[Any, Any]:
        if self._blocks is None:
            raise RuntimeError("LinearNearestNeighbors.query called before build")
        xp = self._xp
        running = RunningTopK(k, order, xp=xp, device=device_of(queries))
        pending: list[Any] = []
        first = width = 0

        def flush() -> None:
            vectors = pending[0] if len(pending) == 1 else xp.concat(pending, axis=0)
            running.update(xp.matmul(queries, xp.permute_dims(vectors, (1, 0))), first)
            pending.clear()

        for start, vectors in self._blocks():
            if pending and start != first + width:  # not contiguous: score what is held
                flush()
            if not pending:
                first, width = start, 0
            pending.append(vectors)
            width += int(vectors.shape[0])
            if width >= self.block_columns:
                flush()
        if pending:
            flush()
        return running.result()
