"""The calculator on the NumPy reference models against the exact inverse-Hessian oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import krylov_influence as ki
from krylov_influence import exact
from krylov_influence.reference import LinearRegression, NumpyEngine, SoftmaxRegression
from krylov_influence.testing import random_mlp_spec


@st.composite
def fitted_problems(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    d = draw(st.integers(1, 5))
    c = draw(st.integers(2, 4)) if loss == "cross_entropy" else 1
    spec = random_mlp_spec(
        np.random.default_rng(seed),
        (d, c),
        loss=loss,
        num_examples=draw(st.integers(4, 30)),
        batch_size=draw(st.integers(1, 9)),
        l2=draw(st.sampled_from([1e-2, 0.2])),
    )
    return NumpyEngine.from_neutral_spec(spec)


def _relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@given(problem=fitted_problems(), damping=st.sampled_from([0.0, 1e-3]), seed=st.integers(0, 9))
def test_full_subspace_equals_exact_influence(problem, damping, seed):
    model, batches = problem
    p = model.num_parameters
    calc = ki.ArnoldiInfluenceCalculator(
        model, batches, p, True, p, "float64", damping=damping, seed=seed
    )
    hessian = exact.dense_hessian(model, batches)
    inverse = exact.inverse_hessian(hessian, damping)
    expected_self = exact.exact_self_influence(model, batches, inverse=inverse)
    assert _relative_error(calc.self_influence(batches), expected_self) <= 1e-8
    queries = batches[:2]
    expected_pairs = exact.exact_influence(model, batches, queries, inverse=inverse)
    assert _relative_error(calc.influence_matrix(queries, batches), expected_pairs) <= 1e-8


@given(problem=fitted_problems(), data=st.data())
def test_truncated_full_subspace_equals_the_exact_truncated_formula(problem, data):
    # subspace_dim = p makes the Ritz pairs exact eigenpairs; keeping k < p of them must give
    # V_k diag(1/λ_k) V_kᵀ of the dense Hessian, for every selection rule.
    model, batches = problem
    p = model.num_parameters
    k = data.draw(st.integers(1, p), label="k")
    selection = data.draw(st.sampled_from(["magnitude", "algebraic"]), label="selection")
    hessian = exact.dense_hessian(model, batches)
    values = np.sort(np.linalg.eigvalsh(hessian))[::-1]
    gap = np.abs(values[k - 1] - values[k]) if k < p else np.inf
    if gap < 1e-6 * values[0]:
        return  # a tie at the cut: "the k largest" is not unique, so no single oracle
    calc = ki.ArnoldiInfluenceCalculator(
        model, batches, p, True, k, "float64", eigenvalue_selection=selection
    )
    truncated = exact.truncated_inverse_hessian(hessian, k, selection=selection)
    expected = exact.exact_self_influence(model, batches, inverse=truncated)
    assert _relative_error(calc.self_influence(batches), expected) <= 1e-8


@given(problem=fitted_problems(), data=st.data())
def test_partial_subspace_equals_the_formula_on_its_own_basis(problem, data):
    # With n < p the calculator must compute exactly g_zᵀ Gᵀ diag(1/(λ+δ)) G g_x for its G:
    # checks the JVP projections and the reduced algebra against full gradients.
    model, batches = problem
    p = model.num_parameters
    n = data.draw(st.integers(1, p), label="subspace_dim")
    k = data.draw(st.integers(1, n), label="k")
    calc = ki.ArnoldiInfluenceCalculator(model, batches, n, True, k, "float64", damping=0.05)
    g = np.asarray(calc.G)
    inverse = g.T @ np.diag(calc.eigenbasis.inverse_eigenvalues) @ g
    expected = exact.exact_influence(model, batches, batches[:1], inverse=inverse)
    np.testing.assert_allclose(
        calc.influence_matrix(batches[:1], batches), expected, rtol=1e-9, atol=1e-12
    )


def test_float32_basis_is_accurate_to_float32():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 6)), rng.integers(0, 3, 64)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    reference = SoftmaxRegression(rng.standard_normal((6, 3)), np.zeros(3), l2=0.1)
    model = ki.InfluenceModel(reference, dtype="float32")
    p = model.num_parameters
    calc = ki.ArnoldiInfluenceCalculator(model, batches, p, True, p, "float32")
    assert calc.G.dtype == np.float32
    expected = exact.exact_self_influence(ki.InfluenceModel(reference), batches)  # float64
    with pytest.raises(ValueError, match="the model computes in float32"):
        ki.ArnoldiInfluenceCalculator(model, batches, p, True, p, "float64")
    # float32 basis: round-off of order sqrt(eps32) · condition, loosened to 1e-4.
    assert _relative_error(calc.self_influence(batches), expected) < 1e-4


def test_linear_regression_readme_setting():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(40)
    model = LinearRegression(np.array([1.0, -2.0, 0.5]), 0.0, l2=1e-3)
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 4, True, 4, "float64")
    bound = calc.model
    assert (
        _relative_error(calc.self_influence(batches), exact.exact_self_influence(bound, batches))
        < 1e-8
    )


def test_arnoldi_refits_with_another_dimension():
    model, batches = NumpyEngine.from_neutral_spec(
        random_mlp_spec(np.random.default_rng(2), (4, 3), num_examples=30, batch_size=7)
    )
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 6, True, 3, "float64")
    eig_vals, g = calc.arnoldi(10)
    assert calc.subspace_dim == 10 and g.shape == (3, 15) and eig_vals.shape == (3,)
    fresh = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 3, "float64")
    np.testing.assert_array_equal(np.asarray(eig_vals), np.asarray(fresh.eig_vals))
    calc.subspace_dim = 15  # a full-rank refit is asked for explicitly (arnoldi(p) alone is
    eig_vals, g = calc.arnoldi(15)  # refused: it is how influenciae's calls are ported)
    exact_top = np.sort(np.abs(np.linalg.eigvalsh(exact.dense_hessian(calc.model, batches))))[::-1][
        :3
    ]
    np.testing.assert_allclose(np.sort(np.abs(eig_vals))[::-1], exact_top, rtol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subspace_dim": 5, "k_largest_eig_vals": 6}, "k_largest_eig_vals=6"),
        ({"subspace_dim": 99, "k_largest_eig_vals": 2}, "subspace_dim=99"),
        ({"subspace_dim": 0, "k_largest_eig_vals": 1}, "subspace_dim"),
        ({"subspace_dim": 4, "k_largest_eig_vals": 2, "dtype": "int32"}, "dtype"),
        ({"subspace_dim": 4, "k_largest_eig_vals": 2, "eigenvalue_selection": "x"}, "selection"),
    ],
)
def test_bad_settings_are_explained(kwargs, message):
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((5, 2)), rng.integers(0, 3, 5))]
    model = SoftmaxRegression(np.ones((2, 3)), np.zeros(3), l2=0.1)
    settings = {"force_hermitian": True, "dtype": "float64", **kwargs}
    with pytest.raises(ValueError, match=message):
        ki.ArnoldiInfluenceCalculator(model, batches, **settings)


def test_bad_datasets_are_explained():
    model = SoftmaxRegression(np.ones((2, 3)), np.zeros(3), l2=0.1)
    with pytest.raises(ValueError, match="empty"):
        ki.ArnoldiInfluenceCalculator(model, [], 3, True, 2)
    one_shot = iter([(np.ones((2, 2)), np.zeros(2, dtype=int))])
    with pytest.raises(TypeError, match="one-shot"):
        ki.ArnoldiInfluenceCalculator(model, one_shot, 3, True, 2)
    poisoned = [
        (np.ones((2, 2)), np.zeros(2, dtype=int)),
        (np.full((2, 2), np.nan), np.zeros(2, dtype=int)),
    ]
    with pytest.raises(ki.NonFiniteError, match="batch 1"):
        ki.ArnoldiInfluenceCalculator(model, poisoned, 3, True, 2)
