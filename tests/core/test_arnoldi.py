"""Properties of the Arnoldi iteration on random symmetric matrices, in every namespace."""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from krylov_influence import MatrixOperator, NonFiniteError, arnoldi_iteration, ritz_pairs
from krylov_influence._xp import to_numpy


@st.composite
def symmetric_matrices(draw, max_dim: int = 14):
    """Symmetric matrices with a chosen spectrum: distinct, repeated, negative, rank-deficient."""
    p = draw(st.integers(2, max_dim))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["generic", "repeated", "indefinite", "rank_deficient"]))
    rng = np.random.default_rng(seed)
    eigenvalues = rng.uniform(0.5, 4.0, p)
    if kind == "repeated":
        eigenvalues[: max(2, p // 2)] = 2.0
    elif kind == "indefinite":
        eigenvalues *= rng.choice([-1.0, 1.0], p)
    elif kind == "rank_deficient":
        eigenvalues[: max(1, p // 3)] = 0.0
    basis, _ = np.linalg.qr(rng.standard_normal((p, p)))
    return (basis * eigenvalues) @ basis.T, kind


def _run(xp, matrix, dim, dtype="float64", **kwargs):
    operator = MatrixOperator(xp.asarray(matrix, dtype=getattr(xp, dtype)))
    return arnoldi_iteration(operator, dim, **kwargs), operator


@given(case=symmetric_matrices(), seed=st.integers(0, 1000), data=st.data())
def test_basis_is_orthonormal_and_satisfies_the_arnoldi_relation(xp, case, seed, data):
    matrix, _ = case
    p = matrix.shape[0]
    dim = data.draw(st.integers(1, p), label="subspace_dim")
    result, operator = _run(xp, matrix, dim, seed=seed)
    q = to_numpy(result.basis, xp).astype(np.float64)
    assert q.shape == (dim, p)
    assert operator.calls == dim  # n products give an n-dimensional basis
    np.testing.assert_allclose(q @ q.T, np.eye(dim), atol=1e-12)
    assert result.orthogonality_loss is not None and result.orthogonality_loss < 1e-12
    # H_n = Q A Qᵀ: the Hessenberg matrix is the restriction of A to the basis.
    np.testing.assert_allclose(
        result.hessenberg, q @ matrix @ q.T, atol=1e-11 * np.abs(matrix).max()
    )
    assert np.allclose(np.tril(result.hessenberg, -2), 0.0)


@given(case=symmetric_matrices(), seed=st.integers(0, 1000))
def test_full_subspace_gives_every_eigenvalue(xp, case, seed):
    # With subspace_dim = p, restarts on breakdown make the basis span the whole space, so the
    # Ritz values are the eigenvalues, including repeated and zero ones.
    matrix, _ = case
    p = matrix.shape[0]
    result, _ = _run(xp, matrix, p, seed=seed)
    pairs = ritz_pairs(result.hessenberg, result.residual_norm, p, force_hermitian=True)
    expected = np.linalg.eigvalsh(matrix)
    np.testing.assert_allclose(
        np.sort(pairs.eigenvalues), expected, atol=1e-11 * np.abs(expected).max()
    )


def test_repeated_eigenvalues_restart_instead_of_dividing_by_zero():
    # A = 2I: every Krylov space is one-dimensional, so each step breaks down and restarts.
    p = 6
    import array_api_compat.numpy as xp

    result, _ = _run(xp, 2.0 * np.eye(p), p)
    assert result.restarts == tuple(range(1, p))
    np.testing.assert_allclose(result.hessenberg, 2.0 * np.eye(p), atol=1e-14)


def test_zero_operator_restarts_and_stays_finite():
    import array_api_compat.numpy as xp

    result, _ = _run(xp, np.zeros((5, 5)), 5)
    assert np.all(result.hessenberg == 0.0)
    assert result.restarts == (1, 2, 3, 4)
    q = np.asarray(result.basis)
    np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-14)


def test_start_vector_depends_only_on_the_seed(xp):
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((9, 9))
    matrix = matrix + matrix.T
    first, _ = _run(xp, matrix, 4, seed=11)
    again, _ = _run(xp, matrix, 4, seed=11)
    other, _ = _run(xp, matrix, 4, seed=12)
    expected = np.random.default_rng(11).standard_normal(9)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(to_numpy(first.basis, xp)[0], expected, atol=1e-15)
    np.testing.assert_array_equal(to_numpy(first.basis, xp), to_numpy(again.basis, xp))
    assert not np.allclose(to_numpy(first.basis, xp)[0], to_numpy(other.basis, xp)[0])


def test_float32_stays_orthogonal_on_an_ill_conditioned_spectrum():
    # REFERENCE.md §2: one-pass classical Gram-Schmidt loses orthogonality entirely here
    # (max |QᵀQ − I| = 1.0); CGS2 keeps it at float32 round-off. p = 3000, condition ~1e4,
    # 200 steps: the measured figures are in the closing note of issue 2.
    # Hessian-like: 40 separated outliers over a bulk spanning four decades, a few negative,
    # rotated by three Householder reflections (an O(p) product instead of a dense matrix).
    rng = np.random.default_rng(0)
    p, steps = 3000, 200
    eigenvalues = np.concatenate([np.logspace(0, -2, 40), np.logspace(-2.2, -4, p - 40)])
    eigenvalues *= rng.choice([-1.0, 1.0], p, p=[0.1, 0.9])
    reflectors = rng.standard_normal((3, p))
    reflectors /= np.linalg.norm(reflectors, axis=1, keepdims=True)

    class RotatedSpectrum:
        shape = (p, p)
        dtype = np.float32
        xp = np_xp

        @staticmethod
        def mv(v):
            w = v.astype(np.float64)
            for u in reflectors[::-1]:  # Uᵀ v with U = H1 H2 H3, each H symmetric
                w = w - 2.0 * u * (u @ w)
            w = eigenvalues * w
            for u in reflectors:
                w = w - 2.0 * u * (u @ w)
            return w.astype(np.float32)

    result = arnoldi_iteration(RotatedSpectrum(), steps, seed=0)
    eps32 = float(np.finfo(np.float32).eps)
    assert result.orthogonality_loss < 20 * eps32 * np.sqrt(steps), result.orthogonality_loss
    pairs = ritz_pairs(result.hessenberg, result.residual_norm, 40, force_hermitian=True)
    top = eigenvalues[np.argsort(-np.abs(eigenvalues))[:40]]
    error = np.max(np.abs(np.sort(pairs.eigenvalues) - np.sort(top)))
    assert error < 1e-4 * np.abs(top).max(), error


def test_non_finite_product_names_the_iteration():
    class Poisoned:
        shape = (4, 4)
        dtype = np.float64
        xp = np_xp
        calls = 0

        def mv(self, v):
            self.calls += 1
            return v * (np.nan if self.calls == 3 else 1.0) + np.arange(4.0) * self.calls

    with pytest.raises(NonFiniteError, match="iteration 3 of 4"):
        arnoldi_iteration(Poisoned(), 4)


@pytest.mark.parametrize("dim", [0, 5, -1])
def test_subspace_dim_out_of_range_is_rejected(dim):
    with pytest.raises(ValueError, match="subspace_dim"):
        arnoldi_iteration(MatrixOperator(np.eye(4)), dim)


def test_subspace_dim_must_be_an_integer():
    with pytest.raises(TypeError, match="subspace_dim"):
        arnoldi_iteration(MatrixOperator(np.eye(4)), 2.5)


@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("rank", [40, 5])
def test_resuming_from_any_checkpoint_takes_the_same_steps(block_size, rank):
    # rank 5 < n: the iteration restarts from fresh random vectors after the Krylov space is
    # exhausted, so a resumed iteration must also restore the generator of those vectors.
    rng = np.random.default_rng(0)
    factor = rng.standard_normal((40, rank))
    matrix = factor @ factor.T

    def run(**options):
        states = []
        result = arnoldi_iteration(
            MatrixOperator(matrix),
            30,
            seed=3,
            block_size=block_size,
            checkpoint=states.append,
            checkpoint_every=4,
            **options,
        )
        return result, states

    whole, states = run()
    assert [s.products for s in states] == sorted({s.products for s in states})
    assert all(0 < s.products < 30 for s in states) and len(states) >= 5
    assert (len(whole.restarts) > 0) == (rank < 30)
    for state in states:
        resumed, later = run(resume=state)
        np.testing.assert_array_equal(resumed.basis, whole.basis)
        np.testing.assert_array_equal(resumed.hessenberg, whole.hessenberg)
        assert resumed.restarts == whole.restarts
        # The resumed iteration checkpoints where the whole one did, after the resume point.
        assert [s.products for s in later] == [
            s.products for s in states if s.products > state.products
        ]


def test_a_state_of_another_iteration_is_refused():
    matrix = np.diag(np.arange(1.0, 21.0))
    states = []
    arnoldi_iteration(MatrixOperator(matrix), 10, checkpoint=states.append, checkpoint_every=3)
    with pytest.raises(ValueError, match=r"resume: .*Hessenberg matrix of shape \(10, 10\)"):
        arnoldi_iteration(MatrixOperator(matrix), 12, resume=states[0])
    with pytest.raises(ValueError, match=r"resume: .*block_size 1, not 2"):
        arnoldi_iteration(MatrixOperator(matrix), 10, resume=states[0], block_size=2)
