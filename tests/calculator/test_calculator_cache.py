"""CACHE modes, influence-vector stores that really reload, atomic writes, saved results."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from calculator_support import Problem, build, engine_class, scores_of, top_k_of, training_spec

from krylov_influence import CACHE, ORDER, ArnoldiInfluenceCalculator, IncompatibleStoreError
from krylov_influence.cache import DiskStore, StoreKey, write_disk_store

MODES = [CACHE.MEMORY, CACHE.DISK, CACHE.NO_CACHE]


def test_cache_modes_give_identical_results(problem: Problem, tmp_path) -> None:
    calc = problem.calc
    scores = {
        mode: scores_of(
            problem,
            calc.estimate_influence_values_in_batches(
                problem.queries, problem.train, influence_vector_in_cache=mode
            ),
        )
        for mode in MODES
    }
    tops = {
        mode: top_k_of(
            problem,
            calc.top_k(problem.queries, problem.train, k=4, influence_vector_in_cache=mode),
        )
        for mode in MODES
    }
    # The same float64 operations on the same vectors: equal to the last bit (the disk
    # round trip of .npy is exact).
    for mode in MODES[1:]:
        np.testing.assert_array_equal(scores[mode], scores[CACHE.MEMORY])
        np.testing.assert_array_equal(tops[mode][0], tops[CACHE.MEMORY][0])
        np.testing.assert_array_equal(tops[mode][1], tops[CACHE.MEMORY][1])
    # Influenciae's integer values are accepted too.
    again = calc.top_k(problem.queries, problem.train, k=4, influence_vector_in_cache=1)
    np.testing.assert_array_equal(top_k_of(problem, again)[1], tops[CACHE.MEMORY][1])


def test_saved_store_is_really_loaded(problem: Problem, tmp_path, monkeypatch) -> None:
    path = tmp_path / "vectors.npz"
    calc = problem.calc
    saved = [
        problem.model.to_numpy(v) for _, v in calc.compute_influence_vector(problem.train, path)
    ]
    assert path.exists()

    # Change what the model computes (not its parameters, which the store checks): a store
    # that is really loaded never calls project, and gives back the saved values.
    def poisoned(projector: object, batch: object) -> object:
        raise AssertionError("project called: the store was recomputed, not loaded")

    monkeypatch.setattr(calc.model, "project", poisoned)
    calc._placements.clear()
    loaded = list(calc.compute_influence_vector(problem.train, path))
    for (batch, vectors), original, expected in zip(loaded, problem.train, saved):
        assert batch is original
        np.testing.assert_array_equal(problem.model.to_numpy(vectors), expected)


def test_loaded_store_serves_estimate_and_top_k(numpy_problem: Problem, tmp_path, monkeypatch):
    problem = numpy_problem
    calc = problem.calc
    path = tmp_path / "vectors.npz"
    list(calc.compute_influence_vector(problem.train, path))
    expected_scores = scores_of(
        problem, calc.estimate_influence_values_in_batches(problem.queries, problem.train)
    )
    expected_top = top_k_of(problem, calc.top_k(problem.queries, problem.train, k=3))
    calls: list[int] = []
    original = calc.model.project
    monkeypatch.setattr(calc.model, "project", lambda g, b: calls.append(1) or original(g, b))
    for mode in MODES:
        calls.clear()
        got = scores_of(
            problem,
            calc.estimate_influence_values_in_batches(
                problem.queries,
                problem.train,
                influence_vector_in_cache=mode,
                load_influence_vector_path=path,
            ),
        )
        np.testing.assert_array_equal(got, expected_scores)
        assert len(calls) == 3  # the 3 query batches only: training vectors come from disk
        calls.clear()
        top = top_k_of(
            problem,
            calc.top_k(
                problem.queries,
                problem.train,
                k=3,
                influence_vector_in_cache=mode,
                load_influence_vector_ds_path=path,
            ),
        )
        np.testing.assert_array_equal(top[1], expected_top[1])
        assert len(calls) == 3


def test_store_of_another_model_or_fit_is_refused(numpy_problem: Problem, tmp_path) -> None:
    problem = numpy_problem
    path = tmp_path / "vectors.npz"
    list(problem.calc.compute_influence_vector(problem.train, path))

    other_spec = training_spec(seed=5)  # same shapes, other weights: another fingerprint
    engine = engine_class("numpy")
    other_model, other_train = build(engine, other_spec)
    other = ArnoldiInfluenceCalculator(other_model, other_train, 15, True, 15, "float64")
    with pytest.raises(
        IncompatibleStoreError, match=r"save_influence_vector_ds_path=.*another model"
    ):
        other.compute_influence_vector(other_train, path)
    with pytest.raises(IncompatibleStoreError, match=r"load_influence_vector_path=.*another model"):
        other.estimate_influence_values_in_batches(
            other_train, other_train, load_influence_vector_path=path
        )
    with pytest.raises(IncompatibleStoreError, match="load_influence_vector_ds_path"):
        list(other.top_k(other_train, other_train, load_influence_vector_ds_path=path))

    problem.calc.damping = 0.25  # same model, another fit
    problem.calc.arnoldi(15)
    with pytest.raises(IncompatibleStoreError, match="another eigenbasis"):
        problem.calc.compute_influence_vector(problem.train, path)


def test_store_for_another_training_set_is_refused(numpy_problem: Problem, tmp_path) -> None:
    problem = numpy_problem
    path = tmp_path / "vectors.npz"
    list(problem.calc.compute_influence_vector(problem.train, path))
    with pytest.raises(IncompatibleStoreError, match="another training set"):
        list(problem.calc.compute_influence_vector(problem.train[:3], path))


def test_corrupt_file_is_refused_clearly(numpy_problem: Problem, tmp_path) -> None:
    path = tmp_path / "vectors.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(IncompatibleStoreError, match="not a krylov_influence archive"):
        numpy_problem.calc.compute_influence_vector(numpy_problem.train, path)


def _key() -> StoreKey:
    return StoreKey("f" * 32, "e" * 32, "float64", 3)


def _with_losses(blocks: list[np.ndarray]) -> Any:
    """``(vectors, losses)`` pairs as ``write_disk_store`` takes them (losses: row sums)."""
    return iter([(block, block.sum(axis=1)) for block in blocks])


def test_interrupted_write_keeps_the_previous_store(tmp_path, monkeypatch) -> None:
    path = tmp_path / "store.npz"
    rng = np.random.default_rng(0)
    first = [rng.standard_normal((4, 3)) for _ in range(3)]
    write_disk_store(path, _key(), _with_losses(first))
    before = path.read_bytes()

    real_write = np.lib.format.write_array
    written: list[int] = []

    def crash_mid_write(*args: object, **kwargs: object) -> None:
        if len(written) == 4:
            raise KeyboardInterrupt("simulated crash after two blocks (and their losses)")
        written.append(1)
        real_write(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", crash_mid_write)
    second = [rng.standard_normal((4, 3)) for _ in range(5)]
    with pytest.raises(KeyboardInterrupt):
        write_disk_store(path, _key(), _with_losses(second))
    monkeypatch.undo()

    assert path.read_bytes() == before  # untouched, still the complete first store
    store = DiskStore(path)
    for got, expected in zip(store.blocks(lambda a: a), first, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert os.listdir(tmp_path) == ["store.npz"]  # no temporary file left behind


def test_crash_before_rename_leaves_no_store(tmp_path, monkeypatch) -> None:
    path = tmp_path / "store.npz"

    def crash(*args: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        write_disk_store(path, _key(), _with_losses([np.ones((2, 3))]))
    assert os.listdir(tmp_path) == []


def test_interrupted_calculator_write_leaves_no_store(
    numpy_problem: Problem, tmp_path, monkeypatch
) -> None:
    problem = numpy_problem
    path = tmp_path / "vectors.npz"
    original = problem.model.project
    seen: list[int] = []

    def failing(projector: object, batch: object) -> object:
        seen.append(1)
        if len(seen) == 3:
            raise RuntimeError("simulated failure in the third training batch")
        return original(projector, batch)

    monkeypatch.setattr(problem.model, "project", failing)
    with pytest.raises(RuntimeError, match="third"):
        problem.calc.compute_influence_vector(problem.train, path)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    # The next call computes and saves a complete store.
    assert len(list(problem.calc.compute_influence_vector(problem.train, path))) == 5
    assert len(DiskStore(path).batch_sizes) == 5


def test_saved_influence_values_and_top_k(numpy_problem: Problem, tmp_path) -> None:
    problem = numpy_problem
    calc = problem.calc
    plain = scores_of(
        problem, calc.estimate_influence_values_in_batches(problem.queries, problem.train)
    )
    values_path = tmp_path / "values.npz"
    saved_stream = calc.estimate_influence_values_in_batches(
        problem.queries, problem.train, save_influence_value_path=values_path
    )
    assert values_path.exists()  # written at call time
    np.testing.assert_array_equal(scores_of(problem, saved_stream), plain)
    archive = np.load(values_path)
    np.testing.assert_array_equal(archive["scores_000002_000004"], plain[6:7, 20:23])

    vectors_path = tmp_path / "train"
    vectors_path.mkdir()  # a directory, as influenciae took: the store goes inside
    top_path = tmp_path / "top.npz"
    stream = calc.top_k(
        problem.queries,
        problem.train,
        k=3,
        order=ORDER.ASCENDING,
        save_influence_vector_ds_path=vectors_path,
        save_top_k_ds_path=top_path,
    )
    assert (vectors_path / "influence_vectors.npz").exists() and top_path.exists()
    values, indices = top_k_of(problem, stream)
    np.testing.assert_array_equal(indices, np.argsort(plain, axis=1, kind="stable")[:, :3])
    archive = np.load(top_path)
    np.testing.assert_array_equal(archive["indices_000000"], indices[:3])
    np.testing.assert_array_equal(archive["values_000002"], values[6:])


def test_disk_scratch_store_lives_as_long_as_its_stream(numpy_problem: Problem) -> None:
    import gc

    calc = numpy_problem.calc
    stream = calc.top_k(
        numpy_problem.queries, numpy_problem.train, k=2, influence_vector_in_cache=CACHE.DISK
    )
    assert calc._scratch_dir is not None
    assert len(os.listdir(calc._scratch_dir)) == 1
    first = top_k_of(numpy_problem, stream)
    np.testing.assert_array_equal(top_k_of(numpy_problem, stream)[1], first[1])  # re-iterable
    del stream
    gc.collect()
    assert os.listdir(calc._scratch_dir) == []
