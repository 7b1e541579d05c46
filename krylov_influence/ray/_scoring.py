"""Self-influence and influence vectors of a training set, computed by Ray actors.

After the fit, every example is scored independently, so the training set is cut into
*blocks* of consecutive batches and a pool of actors maps over them. Each actor builds its
model once with the user's ``model_factory`` and holds the fitted state (``G`` and
``1 / (λ + δ)`` shipped as host arrays, plus the spectral complement's weight when the
calculator has one); it scores a block with the very code of the single-process calculator
(:class:`krylov_influence._streaming.Placement`), so the numbers are the calculator's:

- self-influence ``S(x) = Σ_i (G g_x)_i² / (λ_i + δ)`` (+ ``w (‖g_x‖² − ‖G g_x‖²)`` with the
  complement), shape (N,);
- influence vectors ``diag(1/(λ + δ)) G g_x``, shape (N, k).

Example ``i`` is the ``i``-th example of the batches in order (its *global id*); results come
back in that order whatever actor computed them.

With ``store_path=`` the results go to a zarr (v3) group, written by the actors in parallel,
one chunk of rows per block (so no two writers share a chunk):

=================  =============  ==========================================================
array              shape          what
=================  =============  ==========================================================
``ids``            (N,) int64     the global ids
``self_influence`` (N,) float64
``vectors``        (N, k)         influence vectors, the model's dtype
``losses``         (N,) float64   per-example losses: the data's identity
``completed``      (blocks,) bool set for a block after its rows are written
=================  =============  ==========================================================

The group's attributes hold what produced it (the eigenbasis digest, the parameter
fingerprint, the dtype, the batch sizes, the block layout), checked before anything is
reused. A rerun on the same store skips the blocks marked complete: an interrupted run loses
at most the blocks in flight (their marker is written only after their rows). A skipped block
is still checked: its actor recomputes the losses (a forward pass, no gradients) and compares
them with the stored ones, so the rows are never served for other data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence._identity import check_losses, loss_tolerance
from krylov_influence._streaming import Placement
from krylov_influence.errors import IncompatibleStoreError
from krylov_influence.ray._hessian import import_ray
from krylov_influence.registry import bind_model

__all__ = ["RayScores", "score_training_set"]

STORE_KIND = "krylov_influence.ray_scores"
STORE_VERSION = 1


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


class _Scorer:
    """A Ray actor: a model built by the factory, the fitted state, and optionally a store."""

    def __init__(
        self,
        model_factory: Callable[[], Any],
        projector: np.ndarray,
        inverse: np.ndarray,
        complement_weight: float | None,
        store_path: str | None,
        with_vectors: bool,
    ):
        model = bind_model(model_factory())
        self.placement = Placement(
            model, model.from_numpy(projector), model.from_numpy(inverse), False, complement_weight
        )
        self.store_path = store_path
        self.with_vectors = with_vectors

    def fingerprint(self) -> str:
        return str(self.placement.model.fingerprint())

    def score(self, block: int, start: int, batches: Sequence[Any]) -> dict[str, Any]:
        """Score one block; write it (then its marker) when there is a store."""
        placement, model = self.placement, self.placement.model
        values, vectors, losses = [], [], []
        for index, batch in enumerate(batches):
            values.append(model.to_numpy(placement.self_influence(batch, index, "train_set")))
            if self.with_vectors:
                vectors.append(model.to_numpy(placement.vectors(batch, index, "train_set")))
            if self.store_path is not None:
                losses.append(placement.host_losses(batch))
        result: dict[str, Any] = {
            "block": block,
            "self_influence": np.concatenate(values).astype(np.float64),
            "vectors": np.concatenate(vectors) if vectors else None,
            "pid": os.getpid(),
        }
        if self.store_path is not None:
            stop = start + result["self_influence"].shape[0]
            group = _open_group(self.store_path, "r+")
            group["ids"][start:stop] = np.arange(start, stop, dtype=np.int64)
            group["self_influence"][start:stop] = result["self_influence"]
            group["losses"][start:stop] = np.concatenate(losses)
            if result["vectors"] is not None:
                group["vectors"][start:stop, :] = result["vectors"]
            # Last, so that a marked block always has all its rows.
            group["completed"][block : block + 1] = np.ones(1, dtype=bool)
            result["vectors"] = None  # read from the store by the driver
        return result

    def verify(self, block: int, start: int, batches: Sequence[Any]) -> dict[str, Any]:
        """Check a completed block's stored losses against the data (a forward pass)."""
        model = self.placement.model
        group = _open_group(self.store_path, "r")
        sizes = [int(model.batch_size(batch)) for batch in batches]
        stored = np.asarray(group["losses"][start : start + sum(sizes)], np.float64)
        ends = np.cumsum([0, *sizes])
        check_losses(
            model,
            batches,
            sizes,
            lambda index: stored[ends[index] : ends[index + 1]],
            loss_tolerance(model.dtype_name),
            where=f"store_path={self.store_path!r}, block {block}",
            names=("batches", "store", "training set"),
        )
        values = np.asarray(group["self_influence"][start : start + sum(sizes)], np.float64)
        return {"block": block, "self_influence": values, "vectors": None, "pid": os.getpid()}


def _open_group(path: Any, mode: str) -> Any:
    import zarr

    return zarr.open_group(os.fspath(path), mode=mode)  # type: ignore[arg-type]


def _blocks(sizes: list[int], batches_per_block: int) -> list[tuple[int, int, int]]:
    """``(first batch, stop batch, first global id)`` of every block."""
    out, start = [], 0
    for first in range(0, len(sizes), batches_per_block):
        stop = min(first + batches_per_block, len(sizes))
        out.append((first, stop, start))
        start += sum(sizes[first:stop])
    return out


def _prepare_store(
    path: str, attributes: dict[str, Any], num_blocks: int, block_rows: int, dtype: str
) -> list[bool]:
    """Create the store, or check an existing one; return which blocks are complete."""
    import zarr

    if os.path.exists(path):
        group: Any = zarr.open_group(path, mode="r")
        found = dict(group.attrs)
        if found.get("kind") != STORE_KIND or found.get("version") != STORE_VERSION:
            raise IncompatibleStoreError(
                f"store_path={path!r}: not a store of krylov_influence.ray scores of this "
                f"version (kind {found.get('kind')!r}, version {found.get('version')!r})"
            )
        for name, expected in attributes.items():
            if found.get(name) != expected:
                raise IncompatibleStoreError(
                    f"store_path={path!r}: belongs to another computation ({name} is "
                    f"{found.get(name)!r} there, {expected!r} here); remove it or choose "
                    "another path"
                )
        return [bool(flag) for flag in np.asarray(group["completed"][:])]
    n, k = attributes["num_examples"], attributes["k"]
    group = zarr.open_group(path, mode="w")
    for name, shape, chunks, kind in (
        ("ids", (n,), (block_rows,), "int64"),
        ("self_influence", (n,), (block_rows,), "float64"),
        ("losses", (n,), (block_rows,), "float64"),
        ("vectors", (n, k), (block_rows, k), dtype),
        ("completed", (num_blocks,), (1,), "bool"),
    ):
        group.create_array(name, shape=shape, chunks=chunks, dtype=kind, fill_value=0)
    # Written last: a store without its attributes is refused on the next run.
    group.attrs.update({"kind": STORE_KIND, "version": STORE_VERSION, **attributes})
    return [False] * num_blocks


def score_training_set(
    calculator: Any,
    model_factory: Callable[[], Any],
    batches: Iterable[Any],
    *,
    batches_per_block: int = 1,
    num_actors: int = 2,
    vectors: bool = True,
    store_path: Any = None,
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
    model_factory : callable
        A picklable zero-argument callable building the calculator's model (each actor calls
        it once; the parameter fingerprint must match the calculator's model).
    batches : iterable of batches
        The training set, iterated once on the driver; every block of ``batches_per_block``
        consecutive batches is shipped to one actor.
    batches_per_block : int, default 1
        Batches per block: the unit of work, of the store's chunks and of resumption.
    num_actors : int, default 2
        Actors in the pool.
    vectors : bool, default True
        Also compute influence vectors (one more projection pass per batch).
    store_path : str or os.PathLike, optional
        A zarr group to write (see the module docs); rerunning on it skips completed blocks.
        Every block but the last must then have the same number of examples (the chunk
        size), which holds when every batch but the last has the same size.
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
    ray = import_ray()
    from ray.util import ActorPool

    model = calculator.model
    placement = calculator._placed(None)
    items = list(batches)
    if not items:
        raise ValueError("batches: the dataset is empty")
    if batches_per_block < 1 or num_actors < 1:
        raise ValueError("batches_per_block and num_actors: expected positive integers")
    sizes = [int(model.batch_size(batch)) for batch in items]
    blocks = _blocks(sizes, batches_per_block)
    num_examples = sum(sizes)
    path = None if store_path is None else os.fspath(store_path)
    done = [False] * len(blocks)
    if path is not None:
        rows = [sum(sizes[first:stop]) for first, stop, _ in blocks]
        if any(r != rows[0] for r in rows[:-1]) or rows[-1] > rows[0]:
            raise ValueError(
                f"store_path: blocks of {rows} examples; every block but the last must have "
                "the same number of examples (the store's chunk), so use batches of one size "
                "(the last may be smaller)"
            )
        attributes = {
            "eigenbasis_digest": calculator.eigenbasis_digest,
            "fingerprint": model.fingerprint(),
            "dtype": model.dtype_name,
            "k": int(calculator.eigenbasis.rank),
            "num_examples": num_examples,
            "batch_sizes": sizes,
            "batches_per_block": int(batches_per_block),
            "complement_weight": placement.complement_weight,
            "with_vectors": bool(vectors),
        }
        done = _prepare_store(path, attributes, len(blocks), rows[0], model.dtype_name)

    projector = np.asarray(model.to_numpy(placement.projector))
    inverse = np.asarray(calculator.eigenbasis.inverse_eigenvalues, np.float64)
    options: dict[str, Any] = {
        "max_restarts": int(max_restarts),
        "max_task_retries": int(max_task_retries),
        **({} if num_cpus is None else {"num_cpus": num_cpus}),
        **(actor_options or {}),
    }
    actor_class: Any = ray.remote(_Scorer).options(**options)
    state = [ray.put(a) for a in (model_factory, projector, inverse)]
    actors = [
        actor_class.remote(*state, placement.complement_weight, path, bool(vectors))
        for _ in range(min(num_actors, len(blocks)))
    ]
    try:
        fingerprints = ray.get([actor.fingerprint.remote() for actor in actors])
        if any(found != model.fingerprint() for found in fingerprints):
            raise ValueError(
                "model_factory: builds a model whose parameters differ from the calculator's"
            )
        pool = ActorPool(actors)
        work = [
            (index, start, items[first:stop], done[index])
            for index, (first, stop, start) in enumerate(blocks)
        ]
        results = list(
            pool.map(
                lambda actor, job: (actor.verify if job[3] else actor.score).remote(*job[:3]),
                work,
            )
        )
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)

    self_influence = np.concatenate([r["self_influence"] for r in results])
    found: Any = None
    if vectors and path is not None:
        found = _open_group(path, "r")["vectors"]
    elif vectors:
        found = np.concatenate([r["vectors"] for r in results])
    return RayScores(
        ids=np.arange(num_examples, dtype=np.int64),
        self_influence=self_influence,
        vectors=found,
        blocks_computed=tuple(i for i, skipped in enumerate(done) if not skipped),
        blocks_skipped=tuple(i for i, skipped in enumerate(done) if skipped),
    )
