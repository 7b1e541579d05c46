"""Every calculator method against brute force from the dense exact Hessian, on every engine.

With ``subspace_dim = k = p`` the Arnoldi result is exact up to round-off (REFERENCE.md §1), so
scores, self-influence, influence vectors and top-k results must match the dense oracle
(all pairs, sorted) to float64 round-off.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from calculator_support import Problem, make_problem, query_spec, training_spec
from hypothesis import given, settings
from hypothesis import strategies as st

from krylov_influence import CACHE, ORDER, ArnoldiInfluenceCalculator, exact
from krylov_influence.registry import get_engine
from krylov_influence.testing import random_mlp_spec


def host(problem: Problem, array: object) -> np.ndarray:
    return np.asarray(problem.model.to_numpy(array), dtype=np.float64)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """Relative to the largest entry: entries near zero carry the round-off of the big ones."""
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def test_influence_vectors_are_the_scaled_projections(problem: Problem) -> None:
    vectors = [host(problem, v) for _, v in problem.calc.compute_influence_vector(problem.train)]
    p = problem.model.num_parameters
    assert [v.shape for v in vectors] == [(5, p)] * 4 + [(3, p)]  # partial last batch
    stacked = np.concatenate(vectors)
    projector = host(problem, problem.calc.G)
    eigenvalues = host(problem, problem.calc.eig_vals)
    # v = diag(1/λ) G g, with g from the independent oracle's per-example gradients.
    assert_close(stacked, (problem.gradients @ projector.T) / eigenvalues, problem.rtol)
    # Basis-free: vᵢᵀ diag(λ) vⱼ = gᵢᵀ H⁻¹ gⱼ (the exact self-influence on the diagonal).
    gram = (stacked * eigenvalues) @ stacked.T
    assert_close(np.diag(gram), problem.self_influence, problem.rtol)


def test_influence_values_match_exact_self_influence(problem: Problem) -> None:
    stream = problem.calc.compute_influence_values(problem.train)
    batches = list(stream)
    assert len(stream) == len(problem.train) == len(batches)
    assert all(batch is original for (batch, _), original in zip(batches, problem.train))
    values = np.concatenate([host(problem, v) for _, v in batches])
    assert_close(values, problem.self_influence, problem.rtol)


def test_estimate_influence_values_matches_all_pairs(problem: Problem) -> None:
    stream = problem.calc.estimate_influence_values_in_batches(problem.queries, problem.train)
    rows = []
    for query, per_train in stream:
        blocks = [host(problem, scores) for _, scores in per_train]
        assert [b.shape[1] for b in blocks] == [5, 5, 5, 5, 3]
        assert {b.shape[0] for b in blocks} == {problem.model.batch_size(query)}
        rows.append(np.concatenate(blocks, axis=1))
    assert_close(np.concatenate(rows), problem.scores, problem.rtol)


def test_queries_are_projected_once_per_query_batch(numpy_problem: Problem, monkeypatch) -> None:
    problem = numpy_problem
    calls: list[int] = []
    original = problem.model.project

    def counting(projector: object, batch: object) -> object:
        calls.append(problem.model.batch_size(batch))
        return original(projector, batch)

    monkeypatch.setattr(problem.model, "project", counting)
    stream = problem.calc.estimate_influence_values_in_batches(problem.queries, problem.train)
    assert len(calls) == 5  # the training set, once, into the memory cache
    for _, per_train in stream:
        for _ in per_train:
            pass
        for _ in per_train:  # the inner stream is re-iterable and reuses the projections
            pass
    assert len(calls) == 5 + 3  # plus one call per query batch, never per training batch


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k_matches_sorted_brute_force(problem: Problem, order: ORDER) -> None:
    k = 4
    results = list(problem.calc.top_k(problem.queries, problem.train, k=k, order=order))
    assert [r.values.shape for r in results] == [(3, k), (3, k), (1, k)]
    values = np.concatenate([host(problem, r.values) for r in results])
    indices = np.concatenate([problem.model.to_numpy(r.indices) for r in results])
    assert indices.dtype == np.int64
    sign = -1.0 if order is ORDER.DESCENDING else 1.0
    expected_indices = np.argsort(sign * problem.scores, axis=1, kind="stable")[:, :k]
    expected_values = np.take_along_axis(problem.scores, expected_indices, axis=1)
    assert_close(values, expected_values, problem.rtol)
    np.testing.assert_array_equal(indices, expected_indices)
    # The indices point to the samples whose exact score is the reported value.
    assert_close(np.take_along_axis(problem.scores, indices, axis=1), values, problem.rtol)


def test_top_k_indices_locate_the_training_examples(numpy_problem: Problem) -> None:
    problem = numpy_problem
    result = next(iter(problem.calc.top_k(problem.queries, problem.train, k=6)))
    batch_numbers, rows = problem.calc.locate_examples(problem.train, result.indices)
    located = np.stack(
        [problem.train[b][0][r] for b, r in zip(batch_numbers.ravel(), rows.ravel())]
    )
    np.testing.assert_array_equal(located, problem.spec.x[result.indices.ravel()])
    with pytest.raises(IndexError, match="indices"):
        problem.calc.locate_examples(problem.train, np.array([23]))


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_top_k_from_training_dataset(problem: Problem, order: ORDER) -> None:
    k = 5
    result = problem.calc.compute_top_k_from_training_dataset(problem.train, k, order=order)
    indices, values = result  # influenciae's positions: (samples -> indices, values)
    sign = -1.0 if order is ORDER.DESCENDING else 1.0
    expected = np.argsort(sign * problem.self_influence, kind="stable")[:k]
    np.testing.assert_array_equal(problem.model.to_numpy(indices), expected)
    assert_close(host(problem, values), problem.self_influence[expected], problem.rtol)
    assert host(problem, result.values).shape == (k,)


def test_truncated_basis_matches_the_exact_truncated_inverse(engine: object) -> None:
    """k < p with subspace_dim = p: the exact top-k eigenpairs, so V_k diag(1/(λ+δ)) V_kᵀ."""
    problem = make_problem(engine, k=4, damping=0.05)
    reference = get_engine("numpy")
    ref_model, ref_train = reference.from_neutral_spec(problem.spec)
    _, ref_queries = reference.from_neutral_spec(query_spec(problem.spec))
    inverse = exact.truncated_inverse_hessian(
        exact.dense_hessian(ref_model, ref_train), 4, damping=0.05
    )
    expected = exact.exact_influence(ref_model, ref_train, ref_queries, inverse=inverse)
    # Eigenvectors of a p = 15 Hessian carry round-off times the inverse eigengap: 1e-7
    # relative instead of the 1e-9 of the full-rank checks.
    assert_close(problem.calc.influence_matrix(problem.queries, problem.train), expected, 1e-7)
    self_expected = exact.exact_self_influence(ref_model, ref_train, inverse=inverse)
    assert_close(problem.calc.self_influence(problem.train), self_expected, 1e-7)
    # And it is not the full inverse: the truncation is visible at this size.
    assert np.max(np.abs(expected - problem.scores)) > 1e-3 * np.max(np.abs(problem.scores))


def test_streams_are_lazy_and_reiterable(numpy_problem: Problem, monkeypatch) -> None:
    problem = numpy_problem
    calls: list[int] = []
    original = problem.model.project
    monkeypatch.setattr(problem.model, "project", lambda g, b: calls.append(1) or original(g, b))
    stream = problem.calc.compute_influence_values(problem.train)
    assert calls == []  # nothing computed before iteration
    first = [v for _, v in stream]
    second = [v for _, v in stream]
    assert len(calls) == 10
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_d_type_float32_search_on_a_float64_model(numpy_problem: Problem) -> None:
    problem = numpy_problem
    results = list(problem.calc.top_k(problem.queries, problem.train, k=3, d_type="float32"))
    assert all(r.values.dtype == np.float32 for r in results)
    values = np.concatenate([r.values for r in results]).astype(np.float64)
    expected = -np.sort(-problem.scores, axis=1)[:, :3]
    # float32 scores: rtol = 4 sqrt(eps32) of the largest score.
    assert_close(values, expected, 4 * np.sqrt(np.finfo(np.float32).eps))


def test_device_is_honoured_and_checked(numpy_problem: Problem) -> None:
    problem = numpy_problem
    on_cpu = problem.calc.self_influence(problem.train, device="cpu")
    assert_close(on_cpu, problem.self_influence, problem.rtol)
    for method, args in [
        ("compute_influence_values", (problem.train,)),
        ("compute_influence_vector", (problem.train,)),
        ("estimate_influence_values_in_batches", (problem.queries, problem.train)),
        ("top_k", (problem.queries, problem.train)),
    ]:
        with pytest.raises(ValueError, match="device='cuda:3'"):
            getattr(problem.calc, method)(*args, device="cuda:3")
    with pytest.raises(ValueError, match="device='cuda:3'"):
        problem.calc.compute_top_k_from_training_dataset(problem.train, 2, device="cuda:3")


def test_progress_bars_run(capsys) -> None:
    """Bars change nothing of the numbers, and count what is iterated: the Arnoldi steps and
    the 5 batches of the evaluated dataset."""
    model, train = get_engine("numpy").from_neutral_spec(training_spec())
    results = {}
    for show in (True, False):
        calc = ArnoldiInfluenceCalculator(model, train, 15, True, 15, "float64", show_progress=show)
        stream = calc.top_k(train, train, k=2, influence_vector_in_cache=CACHE.NO_CACHE)
        results[show] = [(r.values, r.indices) for r in stream]
        err = capsys.readouterr().err
        if show:
            assert re.search(r"Arnoldi.*\|\s*\d+/15 ", err), err
            assert re.search(r"dataset_to_evaluate.*\|\s*\d+/5 ", err), err
        else:
            assert err == ""
    for (values, indices), (plain_values, plain_indices) in zip(*results.values(), strict=True):
        np.testing.assert_array_equal(values, plain_values)
        np.testing.assert_array_equal(indices, plain_indices)
    scores = exact.exact_influence(model, train, train)
    expected = -np.sort(-scores, axis=1)[:, :2]
    assert_close(np.concatenate([v for v, _ in results[True]]), expected, 1e-9)


def test_explicit_device_gives_the_same_results(problem: Problem) -> None:
    """Every engine accepts its own device by name (engines with several test more)."""
    device = problem.model.device
    default = problem.calc.self_influence(problem.train)
    np.testing.assert_array_equal(
        problem.calc.self_influence(problem.train, device=device), default
    )
    top = next(iter(problem.calc.top_k(problem.queries, problem.train, k=2, device=device)))
    first = next(iter(problem.calc.top_k(problem.queries, problem.train, k=2)))
    np.testing.assert_array_equal(
        problem.model.to_numpy(top.indices), problem.model.to_numpy(first.indices)
    )


@settings(deadline=None)
@given(
    sizes=st.tuples(st.integers(2, 5), st.integers(2, 4)),
    n_train=st.integers(3, 30),
    n_query=st.integers(1, 9),
    batch=st.integers(1, 7),
    k_fraction=st.floats(0.0, 1.0),
    order=st.sampled_from(list(ORDER)),
    cache=st.sampled_from(list(CACHE)),
    seed=st.integers(0, 2**16),
)
def test_top_k_on_random_problems(sizes, n_train, n_query, batch, k_fraction, order, cache, seed):
    """Random sizes, batchings (partial batches) and k, on the NumPy engine, vs brute force."""
    rng = np.random.default_rng(seed)
    spec = random_mlp_spec(rng, sizes, num_examples=n_train, batch_size=batch, l2=0.1)
    queries_spec = query_spec(spec, seed + 1, num_examples=n_query, batch_size=batch)
    reference = get_engine("numpy")
    model, train = reference.from_neutral_spec(spec)
    _, queries = reference.from_neutral_spec(queries_spec)
    p = model.num_parameters
    calc = ArnoldiInfluenceCalculator(model, train, p, True, p, "float64")
    k = 1 + int(k_fraction * (n_train - 1))
    results = list(calc.top_k(queries, train, k=k, order=order, influence_vector_in_cache=cache))
    values = np.concatenate([r.values for r in results])
    indices = np.concatenate([r.indices for r in results])
    scores = exact.exact_influence(model, train, queries)
    sign = -1.0 if order is ORDER.DESCENDING else 1.0
    expected = np.take_along_axis(scores, np.argsort(sign * scores, axis=1)[:, :k], axis=1)
    assert values.shape == indices.shape == (n_query, k)
    assert_close(values, expected, 1e-9)
    # Indices are distinct and point at training examples with exactly those scores (robust
    # to the order of near-ties, which round-off may swap).
    assert all(len(set(row)) == k for row in indices.tolist())
    assert_close(np.take_along_axis(scores, indices, axis=1), values, 1e-9)


def test_fitted_state_is_placed_once_per_device(numpy_problem: Problem, monkeypatch) -> None:
    problem = numpy_problem
    calls: list[object] = []
    original = problem.model.on_device
    monkeypatch.setattr(problem.model, "on_device", lambda d: calls.append(d) or original(d))
    for _ in range(3):
        problem.calc.self_influence(problem.train, device="cpu")
        list(problem.calc.top_k(problem.queries, problem.train, k=1, device="cpu"))
    assert calls == ["cpu"]


def test_float32_end_to_end(engine: object, tmp_path) -> None:
    """float32 model and basis: every dtype path (projector cast, stores, search) in float32."""
    from calculator_support import build

    spec = training_spec()
    model, train = build(engine, spec, dtype="float32")
    _, queries = build(engine, query_spec(spec), dtype="float32")
    calc = ArnoldiInfluenceCalculator(model, train, 15, True, 15, "float32")
    reference = get_engine("numpy")
    ref_model, ref_train = reference.from_neutral_spec(spec)
    _, ref_queries = reference.from_neutral_spec(query_spec(spec))
    scores = exact.exact_influence(ref_model, ref_train, ref_queries)
    # float32 throughout: the project's 4 sqrt(eps) of the largest score (measured: ~2e-7 in
    # every engine, the Hessian is well conditioned).
    rtol = 4 * np.sqrt(np.finfo(np.float32).eps)
    results = list(
        calc.top_k(
            queries,
            train,
            k=3,
            influence_vector_in_cache=CACHE.DISK,
            save_influence_vector_ds_path=tmp_path / "v.npz",
        )
    )
    values = np.concatenate([model.to_numpy(r.values) for r in results])
    indices = np.concatenate([model.to_numpy(r.indices) for r in results])
    assert values.dtype == np.float32
    assert_close(values.astype(np.float64), -np.sort(-scores, axis=1)[:, :3], rtol)
    assert_close(np.take_along_axis(scores, indices, axis=1), values.astype(np.float64), rtol)
    stored = [
        model.to_numpy(v) for _, v in calc.compute_influence_vector(train, tmp_path / "v.npz")
    ]
    assert all(v.dtype == np.float32 for v in stored)
