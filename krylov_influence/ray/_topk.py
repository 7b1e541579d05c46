"""Top-k proponents / opponents of a set of queries over a training set, on Ray actors.

The driver projects the queries once with its own model (``G g_z``, shape (Q, k)) and ships
them to the actors once (``ray.put``). With the spectral complement the scores also need the
query gradients ``g_z`` in the engine's own form (:meth:`InfluenceModel.query_gradients`:
the torch engine keeps dense layers factored), which need not be host arrays, so the query
batches are shipped instead and each actor computes them once (kept for the tasks of the
same call). The training set is cut into blocks of
consecutive batches (:mod:`krylov_influence.ray._pool`); an actor computes its block's
influence vectors and keeps the block's best ``min(k, B)`` scores per query with the
single-process calculator's own search:

- without the complement, :class:`~krylov_influence.topk.LinearNearestNeighbors` over the
  block's vectors (the score is ``P_z · v_x``);
- with it, :meth:`krylov_influence._streaming.Placement.complement_top_k` (the score adds
  ``w (g_zᵀ g_x − P_zᵀ P_x)``, a projection onto the query gradients).

The driver merges the blocks' results as they arrive with
:func:`~krylov_influence.topk.merge_top_k`: candidates ordered by score, then by global id,
a total order, so the merge is exact and does not depend on which block came back first, and
it equals the calculator's ``top_k`` (ties keep the smaller id). Driver memory: the queries'
projections and ``Q × k`` running results, whatever ``N``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence._data import dataset_length, progress_bar
from krylov_influence._streaming import Placement, require_finite
from krylov_influence.ray._hessian import import_ray
from krylov_influence.ray._pool import Block, actors_for, iter_blocks, run_blocks
from krylov_influence.topk import ORDER, LinearNearestNeighbors, as_order, merge_top_k

__all__ = ["RayTopK", "project_queries", "top_k_training_set"]


@dataclass(frozen=True)
class RayTopK:
    """Top-k results of every query, queries in the order of their batches.

    Attributes
    ----------
    values : numpy.ndarray, shape (Q, k)
        ``values[i, r]``: the r-th best score ``I(x, z_i)`` over the training set, best first
        (highest for ``ORDER.DESCENDING``, lowest for ``ORDER.ASCENDING``), the model's dtype.
    indices : numpy.ndarray of int64, shape (Q, k)
        Their global training ids (positions in the training batches, counted from 0);
        equal scores keep the smaller id.
    """

    values: np.ndarray
    indices: np.ndarray


def project_queries(
    placement: Placement, queries: Iterable[Any]
) -> tuple[np.ndarray, list[Any] | None]:
    """``(G g_z (Q, k) on the host, the query batches or None)``.

    The batches only with the spectral complement, whose scores need the query gradients
    (computed on each actor by :func:`_query_sides`).
    """
    model = placement.model
    projected, kept = [], []
    for index, query in enumerate(queries):
        part, query_grads = placement.query_side(query, index)
        projected.append(np.asarray(model.to_numpy(part)))
        if query_grads is not None:
            kept.append(query)
    if not projected:
        raise ValueError("queries: the dataset is empty")
    return np.concatenate(projected), kept or None


# Per actor process: the query side of the call in progress (its token), computed once.
_QUERY_SIDES: dict[str, list[tuple[Any, Any]]] = {}


def _query_sides(placement: Placement, token: str, batches: Sequence[Any]) -> list[Any]:
    """``placement.query_side`` of every query batch, once per actor and call."""
    found = _QUERY_SIDES.get(token)
    if found is None:
        _QUERY_SIDES.clear()
        found = [placement.query_side(batch, index) for index, batch in enumerate(batches)]
        _QUERY_SIDES[token] = found
    return found


def _top_k_block(
    placement: Placement,
    start: int,
    first_batch: int,
    batches: Sequence[Any],
    projected: np.ndarray,
    query_batches: tuple[str, list[Any]] | None,
    k: int,
    order: ORDER,
) -> dict[str, Any]:
    """On an actor: the best ``min(k, B)`` scores per query over one block, global ids."""
    model, xp = placement.model, placement.xp
    keep = min(k, sum(int(model.batch_size(batch)) for batch in batches))
    queries = model.from_numpy(projected)

    def paired() -> Iterable[tuple[Any, Any]]:
        for offset, batch in enumerate(batches):
            yield batch, placement.vectors(batch, first_batch + offset, "train_set")

    if query_batches is None:

        def source() -> Iterable[tuple[int, Any]]:
            position = start
            for _, vectors in paired():
                yield position, vectors
                position += int(vectors.shape[0])

        search = LinearNearestNeighbors()
        search.build(source, num_examples=None, xp=xp)
        values, indices = search.query(queries, keep, order)
    else:
        pairs = list(paired())  # the block's vectors, once for every query batch
        found = [
            placement.complement_top_k(
                part, gradients, pairs, keep, order, lambda scores: scores, start
            ).result()
            for part, gradients in _query_sides(placement, *query_batches)
        ]
        values = xp.concat([v for v, _ in found], axis=0)
        indices = xp.concat([i for _, i in found], axis=0)
    require_finite(xp, values, "top-k scores", "train_set", first_batch)
    return {
        "values": np.asarray(model.to_numpy(values)),
        "indices": np.asarray(model.to_numpy(indices)).astype(np.int64),
    }


def top_k_training_set(
    calculator: Any,
    model_factory: Any,
    queries: Iterable[Any],
    batches: Iterable[Any],
    k: int = 5,
    order: ORDER = ORDER.DESCENDING,
    *,
    batches_per_block: int = 1,
    num_actors: int = 2,
    in_flight_per_actor: int = 2,
    show_progress: bool = False,
    num_cpus: float | None = None,
    max_restarts: int = 3,
    max_task_retries: int = 3,
    actor_options: dict[str, Any] | None = None,
) -> RayTopK:
    """For each query, the ``k`` most (or least) influential training examples, on Ray actors.

    Equals the calculator's ``top_k(queries, batches, k, order=order)`` (same values to
    round-off, same ids up to ties), spectral complement included.

    Parameters
    ----------
    calculator : ArnoldiInfluenceCalculator
        A fitted calculator; its model projects the queries on the driver.
    model_factory : callable or ScorerPool
        A picklable zero-argument callable building the calculator's model on each actor
        (fingerprint checked; actors started for this call), or a running
        :class:`~krylov_influence.ray.ScorerPool` for this calculator (left running).
    queries : iterable of batches
        The query points z, batches of the calculator's model, iterated once on the driver.
        Their projections (Q × k) are shipped to every actor once; with the complement
        the batches too, and each actor computes their gradients once.
    batches : iterable of batches
        The training set, read lazily on the driver, in blocks of ``batches_per_block``.
    k : int, default 5
        ``1 ≤ k ≤ N``.
    order : ORDER, default ORDER.DESCENDING
        ``DESCENDING``: highest scores (proponents) first; ``ASCENDING``: lowest (opponents).
    batches_per_block, num_actors, in_flight_per_actor, show_progress :
        As for :func:`score_training_set`.
    num_cpus, max_restarts, max_task_retries, actor_options :
        As for :class:`~krylov_influence.ray.RayHessianData`.

    Returns
    -------
    RayTopK
        ``values`` (Q, k) and ``indices`` (Q, k) int64, host arrays.

    Raises
    ------
    ValueError
        On ``k`` above the number of training examples, an unknown ``order``, empty data.
    """
    ray = import_ray()
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: expected a positive integer")
    k = int(k)
    order = as_order(order)
    for name, value in (
        ("batches_per_block", batches_per_block),
        ("in_flight_per_actor", in_flight_per_actor),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    placement = calculator._placed(None)
    projected, query_batches = project_queries(placement, queries)
    token = uuid.uuid4().hex  # names this call's query side on the actors
    shared = (
        ray.put(projected),
        None if query_batches is None else ray.put((token, query_batches)),
    )

    def task(block: Block) -> tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]:
        first_batch = block.index * batches_per_block
        data = ray.put(block.batches)
        return _top_k_block, (block.start, first_batch, data, *shared, k, order)

    num_queries = projected.shape[0]
    values = np.zeros((num_queries, 0), projected.dtype)
    indices = np.zeros((num_queries, 0), np.int64)
    num_examples = 0
    blocks = iter_blocks(batches, batches_per_block, calculator.model.batch_size)
    with (
        actors_for(
            calculator,
            model_factory,
            num_actors,
            num_cpus=num_cpus,
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
            actor_options=actor_options,
        ) as pool,
        progress_bar(show_progress, dataset_length(batches), "train_set") as bar,
    ):
        for block, result in run_blocks(
            pool, blocks, task, in_flight_per_actor=in_flight_per_actor
        ):
            values, indices = merge_top_k(
                values, indices, result["values"], result["indices"], k, order
            )
            num_examples += block.rows
            bar.update(len(block.sizes))
    if k > num_examples:
        raise ValueError(
            f"k={k}: expected at most the number of training examples ({num_examples})"
        )
    return RayTopK(values, indices)
