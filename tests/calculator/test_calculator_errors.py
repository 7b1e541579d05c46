"""Bad input gets a clear error naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
from calculator_support import Problem, build, engine_class, training_spec

from krylov_influence import (
    CACHE,
    ArnoldiInfluenceCalculator,
    LinearNearestNeighbors,
    NonFiniteError,
)


@pytest.fixture
def setup() -> tuple[object, list]:
    return build(engine_class("numpy"), training_spec())


def test_constructor_arguments(setup) -> None:
    model, train = setup
    with pytest.raises(ValueError, match="k_largest_eig_vals=6: expected at most subspace_dim = 5"):
        ArnoldiInfluenceCalculator(model, train, 5, True, 6)
    with pytest.raises(ValueError, match="subspace_dim=16: expected at most p = 15"):
        ArnoldiInfluenceCalculator(model, train, 16, True, 4)
    with pytest.raises(ValueError, match="train_dataset: the dataset is empty"):
        ArnoldiInfluenceCalculator(model, [], 5, True, 4)
    with pytest.raises(TypeError, match="one-shot iterator"):
        ArnoldiInfluenceCalculator(model, iter(train), 5, True, 4)
    poisoned = [*train[:2], (np.full_like(train[2][0], np.nan), train[2][1]), *train[3:]]
    with pytest.raises(NonFiniteError, match="batch 2 has non-finite losses"):
        ArnoldiInfluenceCalculator(model, poisoned, 5, True, 4)


def test_method_arguments(numpy_problem: Problem) -> None:
    calc, train, queries = numpy_problem.calc, numpy_problem.train, numpy_problem.queries
    with pytest.raises(ValueError, match=r"k=24: expected at most the number of training"):
        calc.compute_top_k_from_training_dataset(train, 24)
    for mode in (CACHE.MEMORY, CACHE.DISK):
        with pytest.raises(ValueError, match=r"k=24: expected at most .* \(23\)"):
            calc.top_k(queries, train, k=24, influence_vector_in_cache=mode)
    with pytest.raises(ValueError, match=r"k=24: expected at most .* \(23\)"):
        list(calc.top_k(queries, train, k=24, influence_vector_in_cache=CACHE.NO_CACHE))
    with pytest.raises(ValueError, match="k=0: expected a positive integer"):
        calc.top_k(queries, train, k=0)
    with pytest.raises(ValueError, match="order='descending'"):
        calc.top_k(queries, train, order="descending")
    with pytest.raises(ValueError, match="order=7"):
        calc.compute_top_k_from_training_dataset(train, 2, order=7)
    with pytest.raises(ValueError, match="influence_vector_in_cache=3"):
        calc.top_k(queries, train, influence_vector_in_cache=3)
    with pytest.raises(ValueError, match="influence_vector_in_cache='memory'"):
        calc.estimate_influence_values_in_batches(queries, train, "memory")
    with pytest.raises(TypeError, match="nearest_neighbors"):
        calc.top_k(queries, train, nearest_neighbors=LinearNearestNeighbors)
    with pytest.raises(ValueError, match="dim=0"):
        calc.arnoldi(0)


def test_empty_datasets(numpy_problem: Problem) -> None:
    calc, train = numpy_problem.calc, numpy_problem.train
    with pytest.raises(ValueError, match="train_set: the dataset is empty"):
        calc.compute_influence_values([])
    with pytest.raises(ValueError, match="train_set: the dataset is empty"):
        calc.compute_influence_vector([])
    with pytest.raises(ValueError, match="train_set: the dataset is empty"):
        calc.compute_top_k_from_training_dataset([], 1)
    with pytest.raises(ValueError, match="dataset_to_evaluate: the dataset is empty"):
        calc.top_k([], train)
    with pytest.raises(ValueError, match="train_set: the dataset is empty"):
        calc.top_k(train, [])
    with pytest.raises(ValueError, match="dataset_to_evaluate: the dataset is empty"):
        calc.estimate_influence_values_in_batches([], train)

    class Empty:  # a re-iterable without a length: found empty at iteration
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="train_set: the dataset is empty"):
        list(calc.compute_influence_values(Empty()))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the inf input itself
def test_non_finite_query_names_the_batch(numpy_problem: Problem) -> None:
    calc, train, queries = numpy_problem.calc, numpy_problem.train, numpy_problem.queries
    bad = [queries[0], (np.full_like(queries[1][0], np.inf), queries[1][1])]
    stream = calc.top_k(bad, train, k=2)
    with pytest.raises(NonFiniteError, match="dataset_to_evaluate: batch 1"):
        list(stream)
