"""Hypothesis strategies for neutral MLP specs (needs ``hypothesis``)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import strategies as st

from krylov_influence.testing.spec import ACTIVATIONS, MLPSpec, random_mlp_spec

__all__ = ["mlp_specs"]


@st.composite
def mlp_specs(
    draw: st.DrawFn,
    *,
    max_hidden_layers: int = 2,
    min_parameters: int = 2,
    max_parameters: int = 40,
    activations: tuple[str, ...] = ACTIVATIONS,
    losses: tuple[str, ...] = ("cross_entropy", "mse"),
    l2: tuple[float, ...] = (0.05, 0.2),
) -> MLPSpec:
    """Small random MLP specs: sizes, activation, loss, weights, data, batch size.

    Parameters
    ----------
    max_hidden_layers : int
        0 gives linear/softmax regressions (what the NumPy reference engine builds).
    min_parameters, max_parameters : int
        Bounds on ``p`` (specs outside are redrawn).
    activations, losses : tuple of str
        Choices drawn from.
    l2 : tuple of float
        Choices of the L2 coefficient (> 0 keeps the Hessian of small models well conditioned).

    Returns
    -------
    SearchStrategy of MLPSpec
    """
    loss = draw(st.sampled_from(losses), label="loss")
    hidden = draw(st.integers(0, max_hidden_layers), label="hidden_layers")
    d_in = draw(st.integers(1, 4), label="d_in")
    widths = [draw(st.integers(1, 4), label="width") for _ in range(hidden)]
    d_out = draw(st.integers(2, 3), label="classes") if loss == "cross_entropy" else 1
    if hidden == 0 and loss == "mse":
        d_out = 1  # the reference LinearRegression has a single output
    elif loss == "mse":
        d_out = draw(st.integers(1, 2), label="outputs")
    sizes = (d_in, *widths, d_out)
    p = sum(a * b + b for a, b in itertools.pairwise(sizes))
    if not min_parameters <= p <= max_parameters:
        # A small regression always fits the bounds (one output for mse, as the reference).
        sizes = (min(d_in, 2), 1 if loss == "mse" else d_out)
    spec = random_mlp_spec(
        np.random.default_rng(draw(st.integers(0, 2**31 - 1), label="seed")),
        sizes,
        activation=draw(st.sampled_from(activations), label="activation"),
        loss=loss,
        num_examples=draw(st.integers(3, 24), label="num_examples"),
        batch_size=draw(st.integers(1, 10), label="batch_size"),
        l2=draw(st.sampled_from(l2), label="l2"),
        weight_scale=draw(st.sampled_from([0.5, 1.0]), label="weight_scale"),
    )
    return spec
