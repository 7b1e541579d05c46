"""A kept spectrum with negative ``λ + δ`` is said once per fit, with the damping that fixes it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from calculator_support import build, engine_class

from krylov_influence import ArnoldiInfluenceCalculator, NegativeEigenvalueWarning, exact
from krylov_influence.testing import random_mlp_spec


def test_negative_kept_eigenvalues_warn_with_the_damping_that_fixes_them() -> None:
    # Large random weights and no l2: far from a minimum, the Hessian is indefinite.
    spec = random_mlp_spec(
        np.random.default_rng(3),
        (4, 5, 3),
        num_examples=40,
        batch_size=10,
        l2=0.0,
        weight_scale=2.0,
    )
    model, train = build(engine_class("torch"), spec)
    p = model.num_parameters
    eigenvalues = np.linalg.eigvalsh(exact.dense_hessian(model, train))
    kept = eigenvalues[np.argsort(-np.abs(eigenvalues), kind="stable")[:12]]
    assert (kept < 0).any()  # the premise: an indefinite kept spectrum

    with pytest.warns(NegativeEigenvalueWarning) as caught:
        calc = ArnoldiInfluenceCalculator(model, train, p, True, 12, "float64")
    assert len(caught) == 1
    assert calc.eigenbasis.negative_count == int(np.count_nonzero(kept < 0))
    np.testing.assert_allclose(calc.eigenbasis.positive_damping, -kept.min(), rtol=1e-8)
    assert f"damping > {-kept.min():.3g}" in str(caught[0].message)

    with warnings.catch_warnings():
        warnings.simplefilter("error", NegativeEigenvalueWarning)  # none with enough damping
        damped = ArnoldiInfluenceCalculator(
            model, train, p, True, 12, "float64", damping=1.01 * -kept.min()
        )
    assert damped.eigenbasis.negative_count == 0
    with pytest.warns(NegativeEigenvalueWarning):  # a refit says it again
        calc.arnoldi(p)
