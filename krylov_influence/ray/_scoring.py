"""Self-influence and influence vectors of a training set, computed by Ray actors.

After the fit, every example is scored independently, so the training set is cut into
*blocks* of consecutive batches, read lazily on the driver and mapped over a pool of actors
(:mod:`krylov_influence.ray._pool`). Each actor builds its model once with the user's
``model_factory`` and holds the fitted state (``G`` and ``1 / (λ + δ)`` shipped as host
arrays, plus the spectral complement's weight when the calculator has one); it scores a
block with the very code of the single-process calculator
(:class:`krylov_influence._streaming.Placement`), so the numbers are the calculator's:

- self-influence ``S(x) = Σ_i (G g_x)_i² / (λ_i + δ)`` (+ ``w (‖g_x‖² − ‖G g_x‖²)`` with the
  complement), shape (N,);
- influence vectors ``diag(1/(λ + δ)) G g_x``, shape (N, k).

Example ``i`` is the ``i``-th example of the batches in order (its *global id*); results come
back in that order whatever actor computed them.

With ``store_path=`` the results go to a zarr (v3) group (:mod:`krylov_influence.ray._store`),
written by the actors in parallel, one chunk of rows per block. A rerun on the same store
skips the blocks marked complete: an interrupted run loses at most the blocks in flight
(their marker is written only after their rows). A skipped block is still checked: its actor
recomputes the losses (a forward pass, no gradients) and compares them with the stored ones,
so the rows are never served for other data.

Driver memory: a bounded number of blocks in flight, plus ``N`` float64 self-influence values
(the result) and, only without a store, the ``N × k`` vectors asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence._data import dataset_length, progress_bar
from krylov_influence._identity import check_losses, loss_tolerance
from krylov_influence._streaming import Placement
from krylov_influence.ray._hessian import import_ray
from krylov_influence.ray._pool import Block, actors_for, iter_blocks, run_blocks
from krylov_influence.ray._store import StoreWriter, open_group

__all__ = ["RayScores", "score_training_set"]


@dataclass(frozen=True)
class RayScores:
    """What :func:`score_training_set` returns, in global-id order.

    Attributes
    ----------
    ids : numpy.ndarray, shape (N,), int64
        Global example ids: positions in the batches, counted across batches from 0.
    self_influence : numpy.ndarray, shape (N,), float64
    vectors : numpy.ndarray or zarr.Array of shape (N, k), or None
        Influence vectors (the model's dtype): in memory, or the store's array when
        ``store_path`` was given; ``None`` when not asked for.
    blocks_computed, blocks_skipped : tuple of int
        Blocks scored by this call, and blocks found complete in the store (checked, reused).
    """

    ids: np.ndarray
    self_influence: np.ndarray
    vectors: Any
    blocks_computed: tuple[int, ...]
    blocks_skipped: tuple[int, ...]


def _score_block(
    placement: Placement,
    block: int,
    start: int,
    first_batch: int,
    batches: Sequence[Any],
    store_path: str | None,
    with_vectors: bool,
) -> dict[str, Any]:
    """On an actor: score one block; write it (then its marker) when there is a store."""
    model = placement.model
    values, vectors, losses = [], [], []
    for offset, batch in enumerate(batches):
        index = first_batch + offset
        if store_path is not None:  # one projection pass gives all three where it can
            found, batch_vectors, batch_losses = placement.self_influence_vectors_and_losses(
                batch, index, "train_set"
            )
            losses.append(batch_losses)
            if with_vectors:
                vectors.append(model.to_numpy(batch_vectors))
        elif with_vectors:  # one projection pass gives both
            found, batch_vectors = placement.self_influence_and_vectors(batch, index, "train_set")
            vectors.append(model.to_numpy(batch_vectors))
        else:
            found = placement.self_influence(batch, index, "train_set")
        values.append(model.to_numpy(found))
    result: dict[str, Any] = {
        "self_influence": np.concatenate(values).astype(np.float64),
        "vectors": np.concatenate(vectors) if vectors else None,
    }
    if store_path is not None:
        stop = start + result["self_influence"].shape[0]
        group = open_group(store_path, "r+")
        group["ids"][start:stop] = np.arange(start, stop, dtype=np.int64)
        group["self_influence"][start:stop] = result["self_influence"]
        group["losses"][start:stop] = np.concatenate(losses)
        if result["vectors"] is not None:
            group["vectors"][start:stop, :] = result["vectors"]
        # Last, so that a marked block always has all its rows.
        group["completed"][block : block + 1] = np.ones(1, dtype=bool)
        result["vectors"] = None  # read from the store by the driver
    return result


def _verify_block(
    placement: Placement, block: int, start: int, batches: Sequence[Any], store_path: str
) -> dict[str, Any]:
    """On an actor: check a completed block's stored losses against the data (forward pass)."""
    model = placement.model
    group = open_group(store_path, "r")
    sizes = [int(model.batch_size(batch)) for batch in batches]
    stored = np.asarray(group["losses"][start : start + sum(sizes)], np.float64)
    ends = np.cumsum([0, *sizes])
    check_losses(
        model,
        batches,
        sizes,
        lambda index: stored[ends[index] : ends[index + 1]],
        loss_tolerance(model.dtype_name),
        where=f"store_path={store_path!r}, block {block}",
        names=("batches", "store", "training set"),
    )
    values = np.asarray(group["self_influence"][start : start + sum(sizes)], np.float64)
    return {"self_influence": values, "vectors": None}


def score_training_set(
    calculator: Any,
    model_factory: Any,
    batches: Iterable[Any],
    *,
    batches_per_block: int = 1,
    num_actors: int = 2,
    vectors: bool = True,
    store_path: Any = None,
    in_flight_per_actor: int = 2,
    show_progress: bool = False,
    num_cpus: float | None = None,
    max_restarts: int = 3,
    max_task_retries: int = 3,
    actor_options: dict[str, Any] | None = None,
) -> RayScores:
    """Self-influence and influence vectors of ``batches``, computed by a pool of Ray actors.

    Parameters
    ----------
    calculator : ArnoldiInfluenceCalculator
        A fitted calculator (its eigenbasis and spectral complement are shipped to the actors
        as host arrays: ``k × p`` numbers once per actor).
    model_factory : callable or ScorerPool
        A picklable zero-argument callable building the calculator's model (each actor calls
        it once; the parameter fingerprint must match the calculator's model): actors are
        started for this call and stopped after it. Or a running
        :class:`~krylov_influence.ray.ScorerPool` for this calculator, used and left running
        (``num_actors`` and the actor options are then the pool's).
    batches : iterable of batches
        The training set, iterated once, lazily, on the driver (a generator will do): every
        block of ``batches_per_block`` consecutive batches is shipped to one actor when the
        pool has room for it.
    batches_per_block : int, default 1
        Batches per block: the unit of work, of the store's chunks and of resumption.
    num_actors : int, default 2
        Actors in the pool.
    vectors : bool, default True
        Also compute influence vectors (one more projection pass per batch).
    store_path : str or os.PathLike, optional
        A zarr group to write (see :mod:`krylov_influence.ray._store`); rerunning on it skips
        completed blocks. Every block but the last must then have the same number of
        examples (the chunk size), which holds when every batch but the last has one size.
    in_flight_per_actor : int, default 2
        Blocks queued on an actor at once; the driver holds at most this many per actor.
    show_progress : bool, default False
        A tqdm bar on the driver, in batches.
    num_cpus, max_restarts, max_task_retries, actor_options :
        As for :class:`~krylov_influence.ray.RayHessianData`.

    Returns
    -------
    RayScores

    Raises
    ------
    ValueError
        On empty data, or blocks of unequal size with a store.
    IncompatibleStoreError
        If the store belongs to another model, fit, dtype, data layout or data.
    """
    import_ray()
    for name, value in (
        ("batches_per_block", batches_per_block),
        ("in_flight_per_actor", in_flight_per_actor),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    model = calculator.model
    placement = calculator._placed(None)
    path = None if store_path is None else os.fspath(store_path)
    writer = None
    if path is not None:
        attributes = {
            "eigenbasis_digest": calculator.eigenbasis_digest,
            "fingerprint": model.fingerprint(),
            "dtype": model.dtype_name,
            "k": int(calculator.eigenbasis.rank),
            "batches_per_block": int(batches_per_block),
            "complement_weight": placement.complement_weight,
            "with_vectors": bool(vectors),
        }
        writer = StoreWriter(path, attributes, model.dtype_name)

    ray = import_ray()
    skipped: dict[int, bool] = {}

    def task(block: Block) -> tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]:
        done = writer.admit(block) if writer is not None else False
        skipped[block.index] = done
        data = ray.put(block.batches)  # dropped with the block once it returns
        if done:
            return _verify_block, (block.index, block.start, data, path)
        first_batch = block.index * batches_per_block
        return _score_block, (block.index, block.start, first_batch, data, path, bool(vectors))

    values: dict[int, np.ndarray] = {}
    found: dict[int, np.ndarray] = {}
    num_examples = num_blocks = 0
    blocks = iter_blocks(batches, batches_per_block, model.batch_size)
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
            values[block.index] = result["self_influence"]
            if result["vectors"] is not None:
                found[block.index] = result["vectors"]
            num_examples = max(num_examples, block.start + block.rows)
            num_blocks = max(num_blocks, block.index + 1)
            bar.update(len(block.sizes))

    if writer is not None:
        writer.finish(num_examples, num_blocks)
    self_influence = np.concatenate([values.pop(i) for i in range(num_blocks)])
    stored: Any = None
    if vectors and path is not None:
        stored = open_group(path, "r")["vectors"]
    elif vectors:
        stored = np.concatenate([found.pop(i) for i in range(num_blocks)])
    return RayScores(
        ids=np.arange(num_examples, dtype=np.int64),
        self_influence=self_influence,
        vectors=stored,
        blocks_computed=tuple(i for i in range(num_blocks) if not skipped[i]),
        blocks_skipped=tuple(i for i in range(num_blocks) if skipped[i]),
    )
