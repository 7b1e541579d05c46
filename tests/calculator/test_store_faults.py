"""Fault injection on stored files: corrupt, truncated and crafted archives, killed writers,
concurrent writers, permissions. Every bad file is refused with ``IncompatibleStoreError``,
before anything large is allocated; every interrupted write leaves the previous file whole."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from calculator_support import Problem, build, engine_class

from krylov_influence import ArnoldiInfluenceCalculator, IncompatibleStoreError
from krylov_influence.cache import DiskStore

# No load of a small crafted file may allocate more than this (the files here are < 64 KiB).
ALLOCATION_BOUND = 8 * 2**20


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _rezip(path: Path, members: dict[str, bytes], compress: dict[str, int] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            kind = (compress or {}).get(name, zipfile.ZIP_STORED)
            archive.writestr(name, data, compress_type=kind)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header_only(shape: tuple[int, ...], descr: str) -> bytes:
    """An .npy header declaring ``shape`` and ``descr`` followed by a few bytes of data."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + b"\0" * 64


def _refused_within_bound(load: Callable[[], Any]) -> IncompatibleStoreError:
    tracemalloc.start()
    try:
        with pytest.raises(IncompatibleStoreError) as caught:
            load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ALLOCATION_BOUND, f"refusing the file allocated {peak} bytes"
    return caught.value


@pytest.fixture
def saved(numpy_problem: Problem, tmp_path: Path) -> tuple[Problem, Path, Path]:
    """A saved calculator and a saved store of the same fit."""
    problem = numpy_problem
    calculator = Path(problem.calc.save(tmp_path / "calc.npz"))
    store = tmp_path / "vectors.npz"
    list(problem.calc.compute_influence_vector(problem.train, store))
    return problem, calculator, store


def _load_calculator(problem: Problem, path: Path) -> Callable[[], Any]:
    return lambda: ArnoldiInfluenceCalculator.load(path, problem.model, check_model=False)


def _read_store(problem: Problem, path: Path) -> Callable[[], Any]:
    return lambda: list(problem.calc.compute_influence_vector(problem.train, path))


# ----------------------------------------------------------------------- corrupt files
def test_every_truncation_is_refused(saved: Any, tmp_path: Path) -> None:
    problem, calculator, store = saved
    for original, read in ((calculator, _load_calculator), (store, _read_store)):
        data = original.read_bytes()
        broken = tmp_path / ("cut_" + original.name)
        for length in sorted({0, 1, 4, 30, 100, *range(0, len(data) - 1, len(data) // 40)}):
            broken.write_bytes(data[:length])
            error = _refused_within_bound(read(problem, broken))
            assert str(broken) in str(error)


def test_flipped_bytes_are_refused_or_harmless(saved: Any, tmp_path: Path) -> None:
    """A flipped byte in any member is caught (CRC, header, metadata checks); a flip in the
    zip's own bookkeeping that changes nothing read (timestamps, attributes) is harmless, and
    then the results are exactly the original ones. Never a different number."""
    problem, calculator, store = saved
    expected_g = problem.calc.G.copy()
    expected_vectors = [v.copy() for _, v in problem.calc.compute_influence_vector(problem.train)]
    rng = np.random.default_rng(0)
    for original in (calculator, store):
        data = bytearray(original.read_bytes())
        broken = tmp_path / ("flip_" + original.name)
        refused = 0
        positions = rng.choice(len(data), size=min(150, len(data)), replace=False)
        for position in positions:
            flipped = bytearray(data)
            flipped[position] ^= 0xFF
            broken.write_bytes(bytes(flipped))
            try:
                if original is calculator:
                    got = ArnoldiInfluenceCalculator.load(broken, problem.model, check_model=False)
                    np.testing.assert_array_equal(got.G, expected_g)
                else:
                    got = _read_store(problem, broken)()
                    for (_, a), b in zip(got, expected_vectors, strict=True):
                        np.testing.assert_array_equal(a, b)
            except IncompatibleStoreError:
                refused += 1
        assert refused > len(positions) // 2  # most bytes are member data: all caught


def test_missing_members_are_refused(saved: Any, tmp_path: Path) -> None:
    problem, calculator, store = saved
    for original, read in ((calculator, _load_calculator), (store, _read_store)):
        members = _members(original)
        for name in members:
            broken = tmp_path / f"drop_{name}_{original.name}"
            _rezip(broken, {n: d for n, d in members.items() if n != name})
            error = _refused_within_bound(read(problem, broken))
            assert "missing" in str(error) or "metadata.json" in str(error)


@pytest.mark.parametrize(
    "member, payload, message",
    [
        ("projector.npy", _npy_header_only((3,), "|O"), "dtype object"),
        ("projector.npy", _npy_header_only((2**21, 2**21), "<f8"), "shape"),
        ("eigenvalues.npy", _npy_header_only((15,), "<f8"), "declares 120 bytes"),
        ("projector.npy", _npy(np.full((15, 15), np.nan)), "non-finite"),
        ("projector.npy", _npy(np.zeros((15, 15), np.float32)), "dtype float32"),
        ("eigenvalues.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': ", "cannot be read"),
        ("metadata.json", b"{not json", "not a krylov_influence archive"),
        ("metadata.json", b"[1, 2]", "malformed metadata"),
    ],
)
def test_crafted_calculator_members_are_refused(
    saved: Any, tmp_path: Path, member: str, payload: bytes, message: str
) -> None:
    problem, calculator, _ = saved
    members = _members(calculator)
    members[member] = payload
    broken = tmp_path / "crafted.npz"
    _rezip(broken, members)
    error = _refused_within_bound(_load_calculator(problem, broken))
    assert message in str(error) and str(broken) in str(error)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("damping", -1.0, "damping"),
        ("damping", float("nan"), "damping"),
        ("k_largest_eig_vals", 16, "k_largest_eig_vals"),
        ("k_largest_eig_vals", "15", "k_largest_eig_vals"),
        ("subspace_dim", 0, "subspace_dim"),
        ("seed", 1.5, "seed"),
        ("dtype", "float16", "dtype"),
        ("eigenvalue_selection", "smallest", "eigenvalue_selection"),
        ("num_hessian_examples", True, "num_hessian_examples"),
        ("arnoldi_restarts", ["a"], "arnoldi_restarts"),
        ("version", 1, "version"),
    ],
)
def test_invalid_calculator_metadata_is_refused(
    saved: Any, tmp_path: Path, field: str, value: Any, message: str
) -> None:
    problem, calculator, _ = saved
    members = _members(calculator)
    meta = json.loads(members["metadata.json"])
    meta[field] = value
    members["metadata.json"] = json.dumps(meta).encode()
    broken = tmp_path / "meta.npz"
    _rezip(broken, members)
    error = _refused_within_bound(_load_calculator(problem, broken))
    assert message in str(error)


def test_a_decompression_bomb_is_refused_unread(saved: Any, tmp_path: Path) -> None:
    problem, calculator, store = saved
    bomb = _npy(np.zeros((2**25,), np.float64))  # 256 MiB of zeros, about 256 KiB deflated
    for original, read, member in (
        (calculator, _load_calculator, "projector.npy"),
        (store, _read_store, "block_000000.npy"),
    ):
        members = _members(original)
        members[member] = bomb
        broken = tmp_path / ("bomb_" + original.name)
        _rezip(broken, members, compress={member: zipfile.ZIP_DEFLATED})
        assert broken.stat().st_size < 2**20
        error = _refused_within_bound(read(problem, broken))
        assert "compressed" in str(error)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank": 0}, "malformed store metadata"),
        ({"batch_sizes": [5, 5, 5, 5]}, "another training set"),
        ({"batch_sizes": [5, 5, 5, 5, 3.0]}, "malformed store metadata"),
        ({"batch_sizes": []}, "no batch"),
        ({"dtype": "int8"}, "malformed store metadata"),
        ({"version": 1}, "not an influence-vector store of this version"),
    ],
)
def test_invalid_store_metadata_is_refused(
    saved: Any, tmp_path: Path, change: dict, message: str
) -> None:
    problem, _, store = saved
    members = _members(store)
    meta = json.loads(members["metadata.json"])
    meta.update(change)
    members["metadata.json"] = json.dumps(meta).encode()
    broken = tmp_path / "meta_store.npz"
    _rezip(broken, members)
    error = _refused_within_bound(_read_store(problem, broken))
    assert message in str(error)


def test_non_finite_or_misshapen_store_blocks_are_refused(saved: Any, tmp_path: Path) -> None:
    problem, _, store = saved
    for block, message in (
        (np.full((5, 15), np.nan), "non-finite"),
        (np.zeros((4, 15)), "shape"),
        (np.zeros((5, 15), np.float32), "dtype float32"),
    ):
        members = _members(store)
        members["block_000002.npy"] = _npy(block)
        broken = tmp_path / "block.npz"
        _rezip(broken, members)
        with pytest.raises(IncompatibleStoreError, match=message):
            list(DiskStore(broken).blocks(lambda a: a))
        with pytest.raises(IncompatibleStoreError, match=message):
            _read_store(problem, broken)()


def test_a_float32_basis_is_refused_for_a_float64_model(numpy_problem: Problem, tmp_path) -> None:
    """A model trained in float32 and cast to float64 has the same parameter values (the
    same fingerprint), but its basis was computed in float32."""
    import dataclasses

    spec = numpy_problem.spec
    rounded = dataclasses.replace(
        spec,
        weights=tuple(w.astype(np.float32).astype(np.float64) for w in spec.weights),
        biases=tuple(b.astype(np.float32).astype(np.float64) for b in spec.biases),
    )
    engine = engine_class("numpy")
    model32, train32 = build(engine, rounded, "float32")
    model64, _ = build(engine, rounded, "float64")
    assert model32.fingerprint() == model64.fingerprint()
    calc = ArnoldiInfluenceCalculator(model32, train32, 15, True, 15, "float32")
    path = calc.save(tmp_path / "c32.npz")
    with pytest.raises(IncompatibleStoreError, match=r"computes in float64.*float32 model"):
        ArnoldiInfluenceCalculator.load(path, model64, check_model=False)


# ----------------------------------------------------------------- killed and racing writers
WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np
    from krylov_influence.cache import StoreKey, write_disk_store
    key = StoreKey("f" * 32, "e" * 32, "float64", 8)
    def blocks():
        for i in range(int(sys.argv[2])):
            yield np.full((4096, 8), float(i)), np.zeros(4096)
            if i == 2:
                print("ready", flush=True)
                time.sleep(float(sys.argv[3]))
    write_disk_store(sys.argv[1], key, blocks())
    print("done", flush=True)
    """
)


def _start_writer(path: Path, blocks: int, pause: float, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(blocks), str(pause)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def _temporaries(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def test_sigkill_mid_write_keeps_the_previous_store_and_the_next_write_cleans_up(tmp_path):
    path = tmp_path / "store.npz"
    first = _start_writer(path, 4, 0)
    assert first.wait(timeout=60) == 0
    before = path.read_bytes()
    writer = _start_writer(path, 6, 60)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert path.read_bytes() == before  # the complete earlier store, untouched
    assert len(_temporaries(tmp_path)) == 1  # what a killed writer leaves (no code runs)
    np.testing.assert_array_equal(list(DiskStore(path).blocks(lambda a: a))[3][0], 3.0)
    again = _start_writer(path, 5, 0)
    assert again.wait(timeout=60) == 0
    assert _temporaries(tmp_path) == []  # the dead writer's file is gone
    assert len(DiskStore(path).batch_sizes) == 5


def test_sigterm_mid_write_removes_the_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    writer = _start_writer(path, 6, 60)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    assert len(_temporaries(tmp_path)) == 1
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=30) == -signal.SIGTERM  # still dies of SIGTERM
    assert os.listdir(tmp_path) == []


def test_scratch_stores_of_a_killed_process_are_removed_by_the_next(tmp_path, monkeypatch):
    script = textwrap.dedent(
        """
        import sys, time, numpy as np
        from krylov_influence import CACHE, ArnoldiInfluenceCalculator
        from krylov_influence.reference import SoftmaxRegression
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((40, 4)), rng.integers(0, 3, 40)
        train = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
        model = SoftmaxRegression(rng.standard_normal((4, 3)), np.zeros(3), l2=0.1)
        calc = ArnoldiInfluenceCalculator(model, train, 15, True, 5, "float64")
        stream = calc.top_k(train, train, k=2, influence_vector_in_cache=CACHE.DISK)
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert victim.stdout is not None and victim.stdout.readline().strip() == b"ready"
    scratch = [n for n in os.listdir(tmp_path) if n.startswith("krylov_influence_")]
    assert len(scratch) == 1 and os.listdir(tmp_path / scratch[0])
    victim.kill()
    victim.wait(timeout=30)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:  # a live process's scratch directory is never touched
        alive = tmp_path / f"krylov_influence_{survivor.pid}_abc"
        alive.mkdir()
        calc = ArnoldiInfluenceCalculator(*_tiny())
        calc._scratch_path()
        remaining = sorted(n for n in os.listdir(tmp_path) if n.startswith("krylov_influence_"))
        assert scratch[0] not in remaining and alive.name in remaining
    finally:
        survivor.kill()
        survivor.wait()


def _tiny() -> tuple[Any, ...]:
    from krylov_influence.reference import SoftmaxRegression

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 2)), rng.integers(0, 2, 10)
    model = SoftmaxRegression(rng.standard_normal((2, 2)), np.zeros(2), l2=0.1)
    return model, [(x, y)], 3, True, 2, "float64"


def test_concurrent_writers_leave_one_complete_store(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    writers = [_start_writer(path, 4 + i, 0.2) for i in range(4)]
    for writer in writers:
        assert writer.wait(timeout=60) == 0
    store = DiskStore(path)
    assert len(store.batch_sizes) in (4, 5, 6, 7)
    blocks = list(store.blocks(lambda a: a))
    for index, block in enumerate(blocks):  # every block of one writer, none mixed
        np.testing.assert_array_equal(block, float(index))
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    path = tmp_path / "store.npz"
    script = f"import os; os.umask({umask}); exec({WRITER!r})"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), "1", "0"], capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_stale_temporary_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    writer = _start_writer(path, 6, 60)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        other = _start_writer(path, 2, 0)
        assert other.wait(timeout=60) == 0
        assert len(_temporaries(tmp_path)) == 1  # the live writer's file is still there
    finally:
        writer.kill()
        writer.wait()
    time.sleep(0.1)
