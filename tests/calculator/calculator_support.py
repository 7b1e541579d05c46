"""Support of the calculator tests: every engine that builds neutral specs, small problems.

An engine is skipped (never failed) when its framework is not installed, when it is not
registered, or when its ``from_neutral_spec`` raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import pytest

from krylov_influence import ArnoldiInfluenceCalculator, exact
from krylov_influence.errors import EngineNotFoundError
from krylov_influence.registry import get_engine
from krylov_influence.testing import random_mlp_spec

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ENGINES = ("numpy", "torch", "jax", "tensorflow")
FRAMEWORKS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}


def engine_class(name: str) -> Any:
    """The engine class, or a skip when its framework or registration is missing."""
    if name in FRAMEWORKS:
        module = pytest.importorskip(FRAMEWORKS[name])
        if name == "jax":  # these tests compute in float64 (process-global; dtypes explicit)
            module.config.update("jax_enable_x64", True)
    try:
        return get_engine(name)
    except EngineNotFoundError as error:
        pytest.skip(f"engine {name!r} not available: {error}")


def build(engine: Any, spec: Any, dtype: str = "float64") -> tuple[Any, list[Any]]:
    """``engine.from_neutral_spec`` or a skip when the engine does not build specs yet."""
    try:
        return engine.from_neutral_spec(spec, dtype=dtype)
    except NotImplementedError as error:
        pytest.skip(f"{engine.name}: from_neutral_spec not implemented ({error})")


def training_spec(seed: int = 0, *, num_examples: int = 23, batch_size: int = 5) -> Any:
    """Softmax regression, 4 features, 3 classes (p = 15); 23 examples: a partial batch."""
    rng = np.random.default_rng(seed)
    return random_mlp_spec(rng, (4, 3), num_examples=num_examples, batch_size=batch_size, l2=0.1)


def query_spec(spec: Any, seed: int = 1, *, num_examples: int = 7, batch_size: int = 3) -> Any:
    """Same weights as ``spec``, fresh data: 7 queries in batches of 3 (partial last)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, spec.layer_sizes[0]))
    y = rng.integers(0, spec.layer_sizes[-1], num_examples)
    return dataclasses.replace(spec, x=x, y=y, batch_size=batch_size)


@dataclasses.dataclass
class Problem:
    """A fitted calculator with its data and the exact oracle."""

    engine: Any
    spec: Any
    model: Any
    train: list[Any]
    queries: list[Any]
    calc: ArnoldiInfluenceCalculator
    scores: np.ndarray  # exact (N_queries, N_train)
    self_influence: np.ndarray  # exact (N_train,)
    gradients: np.ndarray  # exact per-example training gradients (N_train, p)

    @property
    def rtol(self) -> float:
        return 1e-9  # float64 throughout; round-off of a p = 15 problem is far below


def softmax_hessian(spec: Any) -> np.ndarray:
    """The mean-loss Hessian of softmax regression in closed form, shape (p, p).

    With ``z = [x, 1]``, probabilities ``π`` and the spec's flat order (``W`` row-major, then
    ``b``), an example's gradient is ``z ⊗ (π − e_y)`` and its Hessian ``z zᵀ ⊗ (diag π − π πᵀ)``;
    plus ``l2 I``. No engine and no autodiff: the calculator tests' oracle.
    """
    assert spec.hidden_layers == 0 and spec.loss == "cross_entropy"
    z = np.concatenate([spec.x, np.ones((spec.num_examples, 1))], axis=1)
    weights = np.concatenate([spec.weights[0], spec.biases[0][None, :]], axis=0)
    logits = z @ weights
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    curvature = np.einsum("nc,cd->ncd", probs, np.eye(probs.shape[1])) - np.einsum(
        "nc,nd->ncd", probs, probs
    )
    hessian = np.einsum("ni,nj,ncd->icjd", z, z, curvature).reshape(
        z.shape[1] * probs.shape[1], -1
    ) / len(z)
    return hessian + spec.l2 * np.eye(hessian.shape[0])


def make_problem(engine: Any, *, k: int | None = None, damping: float = 0.0) -> Problem:
    """Fit with subspace_dim = p (exact up to round-off). The oracle shares no code path with
    any engine: gradients by the spec's NumPy backpropagation (``MLPSpec.gradients``) and the
    Hessian in closed form (:func:`softmax_hessian`). The NumPy engine's own derivatives are
    checked against the same oracle by the conformance suite."""
    spec = training_spec()
    queries_spec = query_spec(spec)
    model, train = build(engine, spec)
    _, queries = build(engine, queries_spec)
    p = model.num_parameters
    calc = ArnoldiInfluenceCalculator(
        model, train, p, True, p if k is None else k, "float64", damping=damping
    )
    inverse = exact.inverse_hessian(softmax_hessian(spec), damping)
    gradients = spec.gradients(spec.x, spec.y)
    query_gradients = queries_spec.gradients(queries_spec.x, queries_spec.y)
    return Problem(
        engine,
        spec,
        model,
        train,
        queries,
        calc,
        query_gradients @ inverse @ gradients.T,
        np.einsum("ip,pq,iq->i", gradients, inverse, gradients),
        gradients,
    )


def scores_of(problem: Problem, stream: object) -> np.ndarray:
    return np.concatenate(
        [
            np.concatenate([problem.model.to_numpy(s) for _, s in per_train], axis=1)
            for _, per_train in stream
        ]
    )


def top_k_of(problem: Problem, stream: object) -> tuple[np.ndarray, np.ndarray]:
    results = list(stream)
    values = np.concatenate([problem.model.to_numpy(r.values) for r in results])
    indices = np.concatenate([problem.model.to_numpy(r.indices) for r in results])
    return values, indices
