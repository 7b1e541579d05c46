"""The spectral complement: ``H⁻¹ ≈ Gᵀ diag(1/(λ+δ)) G + (I − GᵀG)/(c + δ)`` in every method.

Oracles: per-example gradients of the NumPy reference engine on the same neutral spec (no code
path shared with the engine under test), the dense formula built from the fit's own ``G``,
``λ`` and ``c``, and the exact inverse where the discarded spectrum is exactly isotropic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from calculator_support import build, engine_class, query_spec

from krylov_influence import CACHE, ArnoldiInfluenceCalculator, LinearNearestNeighbors, exact
from krylov_influence.registry import get_engine
from krylov_influence.testing import random_mlp_spec

DAMPING = 0.05


def _isotropic_spec() -> object:
    """Least squares with p = 20 > N = 6: H = ZᵀZ/N + l2·I has 14 eigenvalues equal to l2."""
    rng = np.random.default_rng(7)
    spec = random_mlp_spec(rng, (19, 1), loss="mse", num_examples=6, batch_size=4, l2=0.3)
    return spec


def _reference(spec: object) -> tuple[object, list]:
    return get_engine("numpy").from_neutral_spec(spec)


def _dense_formula(calc: ArnoldiInfluenceCalculator, model: object) -> np.ndarray:
    g = np.asarray(model.to_numpy(calc.G), dtype=np.float64)
    basis = calc.eigenbasis
    inverse = g.T @ np.diag(basis.inverse_eigenvalues) @ g
    c = basis.complement.value
    return inverse + (np.eye(g.shape[1]) - g.T @ g) / (c + basis.damping)


@pytest.mark.parametrize("complement", [0.7, "mean"])
def test_every_method_applies_the_complement(engine: object, complement: object, tmp_path) -> None:
    spec = random_mlp_spec(np.random.default_rng(0), (4, 3), num_examples=23, batch_size=5)
    model, train = build(engine, spec)
    _, queries = build(engine, query_spec(spec))
    calc = ArnoldiInfluenceCalculator(
        model, train, 10, True, 5, damping=DAMPING, complement=complement
    )
    ref_model, ref_train = _reference(spec)
    _, ref_queries = _reference(query_spec(spec))
    gx = exact.per_example_gradients(ref_model, ref_train)
    gz = exact.per_example_gradients(ref_model, ref_queries)
    inverse = _dense_formula(calc, model)
    expected_self = np.einsum("ip,pq,iq->i", gx, inverse, gx)
    expected_scores = gz @ inverse @ gx.T
    rtol = 1e-10
    np.testing.assert_allclose(calc.self_influence(train), expected_self, rtol=rtol)
    scale = np.max(np.abs(expected_scores))
    np.testing.assert_allclose(
        calc.influence_matrix(queries, train), expected_scores, rtol=0, atol=rtol * scale
    )
    values, indices = top_k_of_problem(model, calc.top_k(queries, train, k=4))
    np.testing.assert_array_equal(
        indices, np.argsort(-expected_scores, axis=1, kind="stable")[:, :4]
    )
    np.testing.assert_allclose(
        values, np.sort(expected_scores, axis=1)[:, ::-1][:, :4], rtol=0, atol=rtol * scale
    )
    # Every source of the training vectors (recomputed, a scratch store, a saved store and
    # that store loaded back) gives the same complement scores: the gradient pass is fused
    # with the vectors only where no store is read.
    saved = tmp_path / "vectors.npz"
    sources = [
        {"influence_vector_in_cache": CACHE.NO_CACHE},
        {"influence_vector_in_cache": CACHE.DISK},
        {"save_influence_vector_path": saved},
        {"load_influence_vector_path": saved, "influence_vector_in_cache": CACHE.NO_CACHE},
        {"load_influence_vector_path": saved},
    ]
    for options in sources:
        blocks = [
            np.concatenate([model.to_numpy(s) for _, s in per_train], axis=1)
            for _, per_train in calc.estimate_influence_values_in_batches(queries, train, **options)
        ]
        np.testing.assert_allclose(
            np.concatenate(blocks), expected_scores, rtol=0, atol=rtol * scale, err_msg=str(options)
        )
    # Kept training vectors (cache_training_vectors) give the same numbers.
    calc.cache_training_vectors(train)
    np.testing.assert_allclose(calc.self_influence(train), expected_self, rtol=rtol)
    np.testing.assert_allclose(
        calc.influence_matrix(queries, train), expected_scores, rtol=0, atol=rtol * scale
    )
    # And the truncation alone differs: the complement is really there.
    plain = ArnoldiInfluenceCalculator(model, train, 10, True, 5, damping=DAMPING)
    assert np.max(np.abs(plain.self_influence(train) - expected_self)) > 1e-3 * scale


def top_k_of_problem(model: object, stream: object) -> tuple[np.ndarray, np.ndarray]:
    results = list(stream)
    values = np.concatenate([model.to_numpy(r.values) for r in results])
    indices = np.concatenate([model.to_numpy(r.indices) for r in results])
    return values, indices


def test_with_k_equal_p_the_complement_changes_nothing(engine: object) -> None:
    spec = random_mlp_spec(np.random.default_rng(0), (4, 3), num_examples=23, batch_size=5)
    model, train = build(engine, spec)
    p = model.num_parameters
    with_complement = ArnoldiInfluenceCalculator(
        model, train, p, True, p, damping=DAMPING, complement="mean"
    )
    plain = ArnoldiInfluenceCalculator(model, train, p, True, p, damping=DAMPING)
    ref_model, ref_train = _reference(spec)
    expected = exact.exact_self_influence(ref_model, ref_train, damping=DAMPING)
    np.testing.assert_allclose(with_complement.self_influence(train), expected, rtol=1e-9)
    np.testing.assert_allclose(plain.self_influence(train), expected, rtol=1e-9)


def test_an_isotropic_remainder_is_recovered_exactly(engine: object) -> None:
    spec = _isotropic_spec()
    model, train = build(engine, spec)
    _, queries = build(engine, dataclasses.replace(spec, batch_size=3))
    ref_model, ref_train = _reference(spec)
    hessian = exact.dense_hessian(ref_model, ref_train)
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert np.sum(np.isclose(eigenvalues, 0.3, rtol=1e-10)) == 14  # the premise
    exact_inverse = exact.inverse_hessian(hessian, DAMPING)
    gx = exact.per_example_gradients(ref_model, ref_train)
    expected = np.einsum("ip,pq,iq->i", gx, exact_inverse, gx)

    given = ArnoldiInfluenceCalculator(model, train, 10, True, 8, damping=DAMPING, complement=0.3)
    np.testing.assert_allclose(given.self_influence(train), expected, rtol=1e-9)
    np.testing.assert_allclose(
        given.influence_matrix(queries, train), gx @ exact_inverse @ gx.T, rtol=1e-9, atol=1e-12
    )
    estimated = ArnoldiInfluenceCalculator(
        model, train, 10, True, 8, damping=DAMPING, complement="mean", complement_probes=30
    )
    found = estimated.eigenbasis.complement
    assert found.method == "mean" and found.probes == 30 and found.stderr > 0
    assert abs(found.value - 0.3) <= 4 * found.stderr  # within its stated error
    relative = abs(found.value - 0.3) / (0.3 + DAMPING)
    np.testing.assert_allclose(estimated.self_influence(train), expected, rtol=2 * relative + 1e-9)
    truncated = ArnoldiInfluenceCalculator(model, train, 10, True, 8, damping=DAMPING)
    assert np.max(np.abs(truncated.self_influence(train) - expected) / expected) > 0.05


def test_the_complement_is_saved_and_loaded(numpy_problem: object, tmp_path) -> None:
    spec = random_mlp_spec(np.random.default_rng(0), (4, 3), num_examples=23, batch_size=5)
    model, train = build(engine_class("numpy"), spec)
    calc = ArnoldiInfluenceCalculator(model, train, 10, True, 5, damping=DAMPING, complement="mean")
    loaded = ArnoldiInfluenceCalculator.load(
        calc.save(tmp_path / "c.npz"), model, train_dataset=train
    )
    assert loaded.eigenbasis.complement == calc.eigenbasis.complement
    assert loaded.complement == "mean" and loaded.complement_probes == 10
    np.testing.assert_array_equal(loaded.self_influence(train), calc.self_influence(train))


def test_bad_complement_arguments(numpy_problem: object) -> None:
    problem = numpy_problem
    for bad in ("median", -1.0, float("nan")):
        with pytest.raises(ValueError, match="complement="):
            ArnoldiInfluenceCalculator(problem.model, problem.train, 10, True, 5, complement=bad)
    with pytest.raises(TypeError, match="complement="):
        ArnoldiInfluenceCalculator(problem.model, problem.train, 10, True, 5, complement=True)
    with pytest.raises(ValueError, match="complement_probes"):
        ArnoldiInfluenceCalculator(
            problem.model, problem.train, 10, True, 5, complement="mean", complement_probes=0
        )
    calc = ArnoldiInfluenceCalculator(
        problem.model, problem.train, 10, True, 5, damping=DAMPING, complement=0.5
    )
    with pytest.raises(ValueError, match="nearest_neighbors: with the spectral complement"):
        calc.top_k(problem.queries, problem.train, nearest_neighbors=LinearNearestNeighbors())
    with pytest.raises(ValueError, match="not positive"):
        ArnoldiInfluenceCalculator(problem.model, problem.train, 10, True, 5, complement=0.0)
