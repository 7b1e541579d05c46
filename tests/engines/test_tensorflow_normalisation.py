"""Hessian-vector products through Keras normalisation layers, against finite differences.

Keras computes LayerNormalization's and GroupNormalization's statistics with
``tf.nn.moments``, whose ``stop_gradient`` makes nested tapes' second derivatives wrong; the
layer matrix compares with nested tapes, so it cannot see that. The oracle here is
independent of second derivatives: central differences of exact first derivatives.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import krylov_influence  # noqa: E402
from krylov_influence_tf._functional import exact_moments  # noqa: E402

LAYERS = {
    "LayerNormalization": lambda: keras.layers.LayerNormalization(dtype="float64"),
    "RMSNormalization": lambda: keras.layers.RMSNormalization(dtype="float64"),
    "GroupNormalization": lambda: keras.layers.GroupNormalization(groups=2, dtype="float64"),
}


def build(name: str):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            LAYERS[name](),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((9, 5)), rng.integers(0, 3, 9)
    return model, loss, x, y


def mean_gradient(model, loss, x, y, flat: np.ndarray) -> np.ndarray:
    """The exact first derivative of the mean loss at the flat parameters ``flat``."""
    shapes = [v.shape for v in model.trainable_variables]
    sizes = [int(np.prod(s)) for s in shapes]
    values = [
        tf.constant(part.reshape(shape))
        for part, shape in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes)
    ]
    fixed = [v.value for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(values)
        outputs, _ = model.stateless_call(values, fixed, tf.constant(x), training=False)
        mean = tf.reduce_mean(loss.call(tf.constant(y), outputs))
    return np.concatenate([g.numpy().reshape(-1) for g in tape.gradient(mean, values)])


@pytest.mark.parametrize("name", list(LAYERS))
def test_hvps_through_keras_normalisation_equal_finite_differences(name):
    model, loss, x, y = build(name)
    bound = krylov_influence.InfluenceModel(model, loss, dtype="float64")
    theta = bound.to_numpy(bound.flat_parameters())
    vector = np.random.default_rng(2).standard_normal(theta.size)
    found = bound.to_numpy(bound.hvp(tf.constant(vector), [(x, y)]))
    step = 1e-5
    expected = (
        mean_gradient(model, loss, x, y, theta + step * vector)
        - mean_gradient(model, loss, x, y, theta - step * vector)
    ) / (2 * step)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-7 * scale)


def test_without_the_exact_moments_keras_layer_norm_hessians_are_wrong():
    """The defect the engine works around is real (so the test above can fail)."""
    model, loss, x, y = build("LayerNormalization")
    values = [tf.constant(v.value) for v in model.trainable_variables]
    vector = [tf.ones_like(v) for v in values]

    def hvp():
        with tf.autodiff.ForwardAccumulator(values, vector) as acc:
            with tf.GradientTape() as tape:
                tape.watch(values)
                outputs, _ = model.stateless_call(values, [], tf.constant(x), training=False)
                mean = tf.reduce_mean(loss.call(tf.constant(y), outputs))
            grads = tape.gradient(mean, values)
        return np.concatenate([acc.jvp(g).numpy().reshape(-1) for g in grads])

    plain = hvp()
    with exact_moments():
        exact = hvp()
    assert np.abs(plain - exact).max() > 1e-4 * np.abs(exact).max()
