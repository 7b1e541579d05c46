"""The calculator tests' oracle is right, and independent of every engine."""

from __future__ import annotations

import numpy as np
from calculator_support import build, engine_class, softmax_hessian, training_spec

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
