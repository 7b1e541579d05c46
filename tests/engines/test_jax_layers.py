"""Every standard Flax nnx layer on every route of the JAX engine, against plain JAX.

For each layer a tiny nnx model (the layer, then an ``nnx.Linear`` head to two logits), bound
directly (``InfluenceModel(module, loss_fn)``), is checked against :mod:`jax_oracle`, which
calls the model through ``nnx.merge`` itself in eval mode:

- ``project(G, batch)`` with ``projection="gradients"`` and ``projection="jvp"`` against
  ``grads @ G.T``, ``grads`` the per-example gradients by one ``jax.grad`` per example;
- ``hvps(V, batches)`` with blocks of 1 and 4 vectors against ``V @ H``, ``H`` the dense Hessian
  of the mean loss by ``jax.hessian`` over ``ravel_pytree`` of the ``nnx.Param`` state.

Each check also asserts the route the engine took (:attr:`JaxInfluenceModel.routes`), so the
table in ``docs/layers.md`` is what these tests check; regenerate it with
``python -m tests.engines.test_jax_layers`` (a test fails when it is stale). JAX differentiates
and vectorises every layer here on the fast route: there is no fallback to take.

Tolerances as in ``test_tensorflow_layers.py``: ``4·sqrt(eps)`` of the dtype relative to the
largest entry of each row of ``|grads| @ |G|ᵀ`` (resp. ``|V| @ |H|``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
nnx = pytest.importorskip("flax.nnx")

import jax.numpy as jnp  # noqa: E402

try:  # pytest puts this folder on sys.path; `python -m tests.engines...` does not
    from jax_oracle import Oracle, assert_products_close, cross_entropy, oracle
except ImportError:  # pragma: no cover - only when run as a module for the docs table
    from tests.engines.jax_oracle import Oracle, assert_products_close, cross_entropy, oracle

import krylov_influence  # noqa: E402
from krylov_influence_jax._model import ROUTES, JaxInfluenceModel  # noqa: E402

try:  # pytest puts this folder on sys.path; `python -m tests.engines...` does not
    import layer_matrix
except ImportError:  # pragma: no cover - only when run as a module for the docs table
    from tests.engines import layer_matrix
NUM_EXAMPLES = 5


# ------------------------------------------------------------------------------ the layers
@dataclass(frozen=True)
class Layer:
    """A tiny model around one layer: ``body(dtype, rngs)`` is an nnx module or callable."""

    input_shape: tuple[int, ...]
    body: Any
    dtypes: tuple[str, ...] = ("float64", "float32")
    integer_input: int = 0  # > 0: token ids in [0, integer_input)


BOTH = ("float64", "float32")


def _conv(shape: tuple[int, ...], **options: Any) -> Any:
    return lambda d, r: nnx.Sequential(
        nnx.Conv(2, 2, shape, padding="VALID", dtype=d, param_dtype=d, rngs=r, **options),
        jnp.tanh,
    )


class LastStep(nnx.Module):
    """An ``nnx.RNN`` over the sequence; its output at the last step."""

    def __init__(self, rnn: Any):
        self.rnn = rnn

    def __call__(self, h):
        return self.rnn(h)[:, -1]


def _rnn(cell: Any) -> Any:
    return lambda d, r: LastStep(nnx.RNN(cell(2, 2, dtype=d, param_dtype=d, rngs=r), rngs=r))


def _dense_then(*layers: Any) -> Any:
    return lambda d, r: nnx.Sequential(
        nnx.Linear(3, 3, dtype=d, param_dtype=d, rngs=r), *(make(d, r) for make in layers)
    )


def _pool(h):
    return nnx.avg_pool(nnx.max_pool(h, (2, 2), strides=(2, 2)), (2, 2), strides=(2, 2))


LAYERS: dict[str, Layer] = {
    "Linear": Layer(
        (3,),
        lambda d, r: nnx.Sequential(nnx.Linear(3, 3, dtype=d, param_dtype=d, rngs=r), jnp.tanh),
        BOTH,
    ),
    "Conv 1D": Layer((5, 2), _conv((3,))),
    "Conv 2D": Layer((4, 4, 2), _conv((3, 3)), BOTH),
    "Conv 3D": Layer((3, 3, 3, 2), _conv((2, 2, 2))),
    "ConvTranspose": Layer(
        (2, 2, 2),
        lambda d, r: nnx.Sequential(
            nnx.ConvTranspose(2, 2, (2, 2), dtype=d, param_dtype=d, rngs=r), jnp.tanh
        ),
    ),
    "Conv, feature_group_count (depthwise)": Layer((4, 4, 2), _conv((3, 3), feature_group_count=2)),
    "separable (depthwise + pointwise Conv)": Layer(
        (4, 4, 2),
        lambda d, r: nnx.Sequential(
            nnx.Conv(2, 2, (3, 3), feature_group_count=2, dtype=d, param_dtype=d, rngs=r),
            nnx.Conv(2, 2, (1, 1), dtype=d, param_dtype=d, rngs=r),
            jnp.tanh,
        ),
    ),
    "Embed": Layer((3,), lambda d, r: nnx.Embed(5, 2, dtype=d, param_dtype=d, rngs=r), BOTH, 5),
    "RNN(SimpleCell)": Layer((3, 2), _rnn(nnx.SimpleCell)),
    "RNN(LSTMCell)": Layer((3, 2), _rnn(nnx.LSTMCell), BOTH),
    "RNN(GRUCell)": Layer((3, 2), _rnn(nnx.GRUCell)),
    "MultiHeadAttention": Layer(
        (3, 2),
        lambda d, r: nnx.MultiHeadAttention(
            num_heads=2,
            in_features=2,
            qkv_features=4,
            decode=False,
            dtype=d,
            param_dtype=d,
            rngs=r,
        ),
        BOTH,
    ),
    "BatchNorm (eval)": Layer(
        (3,),
        _dense_then(
            lambda d, r: nnx.BatchNorm(3, dtype=d, param_dtype=d, rngs=r), lambda d, r: jnp.tanh
        ),
    ),
    "LayerNorm": Layer(
        (3,),
        _dense_then(
            lambda d, r: nnx.LayerNorm(3, dtype=d, param_dtype=d, rngs=r), lambda d, r: jnp.tanh
        ),
    ),
    "max_pool + avg_pool": Layer(
        (4, 4, 2),
        lambda d, r: nnx.Sequential(
            nnx.Linear(2, 2, dtype=d, param_dtype=d, rngs=r), jnp.tanh, _pool
        ),
    ),
    "Dropout (deterministic)": Layer(
        (3,),
        _dense_then(lambda d, r: jnp.tanh, lambda d, r: nnx.Dropout(0.5, rngs=r)),
    ),
}

# The route each operator takes, per layer: (per_example_grads, project (jvp), hvp, hvps).
KERNELS = ("per_example_grads", "project (jvp)", "hvp", "hvps")
FAST = tuple(ROUTES[kernel] for kernel in KERNELS)
ROUTES_TAKEN: dict[tuple[str, str], tuple[str, str, str, str]] = {}  # no layer falls back


def expected_route(layer: str, dtype: str, kernel: str) -> str:
    return ROUTES_TAKEN.get((layer, dtype), FAST)[KERNELS.index(kernel)]


CASES = [(name, dtype) for name, layer in LAYERS.items() for dtype in layer.dtypes]
CASE_IDS = [f"{name}-{dtype}" for name, dtype in CASES]


# --------------------------------------------------------------------- models and oracles
class Net(nnx.Module):
    """``head(flatten(body(x)))``, two logits."""

    def __init__(self, body: Any, features: int, dtype: str, rngs: Any):
        self.body = body
        self.head = nnx.Linear(features, 2, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.body(x)
        return self.head(h.reshape(h.shape[0], -1))


def _materialise(abstract: Any, rng: np.random.Generator) -> Any:
    """The module of ``nnx.eval_shape``, with random nonzero values everywhere (biases, BN
    statistics; variances positive), so no second derivative hides. Building it abstractly
    skips Flax's initialisers, whose eager calls compile once per shape."""

    def draw(path, leaf):
        dtype, shape = leaf.dtype, leaf.shape
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), shape) if shape else jax.random.key(0)
        if not jnp.issubdtype(dtype, jnp.floating):
            return jnp.zeros(shape, dtype)  # RNG counters
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        value = rng.uniform(0.5, 1.5, shape) if name.endswith("var") else rng.normal(0, 0.6, shape)
        return jnp.asarray(value, dtype=dtype)

    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@dataclass
class Case:
    module: Any
    x: np.ndarray
    y: np.ndarray
    oracle: Oracle
    bound: dict[str, JaxInfluenceModel]  # projection route -> model, bound once per case


@functools.cache
def case(name: str, dtype: str) -> Case:
    layer = LAYERS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    shape = (NUM_EXAMPLES, *layer.input_shape)
    if layer.integer_input:
        x = rng.integers(0, layer.integer_input, shape).astype(np.int32)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    y = rng.integers(0, 2, NUM_EXAMPLES).astype(np.int32)

    def build():
        body = layer.body(jnp.dtype(dtype), nnx.Rngs(0))
        body.eval()  # no batch-statistics update while probing the shape
        features = int(np.prod(body(jnp.asarray(x[:2])).shape[1:]))  # abstract: no compute
        body.train()  # the user's module is in train mode; the engine must evaluate a copy
        return Net(body, features, jnp.dtype(dtype), nnx.Rngs(1))

    module = _materialise(nnx.eval_shape(build), rng)
    # The oracle: the module in eval mode through nnx.merge, only nnx.Param differentiated.
    evaluated = nnx.clone(module)
    evaluated.eval()
    graphdef, params, rest = nnx.split(evaluated, nnx.Param, ...)
    # As arrays, not Variables: merge then makes the RNG counter (which nnx.RNN advances)
    # inside the trace; a closed-over Variable cannot be mutated there.
    rest = nnx.to_pure_dict(rest)

    def loss(p, xs, ys):
        return cross_entropy(nnx.merge(graphdef, p, rest)(xs), ys)

    bound = {
        route: krylov_influence.InfluenceModel(module, cross_entropy, projection=route)
        for route in ("gradients", "jvp")
    }
    return Case(module, x, y, oracle(loss, params, x, y), bound)


@pytest.fixture(scope="module", autouse=True)
def _free_the_cached_models():
    """The cached cases hold bound models, and the JAX engine keeps a model's compiled programs
    while it is alive: drop them when this module's tests are done, not at the session's end."""
    yield
    case.cache_clear()


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("route", ["gradients", "jvp"])
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_projection_matches_per_example_gradients(name, dtype, route):
    c = case(name, dtype)
    model = c.bound[route]
    assert model.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(model.flat_parameters(), c.oracle.theta)  # the same order
    projector = np.random.default_rng(1).standard_normal((3, model.num_parameters))
    projected = model.project(model.from_numpy(projector), (c.x, c.y))
    assert projected.dtype == np.dtype(dtype)
    assert_products_close(projected, c.oracle.grads, projector.T, dtype)
    assert model.routes["per_example_grads"] == expected_route(name, dtype, "per_example_grads")
    if route == "jvp":
        assert model.routes["project (jvp)"] == expected_route(name, dtype, "project (jvp)")
    # The pass a store records: the same projections, and the losses of the same program.
    both, losses = model.project_and_losses(model.from_numpy(projector), (c.x, c.y))
    assert_products_close(both, c.oracle.grads, projector.T, dtype)
    assert losses.dtype == np.dtype(dtype) and losses.shape == (NUM_EXAMPLES,)
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(np.asarray(losses), c.oracle.losses, rtol=tol, atol=tol)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_hvps_match_the_dense_hessian(name, dtype, block):
    c = case(name, dtype)
    model = c.bound["jvp"]
    vectors = np.random.default_rng(2).standard_normal((block, model.num_parameters))
    products = model.hvps(model.from_numpy(vectors), [(c.x, c.y)])
    assert_products_close(products, vectors, c.oracle.hessian, dtype)
    kernel = "hvp" if block == 1 else "hvps"
    assert model.routes[kernel] == expected_route(name, dtype, kernel)


# ------------------------------------------------------------------------------ the docs
def routes_table() -> str:
    """The markdown table of docs/layers.md (JAX): the routes these tests assert, per layer."""
    return layer_matrix.routes_table(
        "nnx layer",
        [
            '`per_example_grads`, `projection="gradients"`',
            '`projection="jvp"`',
            "`hvps`, block 1",
            "`hvps`, block ≥ 2",
        ],
        CASES,
        lambda name, dtype, i: expected_route(name, dtype, KERNELS[i]),
        FAST,
    )


def test_the_docs_table_is_current():
    layer_matrix.assert_docs_has(routes_table(), "tests.engines.test_jax_layers")


if __name__ == "__main__":
    print(routes_table(), end="")
