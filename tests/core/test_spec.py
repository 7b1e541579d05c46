"""The neutral spec's NumPy oracles against finite differences and the reference engine."""

from __future__ import annotations

import numpy as np
from hypothesis import given

import krylov_influence as ki
from krylov_influence.exact import dense_hessian
from krylov_influence.reference import NumpyEngine
from krylov_influence.testing.strategies import mlp_specs


@given(spec=mlp_specs(activations=("tanh", "softplus", "gelu")))
def test_analytic_gradients_match_finite_differences_of_the_losses(spec):
    theta, step = spec.flat_parameters(), 1e-6
    expected = np.zeros((spec.num_examples, theta.size))
    for i in range(theta.size):
        shift = np.zeros_like(theta)
        shift[i] = step
        expected[:, i] = (
            spec.losses(spec.x, spec.y, theta + shift) - spec.losses(spec.x, spec.y, theta - shift)
        ) / (2 * step)
    np.testing.assert_allclose(spec.gradients(spec.x, spec.y), expected, atol=1e-7)


@given(spec=mlp_specs(max_hidden_layers=0))
def test_spec_hessian_matches_the_reference_engine(spec):
    model, batches = NumpyEngine.from_neutral_spec(spec)
    assert isinstance(model, ki.InfluenceModel)
    exact = dense_hessian(model, batches)
    np.testing.assert_allclose(spec.hessian(), exact, atol=1e-8 * max(1.0, np.abs(exact).max()))
