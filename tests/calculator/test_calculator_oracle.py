"""The calculator tests' oracle is right, and independent of every engine."""

from __future__ import annotations

import numpy as np
import pytest
from calculator_support import (
    KINDS,
    build,
    engine_class,
    mlp_hessian,
    mlp_spec,
    softmax_hessian,
    training_spec,
)

from krylov_influence import exact


def test_softmax_hessian_is_the_finite_difference_hessian() -> None:
    """The closed form against central differences of the spec's analytic gradients."""
    spec = training_spec()
    np.testing.assert_allclose(softmax_hessian(spec), spec.hessian(), rtol=0, atol=1e-8)


def test_the_numpy_engine_agrees_with_the_oracle() -> None:
    """The NumPy engine's HVPs and gradients (what exact.py builds on) equal the oracle's."""
    spec = training_spec()
    model, train = build(engine_class("numpy"), spec)
    np.testing.assert_allclose(
        exact.dense_hessian(model, train), softmax_hessian(spec), rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        exact.per_example_gradients(model, train), spec.gradients(spec.x, spec.y), rtol=1e-12
    )


@pytest.mark.parametrize("trained", [True, False], ids=["at_minimum", "indefinite"])
def test_mlp_hessian_is_the_finite_difference_hessian(trained: bool) -> None:
    """The MLP's closed form against central differences of the spec's analytic gradients
    (whose truncation and round-off error is ~1e-10 of the largest entry)."""
    spec = mlp_spec(trained=trained)
    hessian = mlp_hessian(spec)
    np.testing.assert_allclose(hessian, spec.hessian(), rtol=0, atol=1e-8 * np.abs(hessian).max())


def test_the_mlp_problems_are_what_they_claim() -> None:
    """At the minimum: zero mean gradient and a positive definite Hessian. Away from it: with
    the problem's damping, ``H + δI`` keeps negative eigenvalues, none near zero (so the
    full-rank oracle is well conditioned)."""
    trained = mlp_spec(trained=True)
    assert np.linalg.norm(trained.gradients(trained.x, trained.y).mean(axis=0)) < 1e-7
    assert trained.num_parameters == 35
    values = np.linalg.eigvalsh(mlp_hessian(trained))
    assert values.min() > 0 and values.max() / values.min() < 1e3

    damping = KINDS["mlp_indefinite"].damping
    assert damping > 0
    values = np.linalg.eigvalsh(mlp_hessian(mlp_spec(trained=False))) + damping
    assert np.count_nonzero(values < 0) >= 5
    assert np.abs(values).min() > 1e-2 * np.abs(values).max()
