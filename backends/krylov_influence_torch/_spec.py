"""The neutral MLP of :class:`krylov_influence.testing.MLPSpec` as a ``torch.nn.Module``.

Each layer holds ``weight`` of shape (in, out), used as ``x @ W + b`` (the spec's layout, not
``nn.Linear``'s (out, in)), so ``named_parameters()`` order — ``layers.0.weight``,
``layers.0.bias``, ``layers.1.weight``, ... — flattened in C order is exactly the spec's θ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["NeutralDense", "NeutralMLP", "neutral_loss"]


class NeutralDense(torch.nn.Module):
    """``x @ W + b`` with ``W`` of shape (in, out).

    Parameters
    ----------
    weight : tensor, shape (in, out)
    bias : tensor, shape (out,)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


_ACTIVATIONS = {
    "tanh": torch.tanh,
    # The default threshold (20) switches to the identity where softplus(h) − h < 3e-9.
    "softplus": F.softplus,
    "gelu": lambda h: F.gelu(h, approximate="none"),
    "relu": F.relu,
}


class NeutralMLP(torch.nn.Module):
    """``h_l = act(h_{l-1} @ W_l + b_l)`` for hidden layers, no activation on the output.

    Parameters
    ----------
    weights, biases : sequences of tensors
        ``W_l`` (in, out) and ``b_l`` (out,) per layer.
    activation : {"tanh", "softplus", "gelu", "relu"}
    """

    def __init__(self, weights: Any, biases: Any, activation: str):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: expected one of {sorted(_ACTIVATIONS)}")
        self.activation = activation
        self.layers = torch.nn.ModuleList(NeutralDense(w, b) for w, b in zip(weights, biases))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = act(x)
        return x


def neutral_loss(name: str) -> Any:
    """The spec's per-example loss: ``cross_entropy`` or ``½ Σ (out − y)²`` for ``mse``."""
    if name == "cross_entropy":

        def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(outputs, targets, reduction="none")

        return cross_entropy
    if name == "mse":

        def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return 0.5 * ((outputs - targets) ** 2).sum(dim=-1)

        return half_squared_error
    raise ValueError(f"loss={name!r}: expected 'cross_entropy' or 'mse'")
