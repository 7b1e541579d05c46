"""Where training influence vectors live between passes: memory, disk, or nowhere.

Influence vectors are k numbers per training example (``k = k_largest_eig_vals``), so the
whole training set is ``N × k``: small enough to keep in memory for most data, and cheap to
store on disk for the rest. :class:`CACHE` keeps influenciae's names and values.

Disk archives are ``.npz`` files (a zip of ``.npy`` members, readable by ``numpy.load``)
written **atomically**: members are streamed one batch at a time into a temporary file in the
same directory, which is flushed, synced and renamed over the destination with
:func:`os.replace`. An interrupted run leaves the previous archive intact (or none), never a
half-written one. Every archive has a ``metadata.json`` member saying what it holds and for
which model and eigenbasis, so a store is only reused when it matches.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from krylov_influence.errors import IncompatibleStoreError

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
FORMAT_VERSION = 1
DEFAULT_FILENAMES = {
    "influence_vectors": "influence_vectors.npz",
    "influence_values": "influence_values.npz",
    "top_k": "top_k.npz",
    "calculator": "calculator.npz",
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


# --------------------------------------------------------------------------------- archives
class AtomicArchiveWriter:
    """Write an ``.npz`` archive member by member, then publish it atomically.

    Use as a context manager; on a clean exit the temporary file replaces ``path`` with
    :func:`os.replace`, on an exception it is removed and ``path`` is untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Destination. Its directory must exist.
    """

    def __init__(self, path: Any):
        self.path = os.fspath(path)
        self._zip: zipfile.ZipFile | None = None
        self._temp: str | None = None

    def __enter__(self) -> AtomicArchiveWriter:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{self.path}: the directory {directory} does not exist")
        handle, self._temp = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(self.path) + ".", suffix=".tmp"
        )
        os.close(handle)
        # Stored, not deflated: float data barely compresses and members stay seekable.
        self._zip = zipfile.ZipFile(self._temp, "w", zipfile.ZIP_STORED, allowZip64=True)
        return self

    def write_array(self, name: str, array: np.ndarray) -> None:
        """Add ``array`` as member ``name.npy``."""
        assert self._zip is not None, "use AtomicArchiveWriter as a context manager"
        with self._zip.open(name + ".npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)

    def write_json(self, name: str, value: Any) -> None:
        """Add ``value`` as member ``name.json`` (UTF-8 JSON)."""
        assert self._zip is not None, "use AtomicArchiveWriter as a context manager"
        self._zip.writestr(name + ".json", json.dumps(value, indent=1, sort_keys=True))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._zip is not None and self._temp is not None
        try:
            self._zip.close()
            if exc_type is None:
                with open(self._temp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(self._temp, self.path)
        finally:
            if os.path.exists(self._temp):
                os.remove(self._temp)


class ArchiveReader:
    """Read members of an archive written by :class:`AtomicArchiveWriter`.

    Parameters
    ----------
    path : str or os.PathLike
    argument : str
        The argument the path came from, for error messages.

    Attributes
    ----------
    metadata : dict
        The ``metadata.json`` member.

    Raises
    ------
    IncompatibleStoreError
        If the file is not such an archive (corrupt, truncated, or foreign).
    """

    def __init__(self, path: Any, argument: str):
        self.path = os.fspath(path)
        self.argument = argument
        try:
            with zipfile.ZipFile(self.path) as archive:
                self.members = frozenset(archive.namelist())
                self.metadata = json.loads(archive.read("metadata.json"))
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
            raise IncompatibleStoreError(
                f"{argument}={self.path!r}: not a krylov_influence archive ({error})"
            ) from None
        if not isinstance(self.metadata, dict):
            raise IncompatibleStoreError(f"{argument}={self.path!r}: malformed metadata.json")

    def read_array(self, name: str, archive: zipfile.ZipFile | None = None) -> np.ndarray:
        """Member ``name.npy`` as a NumPy array."""
        with contextlib.ExitStack() as stack:
            if archive is None:
                archive = stack.enter_context(zipfile.ZipFile(self.path))
            with archive.open(name + ".npy") as member:
                return np.lib.format.read_array(member, allow_pickle=False)

    def iter_arrays(self, names: list[str]) -> Iterator[np.ndarray]:
        """Members ``names`` in order, one at a time, from one open file handle."""
        with zipfile.ZipFile(self.path) as archive:
            for name in names:
                yield self.read_array(name, archive)


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
    key : StoreKey
    batch_sizes : tuple of int
        Examples per block, in training-set order.
    """

    key: StoreKey
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
    key : StoreKey
    arrays : list of arrays, each shape (B, k)
    """

    def __init__(self, key: StoreKey, arrays: list[Any]):
        self.key = key
        self._arrays = list(arrays)
        self.batch_sizes = tuple(int(a.shape[0]) for a in self._arrays)

    def blocks(self, from_numpy: Callable[[np.ndarray], Any]) -> Iterator[Any]:
        return iter(self._arrays)


class DiskStore(InfluenceVectorStore):
    """Blocks streamed from an ``.npz`` store (``CACHE.DISK`` and saved stores).

    Open an existing store with ``DiskStore(path, argument=...)``; write one with
    :func:`write_disk_store`. Member ``block_{i:06d}.npy`` holds block ``i``.

    Raises
    ------
    IncompatibleStoreError
        If the file is not an influence-vector store, or is incomplete.
    """

    def __init__(self, path: Any, *, argument: str = "path"):
        self.reader = ArchiveReader(path, argument)
        self.path = self.reader.path
        meta = self.reader.metadata
        if meta.get("kind") != STORE_KIND or meta.get("version") != FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"{argument}={self.path!r}: not an influence-vector store (kind "
                f"{meta.get('kind')!r}, version {meta.get('version')!r})"
            )
        try:
            self.key = StoreKey(
                str(meta["fingerprint"]),
                str(meta["eigenbasis"]),
                str(meta["dtype"]),
                int(meta["rank"]),
            )
            self.batch_sizes = tuple(int(size) for size in meta["batch_sizes"])
        except (KeyError, TypeError, ValueError) as error:
            raise IncompatibleStoreError(
                f"{argument}={self.path!r}: malformed store metadata ({error})"
            ) from None
        missing = [n for n in self._names() if n + ".npy" not in self.reader.members]
        if missing:
            raise IncompatibleStoreError(
                f"{argument}={self.path!r}: incomplete store, missing {missing[:3]}"
            )

    def _names(self) -> list[str]:
        return [f"block_{i:06d}" for i in range(len(self.batch_sizes))]

    def blocks(self, from_numpy: Callable[[np.ndarray], Any]) -> Iterator[Any]:
        for block in self.reader.iter_arrays(self._names()):
            yield from_numpy(block)

    def check(self, expected: StoreKey) -> None:
        """Raise unless this store was computed for ``expected``.

        Raises
        ------
        IncompatibleStoreError
            Naming the argument, the path and the fields that differ.
        """
        differences = self.key.differences(expected)
        if differences:
            what = {
                "fingerprint": "another model (or other parameter values)",
                "eigenbasis": "another eigenbasis (another fit of the calculator)",
                "dtype": "another dtype",
                "rank": "another number of eigenvalues",
            }
            reasons = "; ".join(what[name] for name in differences)
            raise IncompatibleStoreError(
                f"{self.reader.argument}={self.path!r}: the store there belongs to {reasons} "
                f"(differs in {', '.join(differences)}); delete it or choose another path"
            )


def write_disk_store(
    path: Any, key: StoreKey, blocks: Iterator[np.ndarray], *, argument: str = "path"
) -> DiskStore:
    """Stream host blocks (each (B, k)) into an atomic ``.npz`` store at ``path``.

    Returns
    -------
    DiskStore
        The store just written, reopened from disk.
    """
    sizes: list[int] = []
    with AtomicArchiveWriter(path) as writer:
        for index, block in enumerate(blocks):
            if block.ndim != 2 or block.shape[1] != key.rank:
                raise ValueError(
                    f"block {index}: expected shape (B, {key.rank}), got {block.shape}"
                )
            writer.write_array(f"block_{index:06d}", block)
            sizes.append(int(block.shape[0]))
        meta = {"kind": STORE_KIND, "version": FORMAT_VERSION, "batch_sizes": sizes}
        meta.update(asdict(key))
        writer.write_json("metadata", meta)
    return DiskStore(path, argument=argument)
