"""The neutral MLP of :class:`krylov_influence.testing.MLPSpec` as a pure JAX function."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from krylov_influence import _xp
from krylov_influence_jax._model import JaxInfluenceModel, bind_jax

__all__ = ["ACTIVATIONS", "APPLY_FNS", "build_spec", "cross_entropy", "mlp_apply", "squared_error"]

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
    "relu": jax.nn.relu,
    "gelu": lambda h: jax.nn.gelu(h, approximate=False),  # the spec's exact erf form
}


def mlp_apply(activation: str, layers: list[tuple[Any, Any]], x: Any) -> Any:
    """``act(... act(x @ W_1 + b_1) ...) @ W_L + b_L``; ``layers`` is a list of ``(W, b)``."""
    act = ACTIVATIONS[activation]
    h = x
    for index, (w, b) in enumerate(layers):
        h = h @ w + b
        if index < len(layers) - 1:
            h = act(h)
    return h


def _apply_with(activation: str) -> Any:
    def apply_fn(params: list[tuple[Any, Any]], x: Any) -> Any:
        return mlp_apply(activation, params, x)

    apply_fn.__name__ = f"mlp_{activation}"
    return apply_fn


# One function per activation, so every spec of the same architecture shares compiled programs.
APPLY_FNS = {name: _apply_with(name) for name in ACTIVATIONS}


def cross_entropy(logits: Any, labels: Any) -> Any:
    """``−log softmax(logits)_y`` per example, shape (B,)."""
    picked = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - picked


def squared_error(outputs: Any, targets: Any) -> Any:
    """``½ ‖out − y‖²`` per example, shape (B,)."""
    return 0.5 * jnp.sum((outputs - targets) ** 2, axis=1)


def build_spec(spec: Any, dtype: Any, device: Any) -> tuple[JaxInfluenceModel, list[Any]]:
    """The bound model (params a list of ``(W, b)``, so ravel order is the spec's) and batches."""
    if spec.activation not in ACTIVATIONS:
        raise NotImplementedError(f"jax engine: activation {spec.activation!r} is not built")
    name = _xp.dtype_name(dtype)
    layers = [
        (np.asarray(w, dtype=name), np.asarray(b, dtype=name))
        for w, b in zip(spec.weights, spec.biases)
    ]
    loss = cross_entropy if spec.loss == "cross_entropy" else squared_error
    model = bind_jax(
        APPLY_FNS[spec.activation],
        loss,
        params=layers,
        dtype=name,
        device=device,
        l2=spec.l2,
    )
    batches = []
    for x, y in spec.numpy_batches():
        target = y.astype(np.int32) if spec.loss == "cross_entropy" else y.astype(name)
        batches.append(
            (jax.device_put(x.astype(name), model.device), jax.device_put(target, model.device))
        )
    return model, batches
