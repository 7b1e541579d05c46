"""A neutral description of a small MLP that every engine builds with the same flat parameters.

The network is ``h_0 = x``, ``h_l = act(h_{l-1} @ W_l + b_l)`` for hidden layers and
``out = h_{L-1} @ W_L + b_L`` (no activation on the output). ``W_l`` has shape
``(in, out)`` — the Keras layout, ``x @ W``; a PyTorch engine stores it transposed-free as a
plain parameter rather than in ``nn.Linear``'s (out, in) layout — and the flat parameter order
is ``W_1`` (C order), ``b_1``, ``W_2``, ``b_2``, ..., so results compare entry by entry.

Losses, per example:

- ``"cross_entropy"``: ``−log softmax(out)_y`` with integer labels ``y`` (N,);
- ``"mse"``: ``½ ‖out − y‖²`` (a sum over outputs) with float targets ``y`` (N, d_out);

plus ``½ l2 ‖θ‖²`` over all parameters in every per-example loss (the engines' ``l2=`` option).
With no hidden layer the spec is exactly a :mod:`krylov_influence.reference` model
(``SoftmaxRegression`` or ``LinearRegression`` with one output).

Engines materialise a spec through ``Engine.from_neutral_spec(spec, dtype=..., device=...)``,
returning the bound model and the data as a list of batches in the engine's own format.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ACTIVATIONS", "LOSSES", "MLPSpec", "numpy_activation", "random_mlp_spec"]

ACTIVATIONS: tuple[str, ...] = ("tanh", "softplus", "gelu", "relu")
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")


@dataclass(frozen=True, eq=False)
class MLPSpec:
    """A small MLP with its weights and data, as float64 NumPy arrays.

    Attributes
    ----------
    layer_sizes : tuple of int
        ``(d_in, h_1, ..., d_out)``; ``len(layer_sizes) - 1`` dense layers.
    activation : {"tanh", "softplus", "gelu", "relu"}
        Hidden activation (``gelu`` is the exact erf form).
    loss : {"cross_entropy", "mse"}
    weights : tuple of numpy.ndarray
        ``W_l`` of shape ``(layer_sizes[l], layer_sizes[l+1])``.
    biases : tuple of numpy.ndarray
        ``b_l`` of shape ``(layer_sizes[l+1],)``.
    x : numpy.ndarray, shape (N, d_in)
    y : numpy.ndarray
        (N,) integer labels for cross-entropy, (N, d_out) floats for mse.
    batch_size : int
        Examples per batch; the last batch may be shorter.
    l2 : float
        L2 coefficient in every per-example loss.
    """

    layer_sizes: tuple[int, ...]
    activation: str
    loss: str
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    x: np.ndarray
    y: np.ndarray
    batch_size: int
    l2: float = 0.0

    @property
    def num_parameters(self) -> int:
        """``p``: total number of weights and biases."""
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases))

    @property
    def num_examples(self) -> int:
        """``N``."""
        return int(self.x.shape[0])

    @property
    def hidden_layers(self) -> int:
        """Number of hidden layers (0: a linear or softmax regression)."""
        return len(self.layer_sizes) - 2

    def flat_parameters(self) -> np.ndarray:
        """θ in the neutral order: ``W_1`` (C order), ``b_1``, ``W_2``, ..., shape (p,)."""
        parts = []
        for w, b in zip(self.weights, self.biases):
            parts += [w.reshape(-1), b.reshape(-1)]
        return np.concatenate(parts)

    def batch_slices(self) -> list[slice]:
        """The example ranges of the batches, in order."""
        n, size = self.num_examples, self.batch_size
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def numpy_batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The data as ``(x, y)`` NumPy batches (float64 x)."""
        return [(self.x[s], self.y[s]) for s in self.batch_slices()]

    def forward(self, x: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        """NumPy forward pass (float64), optionally at another flat θ; shape (B, d_out)."""
        weights, biases = self.unflatten(self.flat_parameters() if theta is None else theta)
        h = np.asarray(x, dtype=np.float64)
        for layer, (w, b) in enumerate(zip(weights, biases)):
            h = h @ w + b
            if layer < len(weights) - 1:
                h = numpy_activation(self.activation, h)
        return h

    def losses(self, x: np.ndarray, y: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        """NumPy per-example losses (float64), shape (B,): the independent oracle."""
        flat = self.flat_parameters() if theta is None else theta
        out = self.forward(x, flat)
        if self.loss == "cross_entropy":
            top = out.max(axis=1, keepdims=True)
            log_norm = top[:, 0] + np.log(np.exp(out - top).sum(axis=1))
            data = log_norm - out[np.arange(len(y)), np.asarray(y, dtype=np.intp)]
        else:
            data = 0.5 * np.sum((out - y) ** 2, axis=1)
        return data + 0.5 * self.l2 * float(flat @ flat)

    def gradients(
        self, x: np.ndarray, y: np.ndarray, theta: np.ndarray | None = None
    ) -> np.ndarray:
        """Analytic per-example gradients by NumPy backpropagation (float64), shape (B, p).

        Independent of every engine: the conformance suite's oracle for gradients.
        """
        flat = self.flat_parameters() if theta is None else theta
        weights, biases = self.unflatten(flat)
        inputs, pre = [np.asarray(x, dtype=np.float64)], []
        for layer, (w, b) in enumerate(zip(weights, biases)):
            a = inputs[-1] @ w + b
            pre.append(a)
            if layer < len(weights) - 1:
                inputs.append(numpy_activation(self.activation, a))
        out = pre[-1]
        if self.loss == "cross_entropy":
            e = np.exp(out - out.max(axis=1, keepdims=True))
            delta = e / e.sum(axis=1, keepdims=True)
            delta[np.arange(len(y)), np.asarray(y, dtype=np.intp)] -= 1.0
        else:
            delta = out - y
        per_layer = []
        for layer in range(len(weights) - 1, -1, -1):
            grad_w = inputs[layer][:, :, None] * delta[:, None, :]
            per_layer.append((grad_w.reshape(len(delta), -1), delta))
            if layer:
                delta = (delta @ weights[layer].T) * _activation_derivative(
                    self.activation, pre[layer - 1]
                )
        parts = [part for pair in reversed(per_layer) for part in pair]
        return np.concatenate(parts, axis=1) + self.l2 * flat[None, :]

    def hessian(self, step: float = 1e-5) -> np.ndarray:
        """Hessian of the mean loss over all examples, shape (p, p), float64.

        Central differences of the analytic mean gradient (error ~1e-10 relative for smooth
        activations), symmetrised. Independent of every engine.
        """
        theta = self.flat_parameters()
        columns = []
        for i in range(theta.size):
            shift = np.zeros_like(theta)
            shift[i] = step
            plus = self.gradients(self.x, self.y, theta + shift).mean(axis=0)
            minus = self.gradients(self.x, self.y, theta - shift).mean(axis=0)
            columns.append((plus - minus) / (2 * step))
        hessian = np.stack(columns, axis=1)
        return 0.5 * (hessian + hessian.T)

    def unflatten(self, theta: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Split a flat θ into per-layer ``(weights, biases)`` in the neutral order."""
        weights, biases, offset = [], [], 0
        for fan_in, fan_out in zip(self.layer_sizes[:-1], self.layer_sizes[1:]):
            weights.append(theta[offset : offset + fan_in * fan_out].reshape(fan_in, fan_out))
            offset += fan_in * fan_out
            biases.append(theta[offset : offset + fan_out])
            offset += fan_out
        return weights, biases

    def reference_model(self) -> Any:
        """The equivalent :mod:`krylov_influence.reference` model (no hidden layer only).

        Raises
        ------
        ValueError
            If the spec has hidden layers, or an mse loss with several outputs.
        """
        from krylov_influence.reference import LinearRegression, SoftmaxRegression

        if self.hidden_layers:
            raise ValueError("reference models have no hidden layer")
        if self.loss == "cross_entropy":
            return SoftmaxRegression(self.weights[0], self.biases[0], l2=self.l2)
        if self.layer_sizes[-1] != 1:
            raise ValueError("the reference LinearRegression has a single output")
        return LinearRegression(self.weights[0][:, 0], self.biases[0][0], l2=self.l2)


def numpy_activation(name: str, h: np.ndarray) -> np.ndarray:
    """The hidden activation in NumPy (float64)."""
    if name == "tanh":
        return np.tanh(h)
    if name == "softplus":
        return np.logaddexp(0.0, h)
    if name == "relu":
        return np.maximum(h, 0.0)
    if name == "gelu":
        from math import erf

        return 0.5 * h * (1.0 + np.vectorize(erf)(h / np.sqrt(2.0)))
    raise ValueError(f"activation={name!r}: expected one of {ACTIVATIONS}")


def _activation_derivative(name: str, h: np.ndarray) -> np.ndarray:
    """Derivative of the hidden activation at pre-activations ``h``."""
    if name == "tanh":
        return 1.0 - np.tanh(h) ** 2
    if name == "softplus":
        return 0.5 * (1.0 + np.tanh(0.5 * h))  # the logistic sigmoid, overflow-free
    if name == "relu":
        return (h > 0).astype(h.dtype)
    if name == "gelu":
        from math import erf

        cdf = 0.5 * (1.0 + np.vectorize(erf)(h / np.sqrt(2.0)))
        return cdf + h * np.exp(-0.5 * h**2) / np.sqrt(2.0 * np.pi)
    raise ValueError(f"activation={name!r}: expected one of {ACTIVATIONS}")


def random_mlp_spec(
    rng: np.random.Generator,
    layer_sizes: tuple[int, ...],
    *,
    activation: str = "tanh",
    loss: str = "cross_entropy",
    num_examples: int = 24,
    batch_size: int = 10,
    l2: float = 1e-2,
    weight_scale: float = 0.5,
) -> MLPSpec:
    """A spec with Gaussian weights and data drawn from ``rng``.

    Parameters
    ----------
    rng : numpy.random.Generator
    layer_sizes : tuple of int
        ``(d_in, ..., d_out)``, at least two entries.
    activation, loss : str
    num_examples, batch_size : int
    l2 : float
    weight_scale : float
        Weights are ``weight_scale / sqrt(fan_in)`` times standard normals.

    Returns
    -------
    MLPSpec
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
    if len(layer_sizes) < 2:
        raise ValueError(f"layer_sizes={layer_sizes!r}: expected at least (d_in, d_out)")
    weights = tuple(
        weight_scale / np.sqrt(fan_in) * rng.standard_normal((fan_in, fan_out))
        for fan_in, fan_out in itertools.pairwise(layer_sizes)
    )
    biases = tuple(0.1 * rng.standard_normal(fan_out) for fan_out in layer_sizes[1:])
    x = rng.standard_normal((num_examples, layer_sizes[0]))
    y: np.ndarray
    if loss == "cross_entropy":
        y = rng.integers(0, layer_sizes[-1], num_examples)
    else:
        y = rng.standard_normal((num_examples, layer_sizes[-1]))
    return MLPSpec(
        tuple(layer_sizes), activation, loss, weights, biases, x, y, batch_size, float(l2)
    )
