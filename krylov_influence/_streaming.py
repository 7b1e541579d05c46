"""The calculator's plumbing: a fitted state on a device, batch streams, training vectors.

Private to :mod:`krylov_influence.calculator`, which documents the behaviour. Kept apart so
that the calculator module holds the public API and its documentation, and this one the
mechanics of where training influence vectors come from (memory, a disk store, or
recomputation) and how saved results are written and read back.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence._archive import ArchiveReader, AtomicArchiveWriter
from krylov_influence._data import BatchStream, dataset_length, progress_bar, require_reiterable
from krylov_influence._host_basis import HostProjector
from krylov_influence._identity import check_training_data, guard_overwrite
from krylov_influence._xp import index_dtype
from krylov_influence.cache import (
    CACHE,
    STORE_KIND,
    DiskStore,
    InfluenceVectorStore,
    MemoryStore,
    StoreKey,
    resolve_path,
    write_disk_store,
)
from krylov_influence.engine import InfluenceModel
from krylov_influence.errors import IncompatibleStoreError, NonFiniteError
from krylov_influence.topk import ORDER, RunningTopK, TopKBatch

__all__ = [
    "Placement",
    "TrainingVectors",
    "batch_stream",
    "prepare_training_vectors",
    "require_data",
    "require_finite",
    "save_scores",
    "save_top_k",
    "write_vector_store",
]


# Rows of an off-device projector taken to the device at once: a bounded slice of G.
PROJECTOR_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Placement:
    """The model on one device with the fitted state placed there, in the model's dtype.

    Attributes
    ----------
    model : InfluenceModel
    projector : array, shape (k, p)
        ``G``.
    inverse : array, shape (k,)
        ``1 / (λ + δ)``.
    show_progress : bool
    complement_weight : float or None
        ``1 / (c + δ)`` of the spectral complement (:mod:`krylov_influence.complement`), or
        ``None`` for plain truncation.
    """

    model: InfluenceModel
    projector: Any
    inverse: Any
    show_progress: bool = False
    complement_weight: float | None = None

    def self_influence(self, batch: Any, index: int, stage: str) -> Any:
        """``S(x)`` of every example of ``batch``, shape (B,), with the complement if any.

        With the complement, one per-example gradient pass gives both ``G g`` and ``‖g‖²``.
        """
        return self._projected_and_self_influence(batch, index, stage)[1]

    def self_influence_and_vectors(self, batch: Any, index: int, stage: str) -> tuple[Any, Any]:
        """``(S(x) (B,), influence vectors (B, k))`` of ``batch`` from one projection pass."""
        projected, values = self._projected_and_self_influence(batch, index, stage)
        return values, projected * self.inverse

    def self_influence_vectors_and_losses(
        self, batch: Any, index: int, stage: str
    ) -> tuple[Any, Any, np.ndarray]:
        """``(S(x) (B,), influence vectors (B, k), host losses (B,) float64)``: what a store
        of self-influence records; without the complement, the losses come from the
        projection's pass where the engine can (:meth:`InfluenceModel.project_and_losses`)."""
        if self.complement_weight is None and not isinstance(self.projector, HostProjector):
            projected, losses = self.projections_and_host_losses(batch, index, stage)
            values = self._truncated_self_influence(projected, index, stage)
            return values, projected * self.inverse, losses
        values, vectors = self.self_influence_and_vectors(batch, index, stage)
        return values, vectors, self.host_losses(batch)

    def _truncated_self_influence(self, projected: Any, index: int, stage: str) -> Any:
        """``Σ_i (G g)_i² / (λ_i + δ)`` per example, shape (B,); non-finite is an error."""
        xp = self.xp
        values = xp.sum(projected * projected * self.inverse, axis=1)
        return require_finite(xp, values, "self-influence", stage, index)

    def _projected_and_self_influence(self, batch: Any, index: int, stage: str) -> tuple[Any, Any]:
        """``(G g (B, k), S(x) (B,))``: what :meth:`self_influence` computes, both kept."""
        xp = self.xp
        if self.complement_weight is None:
            projected = self.projections(batch, index, stage)
            return projected, self._truncated_self_influence(projected, index, stage)
        if isinstance(self.projector, HostProjector):  # G in row chunks: gradients formed
            grads = self.gradients(batch, index, stage)
            projected, norms = self.project_gradients(grads), xp.sum(grads * grads, axis=1)
        else:
            projected, norms = self._projected_with_norms(batch, index, stage)
        squared = projected * projected
        values = xp.sum(squared * self.inverse, axis=1)
        values = values + self.complement_weight * (norms - xp.sum(squared, axis=1))
        return projected, require_finite(xp, values, "self-influence", stage, index)

    def _projected_with_norms(self, batch: Any, index: int, stage: str) -> tuple[Any, Any]:
        """``model.project_with_norms`` with the checks of :meth:`projections`."""
        projected, norms = self._checked(
            lambda: self.model.project_with_norms(self.projector, batch),
            batch,
            index,
            stage,
            "cannot be projected",
        )
        return projected, norms

    def _checked(
        self,
        compute: Callable[[], Any],
        batch: Any,
        index: int,
        stage: str,
        failure: str,
        finite: bool = True,
    ) -> Any:
        """``compute()`` for a non-empty batch, its errors naming the batch; every array it
        returns (one, or a tuple) must be finite (``NonFiniteError`` otherwise) unless
        ``finite`` is false (the caller checks what it derives)."""
        xp = self.xp
        if self.model.batch_size(batch) == 0:
            raise ValueError(f"{stage}: batch {index} is empty")
        try:
            result = compute()
        except (RuntimeError, TypeError, ValueError, AssertionError) as error:
            raise type(error)(
                f"{stage}: batch {index} {failure} ({type(error).__name__}: {error})"
            ) from error
        if not finite:
            return result
        for array in result if isinstance(result, tuple) else (result,):
            if not bool(xp.all(xp.isfinite(array))):
                raise NonFiniteError(
                    f"{stage}: batch {index} gives non-finite gradients (NaN or Inf loss?)"
                )
        return result

    def gradient_norms(self, batch: Any, index: int, stage: str) -> Any:
        """``‖g‖²`` of every example of ``batch``, shape (B,) (the complement's share)."""
        xp = self.xp
        norms = self.model.squared_gradient_norms(batch)
        return require_finite(xp, norms, "gradient norms", stage, index)

    def gradients(self, batch: Any, index: int, stage: str) -> Any:
        """Per-example gradients of ``batch``, shape (B, p); non-finite is an error."""
        return self._checked(
            lambda: self.model.per_example_grads(batch),
            batch,
            index,
            stage,
            "has no per-example gradients",
        )

    def project_gradients(self, grads: Any) -> Any:
        """``G g`` from gradients already formed: (B, p) → (B, k)."""
        xp = self.xp
        if not isinstance(self.projector, HostProjector):
            return xp.matmul(grads, xp.permute_dims(self.projector, (1, 0)))
        parts = [
            xp.matmul(grads, xp.permute_dims(self.model.from_numpy(rows), (1, 0)))
            for rows in self.projector.row_chunks(PROJECTOR_CHUNK_BYTES)
        ]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def query_side(self, query: Any, index: int) -> tuple[Any, Any]:
        """``(G g_z (B_query, k), the query gradients or None)`` of a query batch.

        The gradients (in the engine's form, :meth:`InfluenceModel.query_gradients`) only with
        the complement, which needs ``g_zᵀ g_x``; one pass gives both.
        """
        if self.complement_weight is None:
            return self.projections(query, index, "dataset_to_evaluate"), None
        stage = "dataset_to_evaluate"
        gradients = self._checked(
            lambda: self.model.query_gradients(query),
            query,
            index,
            stage,
            "has no per-example gradients",
            finite=False,  # any non-finite entry makes its whole row of G g_z non-finite
        )
        model = self.model
        if isinstance(self.projector, HostProjector):
            parts = [
                model.project_query_gradients(gradients, model.from_numpy(rows))
                for rows in self.projector.row_chunks(PROJECTOR_CHUNK_BYTES)
            ]
            projected = parts[0] if len(parts) == 1 else self.xp.concat(parts, axis=1)
        else:
            projected = model.project_query_gradients(gradients, self.projector)
        if not bool(self.xp.all(self.xp.isfinite(projected))):
            raise NonFiniteError(
                f"{stage}: batch {index} gives non-finite gradients (NaN or Inf loss?)"
            )
        return projected, gradients

    def complement_scores(
        self, projected: Any, query_grads: Any, batch: Any, vectors: Any, index: int
    ) -> Any:
        """Scores of a query block against a training batch, complement included.

        ``P_x v_zᵀ + w (g_x g_zᵀ − P_x P_zᵀ)`` with ``P_z = v_z (λ + δ)``: the truncated
        scores plus ``w`` times the gradients' inner product outside the kept directions,
        ``g_zᵀ g_x`` from the engine's :meth:`InfluenceModel.gradient_inner_products` (by
        default the training batch projected onto the query gradients with the engine's own
        projection kernel; the torch engine contracts ``nn.Linear`` layers in factored form).

        Parameters
        ----------
        projected : array, shape (B_query, k)
        query_grads : the query batch's :meth:`InfluenceModel.query_gradients`
        batch : the training batch
        vectors : array, shape (B_train, k)
            The training batch's influence vectors.
        index : int
            The training batch's number, for error messages.

        Returns
        -------
        array, shape (B_query, B_train)
        """
        xp = self.xp
        assert self.complement_weight is not None
        cross = self.model.gradient_inner_products(query_grads, batch)  # (B_query, B_train)
        train_projected = vectors / self.inverse
        truncated = xp.matmul(projected, xp.permute_dims(vectors, (1, 0)))
        overlap = xp.matmul(projected, xp.permute_dims(train_projected, (1, 0)))
        scores = truncated + self.complement_weight * (cross - overlap)
        return require_finite(xp, scores, "scores", "train_set", index)

    def complement_top_k(
        self,
        projected: Any,
        query_grads: Any,
        paired: Iterable[tuple[Any, Any]],
        k: int,
        order: ORDER,
        convert: Callable[[Any], Any],
        start: int = 0,
    ) -> RunningTopK:
        """Exact running top-k of a query block over training batches, complement included.

        With the spectral complement a score is not an inner product of k-vectors, so every
        training batch is scored (:meth:`complement_scores`) and merged into a running top-k.
        The calculator scans the whole training set with it; a Ray actor scans one block of
        consecutive batches (``start``: the global id of the first example).

        Parameters
        ----------
        projected : array, shape (B_query, k_rank)
        query_grads : array, shape (B_query, p)
        paired : iterable of ``(train batch, influence vectors (B_train, k_rank))``
        k : int
            Results kept per query (at most the examples scanned, or ``result()`` raises).
        order : ORDER
        convert : callable
            Applied to each score block (the search's dtype).
        start : int, default 0

        Returns
        -------
        RunningTopK
            ``.result()`` gives values and global indices, shape (B_query, k) each.
        """
        running = RunningTopK(k, order, xp=self.xp, device=self.model.device)
        for t, (batch, vectors) in enumerate(paired):
            scores = self.complement_scores(projected, query_grads, batch, vectors, t)
            running.update(convert(scores), start)
            start += int(scores.shape[1])
        return running

    @property
    def xp(self) -> Any:
        return self.model.xp

    def projections(self, batch: Any, index: int, stage: str) -> Any:
        """``G g`` for every example of ``batch``: shape (B, k); non-finite is an error."""
        return self._checked(
            lambda: self._project(batch), batch, index, stage, "cannot be projected"
        )

    def _project(self, batch: Any) -> Any:
        """``model.project(G, batch)``; with ``G`` off the device, over chunks of its rows."""
        if not isinstance(self.projector, HostProjector):
            return self.model.project(self.projector, batch)
        parts = [
            self.model.project(self.model.from_numpy(rows), batch)
            for rows in self.projector.row_chunks(PROJECTOR_CHUNK_BYTES)
        ]
        return parts[0] if len(parts) == 1 else self.xp.concat(parts, axis=1)

    def vectors_and_host_losses(self, batch: Any, index: int, stage: str) -> tuple[Any, Any]:
        """Influence vectors (B, k) and the per-example losses on the host, (B,) float64,
        from one pass where the engine can (:meth:`InfluenceModel.project_and_losses`)."""
        projected, losses = self.projections_and_host_losses(batch, index, stage)
        return projected * self.inverse, losses

    def projections_and_host_losses(
        self, batch: Any, index: int, stage: str
    ) -> tuple[Any, np.ndarray]:
        """``G g`` (B, k) and the host losses (B,) float64 of :meth:`vectors_and_host_losses`."""
        if isinstance(self.projector, HostProjector):  # G in row chunks: two passes
            return self.projections(batch, index, stage), self.host_losses(batch)
        projected, losses = self._checked(
            lambda: self.model.project_and_losses(self.projector, batch),
            batch,
            index,
            stage,
            "cannot be projected",
        )
        return projected, np.asarray(self.model.to_numpy(losses), dtype=np.float64)

    def vectors(self, batch: Any, index: int, stage: str) -> Any:
        """Influence vectors ``diag(1/(λ+δ)) G g``: shape (B, k)."""
        return self.projections(batch, index, stage) * self.inverse

    def vector_stream(self, dataset: Iterable[Any], name: str) -> BatchStream:
        """``(batch, influence vectors (B, k))`` per batch, lazily."""
        return batch_stream(
            dataset, name, lambda i, b: (b, self.vectors(b, i, name)), self.show_progress
        )

    def host_losses(self, batch: Any) -> np.ndarray:
        """Per-example losses of ``batch`` on the host, (B,) float64: the data's identity."""
        return np.asarray(self.model.to_numpy(self.model.losses(batch)), dtype=np.float64)

    def vectors_and_losses(
        self, dataset: Iterable[Any], with_losses: bool
    ) -> tuple[list[Any], list[Any] | None]:
        """Every batch's influence vectors, and (when asked) its losses, from one pass."""
        if not with_losses:
            return [vectors for _, vectors in self.vector_stream(dataset, "train_set")], None
        arrays, losses = [], []
        for vectors, batch_losses in self._vectors_with_losses(dataset, "train_set"):
            arrays.append(vectors)
            losses.append(batch_losses)
        return arrays, losses

    def store_blocks(self, dataset: Iterable[Any], name: str) -> Iterator[tuple[Any, Any]]:
        """``(vectors (B, k) on the host, losses (B,))`` per batch: what a store holds."""
        for vectors, losses in self._vectors_with_losses(dataset, name):
            yield self.model.to_numpy(vectors), losses

    def _vectors_with_losses(self, dataset: Iterable[Any], name: str) -> BatchStream:
        """``(influence vectors (B, k), host losses (B,))`` per batch, lazily."""
        return batch_stream(
            dataset,
            name,
            lambda i, b: self.vectors_and_host_losses(b, i, name),
            self.show_progress,
        )


def require_finite(xp: Any, values: Any, what: str, stage: str, index: int) -> Any:
    """``values`` when every entry is finite; ``NonFiniteError`` naming the batch otherwise.

    Scores can overflow where the projections did not (float32: ``P² / (λ + δ)`` with a tiny
    ``λ + δ``); an ``inf`` would otherwise sort first in every top-k and a NaN be skipped.
    """
    if not bool(xp.all(xp.isfinite(values))):
        raise NonFiniteError(
            f"{stage}: batch {index} gives non-finite {what} (overflow of the model's dtype? "
            "compute in float64, or add damping)"
        )
    return values


def require_data(dataset: Any, name: str) -> None:
    """Re-iterable and, when its length is known, non-empty."""
    require_reiterable(dataset, name)
    if dataset_length(dataset) == 0:
        raise ValueError(f"{name}: the dataset is empty")


def batch_stream(
    dataset: Iterable[Any], name: str, produce: Callable[[int, Any], Any], show_progress: bool
) -> BatchStream:
    """Lazy per-batch results of ``produce(index, batch)``; empty data is an error."""
    require_data(dataset, name)

    def run() -> Iterator[Any]:
        seen = False
        with progress_bar(show_progress, dataset_length(dataset), name) as bar:
            for index, batch in enumerate(dataset):
                seen = True
                yield produce(index, batch)
                bar.update(1)
        if not seen:
            raise ValueError(f"{name}: the dataset is empty")

    return BatchStream(run, dataset_length(dataset))


def write_vector_store(
    placement: Placement, train_set: Iterable[Any], path: str, key: StoreKey, argument: str
) -> DiskStore:
    """Compute the training vectors batch by batch into an atomic store at ``path``."""
    guard_overwrite(path, argument, STORE_KIND, store_provenance(key))
    blocks = placement.store_blocks(train_set, "train_set")
    return write_disk_store(path, key, blocks, argument=argument)


def write_kept_store(
    model: InfluenceModel,
    arrays: list[Any],
    losses: list[Any],
    path: str,
    key: StoreKey,
    argument: str,
) -> DiskStore:
    """Write vectors already computed, with the losses of the batches they were computed from.

    The losses must come from the same pass as the vectors: they are the store's identity of
    the training data, so losses of the data as it is *now* could vouch for stale vectors.
    """
    guard_overwrite(path, argument, STORE_KIND, store_provenance(key))
    blocks = ((model.to_numpy(v), loss) for v, loss in zip(arrays, losses, strict=True))
    return write_disk_store(path, key, blocks, argument=argument)


def store_provenance(key: StoreKey) -> dict[str, Any]:
    """The metadata fields that tie a stored result to a model, a fit, a dtype and a rank."""
    return {
        "fingerprint": key.fingerprint,
        "eigenbasis": key.eigenbasis,
        "dtype": key.dtype,
        "rank": key.rank,
    }


def open_checked_store(
    placement: Placement, train_set: Iterable[Any], path: Any, key: StoreKey, argument: str
) -> DiskStore:
    """The store at ``path``, held open, after checking its key and its training data."""
    store = DiskStore(resolve_path(path, "influence_vectors"), argument=argument)
    store.check(key)
    check_training_data(placement.model, train_set, store, argument)
    return store


class TrainingVectors:
    """The training influence vectors of one call: from a store, or recomputed on demand.

    Parameters
    ----------
    placement : Placement
    train_set : re-iterable of batches
    store : InfluenceVectorStore or None
        ``None``: recompute from ``train_set`` on every pass (``CACHE.NO_CACHE``).
    argument : str
        The argument the store came from, for error messages.
    aligned : bool, default False
        The store was computed from ``train_set`` in this call, or checked against it
        (``open_checked_store``): :meth:`require_aligned` has nothing left to check. Vectors
        kept across calls (``cache_training_vectors``) are not: a list of batches can change
        in place between calls.
    """

    def __init__(
        self,
        placement: Placement,
        train_set: Iterable[Any],
        store: InfluenceVectorStore | None,
        argument: str,
        aligned: bool = False,
    ):
        self.placement = placement
        self.train_set = train_set
        self.store = store
        self.argument = argument
        self.aligned = aligned

    @property
    def num_examples(self) -> int | None:
        """``N`` when a store knows it, else ``None``."""
        return None if self.store is None else self.store.num_examples

    @property
    def num_batches(self) -> int | None:
        """Number of training batches when known (from the store or the dataset)."""
        if self.store is not None:
            return len(self.store.batch_sizes)
        return dataset_length(self.train_set)

    def paired(self) -> Iterator[tuple[Any, Any]]:
        """``(train batch, influence vectors (B, k))`` in order.

        With a store, checks that every batch of ``train_set`` has as many examples as the
        stored block (a store of another training set is refused).
        """
        if self.store is None:
            yield from self.placement.vector_stream(self.train_set, "train_set")
            return
        blocks = self.store.blocks(self.placement.model.from_numpy)
        # The batches first: after the last block, their check for a surplus batch runs.
        yield from zip(self._checked_batches(), blocks)

    def require_aligned(self) -> None:
        """Refuse a store whose batches no longer line up with ``train_set``.

        One pass over ``train_set`` reading batch sizes only, for callers that score from
        the vectors alone (:meth:`indexed_blocks`) and so never see the batches; nothing to
        do when the store is :attr:`aligned` already.
        """
        if self.store is None or self.aligned:
            return
        for _ in self._checked_batches():
            pass
        self.aligned = True

    def _checked_batches(self) -> Iterator[Any]:
        """The batches of ``train_set``, each as large as its stored block, and no more."""
        assert self.store is not None
        model = self.placement.model
        batches = iter(self.train_set)
        sentinel = object()
        for index, expected in enumerate(self.store.batch_sizes):
            batch = next(batches, sentinel)
            if batch is sentinel or model.batch_size(batch) != expected:
                got = "no batch" if batch is sentinel else f"{model.batch_size(batch)} examples"
                raise IncompatibleStoreError(
                    f"{self.argument}: batch {index} of train_set has {got} but the "
                    f"influence-vector store has {expected}; the store was computed on another "
                    "training set"
                )
            yield batch
        if next(batches, sentinel) is not sentinel:
            raise IncompatibleStoreError(
                f"{self.argument}: train_set has more batches than the influence-vector store "
                f"({len(self.store.batch_sizes)}); the store was computed on another training set"
            )

    def indexed_blocks(self, convert: Callable[[Any], Any]) -> Iterator[tuple[int, Any]]:
        """``(start, convert(influence vectors (B, k)))`` over the training set, in order."""
        if self.store is not None:
            for start, vectors in self.store.indexed_blocks(self.placement.model.from_numpy):
                yield start, convert(vectors)
            return
        start = 0
        for index, batch in enumerate(self.train_set):
            vectors = self.placement.vectors(batch, index, "train_set")
            yield start, convert(vectors)
            start += int(vectors.shape[0])


def prepare_training_vectors(
    placement: Placement,
    train_set: Iterable[Any],
    cache: CACHE,
    store_key: Callable[[], StoreKey],
    *,
    kept: MemoryStore | None = None,
    load_path: Any,
    save_path: Any,
    load_argument: str,
    save_argument: str,
    scratch_path: Callable[[], str],
) -> TrainingVectors:
    """The training vectors as ``cache`` asks.

    - ``load_path``: the store there (it must match ``store_key()``), copied to memory for
      ``CACHE.MEMORY``, streamed from disk otherwise;
    - otherwise ``CACHE.MEMORY`` computes into memory, ``CACHE.DISK`` into a store (the save
      path, or ``scratch_path()``), ``CACHE.NO_CACHE`` computes nothing now;
    - ``save_path`` (when given) receives the vectors as a store, which then serves as the
      disk store (also for ``CACHE.NO_CACHE``: nothing left to recompute);
    - ``kept`` (vectors kept across calls for this ``train_set``) replaces the computation
      whatever ``cache`` says; ``load_path`` still comes first.

    ``store_key`` is only called when a store is read or written (it hashes the parameters).
    """
    model = placement.model
    if load_path is not None:
        key = store_key()
        require_data(train_set, "train_set")
        loaded = open_checked_store(placement, train_set, load_path, key, load_argument)
        if save_path is not None:
            target = resolve_path(save_path, "influence_vectors")
            if not os.path.exists(target) or not os.path.samefile(target, loaded.path):
                guard_overwrite(target, save_argument, STORE_KIND, store_provenance(key))
                pairs = (
                    (vectors, loaded.stored_losses(index))
                    for index, vectors in enumerate(loaded.blocks(lambda a: a))
                )
                loaded = write_disk_store(target, key, pairs, argument=save_argument)
        if cache is CACHE.MEMORY:
            memory = MemoryStore(key, list(loaded.blocks(model.from_numpy)))
            return TrainingVectors(placement, train_set, memory, load_argument, aligned=True)
        return TrainingVectors(placement, train_set, loaded, load_argument, aligned=True)
    require_data(train_set, "train_set")
    if kept is not None or cache is CACHE.MEMORY:
        if kept is not None:
            arrays, losses = list(kept.blocks(model.from_numpy)), kept.losses
        else:
            arrays, losses = placement.vectors_and_losses(train_set, save_path is not None)
        saved_key = None
        if save_path is not None:
            assert losses is not None
            saved_key = store_key()
            target = resolve_path(save_path, "influence_vectors")
            write_kept_store(model, arrays, losses, target, saved_key, save_argument)
        memory = MemoryStore(saved_key, arrays)
        # Vectors computed now are aligned by construction; kept ones are checked on use.
        return TrainingVectors(placement, train_set, memory, save_argument, aligned=kept is None)
    if save_path is not None or cache is CACHE.DISK:
        scratch = save_path is None
        target = scratch_path() if scratch else resolve_path(save_path, "influence_vectors")
        store = write_vector_store(placement, train_set, target, store_key(), save_argument)
        training = TrainingVectors(placement, train_set, store, save_argument, aligned=True)
        if scratch:  # a scratch store lives as long as the streams that read it
            weakref.finalize(training, _remove_quietly, target)
        return training
    return TrainingVectors(placement, train_set, None, save_argument)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def save_scores(
    placement: Placement,
    stream: BatchStream,
    path: Any,
    queries: Iterable[Any],
    train_set: Iterable[Any],
    provenance: dict[str, Any],
) -> BatchStream:
    """Write every score of ``stream`` now; return a stream that reads them back.

    Member ``scores_{q:06d}_{t:06d}`` is the (B_query, B_train) block of query batch q and
    training batch t; the batches themselves come from ``queries`` and ``train_set`` again.
    """
    target = resolve_path(path, "influence_values")
    guard_overwrite(target, "save_influence_value_path", "influence_values", provenance)
    model = placement.model
    query_sizes: list[int] = []
    train_sizes: list[int] = []
    with AtomicArchiveWriter(target) as writer:
        for q, (query, per_train) in enumerate(stream):
            for t, (_, scores) in enumerate(per_train):
                writer.write_array(f"scores_{q:06d}_{t:06d}", model.to_numpy(scores))
                if q == 0:
                    train_sizes.append(int(scores.shape[1]))
            query_sizes.append(model.batch_size(query))
        writer.write_json(
            "metadata",
            {
                "kind": "influence_values",
                "version": 1,
                "query_batch_sizes": query_sizes,
                "train_batch_sizes": train_sizes,
                **provenance,
            },
        )
    # Held open: the stream serves this file even if another one replaces it at the path.
    reader = ArchiveReader(target, "save_influence_value_path")
    dtypes = (provenance["dtype"],)

    def scores_of(q: int) -> BatchStream:
        def run() -> Iterator[tuple[Any, Any]]:
            for t, batch in enumerate(train_set):
                if t >= len(train_sizes):
                    break
                shape = (query_sizes[q], train_sizes[t])
                scores = reader.read_array(f"scores_{q:06d}_{t:06d}", shape=shape, dtypes=dtypes)
                yield batch, model.from_numpy(scores)

        return BatchStream(run, len(train_sizes))

    return BatchStream(
        lambda: ((query, scores_of(q)) for q, query in enumerate(queries)), len(query_sizes)
    )


def save_top_k(
    placement: Placement,
    stream: BatchStream,
    path: Any,
    queries: Iterable[Any],
    convert: Callable[[Any], Any],
    metadata: dict[str, Any],
) -> BatchStream:
    """Write every top-k result of ``stream`` now; return a stream that reads them back.

    Members ``values_{q:06d}`` (B_query, k) and ``indices_{q:06d}`` (B_query, k) integers per
    query batch; the query batches come from ``queries`` again.
    """
    target = resolve_path(path, "top_k")
    names = ("fingerprint", "eigenbasis", "dtype", "rank", "complement")
    provenance = {name: metadata[name] for name in names}
    guard_overwrite(target, "save_top_k_ds_path", "top_k", provenance)
    model = placement.model
    xp = placement.xp
    sizes: list[int] = []
    value_dtypes: tuple[str, ...] = ("float32", "float64")
    index_dtypes = ("int32", "int64")
    with AtomicArchiveWriter(target) as writer:
        for q, (_, values, indices) in enumerate(stream):
            host_values = model.to_numpy(values)
            writer.write_array(f"values_{q:06d}", host_values)
            writer.write_array(f"indices_{q:06d}", model.to_numpy(indices))
            sizes.append(int(values.shape[0]))
            value_dtypes = (host_values.dtype.name,)
        writer.write_json(
            "metadata", {"kind": "top_k", "version": 1, "query_batch_sizes": sizes, **metadata}
        )
    # Held open: the stream serves this file even if another one replaces it at the path.
    reader = ArchiveReader(target, "save_top_k_ds_path")
    k = int(metadata["k"])

    def run() -> Iterator[TopKBatch]:
        for q, query in enumerate(queries):
            if q >= len(sizes):
                break
            shape = (sizes[q], k)
            values = reader.read_array(f"values_{q:06d}", shape=shape, dtypes=value_dtypes)
            indices = reader.read_array(f"indices_{q:06d}", shape=shape, dtypes=index_dtypes)
            values = convert(model.from_numpy(values))
            indices = model.from_numpy(indices, dtype=index_dtype(xp, model.device))
            yield TopKBatch(query, values, indices)

    return BatchStream(run, len(sizes))
