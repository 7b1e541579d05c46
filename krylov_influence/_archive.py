"""The one file format of every stored artefact: an ``.npz`` archive, written atomically, read
defensively, and held open while it is read.

Every stored artefact (a saved calculator, a store of influence vectors, saved scores and
top-k results) is a zip of ``.npy`` members plus a ``metadata.json`` member that says what it
holds and what produced it. This module owns the bytes; what the metadata means, and whether
it matches, is the business of its callers.

Writing (:class:`AtomicArchiveWriter`)
    Members are streamed into a temporary file ``.NAME.<pid>.<random>.tmp`` in the target's
    directory, which is flushed, synced, given the permissions any file created under the
    process's umask would have, and renamed over the target with :func:`os.replace`. An
    interrupted write leaves the previous archive intact (or none). Temporary files of writers
    that died (their pid no longer runs) are removed by the next write into the same directory,
    and a process ended by ``SIGTERM`` removes its own on the way out.

Reading (:class:`ArchiveReader`)
    The file is opened **once** and the handle kept for the reader's lifetime: a file replaced
    at the same path by another writer (a rename creates a new file) never changes what an
    open reader serves. Every failure to read (a truncated or corrupt zip, a CRC mismatch, a
    compressed or missing member, a malformed ``.npy`` header, object arrays, a header that
    declares more data than the member holds) is an :class:`IncompatibleStoreError` naming the
    file and the member, raised before anything large is allocated.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from krylov_influence.errors import IncompatibleStoreError

__all__ = ["ArchiveReader", "AtomicArchiveWriter", "register_for_cleanup", "unregister_cleanup"]

#: The largest ``metadata.json`` read (batch sizes of 10M examples in small batches fit).
MAX_METADATA_BYTES = 64 * 2**20

# Exceptions that reading a damaged or foreign file can raise, from zipfile, zlib, the .npy
# header parser (ast / tokenize) and numpy.
_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    KeyError,
    ValueError,
    TypeError,
    OSError,
    EOFError,
    SyntaxError,
    OverflowError,
    MemoryError,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
)


# ------------------------------------------------------------------- temporary files, cleanup
_cleanup_lock = threading.Lock()
_cleanup_paths: set[str] = set()
_sigterm_installed = False


def register_for_cleanup(path: str) -> None:
    """Remove ``path`` (a file or a directory) if the process is ended by ``SIGTERM``."""
    with _cleanup_lock:
        _cleanup_paths.add(path)
    _install_sigterm_cleanup()


def unregister_cleanup(path: str) -> None:
    """Forget ``path`` (it was published or removed)."""
    with _cleanup_lock:
        _cleanup_paths.discard(path)


def _remove_registered() -> None:
    import shutil

    with _cleanup_lock:
        paths = list(_cleanup_paths)
        _cleanup_paths.clear()
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _on_sigterm(signum: int, frame: Any) -> None:
    _remove_registered()
    # Then die of SIGTERM as the process would have without us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_cleanup() -> None:
    """Install the SIGTERM handler once, only where nobody else handles SIGTERM.

    A library must not take a signal away from its application: the handler goes in only when
    the current one is the default, and only from the main thread (where Python allows it).
    """
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = True
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _on_sigterm)


def _pid_is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists, under another user
    return True


def remove_stale_temporaries(directory: str, pattern: re.Pattern[str]) -> list[str]:
    """Remove entries of ``directory`` matching ``pattern`` whose group ``pid`` is not running.

    Returns
    -------
    list of str
        The paths removed.
    """
    import shutil

    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _pid_is_running(int(match.group("pid"))):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed


def _temporary_pattern(basename: str) -> re.Pattern[str]:
    return re.compile(r"\." + re.escape(basename) + r"\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")


_umask_cache: int | None = None


def _umask() -> int:
    """The process's umask: from ``/proc`` where Linux says it (each time: it may change),
    elsewhere set and restored once (reading it that way means changing it, briefly)."""
    global _umask_cache
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    if _umask_cache is None:
        with _cleanup_lock:
            current = os.umask(0o022)
            os.umask(current)
            _umask_cache = current
    return _umask_cache


# ---------------------------------------------------------------------------------- writing
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
        basename = os.path.basename(self.path)
        remove_stale_temporaries(directory, _temporary_pattern(basename))
        handle, self._temp = tempfile.mkstemp(
            dir=directory, prefix=f".{basename}.{os.getpid()}.", suffix=".tmp"
        )
        os.close(handle)
        register_for_cleanup(self._temp)
        # Stored, not deflated: float data barely compresses, members stay seekable, and the
        # reader can refuse anything compressed (no decompression bombs).
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
                # mkstemp makes 0600 files; a published file gets what open() would give it.
                os.chmod(self._temp, 0o666 & ~_umask())
                os.replace(self._temp, self.path)
        finally:
            if os.path.exists(self._temp):
                os.remove(self._temp)
            unregister_cleanup(self._temp)


# ---------------------------------------------------------------------------------- reading
class ArchiveReader:
    """Read members of an archive written by :class:`AtomicArchiveWriter`, from one handle.

    Parameters
    ----------
    path : str or os.PathLike
    argument : str
        The argument the path came from, for error messages.

    Attributes
    ----------
    metadata : dict
        The ``metadata.json`` member.
    members : frozenset of str
        Member names.

    Raises
    ------
    IncompatibleStoreError
        If the file is not such an archive (missing, corrupt, truncated, compressed, foreign).
    """

    def __init__(self, path: Any, argument: str):
        self.path = os.fspath(path)
        self.argument = argument
        self._lock = threading.Lock()
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 (held for the reader's lifetime)
        except OSError as error:
            raise self.error(f"cannot be opened ({error.strerror or error})") from None
        self._handle = handle
        weakref.finalize(self, handle.close)
        try:
            self._zip = zipfile.ZipFile(handle)
            self._infos = {info.filename: info for info in self._zip.infolist()}
            for info in self._infos.values():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise self.error(f"member {info.filename!r} is compressed")
            meta_info = self._infos.get("metadata.json")
            if meta_info is None:
                raise self.error("no metadata.json member")
            if meta_info.file_size > MAX_METADATA_BYTES:
                raise self.error(f"metadata.json declares {meta_info.file_size} bytes")
            metadata = json.loads(self._zip.read("metadata.json").decode("utf-8"))
        except IncompatibleStoreError:
            handle.close()
            raise
        except _READ_ERRORS as error:
            handle.close()
            raise self.error(f"not a krylov_influence archive ({error})") from None
        if not isinstance(metadata, dict):
            handle.close()
            raise self.error("malformed metadata.json (not an object)")
        self.metadata: dict[str, Any] = metadata
        self.members = frozenset(self._infos)

    def error(self, what: str) -> IncompatibleStoreError:
        """An :class:`IncompatibleStoreError` naming the argument and the file."""
        return IncompatibleStoreError(f"{self.argument}={self.path!r}: {what}")

    def close(self) -> None:
        """Close the file (also done when the reader is garbage-collected)."""
        self._handle.close()

    def read_array(
        self,
        name: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtypes: tuple[str, ...] = ("float32", "float64"),
    ) -> np.ndarray:
        """Member ``name.npy``, checked against ``shape`` and ``dtypes`` before it is read.

        Parameters
        ----------
        name : str
        shape : tuple of int, optional
            The shape the metadata implies; any other is refused.
        dtypes : tuple of str
            Accepted dtype names (native or little-endian); object arrays never are.

        Raises
        ------
        IncompatibleStoreError
            Naming the member and what is wrong with it.
        """
        member = name + ".npy"
        info = self._infos.get(member)
        if info is None:
            raise self.error(f"member {member!r} is missing")
        try:
            with self._lock, self._zip.open(info) as stream:
                found_shape, fortran, dtype = self._checked_header(stream, member, shape, dtypes)
                nbytes = int(np.prod(found_shape, dtype=np.int64)) * dtype.itemsize
                if stream.tell() + nbytes != info.file_size:
                    raise self.error(
                        f"member {member!r} declares {nbytes} bytes of data but holds "
                        f"{info.file_size - stream.tell()}"
                    )
                buffer = bytearray(nbytes)
                if stream.readinto(memoryview(buffer)) != nbytes:  # type: ignore[attr-defined]
                    raise EOFError("short read")
                stream.read()  # to the end, so that zipfile checks the CRC
        except IncompatibleStoreError:
            raise
        except _READ_ERRORS as error:
            raise self.error(f"member {member!r} cannot be read ({error})") from None
        array = np.frombuffer(buffer, dtype=dtype)
        shaped = array.reshape(tuple(found_shape), order="F" if fortran else "C")
        return shaped.astype(dtype.newbyteorder("="), copy=False)

    def _checked_header(
        self, stream: Any, member: str, shape: tuple[int, ...] | None, dtypes: tuple[str, ...]
    ) -> tuple[tuple[int, ...], bool, np.dtype]:
        """The ``.npy`` header of ``member`` read from ``stream``, checked against the shape
        the metadata implies and the accepted dtypes (object arrays never are)."""
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            header = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        found_shape, fortran, dtype = header
        if dtype.hasobject or dtype.name not in dtypes:
            raise self.error(f"member {member!r} has dtype {dtype}, expected {dtypes}")
        if shape is not None and tuple(found_shape) != tuple(shape):
            raise self.error(
                f"member {member!r} has shape {tuple(found_shape)}, but the metadata "
                f"says {tuple(shape)}"
            )
        return tuple(found_shape), bool(fortran), dtype

    def locate_array(
        self,
        name: str,
        *,
        shape: tuple[int, ...],
        dtypes: tuple[str, ...] = ("float32", "float64"),
        chunk_bytes: int = 64 * 2**20,
    ) -> tuple[int, np.dtype]:
        """Where member ``name.npy``'s data starts in the file, for reading it in place.

        The member is read through once in chunks of ``chunk_bytes`` (bounded memory): its
        header is checked as by :meth:`read_array`, its CRC by :mod:`zipfile`, and every value
        must be finite. Members are stored uncompressed, so the data is a plain C-order array
        at the returned offset.

        Returns
        -------
        (offset, dtype)

        Raises
        ------
        IncompatibleStoreError
            As :meth:`read_array`, and for non-finite values.
        """
        member = name + ".npy"
        info = self._infos.get(member)
        if info is None:
            raise self.error(f"member {member!r} is missing")
        try:
            with self._lock, self._zip.open(info) as stream:
                found_shape, fortran, dtype = self._checked_header(stream, member, shape, dtypes)
                if fortran:
                    raise self.error(f"member {member!r} is in Fortran order")
                data_start = stream.tell()
                nbytes = int(np.prod(found_shape, dtype=np.int64)) * dtype.itemsize
                if data_start + nbytes != info.file_size:
                    raise self.error(f"member {member!r} has a wrong size")
                step = max(dtype.itemsize, chunk_bytes // dtype.itemsize * dtype.itemsize)
                while True:
                    chunk = stream.read(step)
                    if not chunk:
                        break
                    if not np.isfinite(np.frombuffer(chunk, dtype=dtype)).all():
                        raise self.error(f"member {name!r} holds non-finite values")
            self._handle.seek(info.header_offset)
            local = self._handle.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError("bad local file header")
            name_length = int.from_bytes(local[26:28], "little")
            extra_length = int.from_bytes(local[28:30], "little")
        except IncompatibleStoreError:
            raise
        except _READ_ERRORS as error:
            raise self.error(f"member {member!r} cannot be read ({error})") from None
        offset = info.header_offset + 30 + name_length + extra_length + data_start
        return offset, dtype.newbyteorder("=") if dtype.byteorder == "<" else dtype

    def iter_arrays(self, names: list[str], **checks: Any) -> Iterator[np.ndarray]:
        """Members ``names`` in order, one at a time (see :meth:`read_array` for ``checks``)."""
        for name in names:
            yield self.read_array(name, **checks)
