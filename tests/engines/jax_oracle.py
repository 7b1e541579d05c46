"""An oracle for the JAX engine's operators that shares none of the engine's code.

Given ``loss(params, x, y) -> (B,)`` per-example losses written directly against a library
(``nnx.merge``, ``linen.apply``, ``eqx.combine``), the flat vector is
``jax.flatten_util.ravel_pytree`` of the differentiated pytree; per-example gradients are one
``jax.grad`` per example in a Python loop (not the engine's ``vmap``), and the Hessian of the
mean loss is ``jax.hessian`` of a function of that flat vector (dense, p × p).

Used by ``test_jax_models.py`` and ``test_jax_layers.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

try:  # pytest puts this folder on sys.path; `python -m tests.engines...` does not
    from layer_matrix import assert_products_close, rtol
except ImportError:  # pragma: no cover - only when run as a module for the docs table
    from tests.engines.layer_matrix import assert_products_close, rtol

# The product check and its tolerance are the layer matrices' (re-exported for the JAX files).
__all__ = ["Oracle", "assert_products_close", "cross_entropy", "oracle", "rtol"]


@dataclass
class Oracle:
    theta: np.ndarray  # (p,) the flat parameters
    grads: np.ndarray  # (B, p) per-example gradients (l2·θ included)
    hessian: np.ndarray  # (p, p) Hessian of the mean loss (l2·I included), symmetrised
    losses: np.ndarray  # (B,) per-example losses (½·l2·‖θ‖² included)


def oracle(
    loss: Callable[[Any, Any, Any], Any], params: Any, x: Any, y: Any, l2: float = 0.0
) -> Oracle:
    """Per-example gradients and losses, and the dense Hessian of ``mean loss + ½·l2·‖θ‖²``.

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
        losses = np.asarray(loss(params, x, y) + 0.5 * l2 * theta @ theta)
    return Oracle(np.asarray(theta), grads, (hessian + hessian.T) / 2, losses)


def cross_entropy(logits: Any, labels: Any) -> Any:
    """``−log softmax(logits)_y`` per example, shape (B,)."""
    picked = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - picked
