"""Bad input gets a clear error naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
from calculator_support import Problem, build, engine_class, softmax_hessian, training_spec

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


def test_a_call_ported_from_influenciae_is_not_a_silent_full_rank_fit(
    numpy_problem: Problem,
) -> None:
    # influenciae's arnoldi(dim) takes the start vector's length, always p, and keeps
    # subspace_dim; here dim is the subspace dimension, so arnoldi(p) would mean p HVPs.
    train = numpy_problem.train
    calc = ArnoldiInfluenceCalculator(numpy_problem.model, train, 6, True, 4, "float64")
    p = numpy_problem.model.num_parameters
    assert calc.subspace_dim < p
    before = np.asarray(calc.eig_vals)
    with pytest.raises(ValueError, match=rf"dim={p}: that is p.*Call arnoldi\(\)"):
        calc.arnoldi(p)
    assert calc.subspace_dim == 6
    eig_vals, _ = calc.arnoldi()  # what the ported call meant: refit with subspace_dim
    assert calc.subspace_dim == 6
    np.testing.assert_array_equal(np.asarray(eig_vals), before)  # same seed, same basis
    calc.subspace_dim = p  # a full-rank refit, asked for explicitly, is exact
    eig_vals, _ = calc.arnoldi(p)
    exact = np.linalg.eigvalsh(softmax_hessian(numpy_problem.spec)) + calc.damping
    top = np.sort(exact)[::-1][:4]  # convex: the largest magnitudes are the largest values
    np.testing.assert_allclose(np.sort(np.asarray(eig_vals))[::-1], top, rtol=1e-9)


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


def test_unclear_inputs_get_errors_that_name_the_argument(setup, numpy_problem: Problem):
    model, train = setup
    with pytest.raises(TypeError, match="train_dataset: expected a re-iterable dataset"):
        ArnoldiInfluenceCalculator(model, None, 5, True, 4)
    for seed in (None, 1.7, -1, True):
        with pytest.raises(TypeError, match=f"seed={seed!r}: expected an integer >= 0"):
            ArnoldiInfluenceCalculator(model, train, 5, True, 4, seed=seed)
    for damping in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"damping=.*expected a finite number >= 0"):
            ArnoldiInfluenceCalculator(model, train, 5, True, 4, damping=damping)
    calc, queries = numpy_problem.calc, numpy_problem.queries
    empty = (queries[0][0][:0], queries[0][1][:0])
    with pytest.raises(ValueError, match="dataset_to_evaluate: batch 1 is empty"):
        list(calc.top_k([queries[0], empty], train, k=2))
    with pytest.raises(TypeError, match="indices: expected integers"):
        calc.locate_examples(train, np.array([1.0, 2.7]))
    wrapped = [(train[0][0], np.where(train[0][1] == 0, -1, train[0][1]))]
    with pytest.raises(ValueError, match=r"class labels in \[0, 3\), got -1"):
        calc.self_influence(wrapped)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value):RuntimeWarning")  # the overflow
def test_an_overflowing_hessian_names_the_batch() -> None:
    from krylov_influence.reference import LinearRegression

    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 3)), rng.standard_normal(4)) for _ in range(3)]
    # x xᵀ overflows float64 while the loss ½(xᵀw − y)² stays small (w is tiny).
    batches[1] = (batches[1][0] * 1e155, batches[1][1])
    model = LinearRegression(rng.standard_normal(3) * 1e-160, np.zeros(1), l2=0.1)
    with pytest.raises(NonFiniteError, match="batch 1 of train_dataset gives non-finite Hessian"):
        ArnoldiInfluenceCalculator(model, batches, 3, True, 2, "float64")


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # the overflow under test
def test_float32_score_overflow_is_an_error_not_inf(numpy_problem: Problem) -> None:
    spec = numpy_problem.spec
    model, train = build(engine_class("numpy"), spec, "float32")
    calc = ArnoldiInfluenceCalculator(model, train, 15, True, 15, "float32")
    huge = [(train[0][0] * np.float32(1e30), train[0][1])]  # P ~ 1e30 fits, P² overflows
    with pytest.raises(NonFiniteError, match="train_set: batch 0 gives non-finite self-infl"):
        calc.self_influence(huge)
    with pytest.raises(NonFiniteError, match=r"non-finite (scores|top-k scores)"):
        list(calc.top_k(huge, huge, k=2))
    with pytest.raises(NonFiniteError, match="non-finite"):
        calc.influence_matrix(huge, huge)


def test_a_torch_model_on_the_meta_device_is_refused_clearly() -> None:
    torch = pytest.importorskip("torch")
    import krylov_influence as ki

    loss = torch.nn.CrossEntropyLoss(reduction="none")
    net = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"device='meta': .*meta tensors"):
        ki.InfluenceModel(net, loss, device="meta")
    with pytest.raises(ValueError, match=r"device=None: .*meta tensors"):
        ki.InfluenceModel(torch.nn.Linear(3, 2, device="meta"), loss)


def test_label_dtypes_are_consistent_and_errors_name_the_batch() -> None:
    torch = pytest.importorskip("torch")
    import krylov_influence as ki

    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    net = torch.nn.Linear(4, 3).double().eval()
    model = ki.InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    calc = ki.ArnoldiInfluenceCalculator(model, [(x, y)], 15, True, 5)
    # int32 labels (torch or NumPy) are int64 labels: the same numbers.
    for labels in (y.to(torch.int32), y.numpy().astype(np.int32), y.numpy()):
        np.testing.assert_array_equal(
            calc.self_influence([(x, labels)]), calc.self_influence([(x, y)])
        )
    bad = [(x, y), (x, torch.rand(32, 5, dtype=torch.float64))]  # targets of another shape
    with pytest.raises(RuntimeError, match=r"train_dataset: batch 1 cannot be evaluated"):
        ki.ArnoldiInfluenceCalculator(model, bad, 15, True, 5)
    with pytest.raises(Exception, match=r"train_set: batch 1 cannot be projected"):
        calc.self_influence(bad)
