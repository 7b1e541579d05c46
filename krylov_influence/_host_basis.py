"""A Krylov basis kept off the device: in host memory or in a file on disk.

The basis has ``n × p`` numbers (80 GB for p = 10⁸ at n = 200 in float32), more than a device
holds for a large model. :class:`HostBasis` keeps it in a NumPy array, or in an ``.npy`` file
read and written block by block with ``pread``/``pwrite`` (:class:`RowFile`: no memory map,
so the process holds only the block in hand, never the file's pages). Every operation on it
(classical Gram–Schmidt twice, restarts, the orthogonality check, the projector ``G = Yᵀ Q``,
deflating probes) runs on the host over blocks of parameter columns, so at most one block of
``n × block_columns`` numbers is read at a time besides the p-vectors. The operator products
stay on the device: each Arnoldi step moves one p-vector to the host and one back.

The arithmetic is the device path's (the same CGS2 sequence, the same generator draws for
restarts) with sums split over column blocks, so results agree to round-off.

Used by :mod:`krylov_influence.arnoldi` (``host_basis=``) and the calculator
(``basis_location=``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence.errors import IncompatibleStoreError

__all__ = ["HostBasis", "HostProjector", "RowFile"]

DEFAULT_BLOCK_BYTES = 64 * 2**20
#: A basis on disk is read block by block into a buffer that the products then read again:
#: a buffer that stays in the last-level cache between the two is read from memory once.
#: 8 MiB measured fastest on a 32 MiB L3 (a CGS2 step at p = 2.1M, 40 rows: 141 ms against
#: 220 ms with 64 MiB blocks and 180 ms with 4 MiB, where the reads' system calls add up).
DISK_BLOCK_BYTES = 8 * 2**20


def _stamp(fd: int) -> tuple[int, int]:
    status = os.fstat(fd)
    return (int(status.st_size), int(status.st_mtime_ns))


class RowFile:
    """An (m, p) C-order array in an ``.npy`` file, read and written with ``pread``/``pwrite``.

    Supports the indexing the host basis and projector use: ``f[i]`` and ``f[i] = row``,
    ``f[:r]`` and ``f[:r] = rows``, ``f[:r, a:b]`` and ``f[:, a:b]`` (a column block, one read
    per row). Every read returns a new NumPy array of exactly the requested numbers, so memory
    stays bounded by what the caller asks for. ``numpy.load(path, mmap_mode="r")`` reads the
    file as well.
    """

    @classmethod
    def in_place(cls, path: str, offset: int, shape: tuple[int, int], dtype: Any) -> RowFile:
        """Read-only access to a C-order array stored at ``offset`` of ``path`` (e.g. a
        stored member of a saved calculator's archive)."""
        rows = cls.__new__(cls)
        rows._fd = -1
        rows.path = path
        rows.shape = (int(shape[0]), int(shape[1]))
        rows.dtype = np.dtype(dtype)
        rows._row_bytes = rows.shape[1] * rows.dtype.itemsize
        rows.offset = int(offset)
        rows._fd = os.open(path, os.O_RDONLY)
        rows.stamp = _stamp(rows._fd)
        return rows

    def check_unchanged(self) -> None:
        """Refuse to read a file opened in place that was written since (same inode, new
        bytes: e.g. copied over). Its rows would silently be another fit's ``G``."""
        if self.stamp is not None and _stamp(self._fd) != self.stamp:
            raise IncompatibleStoreError(
                f"{self.path!r} changed after it was loaded (size or modification time); "
                "load the calculator again"
            )

    stamp: tuple[int, int] | None = None  # (size, mtime) of a file opened in place

    def __init__(self, path: str, shape: tuple[int, int], dtype: Any, *, create: bool):
        self._fd = -1
        self.path = path
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        if create:
            with open(path, "wb") as handle:
                header = {
                    "descr": np.lib.format.dtype_to_descr(self.dtype),
                    "fortran_order": False,
                    "shape": self.shape,
                }
                np.lib.format.write_array_header_1_0(handle, header)
                self.offset = handle.tell()
                handle.truncate(self.offset + self.nbytes)  # a sparse file of zeros
            self._fd = os.open(path, os.O_RDWR)
        else:
            with open(path, "rb") as handle:
                np.lib.format.read_magic(handle)
                found, fortran, dtype_found = np.lib.format.read_array_header_1_0(handle)
                self.offset = handle.tell()
            if tuple(found) != self.shape or fortran or dtype_found != self.dtype:
                raise ValueError(f"{path}: not a C-order {self.dtype} array of {self.shape}")
            self._fd = os.open(path, os.O_RDONLY)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def _read(self, offset: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty(count, dtype=self.dtype)
        target: Any = out  # a contiguous buffer (mypy: ndarray)
        view, done = memoryview(target).cast("B"), 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], self.offset + offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read")
            done += got
        return out

    def read_block(self, rows: int, columns: slice, out: np.ndarray) -> np.ndarray:
        """Rows ``[:rows]`` of the column block ``columns`` into ``out`` (reused by the caller:
        no allocation, so no fresh pages per read); returns the filled (rows, width) view."""
        start, stop, _ = columns.indices(self.shape[1])
        width = stop - start
        block = out[:rows, :width]
        for row in range(rows):
            self._read(row * self._row_bytes + start * self.dtype.itemsize, width, block[row])
        return block

    def _write(self, offset: int, values: np.ndarray) -> None:
        array: Any = np.ascontiguousarray(values, dtype=self.dtype)  # a buffer (mypy: ndarray)
        data = memoryview(array).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self.offset + offset + done)

    def _rows(self, key: Any) -> range:
        if isinstance(key, (int, np.integer)):
            return range(int(key), int(key) + 1)
        if isinstance(key, slice) and key.step in (None, 1):
            return range(*key.indices(self.shape[0]))
        raise TypeError(f"RowFile: unsupported row index {key!r}")

    def __getitem__(self, key: Any) -> np.ndarray:
        columns = slice(None)
        if isinstance(key, tuple):
            key, columns = key
        rows = self._rows(key)
        start, stop, _ = columns.indices(self.shape[1])
        width = stop - start
        if width == self.shape[1]:  # whole rows: one read
            out = self._read(rows.start * self._row_bytes, len(rows) * width)
            out = out.reshape(len(rows), width)
        else:
            out = np.empty((len(rows), width), dtype=self.dtype)
            for i, row in enumerate(rows):
                out[i] = self._read(row * self._row_bytes + start * self.dtype.itemsize, width)
        return out[0] if isinstance(key, (int, np.integer)) else out

    def __setitem__(self, key: Any, values: Any) -> None:
        columns = slice(None)
        if isinstance(key, tuple):
            key, columns = key
        rows = self._rows(key)
        start, stop, _ = columns.indices(self.shape[1])
        block = np.asarray(values, dtype=self.dtype).reshape(len(rows), stop - start)
        if stop - start == self.shape[1]:
            self._write(rows.start * self._row_bytes, block)
            return
        for i, row in enumerate(rows):  # a column block: one write per row
            self._write(row * self._row_bytes + start * self.dtype.itemsize, block[i])


@dataclass
class HostBasis:
    """An (n, p) basis on the host, processed in blocks of ``block_columns`` columns.

    Attributes
    ----------
    array : numpy.ndarray or RowFile, shape (n, p)
        Rows ``q_1 .. q_n`` in the working dtype; rows not yet set are zero.
    block_columns : int
    path : str or None
        The file of a basis on disk, or ``None`` in memory.
    """

    array: Any
    block_columns: int
    path: str | None = None
    _scratch: np.ndarray | None = None

    def _block(self, rows: int, block: slice) -> np.ndarray:
        """``array[:rows, block]``: a view in memory; read into a reused buffer from disk."""
        if not isinstance(self.array, RowFile):
            return self.array[:rows, block]
        if self._scratch is None:
            self._scratch = np.empty((self.shape[0], self.block_columns), dtype=self.dtype)
        return self.array.read_block(rows, block, self._scratch)

    @classmethod
    def allocate(
        cls,
        n: int,
        p: int,
        dtype: Any,
        *,
        path: str | None = None,
        block_bytes: int | None = None,
    ) -> HostBasis:
        """A zero basis in memory, or in a new ``.npy`` file at ``path``; processed in column
        blocks of ``block_bytes`` (default 64 MiB in memory, 8 MiB on disk)."""
        dtype = np.dtype(dtype)
        if block_bytes is None:
            block_bytes = DEFAULT_BLOCK_BYTES if path is None else DISK_BLOCK_BYTES
        array: Any
        if path is None:
            array = np.zeros((n, p), dtype=dtype)
        else:
            array = RowFile(path, (n, p), dtype, create=True)
        columns = max(1, int(block_bytes) // max(1, n * dtype.itemsize))
        return cls(array, min(p, columns), path)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.array.shape[0]), int(self.array.shape[1]))

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def blocks(self) -> Iterator[slice]:
        p = self.shape[1]
        for start in range(0, p, self.block_columns):
            yield slice(start, min(p, start + self.block_columns))

    def coefficients(self, rows: int, w: np.ndarray) -> np.ndarray:
        """``Q[:rows] w``, shape (rows,), summed over column blocks."""
        out = np.zeros(rows, dtype=w.dtype)
        for block in self.blocks():
            out += self._block(rows, block) @ w[block]
        return out

    def subtract(self, rows: int, coefficients: np.ndarray, w: np.ndarray) -> None:
        """``w −= Q[:rows]ᵀ coefficients``, in place, block by block."""
        for block in self.blocks():
            w[block] -= coefficients @ self._block(rows, block)

    def cgs2(self, rows: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Classical Gram–Schmidt twice against the first ``rows`` rows (in place on ``w``).

        Returns ``w``, the summed coefficients (float64), ``‖w‖`` before and after.

        The first subtraction and the second pass's coefficients ``c₂`` share one sweep over
        the basis (block b of the remainder needs only block b of ``w`` and the first
        coefficients). The second subtraction, a third sweep, changes ``w`` by exactly
        ``‖c₂‖``; it is skipped when that is below ``10·√rows·eps·‖w‖``, the round-off the
        subtraction itself would add, so the remainder is as orthogonal either way (near a
        breakdown ``c₂`` is large relative to ``w`` and the sweep is done). Two reads of the
        basis per step instead of four for most steps.
        """
        product_norm = float(np.linalg.norm(w))
        first = self.coefficients(rows, w)
        second = np.zeros(rows, dtype=w.dtype)
        for block in self.blocks():
            q = self._block(rows, block)
            w[block] -= first @ q
            second += q @ w[block]
        remainder = float(np.linalg.norm(w))
        eps = float(np.finfo(w.dtype).eps)
        if float(np.linalg.norm(second)) > 10.0 * math.sqrt(rows) * eps * remainder:
            self.subtract(rows, second, w)
            coefficients = first.astype(np.float64) + second.astype(np.float64)
        else:
            coefficients = first.astype(np.float64)
        return w, coefficients, product_norm, float(np.linalg.norm(w))

    def fresh_direction(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        """A unit vector orthogonal to the first ``rows`` rows, from ``rng`` (for restarts).

        The same draws and the same test as the device path's ``fresh_direction``.
        """
        threshold = math.sqrt(float(np.finfo(np.float32).eps))
        for _ in range(8):
            draw = rng.standard_normal(self.shape[1])
            r = (draw / np.linalg.norm(draw)).astype(self.dtype)
            for _pass in range(2):
                self.subtract(rows, self.coefficients(rows, r), r)
            norm = float(np.linalg.norm(r))
            if norm > threshold:
                return r * self.dtype.type(1.0 / norm)
        raise RuntimeError(  # pragma: no cover - needs 8 draws inside the span of the basis
            "could not draw a restart vector orthogonal to the Krylov basis"
        )

    def orthogonality_loss(self) -> float:
        """``max |Q Qᵀ − I|``, block Gram matrices (working dtype) summed in float64."""
        n = self.shape[0]
        gram = np.zeros((n, n))
        for block in self.blocks():  # products in the working dtype, as on the device
            part = self._block(n, block)
            gram += np.asarray(part @ part.T, dtype=np.float64)
        return float(np.max(np.abs(gram - np.eye(n))))

    def left_multiply(self, coefficients: np.ndarray, out: Any = None) -> Any:
        """``C Q`` for ``C`` of shape (m, n): shape (m, p), in the basis dtype.

        Into ``out`` (an (m, p) array or :class:`RowFile`) when given, block by block.
        """
        c = np.asarray(coefficients, dtype=self.dtype)
        if out is None:
            out = np.empty((c.shape[0], self.shape[1]), dtype=self.dtype)
        for block in self.blocks():
            out[:, block] = c @ self._block(self.shape[0], block)
        return out

    def right_multiply(self, vectors: np.ndarray) -> np.ndarray:
        """``Z Qᵀ`` for ``Z`` of shape (m, p): shape (m, n), summed over column blocks."""
        z = np.asarray(vectors, dtype=self.dtype)
        out = np.zeros((z.shape[0], self.shape[0]), dtype=self.dtype)
        for block in self.blocks():
            out += z[:, block] @ self._block(self.shape[0], block).T
        return out

    def release(self) -> None:
        """Drop the array; remove the file of a basis on disk."""
        path, self.path = self.path, None
        if isinstance(self.array, RowFile):
            self.array.close()
        self.array = np.zeros((0, 0), dtype=self.dtype)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


class HostProjector:
    """The projector ``G`` (k × p) off the device: a NumPy array, or a :class:`RowFile`.

    Projections then take its rows a chunk at a time to the device
    (:meth:`row_chunks`), so the device holds at most ``chunk_bytes`` of it.

    Attributes
    ----------
    rows : numpy.ndarray or RowFile, shape (k, p)
    path : str or None
        The file of a projector on disk (removed by :meth:`release` or at exit).
    """

    def __init__(self, rows: Any, path: str | None = None):
        self.rows = rows
        self.path = path

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows.shape[0]), int(self.rows.shape[1]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.rows.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.shape[0] * self.shape[1] * self.dtype.itemsize)

    def chunk_rows(self, chunk_bytes: int) -> int:
        """Rows per chunk so that one chunk takes at most ``chunk_bytes`` (at least one)."""
        return max(1, min(self.shape[0], chunk_bytes // (self.shape[1] * self.dtype.itemsize)))

    def row_chunks(self, chunk_bytes: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of rows, each a new host array of at most ``chunk_bytes``."""
        step = self.chunk_rows(chunk_bytes)
        if isinstance(self.rows, RowFile):
            self.rows.check_unchanged()
        for start in range(0, self.shape[0], step):
            yield np.asarray(self.rows[start : start + step])

    def to_numpy(self) -> np.ndarray:
        """All of ``G`` as one host array (k × p numbers in memory)."""
        return np.asarray(self.rows[:])

    def view(self) -> np.ndarray:
        """``G`` for the user: the array itself, or a read-only memory map of the file."""
        if isinstance(self.rows, RowFile):
            return np.memmap(
                self.rows.path, self.rows.dtype, "r", self.rows.offset, self.rows.shape
            )
        return self.rows

    def release(self) -> None:
        """Close the file of a projector on disk, and remove it when it is its own."""
        if isinstance(self.rows, RowFile):
            self.rows.close()
            if self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
