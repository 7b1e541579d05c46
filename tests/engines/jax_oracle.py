"""An oracle for the JAX engine's operators that shares none of the engine's code.

Given ``loss(params, x, y) -> (B,)`` per-example losses written directly against a library
(``nnx.merge``, ``linen.apply``, ``eqx.combine``), the flat vector is
``jax.flatten_util.ravel_pytree`` of the differentiated pytree; per-example gradients are one
``jax.grad`` per example in a Python loop (not the engine's ``vmap``), and the Hessian of the
mean loss is ``jax.hessian`` of a function of that flat vector (dense, p × p).

Used by ``test_jax_models.py`` and ``test_jax_layers.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


@dataclass
class Oracle:
    theta: np.ndarray  # (p,) the flat parameters
    grads: np.ndarray  # (B, p) per-example gradients (l2·θ included)
    hessian: np.ndarray  # (p, p) Hessian of the mean loss (l2·I included), symmetrised


def oracle(
    loss: Callable[[Any, Any, Any], Any], params: Any, x: Any, y: Any, l2: float = 0.0
) -> Oracle:
    """Per-example gradients and the dense Hessian of ``mean loss + ½·l2·‖θ‖²``.

    Parameters
    ----------
    loss : callable
        ``loss(params, x, y) -> (B,)``, per-example losses through the library itself.
    params : pytree
        The differentiated parameters (the library's own container of them).
    x, y : arrays with examples on axis 0
    """
    theta, unravel = ravel_pytree(params)

    def one(t: Any, xi: Any, yi: Any) -> Any:
        return jnp.sum(loss(unravel(t), xi, yi)) + 0.5 * l2 * t @ t

    def mean(t: Any) -> Any:
        return jnp.mean(loss(unravel(t), x, y)) + 0.5 * l2 * t @ t

    with jax.default_matmul_precision("highest"):
        # Compiled (one program for every example), but one example per call.
        grad = jax.jit(jax.grad(one))
        grads = np.stack(
            [np.asarray(grad(theta, x[i : i + 1], y[i : i + 1])) for i in range(len(y))]
        )
        hessian = np.asarray(jax.jit(jax.hessian(mean))(theta), dtype=np.float64)
    return Oracle(np.asarray(theta), grads, (hessian + hessian.T) / 2)


def cross_entropy(logits: Any, labels: Any) -> Any:
    """``−log softmax(logits)_y`` per example, shape (B,)."""
    picked = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - picked


def rtol(dtype: str) -> float:
    """``4·sqrt(eps)``: 1.4e-3 in float32, 6e-8 in float64 (as in test_tensorflow_layers)."""
    return 4.0 * math.sqrt(float(np.finfo(dtype).eps))


def assert_products_close(actual: Any, left: Any, right: Any, dtype: str) -> None:
    """``actual ≈ left @ right`` within rtol × the row's largest entry of ``|left| @ |right|``.

    That is the scale of the rounding in each row's sums of products; entries that vanish by
    structure come out as rounding noise, so an entrywise relative test would be meaningless.
    """
    left = np.asarray(left, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    expected = left @ right
    scale = np.max(np.abs(left) @ np.abs(right), axis=1, keepdims=True) + np.finfo(dtype).tiny
    error = np.abs(np.asarray(actual, dtype=np.float64) - expected)
    worst = float(np.max(error / scale))
    assert worst <= rtol(dtype), f"max relative error {worst:.2e} > {rtol(dtype):.2e}"
