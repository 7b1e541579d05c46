"""``cache_training_vectors``: training vectors kept across calls, reused only when safe."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from calculator_support import Problem, scores_of, top_k_of

from krylov_influence import CACHE, IncompatibleStoreError


class ProjectionCounter:
    """Wraps ``model.project`` and counts the examples it projects."""

    def __init__(self, problem: Problem, monkeypatch: Any):
        self.examples = 0
        model = problem.calc.model
        original = model.project

        def counting(projector: Any, batch: Any) -> Any:
            self.examples += model.batch_size(batch)
            return original(projector, batch)

        monkeypatch.setattr(model, "project", counting)


def host(problem: Problem, stream: Any) -> np.ndarray:
    return np.concatenate([problem.model.to_numpy(values) for _, values in stream])


def test_kept_vectors_give_the_results_of_recomputing_and_match_exact(
    problem: Problem, monkeypatch: Any
) -> None:
    calc, train, queries = problem.calc, problem.train, problem.queries
    scores = calc.influence_matrix(queries, train)
    self_influence = calc.self_influence(train)
    vectors = host(problem, calc.compute_influence_vector(train))
    top_values, top_indices = top_k_of(problem, calc.top_k(queries, train, k=4))
    training_top = calc.compute_top_k_from_training_dataset(train, 5)

    assert calc.cache_training_vectors(train) == problem.spec.x.shape[0]
    counter = ProjectionCounter(problem, monkeypatch)
    num_queries = problem.scores.shape[0]
    for mode in (CACHE.MEMORY, CACHE.DISK, CACHE.NO_CACHE):
        stream = calc.estimate_influence_values_in_batches(
            queries, train, influence_vector_in_cache=mode
        )
        # The same vectors in the same products: equal to the last bit.
        np.testing.assert_array_equal(scores_of(problem, stream), scores)
    assert counter.examples == 3 * num_queries  # only the queries were projected

    counter.examples = 0
    np.testing.assert_array_equal(host(problem, calc.compute_influence_vector(train)), vectors)
    kept_values, kept_indices = top_k_of(problem, calc.top_k(queries, train, k=4))
    np.testing.assert_array_equal(kept_values, top_values)
    np.testing.assert_array_equal(kept_indices, top_indices)
    # Self-influence from the kept vectors is Σ v²(λ+δ), not Σ P²/(λ+δ): round-off only.
    np.testing.assert_allclose(calc.self_influence(train), self_influence, rtol=problem.rtol)
    # Against the oracle relative to the largest value: on the indefinite MLP self-influence
    # changes sign, so a value near zero carries the round-off of the large ones.
    scale = np.max(np.abs(problem.self_influence))
    np.testing.assert_allclose(
        calc.self_influence(train), problem.self_influence, rtol=0, atol=1e-8 * scale
    )
    kept_top = calc.compute_top_k_from_training_dataset(train, 5)
    np.testing.assert_array_equal(
        problem.model.to_numpy(kept_top.indices), problem.model.to_numpy(training_top.indices)
    )
    assert counter.examples == num_queries  # the top_k call's queries, nothing of train


def test_another_object_or_a_refit_recomputes(numpy_problem: Problem, monkeypatch: Any) -> None:
    problem = numpy_problem
    calc, train = problem.calc, problem.train
    calc.cache_training_vectors(train)
    counter = ProjectionCounter(problem, monkeypatch)
    num_train = problem.spec.x.shape[0]

    equal_copy = list(train)  # equal content, another object: never assumed to be the same
    np.testing.assert_allclose(calc.self_influence(equal_copy), problem.self_influence, rtol=1e-8)
    assert counter.examples == num_train

    counter.examples = 0
    calc.self_influence(train)
    assert counter.examples == 0

    calc.clear_training_vectors()
    calc.self_influence(train)
    assert counter.examples == num_train

    calc.cache_training_vectors(train)
    calc.arnoldi(calc.subspace_dim)  # a refit: the kept vectors belong to the old basis
    counter.examples = 0
    np.testing.assert_allclose(calc.self_influence(train), problem.self_influence, rtol=1e-8)
    assert counter.examples == num_train


def test_changed_batches_are_refused(numpy_problem: Problem) -> None:
    calc = numpy_problem.calc
    train = list(numpy_problem.train)
    calc.cache_training_vectors(train)
    train.append(train[0])  # changed in place after caching
    with pytest.raises(IncompatibleStoreError, match="more batches"):
        calc.self_influence(train)
    train.pop()
    train[0] = train[-1]  # a batch of another size (the partial last one) in its place
    with pytest.raises(IncompatibleStoreError, match="batch 0 of train_set"):
        calc.influence_matrix(numpy_problem.queries, train)
    # The search scores from the vectors alone; it checks the batches all the same.
    with pytest.raises(IncompatibleStoreError, match="batch 0 of train_set"):
        top_k_of(numpy_problem, calc.top_k(numpy_problem.queries, train, k=2))
    train[0] = numpy_problem.train[0]
    train.append(train[0])
    with pytest.raises(IncompatibleStoreError, match="more batches"):
        top_k_of(numpy_problem, calc.top_k(numpy_problem.queries, train, k=2))


class PassCounter:
    """A re-iterable of batches that counts the passes which read at least one batch."""

    def __init__(self, batches: list[Any]):
        self.batches = batches
        self.passes = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        for index, batch in enumerate(self.batches):
            self.passes += index == 0
            yield batch


def test_the_score_matrix_reads_the_training_set_once(numpy_problem: Problem) -> None:
    """Whatever the number of query batches: once for the vectors, or once to check kept ones.

    The public stream yields the training batches, so it reads them once per query batch.
    """
    problem = numpy_problem
    calc = problem.calc
    queries = list(problem.queries) * 2  # several query batches
    train = PassCounter(list(problem.train))
    expected = np.concatenate([problem.scores] * 2)
    np.testing.assert_allclose(
        calc.influence_matrix(queries, train), expected, rtol=problem.rtol, atol=0
    )
    assert train.passes == 1
    train.passes = 0
    stream = calc.estimate_influence_values_in_batches(queries, train)
    np.testing.assert_allclose(scores_of(problem, stream), expected, rtol=problem.rtol, atol=0)
    assert train.passes == 1 + len(queries)

    calc.cache_training_vectors(train)
    train.passes = 0
    np.testing.assert_allclose(
        calc.influence_matrix(queries, train), expected, rtol=problem.rtol, atol=0
    )
    assert train.passes == 1  # the batch-size check of the kept vectors


def test_saving_writes_the_kept_vectors(numpy_problem: Problem, tmp_path: Any) -> None:
    calc, train = numpy_problem.calc, numpy_problem.train
    calc.cache_training_vectors(train)
    expected = host(numpy_problem, calc.compute_influence_vector(train))
    path = tmp_path / "vectors.npz"
    saved = host(numpy_problem, calc.compute_influence_vector(train, path))
    np.testing.assert_array_equal(saved, expected)
    calc.clear_training_vectors()
    reloaded = host(numpy_problem, calc.compute_influence_vector(train, path))
    np.testing.assert_array_equal(reloaded, expected)


def test_empty_training_set_is_refused(numpy_problem: Problem) -> None:
    with pytest.raises(ValueError, match="train_set"):
        numpy_problem.calc.cache_training_vectors([])
