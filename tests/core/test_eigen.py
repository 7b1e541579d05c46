"""Eigen-reduction: selection direction, damping, signs, complex spectra, bad input."""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from krylov_influence import MatrixOperator, arnoldi_iteration, build_eigenbasis, ritz_pairs
from krylov_influence.eigen import select_eigenpairs


def _symmetric(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (basis * np.asarray(eigenvalues, dtype=float)) @ basis.T


@given(
    values=st.lists(
        st.floats(-10, 10, allow_nan=False).filter(lambda v: abs(v) > 1e-3),
        min_size=2,
        max_size=12,
        unique=True,
    ),
    data=st.data(),
)
def test_selection_keeps_the_right_eigenvalues_in_order(values, data):
    values = np.array(values)
    k = data.draw(st.integers(1, len(values)), label="k")
    magnitude = values[select_eigenpairs(values, k, "magnitude")]
    np.testing.assert_array_equal(magnitude, sorted(values, key=lambda v: -abs(v))[:k])
    algebraic = values[select_eigenpairs(values, k, "algebraic")]
    np.testing.assert_array_equal(algebraic, sorted(values, reverse=True)[:k])
    positives = int(np.sum(values > 0))
    if positives >= k:
        kept = values[select_eigenpairs(values, k, "positive")]
        assert np.all(kept > 0)
        np.testing.assert_array_equal(kept, sorted(values, reverse=True)[:k])
    else:
        with pytest.raises(ValueError, match="only"):
            select_eigenpairs(values, k, "positive")


@pytest.mark.parametrize("force_hermitian", [True, False])
def test_ritz_pairs_of_a_full_subspace_are_eigenpairs(force_hermitian):
    eigenvalues = np.array([5.0, -4.0, 3.0, 1.0, 0.5, -0.25])
    matrix = _symmetric(eigenvalues)
    result = arnoldi_iteration(MatrixOperator(matrix), 6, seed=1)
    pairs = ritz_pairs(result.hessenberg, result.residual_norm, 3, force_hermitian=force_hermitian)
    np.testing.assert_allclose(pairs.eigenvalues, [5.0, -4.0, 3.0], atol=1e-12)
    basis = build_eigenbasis(result, 3, force_hermitian=force_hermitian, xp=np_xp)
    g = np.asarray(basis.projector)
    np.testing.assert_allclose(g @ g.T, np.eye(3), atol=1e-12)  # orthonormal Ritz vectors
    np.testing.assert_allclose(g @ matrix, pairs.eigenvalues[:, None] * g, atol=1e-11)
    # Deterministic signs: the largest-magnitude coordinate of each vector is positive.
    assert np.all(pairs.vectors[np.argmax(np.abs(pairs.vectors), axis=0), range(3)] > 0)
    np.testing.assert_allclose(pairs.residuals, 0.0, atol=1e-12)  # invariant: β = 0


def test_residuals_bound_the_ritz_pair_error():
    # ‖A v − λ v‖ equals |β y_n| for every Ritz pair of a partial Krylov space.
    matrix = _symmetric(np.linspace(-3, 7, 40), seed=4)
    result = arnoldi_iteration(MatrixOperator(matrix), 12, seed=0)
    pairs = ritz_pairs(result.hessenberg, result.residual_norm, 5, force_hermitian=True)
    vectors = pairs.vectors.T @ np.asarray(result.basis)
    actual = np.linalg.norm(vectors @ matrix - pairs.eigenvalues[:, None] * vectors, axis=1)
    np.testing.assert_allclose(pairs.residuals, actual, rtol=1e-8, atol=1e-12)


def test_damping_is_added_to_the_kept_eigenvalues():
    matrix = _symmetric([2.0, 1.0, 0.5])
    result = arnoldi_iteration(MatrixOperator(matrix), 3)
    basis = build_eigenbasis(result, 2, force_hermitian=True, damping=0.1, xp=np_xp)
    np.testing.assert_allclose(basis.eigenvalues, [2.0, 1.0], atol=1e-13)
    np.testing.assert_allclose(basis.damped_eigenvalues, [2.1, 1.1], atol=1e-13)
    np.testing.assert_allclose(basis.inverse_eigenvalues, [1 / 2.1, 1 / 1.1], rtol=1e-13)


def test_genuinely_complex_spectrum_is_an_error_not_real_part():
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues ±i
    with pytest.raises(ValueError, match="force_hermitian=True"):
        ritz_pairs(rotation, 0.0, 1, force_hermitian=False)


def test_singular_kept_subspace_needs_damping():
    matrix = _symmetric([1.0, 0.0, 0.0])
    result = arnoldi_iteration(MatrixOperator(matrix), 3)
    with pytest.raises(ValueError, match="damping"):
        build_eigenbasis(result, 3, force_hermitian=True, xp=np_xp)
    damped = build_eigenbasis(result, 3, force_hermitian=True, damping=1e-3, xp=np_xp)
    assert np.all(np.isfinite(damped.inverse_eigenvalues))


@pytest.mark.parametrize("k", [0, 4, 2.0, True])
def test_bad_k_is_rejected(k):
    with pytest.raises(ValueError, match="k_largest_eig_vals"):
        ritz_pairs(np.eye(3), 0.0, k, force_hermitian=True)


@pytest.mark.parametrize("damping", [-1.0, float("nan"), float("inf")])
def test_bad_damping_is_rejected(damping):
    result = arnoldi_iteration(MatrixOperator(np.eye(3)), 3)
    with pytest.raises(ValueError, match="damping"):
        build_eigenbasis(result, 2, force_hermitian=True, damping=damping, xp=np_xp)


def test_unknown_selection_is_rejected():
    with pytest.raises(ValueError, match="eigenvalue_selection"):
        ritz_pairs(np.eye(3), 0.0, 1, force_hermitian=True, selection="smallest")
