"""Block Arnoldi (``block_size`` > 1): the properties of the single-vector iteration, with b
products per step, in every namespace."""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_arnoldi import _run, symmetric_matrices

from krylov_influence import MatrixOperator, NonFiniteError, arnoldi_iteration, ritz_pairs
from krylov_influence._xp import to_numpy


@given(case=symmetric_matrices(), seed=st.integers(0, 1000), data=st.data())
def test_block_basis_is_orthonormal_and_h_is_q_a_qt(xp, case, seed, data):
    matrix, _ = case
    p = matrix.shape[0]
    dim = data.draw(st.integers(2, p), label="subspace_dim")
    block = data.draw(st.integers(2, min(4, dim)), label="block_size")
    result, operator = _run(xp, matrix, dim, seed=seed, block_size=block)
    q = to_numpy(result.basis, xp).astype(np.float64)
    assert operator.calls == dim  # n products, b at a time
    np.testing.assert_allclose(q @ q.T, np.eye(dim), atol=1e-12)
    np.testing.assert_allclose(
        result.hessenberg, q @ matrix @ q.T, atol=1e-11 * np.abs(matrix).max()
    )
    assert np.allclose(np.tril(result.hessenberg, -block - 1), 0.0)  # b subdiagonals


@given(case=symmetric_matrices(), seed=st.integers(0, 1000), block=st.integers(2, 5))
def test_full_block_subspace_gives_every_eigenvalue(case, seed, block):
    matrix, _ = case
    p = matrix.shape[0]
    result, _ = _run(np_xp, matrix, p, seed=seed, block_size=min(block, p))
    pairs = ritz_pairs(result.hessenberg, result.residual_norm, p, force_hermitian=True)
    expected = np.linalg.eigvalsh(matrix)
    np.testing.assert_allclose(
        np.sort(pairs.eigenvalues), expected, atol=1e-11 * np.abs(expected).max()
    )


@pytest.mark.parametrize(("dim", "block"), [(12, 3), (13, 3), (14, 4), (9, 9)])
def test_ritz_residual_estimates_are_the_true_residuals(dim, block):
    """``‖A v − θ v‖`` from the residual rows, also when b does not divide n (rows of the
    block before last then stay outside the basis)."""
    rng = np.random.default_rng(dim)
    p = 40
    basis, _ = np.linalg.qr(rng.standard_normal((p, p)))
    matrix = (basis * rng.uniform(0.1, 5.0, p)) @ basis.T
    result, _ = _run(np_xp, matrix, dim, block_size=block)
    pairs = ritz_pairs(
        result.hessenberg,
        result.residual_norm,
        4,
        force_hermitian=True,
        residual_gram=result.residual_gram,
        residual_columns=result.residual_columns,
    )
    vectors = pairs.vectors.T @ np.asarray(result.basis)
    true = np.linalg.norm(vectors @ matrix - pairs.eigenvalues[:, None] * vectors, axis=1)
    np.testing.assert_allclose(pairs.residuals, true, atol=1e-12 * np.abs(matrix).max())
    assert np.all(true > 1e-6)  # a real test: the space has not converged


def test_block_start_is_the_seeded_generator_and_identity_restarts():
    result, _ = _run(np_xp, 2.0 * np.eye(6), 6, block_size=2, seed=5)
    start, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((6, 2)))
    np.testing.assert_allclose(np.asarray(result.basis)[:2], start.T, atol=1e-15)
    # 2I: every block product lies in the basis, so each new row is a restart.
    assert result.restarts == (2, 2, 4, 4)
    np.testing.assert_allclose(result.hessenberg, 2.0 * np.eye(6), atol=1e-14)


def test_float32_blocks_stay_orthogonal_on_an_ill_conditioned_spectrum():
    rng = np.random.default_rng(0)
    p, steps = 1500, 120
    eigenvalues = np.concatenate([np.logspace(0, -2, 20), np.logspace(-2.2, -4, p - 20)])
    basis, _ = np.linalg.qr(rng.standard_normal((p, 60)))  # rotate a 60-dim part
    rotation = np.eye(p) - 2.0 * basis[:, :1] @ basis[:, :1].T
    matrix = ((rotation * eigenvalues) @ rotation.T).astype(np.float32)
    result, _ = _run(np_xp, matrix, steps, dtype="float32", block_size=8)
    eps32 = float(np.finfo(np.float32).eps)
    assert result.orthogonality_loss < 20 * eps32 * np.sqrt(steps), result.orthogonality_loss
    pairs = ritz_pairs(result.hessenberg, result.residual_norm, 10, force_hermitian=True)
    error = np.max(np.abs(np.sort(pairs.eigenvalues) - np.sort(eigenvalues[:10])))
    assert error < 1e-4, error


def test_operator_without_mm_stacks_products():
    class VectorOnly:
        shape = (7, 7)
        dtype = np.float64
        xp = np_xp
        matrix = np.diag(np.arange(1.0, 8.0))

        def mv(self, v):
            return self.matrix @ v

    result = arnoldi_iteration(VectorOnly(), 7, block_size=3)
    q = np.asarray(result.basis)
    np.testing.assert_allclose(result.hessenberg, q @ VectorOnly.matrix @ q.T, atol=1e-13)


def test_non_finite_block_names_the_rows():
    class Poisoned:
        shape = (6, 6)
        dtype = np.float64
        xp = np_xp
        calls = 0

        def mm(self, rows):
            self.calls += 1
            return rows * (np.nan if self.calls == 2 else 1.0) + self.calls

        def mv(self, v):  # pragma: no cover - mm is used
            raise AssertionError

    with pytest.raises(NonFiniteError, match=r"rows 3\.\.4 of 6"):
        arnoldi_iteration(Poisoned(), 6, block_size=2)


@pytest.mark.parametrize("block", [0, -1, 5])
def test_block_size_out_of_range_is_rejected(block):
    with pytest.raises(ValueError, match="block_size"):
        arnoldi_iteration(MatrixOperator(np.eye(6)), 4, block_size=block)


def test_block_size_must_be_an_integer():
    with pytest.raises(TypeError, match="block_size"):
        arnoldi_iteration(MatrixOperator(np.eye(6)), 4, block_size=2.0)
