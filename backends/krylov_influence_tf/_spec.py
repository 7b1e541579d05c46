"""A :class:`krylov_influence.testing.MLPSpec` as a Keras ``Sequential`` model."""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from krylov_influence import _xp
from krylov_influence_tf._namespace import canonical_device

__all__ = ["build_spec", "spec_loss"]


def _activation(name: str) -> Any:
    if name == "gelu":
        # The spec's gelu is the exact erf form. tf.nn.gelu(approximate=False) goes through
        # erfc and is off by ~5e-9 in float64 (TF 2.21), so write the erf form out.
        return lambda h: 0.5 * h * (1.0 + tf.math.erf(h * (1.0 / math.sqrt(2.0))))
    if name in ("tanh", "softplus", "relu"):
        return name
    raise ValueError(f"activation={name!r}: not a spec activation")


def spec_loss(loss: str) -> Any:
    """The spec's per-example loss as ``(y_true, y_pred) -> (B,)``."""
    if loss == "cross_entropy":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    if loss == "mse":
        return lambda y, out: 0.5 * tf.reduce_sum(tf.square(out - y), axis=-1)
    raise ValueError(f"loss={loss!r}: not a spec loss")


def build_spec(engine: Any, spec: Any, *, dtype: Any, device: Any) -> tuple[Any, list[Any]]:
    """Build ``spec`` in Keras and bind it; see ``TensorFlowEngine.from_neutral_spec``."""
    name = _xp.dtype_name(dtype)
    place = canonical_device(device)
    sizes = spec.layer_sizes
    layers: list[Any] = [keras.Input((sizes[0],), dtype=name)]
    for index, width in enumerate(sizes[1:]):
        hidden = index < len(sizes) - 2
        layers.append(
            keras.layers.Dense(
                width, activation=_activation(spec.activation) if hidden else None, dtype=name
            )
        )
    model = keras.Sequential(layers)
    weights = []
    for w, b in zip(spec.weights, spec.biases):
        weights += [w.astype(name), b.astype(name)]
    model.set_weights(weights)
    bound = engine.bind(model, spec_loss(spec.loss), dtype=name, device=place, l2=spec.l2)
    batches = []
    with tf.device(place):
        for x, y in spec.numpy_batches():
            target = tf.constant(y.astype(name) if spec.loss == "mse" else y.astype("int64"))
            batches.append((tf.constant(x.astype(name)), target))
    return bound, batches
