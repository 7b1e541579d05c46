"""The NumPy reference engine against finite differences and its own dense algebra."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import krylov_influence as ki
from krylov_influence.exact import dense_hessian, per_example_gradients
from krylov_influence.reference import LinearRegression, NumpyEngine, SoftmaxRegression
from krylov_influence.testing import random_mlp_spec


@st.composite
def reference_specs(draw):
    """No-hidden-layer specs: softmax regression or single-output linear regression."""
    seed = draw(st.integers(0, 2**31 - 1))
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    d = draw(st.integers(1, 6))
    c = draw(st.integers(2, 4)) if loss == "cross_entropy" else 1
    n = draw(st.integers(1, 20))
    batch = draw(st.integers(1, 8))
    l2 = draw(st.sampled_from([0.0, 1e-2, 0.3]))
    return random_mlp_spec(
        np.random.default_rng(seed), (d, c), loss=loss, num_examples=n, batch_size=batch, l2=l2
    )


def _central_difference_grads(spec, x, y, step=1e-6):
    theta = spec.flat_parameters()
    grads = np.zeros((len(x), theta.size))
    for i in range(theta.size):
        shift = np.zeros_like(theta)
        shift[i] = step
        grads[:, i] = (spec.losses(x, y, theta + shift) - spec.losses(x, y, theta - shift)) / (
            2 * step
        )
    return grads


@given(spec=reference_specs())
def test_losses_and_gradients_match_the_spec_and_finite_differences(spec):
    model, batches = NumpyEngine.from_neutral_spec(spec)
    np.testing.assert_allclose(model.flat_parameters(), spec.flat_parameters())
    for batch, index in zip(batches, spec.batch_slices()):
        xs, ys = spec.x[index], spec.y[index]
        np.testing.assert_allclose(model.losses(batch), spec.losses(xs, ys), rtol=1e-12)
        grads = model.per_example_grads(batch)
        np.testing.assert_allclose(grads, _central_difference_grads(spec, xs, ys), atol=1e-6)


@given(spec=reference_specs(), seed=st.integers(0, 100))
def test_hvp_is_the_hessian_of_the_mean_loss(spec, seed):
    # Oracle: finite differences of the mean gradient, from the spec's per-example gradients.
    model, batches = NumpyEngine.from_neutral_spec(spec)
    p = model.num_parameters
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(p)
    theta = spec.flat_parameters()

    def mean_gradient(at):
        weights, biases = spec.unflatten(at)
        if spec.loss == "cross_entropy":
            other = SoftmaxRegression(weights[0], biases[0], l2=spec.l2)
        else:
            other = LinearRegression(weights[0][:, 0], biases[0][0], l2=spec.l2)
        return per_example_gradients(ki.InfluenceModel(other), batches).mean(axis=0)

    step = 1e-5
    expected = (mean_gradient(theta + step * v) - mean_gradient(theta - step * v)) / (2 * step)
    np.testing.assert_allclose(
        model.hvp(v, batches), expected, atol=1e-6 * max(1.0, np.abs(expected).max())
    )
    u = rng.standard_normal(p)
    assert np.isclose(u @ model.hvp(v, batches), v @ model.hvp(u, batches), rtol=1e-10, atol=1e-12)


@given(spec=reference_specs(), k=st.integers(1, 5))
def test_projection_is_the_projector_times_the_gradients(spec, k):
    model, batches = NumpyEngine.from_neutral_spec(spec)
    projector = np.random.default_rng(k).standard_normal((k, model.num_parameters))
    for batch in batches:
        np.testing.assert_allclose(
            model.project(projector, batch),
            model.per_example_grads(batch) @ projector.T,
            rtol=1e-10,
            atol=1e-12,
        )


def test_uneven_batches_give_the_exact_mean():
    spec = random_mlp_spec(np.random.default_rng(0), (3, 4), num_examples=11, batch_size=4)
    model, batches = NumpyEngine.from_neutral_spec(spec)
    whole = [(spec.x, spec.y)]
    np.testing.assert_allclose(
        dense_hessian(model, batches), dense_hessian(model, whole), rtol=1e-12
    )


def test_float32_model_hands_out_float32():
    model = ki.InfluenceModel(SoftmaxRegression(np.ones((2, 3)), np.zeros(3)), dtype="float32")
    batch = (np.ones((4, 2), dtype=np.float32), np.array([0, 1, 2, 0]))
    for out in (
        model.losses(batch),
        model.per_example_grads(batch),
        model.hvp(np.ones(9, dtype=np.float32), [batch]),
        model.project(np.ones((2, 9), dtype=np.float32), batch),
        model.flat_parameters(),
    ):
        assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ((np.ones((4, 3)), np.zeros(4, dtype=int)), r"x of shape \(B, 2\)"),
        ((np.ones((4, 2)), np.zeros(3, dtype=int)), r"y of shape \(B,\)"),
        ((np.ones((4, 2)), np.zeros(4)), "integer class labels"),
        (np.ones((4, 2)), r"\(x, y\) tuple"),
    ],
)
def test_bad_batches_are_explained(batch, message):
    model = ki.InfluenceModel(SoftmaxRegression(np.ones((2, 3)), np.zeros(3)))
    with pytest.raises((ValueError, TypeError), match=message):
        model.losses(batch)


def test_bad_models_and_options_are_explained():
    with pytest.raises(ValueError, match="bias"):
        SoftmaxRegression(np.ones((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="l2"):
        LinearRegression(np.ones(2), 0.0, l2=-1.0)
    with pytest.raises(ValueError, match="loss_fn"):
        ki.InfluenceModel(LinearRegression(np.ones(2)), lambda o, t: o)
    with pytest.raises(ValueError, match="device"):
        ki.InfluenceModel(LinearRegression(np.ones(2)), device="cuda:0")
