"""Support of the calculator tests: every engine that builds neutral specs, small problems.

An engine is skipped (never failed) when its framework is not installed, when it is not
registered, or when its ``from_neutral_spec`` raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import functools
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


@functools.cache  # one spec object per variant (trained once per session)
def mlp_spec(*, trained: bool) -> Any:
    """A tanh MLP, 4 inputs, 4 hidden units, 3 classes (p = 35), l2 = 0.01, the data layout of
    :func:`training_spec` (23 examples in batches of 5).

    ``trained=False``: large random weights, far from a minimum: the Hessian is indefinite
    (12 of 35 eigenvalues negative, the smallest magnitude 0.6 % of the largest).
    ``trained=True``: the same network trained to a minimum of the mean loss (L-BFGS, gradient
    norm < 1e-7): a non-convex model at a minimum, positive definite (condition number ~240).
    """
    spec = random_mlp_spec(
        np.random.default_rng(2),
        (4, 4, 3),
        num_examples=23,
        batch_size=5,
        l2=0.01,
        weight_scale=2.0,
    )
    return _trained(spec) if trained else spec


def _trained(spec: Any) -> Any:
    from scipy.optimize import minimize

    def mean_loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        losses = spec.losses(spec.x, spec.y, theta)
        return float(losses.mean()), spec.gradients(spec.x, spec.y, theta).mean(axis=0)

    result = minimize(
        mean_loss,
        spec.flat_parameters(),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 0.0, "maxiter": 2000},
    )
    weights, biases = spec.unflatten(result.x)
    trained = dataclasses.replace(spec, weights=tuple(weights), biases=tuple(biases))
    assert np.linalg.norm(trained.gradients(trained.x, trained.y).mean(axis=0)) < 1e-7
    return trained


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
    kind: str = "softmax"

    @property
    def rtol(self) -> float:
        # float64 throughout; round-off of these problems (p ≤ 35, condition numbers ≤ 240)
        # times the largest entry is far below.
        return 1e-9


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


def mlp_hessian(spec: Any) -> np.ndarray:
    """The mean-loss Hessian of a one-hidden-layer tanh MLP with cross-entropy, shape (p, p).

    With ``z = [x, 1]``, ``a = tanh(z U)``, ``u = [a, 1]``, logits ``u V`` (``U = [W_1; b_1]``,
    ``V = [W_2; b_2]``, the spec's flat order is ``U`` then ``V`` row-major), probabilities
    ``π`` and ``r = π − e_y``, an example's Hessian is the Gauss-Newton part ``Jᵀ (diag π −
    π πᵀ) J`` (``J`` the Jacobian of the logits) plus the logits' curvature weighted by ``r``:
    ``∂²/∂U_ik ∂U_jk = z_i z_j (W_2 r)_k tanh''(h_k)`` and ``∂²/∂U_ik ∂V_kc = z_i r_c
    tanh'(h_k)``; plus ``l2 I``. Closed form in NumPy, no engine, no autodiff: exact to
    round-off (``test_calculator_oracle`` checks it against central differences of the spec's
    analytic gradients, which agree to ~1e-9 relative).
    """
    assert spec.hidden_layers == 1 and spec.activation == "tanh"
    assert spec.loss == "cross_entropy"
    (w1, w2), (b1, b2) = spec.weights, spec.biases
    n = spec.num_examples
    z = np.concatenate([spec.x, np.ones((n, 1))], axis=1)
    a = np.tanh(z @ np.concatenate([w1, b1[None, :]]))
    slope = 1.0 - a**2  # tanh'
    bend = -2.0 * a * slope  # tanh''
    u = np.concatenate([a, np.ones((n, 1))], axis=1)
    logits = u @ np.concatenate([w2, b2[None, :]])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    residual = probs.copy()
    residual[np.arange(n), np.asarray(spec.y, dtype=np.intp)] -= 1.0
    inputs, hidden, classes = z.shape[1], a.shape[1], probs.shape[1]
    jacobian = np.concatenate(
        [
            np.einsum("ni,kc,nk->ncik", z, w2, slope).reshape(n, classes, -1),
            np.einsum("nj,cd->ncjd", u, np.eye(classes)).reshape(n, classes, -1),
        ],
        axis=2,
    )
    curvature = np.einsum("nc,cd->ncd", probs, np.eye(classes)) - np.einsum(
        "nc,nd->ncd", probs, probs
    )
    hessian = np.einsum("ncp,ncd,ndq->pq", jacobian, curvature, jacobian)
    first = inputs * hidden  # the U block, then the V block
    weighted = (residual @ w2.T) * bend  # (n, hidden)
    uu = np.einsum("ikj,kl->ikjl", np.einsum("ni,nj,nk->ikj", z, z, weighted), np.eye(hidden))
    uv = np.zeros((inputs, hidden, hidden + 1, classes))
    uv[:, :, :hidden, :] = np.einsum(
        "ikc,kj->ikjc", np.einsum("ni,nk,nc->ikc", z, slope, residual), np.eye(hidden)
    )
    uv = uv.reshape(first, -1)
    hessian[:first, :first] += uu.reshape(first, first)
    hessian[:first, first:] += uv
    hessian[first:, :first] += uv.T
    return hessian / n + spec.l2 * np.eye(hessian.shape[0])


@dataclasses.dataclass(frozen=True)
class Kind:
    """One calculator-test problem: how its spec is built, its oracle Hessian, its damping."""

    name: str
    spec: Any  # () -> MLPSpec
    hessian: Any  # MLPSpec -> (p, p) ndarray
    damping: float
    engines: tuple[str, ...]  # the engines that build it


# The convex softmax regression on every engine; a non-convex tanh MLP at a minimum, and away
# from one (indefinite, damped: 6 of 35 eigenvalues of H + δI stay negative), on torch and
# JAX. The NumPy reference engine has analytic regressions only (no hidden layer); the
# TensorFlow engine builds the MLP too (tests/engines and the conformance suite cover it), but
# its model builds cost seconds each, so the calculator tests' MLP runs leave it out.
MLP_ENGINES = ("torch", "jax")
KINDS = {
    "softmax": Kind("softmax", training_spec, softmax_hessian, 0.0, ENGINES),
    "mlp": Kind("mlp", lambda: mlp_spec(trained=True), mlp_hessian, 0.0, MLP_ENGINES),
    "mlp_indefinite": Kind(
        "mlp_indefinite", lambda: mlp_spec(trained=False), mlp_hessian, 0.1, MLP_ENGINES
    ),
}
# (engine, kind) pairs of the ``problem`` fixture; ids keep the engine alone for the softmax.
ENGINE_KINDS = [(engine, kind) for kind in KINDS for engine in KINDS[kind].engines]


def make_problem(
    engine: Any,
    *,
    kind: str = "softmax",
    k: int | None = None,
    damping: float | None = None,
    saved: Any = None,
    wrap: Any = None,
) -> Problem:
    """Fit with subspace_dim = p (exact up to round-off). The oracle shares no code path with
    any engine: gradients by the spec's NumPy backpropagation (``MLPSpec.gradients``) and the
    Hessian in closed form (:func:`softmax_hessian`, :func:`mlp_hessian`). The NumPy engine's
    own derivatives are checked against the same oracle by the conformance suite.
    ``damping=None``: the kind's own. ``saved``: the path of this problem's calculator, saved
    by an earlier fit, loaded (and checked against the model's Hessian) instead of refitting.
    ``wrap``: applied to the bound model before the fit (a wrapper that injects a fault)."""
    problem_kind = KINDS[kind]
    damping = problem_kind.damping if damping is None else damping
    spec = problem_kind.spec()
    queries_spec = query_spec(spec)
    model, train = build(engine, spec)
    _, queries = build(engine, queries_spec)
    if wrap is not None:
        model = wrap(model)
    p = model.num_parameters
    if saved is None:
        calc = ArnoldiInfluenceCalculator(
            model, train, p, True, p if k is None else k, "float64", damping=damping
        )
    else:
        calc = ArnoldiInfluenceCalculator.load(saved, model, train_dataset=train)
        assert (calc.damping, calc.k_largest_eig_vals) == (damping, p if k is None else k)
    inverse = exact.inverse_hessian(problem_kind.hessian(spec), damping)
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
        kind,
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
