"""The zarr store of a scored training set: written block by block, read chunk by chunk.

:func:`~krylov_influence.ray.score_training_set` writes a zarr (v3) group, one chunk of rows per
block (so no two writers share a chunk), in parallel from its actors:

=================  =============  ==========================================================
array              shape          what
=================  =============  ==========================================================
``ids``            (N,) int64     the global ids
``self_influence`` (N,) float64
``vectors``        (N, k)         influence vectors ``diag(1/(λ+δ)) G g``, the model's dtype
``losses``         (N,) float64   per-example losses: the data's identity
``completed``      (blocks,) bool set for a block after its rows are written
=================  =============  ==========================================================

The driver reads the training set lazily, so ``N`` is not known when the store is created:
the arrays start empty and the driver grows them (``resize``, an atomic rewrite of their
metadata), doubling their length when a block would not fit, before it ships the block, so
an actor always finds the rows of its block in the arrays it opens; when every block is
written the driver trims them to ``N`` rows. The group's attributes hold what produced it
(eigenbasis digest, parameter fingerprint, dtype, rank, block layout, the complement's
weight) and, once every block is written, ``num_examples``: a store without it is
unfinished, and is not read as scores.

Reading (:class:`ScoreStore`) checks the attributes against the calculator before any chunk is
read, then reads the vectors a chunk at a time: memory ``O(chunk × k)`` whatever ``N``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from krylov_influence.errors import IncompatibleStoreError

__all__ = ["STORE_KIND", "STORE_VERSION", "ScoreStore", "StoreWriter", "open_group"]

STORE_KIND = "krylov_influence.ray_scores"
STORE_VERSION = 2
ROW_ARRAYS = ("ids", "self_influence", "losses", "vectors")


def open_group(path: Any, mode: str) -> Any:
    """The zarr group at ``path`` (``mode`` as ``zarr.open_group``'s)."""
    import zarr

    return zarr.open_group(os.fspath(path), mode=mode)  # type: ignore[arg-type]


def _attributes(path: str, argument: str) -> tuple[Any, dict[str, Any]]:
    """The group at ``path`` (read-only) and its attributes; refused if it is not a group."""
    try:
        group = open_group(path, "r")
    except Exception as error:  # zarr's errors differ by version: any failure is "not ours"
        raise IncompatibleStoreError(
            f"{argument}={path!r}: not a zarr group ({type(error).__name__}: {error}); remove "
            "it or choose another path"
        ) from error
    return group, dict(group.attrs)


def _check_kind(found: dict[str, Any], argument: str, path: str) -> None:
    if found.get("kind") != STORE_KIND or found.get("version") != STORE_VERSION:
        raise IncompatibleStoreError(
            f"{argument}={path!r}: not a store of krylov_influence.ray scores of version "
            f"{STORE_VERSION} (kind {found.get('kind')!r}, version {found.get('version')!r})"
        )


class StoreWriter:
    """The driver's side of writing a store: create or check it, grow it, finish it.

    Parameters
    ----------
    path : str
    attributes : dict
        What produced the scores (checked against an existing store, key by key).
    dtype : str
        The vectors' dtype.
    """

    def __init__(self, path: str, attributes: dict[str, Any], dtype: str):
        self.path, self.attributes, self.dtype = path, attributes, dtype
        self.done: list[bool] = []
        self.block_rows: int | None = None
        self.finished_rows: int | None = None  # num_examples of a finished store
        self.rows = 0  # rows the arrays have now
        if os.path.exists(path):
            group, found = _attributes(path, "store_path")
            _check_kind(found, "store_path", path)
            for name, expected in attributes.items():
                if found.get(name) != expected:
                    raise IncompatibleStoreError(
                        f"store_path={path!r}: belongs to another computation ({name} is "
                        f"{found.get(name)!r} there, {expected!r} here); remove it or choose "
                        "another path"
                    )
            self.block_rows = int(found["block_rows"])
            self.finished_rows = found.get("num_examples")
            self.done = [bool(flag) for flag in np.asarray(group["completed"][:])]
            self.rows = int(group["ids"].shape[0])

    def admit(self, block: Any) -> bool:
        """Make room for ``block``'s rows (creating the store at the first block).

        Returns whether the block is already complete in the store (to verify, not compute).

        Raises
        ------
        ValueError
            If the block is not the last and its size differs from the store's chunk.
        IncompatibleStoreError
            If a finished store holds fewer examples than the data.
        """
        if self.block_rows is None:
            self._create(block.rows)
        assert self.block_rows is not None
        if block.rows != self.block_rows and not (block.last and block.rows < self.block_rows):
            raise ValueError(
                f"store_path: block {block.index} has {block.rows} examples but the store's "
                f"chunk is {self.block_rows}; every block but the last must have the same "
                "number of examples, so use batches of one size (the last may be smaller)"
            )
        stop = block.start + block.rows
        if self.finished_rows is not None and stop > self.finished_rows:
            raise IncompatibleStoreError(
                f"store_path={self.path!r}: holds the scores of {self.finished_rows} examples, "
                f"but the batches have more; it belongs to another training set"
            )
        if stop > self.rows or block.index >= len(self.done):
            # Doubling: a few metadata rewrites in all, not one per block.
            blocks = max(2 * len(self.done), block.index + 1)
            self._resize(max(stop, blocks * self.block_rows), blocks)
        return self.done[block.index]

    def _resize(self, rows: int, blocks: int) -> None:
        group = open_group(self.path, "r+")
        for name in ROW_ARRAYS:
            array = group[name]
            array.resize((rows, *array.shape[1:]))
        group["completed"].resize((blocks,))
        self.rows = rows
        self.done = self.done[:blocks] + [False] * (blocks - len(self.done))

    def _create(self, block_rows: int) -> None:
        import zarr

        group = zarr.open_group(self.path, mode="w")
        k = int(self.attributes["k"])
        # Floating-point results hardly compress (zstd saves a few per cent and costs a third
        # of an actor's write time): stored raw. Ids and markers keep zarr's default codec.
        raw: dict[str, Any] = {"compressors": None}
        for name, shape, chunks, kind, codec in (
            ("ids", (0,), (block_rows,), "int64", {}),
            ("self_influence", (0,), (block_rows,), "float64", raw),
            ("losses", (0,), (block_rows,), "float64", raw),
            ("vectors", (0, k), (block_rows, k), self.dtype, raw),
            ("completed", (0,), (1,), "bool", {}),
        ):
            group.create_array(name, shape=shape, chunks=chunks, dtype=kind, fill_value=0, **codec)
        # Written last: a store without its attributes is refused on the next run.
        group.attrs.update(
            {
                "kind": STORE_KIND,
                "version": STORE_VERSION,
                **self.attributes,
                "block_rows": int(block_rows),
            }
        )
        self.block_rows = block_rows

    def finish(self, num_examples: int, num_blocks: int) -> None:
        """Record ``num_examples`` once every block is written: the store is then readable."""
        group = open_group(self.path, "r+")
        completed = np.asarray(group["completed"][:])
        if bool(np.any(completed[num_blocks:])):
            raise IncompatibleStoreError(
                f"store_path={self.path!r}: holds complete blocks beyond the {num_blocks} "
                "blocks of the batches; it belongs to a longer training set"
            )
        if not bool(np.all(completed[:num_blocks])):
            raise RuntimeError(f"store_path={self.path!r}: a block was not marked complete")
        if self.rows != num_examples or len(self.done) != num_blocks:
            self._resize(num_examples, num_blocks)  # no actor writes any more
        group.attrs.update({"num_examples": int(num_examples)})


class ScoreStore:
    """A finished store of :func:`score_training_set`, checked against a calculator.

    Parameters
    ----------
    path : str or os.PathLike
        The zarr group.
    calculator : ArnoldiInfluenceCalculator
        The store must have been written with its fit (eigenbasis digest), its model's
        parameters (fingerprint) and dtype, with influence vectors.
    argument : str, default "store_path"
        The argument named in error messages.

    Attributes
    ----------
    path : str
    num_examples : int
        ``N``.
    rank : int
        ``k``, the vectors' length.
    block_rows : int
        Rows per chunk.
    vectors, self_influence, ids, losses : zarr.Array
        Shapes (N, k), (N,), (N,), (N,).

    Raises
    ------
    IncompatibleStoreError
        If the path holds no such store, an unfinished one, one without vectors, or one of
        another fit, model or dtype.
    """

    def __init__(self, path: Any, calculator: Any, argument: str = "store_path"):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise IncompatibleStoreError(f"{argument}={self.path!r}: no store there")
        group, found = _attributes(self.path, argument)
        _check_kind(found, argument, self.path)
        model = calculator.model
        expected = {
            "eigenbasis_digest": calculator.eigenbasis_digest,
            "fingerprint": model.fingerprint(),
            "dtype": model.dtype_name,
            "k": int(calculator.eigenbasis.rank),
        }
        for name, value in expected.items():
            if found.get(name) != value:
                raise IncompatibleStoreError(
                    f"{argument}={self.path!r}: written with another calculator ({name} is "
                    f"{found.get(name)!r} there, {value!r} here)"
                )
        if not found.get("with_vectors"):
            raise IncompatibleStoreError(
                f"{argument}={self.path!r}: holds no influence vectors (written with vectors=False)"
            )
        completed = np.asarray(group["completed"][:])
        if found.get("num_examples") is None or not bool(np.all(completed)):
            raise IncompatibleStoreError(
                f"{argument}={self.path!r}: unfinished (a run was interrupted, "
                f"{int(np.sum(~completed))} of {completed.size} blocks missing); rerun "
                "score_training_set on it to complete it"
            )
        self.num_examples = int(found["num_examples"])
        self.rank = int(found["k"])
        self.block_rows = int(found["block_rows"])
        self.vectors = group["vectors"]
        self.self_influence = group["self_influence"]
        self.ids = group["ids"]
        self.losses = group["losses"]
        if self.vectors.shape != (self.num_examples, self.rank):
            raise IncompatibleStoreError(
                f"{argument}={self.path!r}: vectors of shape {self.vectors.shape}, expected "
                f"{(self.num_examples, self.rank)}"
            )

    def vector_blocks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, vectors (B, k))`` over the store in order, ``rows`` at a time.

        ``rows`` defaults to the chunk; a multiple of it reads whole chunks.
        """
        step = self.block_rows if rows is None else int(rows)
        for start in range(0, self.num_examples, step):
            yield start, np.asarray(self.vectors[start : start + step])
