"""Where training influence vectors live between passes: memory, disk, or nowhere.

Influence vectors are k numbers per training example (``k = k_largest_eig_vals``), so the
whole training set is ``N × k``: small enough to keep in memory for most data, and cheap to
store on disk for the rest. :class:`CACHE` keeps influenciae's names and values.

Disk stores are ``.npz`` archives of :mod:`krylov_influence._archive` (written atomically,
read defensively from a held handle). Besides the vectors, a store keeps the per-example
losses of every batch, the identity of the training data (see
:mod:`krylov_influence._identity`), and its ``metadata.json`` names the model, the eigenbasis,
the dtype and the rank it was computed for, so a store is only reused when all of them match.
"""

from __future__ import annotations

import abc
import enum
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from krylov_influence._archive import ArchiveReader, AtomicArchiveWriter

__all__ = [
    "CACHE",
    "ArchiveReader",
    "AtomicArchiveWriter",
    "DiskStore",
    "InfluenceVectorStore",
    "MemoryStore",
    "StoreKey",
    "as_cache",
    "resolve_path",
    "write_disk_store",
]

STORE_KIND = "influence_vectors"
# 2: every block carries the per-example losses of its batch (training-data identity).
FORMAT_VERSION = 2
DEFAULT_FILENAMES = {
    "influence_vectors": "influence_vectors.npz",
    "influence_values": "influence_values.npz",
    "top_k": "top_k.npz",
    "calculator": "calculator.npz",
    "checkpoint": "arnoldi_checkpoint.npz",
}


class CACHE(enum.Enum):
    """Where ``estimate_influence_values_in_batches`` and ``top_k`` keep training vectors.

    Attributes
    ----------
    MEMORY : 0
        Computed once per call and held in memory (``N × k`` numbers on the device).
    DISK : 1
        Computed once per call and streamed back from an ``.npz`` store (the
        ``save_influence_vector...`` path, or a temporary file removed with the calculator).
    NO_CACHE : 2
        Recomputed from the training data for every batch of queries (no storage; each query
        batch costs one projection pass over the training set).
    """

    MEMORY = 0
    DISK = 1
    NO_CACHE = 2


def as_cache(value: Any, name: str) -> CACHE:
    """Return ``value`` as a :class:`CACHE` member (also accepts its value 0, 1 or 2).

    Raises
    ------
    ValueError
        Naming ``name``, for anything else.
    """
    if isinstance(value, CACHE):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        for member in CACHE:
            if member.value == value:
                return member
    raise ValueError(
        f"{name}={value!r}: expected CACHE.MEMORY (0), CACHE.DISK (1) or CACHE.NO_CACHE (2)"
    )


def resolve_path(path: Any, kind: str) -> str:
    """The archive file for ``path``: itself, or a default file name inside a directory.

    A path that is an existing directory (influenciae saved ``tf.data`` directories) holds
    the archive under a fixed name (``influence_vectors.npz``, ``top_k.npz``, ...).
    """
    text = os.fspath(path)
    if os.path.isdir(text):
        return os.path.join(text, DEFAULT_FILENAMES[kind])
    return text


# ------------------------------------------------------------------- influence-vector stores
@dataclass(frozen=True)
class StoreKey:
    """What a store of influence vectors depends on; a store is reused only on equality.

    Attributes
    ----------
    fingerprint : str
        ``InfluenceModel.fingerprint()`` of the model the vectors were computed with.
    eigenbasis : str
        Digest of the eigenvalues and projector ``G`` (see ``ArnoldiInfluenceCalculator``).
    dtype : str
        ``"float32"`` or ``"float64"``: the dtype of the stored vectors.
    rank : int
        ``k``, the length of each vector.
    """

    fingerprint: str
    eigenbasis: str
    dtype: str
    rank: int

    def differences(self, other: StoreKey) -> list[str]:
        """Names of the fields on which ``self`` and ``other`` differ."""
        mine, theirs = asdict(self), asdict(other)
        return [name for name in mine if mine[name] != theirs[name]]


class InfluenceVectorStore(abc.ABC):
    """Influence vectors of a training set, one block per training batch.

    Attributes
    ----------
    key : StoreKey or None
        What the vectors were computed for (``None`` for a memory store made for one call).
    batch_sizes : tuple of int
        Examples per block, in training-set order.
    """

    key: StoreKey | None
    batch_sizes: tuple[int, ...]

    @property
    def num_examples(self) -> int:
        """``N``, the number of training examples."""
        return int(sum(self.batch_sizes))

    @abc.abstractmethod
    def blocks(self, from_numpy: Callable[[np.ndarray], Any]) -> Iterator[Any]:
        """The blocks in order, each of shape (B, k), converted with ``from_numpy`` if needed."""

    def indexed_blocks(self, from_numpy: Callable[[np.ndarray], Any]) -> Iterator[tuple[int, Any]]:
        """``(start, block)`` pairs: ``start`` is the global index of the block's first row."""
        start = 0
        for size, block in zip(self.batch_sizes, self.blocks(from_numpy)):
            yield start, block
            start += size


class MemoryStore(InfluenceVectorStore):
    """Blocks held in memory as arrays of the engine (``CACHE.MEMORY``).

    Parameters
    ----------
    key : StoreKey or None
        ``None`` when the vectors were computed for this call only (never compared).
    arrays : list of arrays, each shape (B, k)
    losses : list of numpy.ndarray, each shape (B,), optional
        Per-example losses of the batches, from the pass that computed ``arrays``: what a
        store written from these vectors records as the identity of its training data.
    """

    def __init__(
        self, key: StoreKey | None, arrays: list[Any], losses: list[np.ndarray] | None = None
    ):
        self.key = key
        self.losses = losses
        self._arrays = list(arrays)
        self.batch_sizes = tuple(int(a.shape[0]) for a in self._arrays)

    def blocks(self, from_numpy: Callable[[np.ndarray], Any]) -> Iterator[Any]:
        return iter(self._arrays)


class DiskStore(InfluenceVectorStore):
    """Blocks streamed from an ``.npz`` store (``CACHE.DISK`` and saved stores).

    Open an existing store with ``DiskStore(path, argument=...)``; write one with
    :func:`write_disk_store`. Member ``block_{i:06d}.npy`` holds block ``i`` (B_i, k) and
    ``losses_{i:06d}.npy`` the per-example losses of batch ``i`` (B_i,), float64: the identity
    of the training data the vectors belong to (see :meth:`stored_losses`).

    The file is opened once and held: every block is read from the file that was checked,
    whatever later happens at ``path``. Blocks are checked for shape, dtype and finiteness as
    they are read.

    Raises
    ------
    IncompatibleStoreError
        If the file is not an influence-vector store, is incomplete or its metadata is invalid.
    """

    key: StoreKey

    def __init__(self, path: Any, *, argument: str = "path"):
        self.reader = ArchiveReader(path, argument)
        self.path = self.reader.path
        meta = self.reader.metadata
        if meta.get("kind") != STORE_KIND or meta.get("version") != FORMAT_VERSION:
            raise self.reader.error(
                f"not an influence-vector store of this version (kind {meta.get('kind')!r}, "
                f"version {meta.get('version')!r}; expected {STORE_KIND!r}, {FORMAT_VERSION})"
            )
        try:
            self.key = StoreKey(
                _text(meta["fingerprint"]),
                _text(meta["eigenbasis"]),
                _text(meta["dtype"]),
                _count(meta["rank"]),
            )
            if not isinstance(meta["batch_sizes"], list):
                raise TypeError("batch_sizes is not a list")
            self.batch_sizes = tuple(_count(size) for size in meta["batch_sizes"])
        except (KeyError, TypeError, ValueError) as error:
            raise self.reader.error(f"malformed store metadata ({error})") from None
        if self.key.dtype not in ("float32", "float64"):
            raise self.reader.error(f"malformed store metadata (dtype {self.key.dtype!r})")
        if not self.batch_sizes:
            raise self.reader.error("the store holds no batch")
        missing = [
            name
            for i in range(len(self.batch_sizes))
            for name in (_block(i), _losses(i))
            if name + ".npy" not in self.reader.members
        ]
        if missing:
            raise self.reader.error(f"incomplete store, missing {missing[:3]}")

    def blocks(self, from_numpy: Callable[[np.ndarray], Any]) -> Iterator[Any]:
        for index, size in enumerate(self.batch_sizes):
            block = self.reader.read_array(
                _block(index), shape=(size, self.key.rank), dtypes=(self.key.dtype,)
            )
            if not np.isfinite(block).all():
                raise self.reader.error(f"block {index} holds non-finite values")
            yield from_numpy(block)

    def stored_losses(self, index: int) -> np.ndarray:
        """Per-example losses of batch ``index`` when the store was written, (B_i,) float64."""
        losses = self.reader.read_array(
            _losses(index), shape=(self.batch_sizes[index],), dtypes=("float64",)
        )
        if not np.isfinite(losses).all():
            raise self.reader.error(f"losses of batch {index} hold non-finite values")
        return losses

    def check(self, expected: StoreKey) -> None:
        """Raise unless this store was computed for ``expected``.

        Raises
        ------
        IncompatibleStoreError
            Naming the argument, the path and the fields that differ.
        """
        differences = self.key.differences(expected)
        if differences:
            raise self.reader.error(
                f"the store there belongs to {describe_differences(differences)} (differs in "
                f"{', '.join(differences)}); delete it or choose another path"
            )


def describe_differences(differences: list[str]) -> str:
    """Say in words what the names of differing :class:`StoreKey` fields mean."""
    what = {
        "fingerprint": "another model (or other parameter values)",
        "eigenbasis": "another eigenbasis (another fit of the calculator)",
        "dtype": "another dtype",
        "rank": "another number of eigenvalues",
    }
    return "; ".join(what.get(name, name) for name in differences)


def write_disk_store(
    path: Any,
    key: StoreKey,
    blocks: Iterator[tuple[np.ndarray, np.ndarray]],
    *,
    argument: str = "path",
) -> DiskStore:
    """Stream host ``(vectors (B, k), losses (B,))`` pairs into an atomic store at ``path``.

    Returns
    -------
    DiskStore
        The store just written, reopened from disk.
    """
    sizes: list[int] = []
    with AtomicArchiveWriter(path) as writer:
        for index, (block, losses) in enumerate(blocks):
            if block.ndim != 2 or block.shape[1] != key.rank:
                raise ValueError(
                    f"block {index}: expected shape (B, {key.rank}), got {block.shape}"
                )
            if losses.shape != (block.shape[0],):
                raise ValueError(
                    f"losses {index}: expected shape ({block.shape[0]},), got {losses.shape}"
                )
            writer.write_array(_block(index), block)
            writer.write_array(_losses(index), np.asarray(losses, dtype=np.float64))
            sizes.append(int(block.shape[0]))
        meta = {"kind": STORE_KIND, "version": FORMAT_VERSION, "batch_sizes": sizes}
        meta.update(asdict(key))
        writer.write_json("metadata", meta)
    return DiskStore(path, argument=argument)


def _block(index: int) -> str:
    return f"block_{index:06d}"


def _losses(index: int) -> str:
    return f"losses_{index:06d}"


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _count(value: Any) -> int:
    """A positive integer from JSON (bools, floats and non-positive values refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def finite_number(value: Any, name: str, *, minimum: float = -math.inf) -> float:
    """A finite float from JSON metadata, at least ``minimum``; ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} is {value!r}, expected a number")
    number = float(value)
    if not math.isfinite(number) or number < minimum:
        raise ValueError(f"{name} is {value!r}, expected a finite number >= {minimum}")
    return number
