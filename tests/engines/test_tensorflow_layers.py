"""Every standard Keras layer on every route of the TensorFlow engine, against plain TensorFlow.

For each layer a tiny Keras model (the layer, then a ``Dense`` head to two logits) is checked:

- ``project(G, batch)`` with ``projection="gradients"`` and ``projection="jvp"`` against
  ``grads @ G.T``, where ``grads`` are per-example gradients taken with ``tf.GradientTape`` one
  example at a time through the Keras model itself (not the engine's functional copy);
- ``hvps(V, batches)`` with blocks of 1 and 4 vectors against ``V @ H``, with ``H`` the dense
  Hessian of the mean loss built by nested tapes, one gradient per row (no ``pfor``).

Each check also asserts the route the engine took (:attr:`TensorFlowInfluenceModel.routes`),
so the table in ``docs/layers.md`` is what these tests check; regenerate it with
``python -m tests.engines.test_tensorflow_layers`` (a test fails when it is stale).

Tolerances: ``4·sqrt(eps)`` of the dtype relative to the largest entry of each row of
``|grads| @ |G|ᵀ`` (resp. ``|V| @ |H|``), the scale of the rounding in a sum of products, in
float32 and float64 alike.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import krylov_influence  # noqa: E402
from krylov_influence import exact  # noqa: E402
from krylov_influence.calculator import ArnoldiInfluenceCalculator  # noqa: E402
from krylov_influence_tf import RouteFallbackWarning  # noqa: E402
from krylov_influence_tf._functional import exact_moments  # noqa: E402
from krylov_influence_tf._model import (  # noqa: E402
    FORWARD_OVER_REVERSE,
    GRADIENTS_IN_CHUNKS,
    JVP_VECTORISED,
    LOOP,
    REVERSE_OVER_REVERSE,
    UNROLLED,
    VECTORISED,
    VECTORISED_LOOP_FALLBACK,
)

try:  # pytest puts this folder on sys.path; `python -m tests.engines...` does not
    import layer_matrix
    from layer_matrix import assert_products_close, rtol
except ImportError:  # pragma: no cover - only when run as a module for the docs table
    from tests.engines import layer_matrix
    from tests.engines.layer_matrix import assert_products_close, rtol
NUM_EXAMPLES = 5
L = keras.layers


def cross_entropy(y, logits):
    """Per-example softmax cross-entropy, written in plain TensorFlow (the oracle's loss too)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(y, tf.int32), logits=logits
    )


# ------------------------------------------------------------------------------ the layers
@dataclass(frozen=True)
class Layer:
    """A tiny model around one layer: ``body(dtype)`` maps a Keras input to features."""

    input_shape: tuple[int, ...]
    body: Any
    dtypes: tuple[str, ...] = ("float64", "float32")
    integer_input: int = 0  # > 0: token ids in [0, integer_input)


def _seq(*layers):
    return lambda h: functools.reduce(lambda acc, layer: layer(acc), layers, h)


def _mha(dtype):
    attention = L.MultiHeadAttention(num_heads=2, key_dim=2, dtype=dtype)
    return lambda h: L.Flatten(dtype=dtype)(attention(h, h))


BOTH = ("float64", "float32")
LAYERS: dict[str, Layer] = {
    "Dense": Layer((3,), lambda d: L.Dense(3, activation="tanh", dtype=d), BOTH),
    "Conv1D": Layer(
        (5, 2), lambda d: _seq(L.Conv1D(2, 3, activation="tanh", dtype=d), L.Flatten(dtype=d))
    ),
    "Conv2D": Layer(
        (4, 4, 1),
        lambda d: _seq(L.Conv2D(2, 3, activation="tanh", dtype=d), L.Flatten(dtype=d)),
        BOTH,
    ),
    "Conv3D": Layer(
        (3, 3, 3, 1),
        lambda d: _seq(L.Conv3D(2, 2, activation="tanh", dtype=d), L.Flatten(dtype=d)),
        BOTH,
    ),
    "Conv2DTranspose": Layer(
        (2, 2, 1),
        lambda d: _seq(L.Conv2DTranspose(2, 2, activation="tanh", dtype=d), L.Flatten(dtype=d)),
    ),
    "DepthwiseConv2D": Layer(
        (4, 4, 2),
        lambda d: _seq(L.DepthwiseConv2D(3, activation="tanh", dtype=d), L.Flatten(dtype=d)),
        BOTH,
    ),
    "SeparableConv2D": Layer(
        (4, 4, 2),
        lambda d: _seq(L.SeparableConv2D(2, 3, activation="tanh", dtype=d), L.Flatten(dtype=d)),
    ),
    "Embedding": Layer(
        (3,), lambda d: _seq(L.Embedding(5, 2, dtype=d), L.Flatten(dtype=d)), BOTH, 5
    ),
    "SimpleRNN": Layer((3, 2), lambda d: L.SimpleRNN(2, dtype=d)),
    "LSTM": Layer((3, 2), lambda d: L.LSTM(2, dtype=d), BOTH),
    "GRU": Layer((3, 2), lambda d: L.GRU(2, dtype=d)),
    "LSTM, unroll=True": Layer((3, 2), lambda d: L.LSTM(2, unroll=True, dtype=d)),
    "MultiHeadAttention": Layer((3, 2), _mha, BOTH),
    "BatchNormalization": Layer(
        (3,),
        lambda d: _seq(
            L.Dense(3, dtype=d), L.BatchNormalization(dtype=d), L.Activation("tanh", dtype=d)
        ),
    ),
    "LayerNormalization": Layer(
        (3,),
        lambda d: _seq(
            L.Dense(3, dtype=d), L.LayerNormalization(dtype=d), L.Activation("tanh", dtype=d)
        ),
    ),
    "MaxPooling2D + AveragePooling2D": Layer(
        (4, 4, 2),
        lambda d: _seq(
            L.Dense(2, activation="tanh", dtype=d),
            L.MaxPooling2D(2, dtype=d),
            L.AveragePooling2D(2, dtype=d),
            L.Flatten(dtype=d),
        ),
    ),
    "Dropout": Layer(
        (3,), lambda d: _seq(L.Dense(3, activation="tanh", dtype=d), L.Dropout(0.5, dtype=d))
    ),
}

# The route each operator takes, per layer: (per_example_grads, project (jvp), hvp, hvps,
# hvp and hvps with hvp_mode="forward-over-reverse"). Layers not listed take the fast routes
# everywhere.
FAST = (
    VECTORISED,
    JVP_VECTORISED,
    REVERSE_OVER_REVERSE,
    f"{REVERSE_OVER_REVERSE}, {VECTORISED}",
    FORWARD_OVER_REVERSE,
    f"{FORWARD_OVER_REVERSE}, {VECTORISED}",
)
# pfor has no rule for a convolution's filter tangent: reverse-over-reverse blocks unroll
# their products, forward-over-reverse ones loop over them.
_CONV_FILTER_TANGENT = (
    VECTORISED,
    GRADIENTS_IN_CHUNKS,
    REVERSE_OVER_REVERSE,
    f"{REVERSE_OVER_REVERSE}, {UNROLLED}",
    FORWARD_OVER_REVERSE,
    f"{FORWARD_OVER_REVERSE}, {LOOP}",
)
_NO_PFOR_RULE = (VECTORISED_LOOP_FALLBACK, *_CONV_FILTER_TANGENT[1:])
_RECURRENT = (
    VECTORISED,
    GRADIENTS_IN_CHUNKS,
    REVERSE_OVER_REVERSE,
    f"{REVERSE_OVER_REVERSE}, {UNROLLED}",
    # forward mode cannot enter Keras's recurrent while_loop
    REVERSE_OVER_REVERSE,
    f"{REVERSE_OVER_REVERSE}, {UNROLLED}",
)
ROUTES: dict[tuple[str, str], tuple[str, ...]] = {
    ("Conv1D", "float64"): _CONV_FILTER_TANGENT,
    ("Conv1D", "float32"): _CONV_FILTER_TANGENT,
    ("Conv2D", "float64"): _CONV_FILTER_TANGENT,
    ("Conv2D", "float32"): _CONV_FILTER_TANGENT,
    ("Conv3D", "float64"): _NO_PFOR_RULE,
    ("Conv3D", "float32"): _NO_PFOR_RULE,
    ("Conv2DTranspose", "float64"): _CONV_FILTER_TANGENT,
    ("Conv2DTranspose", "float32"): _CONV_FILTER_TANGENT,
    ("DepthwiseConv2D", "float64"): _NO_PFOR_RULE,
    ("DepthwiseConv2D", "float32"): _NO_PFOR_RULE,
    ("SeparableConv2D", "float64"): _NO_PFOR_RULE,
    ("SeparableConv2D", "float32"): _NO_PFOR_RULE,
    ("SimpleRNN", "float64"): _RECURRENT,
    ("SimpleRNN", "float32"): _RECURRENT,
    ("LSTM", "float64"): _RECURRENT,
    ("LSTM", "float32"): _RECURRENT,
    ("GRU", "float64"): _RECURRENT,
    ("GRU", "float32"): _RECURRENT,
}
KERNELS = (
    "per_example_grads",
    "project (jvp)",
    "hvp",
    "hvps",
    "hvp (forward-over-reverse)",
    "hvps (forward-over-reverse)",
)


def expected_route(layer: str, dtype: str, kernel: str) -> str:
    return ROUTES.get((layer, dtype), FAST)[KERNELS.index(kernel)]


CASES = [(name, dtype) for name, layer in LAYERS.items() for dtype in layer.dtypes]
CASE_IDS = [f"{name}-{dtype}" for name, dtype in CASES]
RECURRENT = ("SimpleRNN", "GRU", "LSTM")


# --------------------------------------------------------------------- models and oracles
def _randomise(model: Any, rng: np.random.Generator) -> None:
    """Nonzero weights everywhere (biases, BN statistics), so no second derivative hides."""
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "moving_variance" in variable.path:
            value = rng.uniform(0.5, 1.5, shape)
        elif "moving_mean" in variable.path or variable.trainable:
            value = 0.6 * rng.standard_normal(shape)
        else:
            continue
        variable.assign(value.astype(variable.dtype))


def _flat(parts: list[Any]) -> tf.Tensor:
    return tf.concat([tf.reshape(tf.convert_to_tensor(p), [-1]) for p in parts], axis=0)


@dataclass
class Case:
    model: Any
    x: np.ndarray
    y: np.ndarray
    grads: np.ndarray  # (B, p): the oracle's per-example gradients
    hessian: np.ndarray  # (p, p): the oracle's Hessian of the mean loss
    bound: dict[str, Any]  # projection route -> InfluenceModel, bound once per case


def _oracle_gradients(model: Any, x: Any, y: Any) -> np.ndarray:
    rows = []
    for i in range(len(y)):  # one example at a time, through the Keras model itself
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(cross_entropy(y[i : i + 1], model(x[i : i + 1], training=False)))
        rows.append(_flat(tape.gradient(loss, model.trainable_variables)).numpy())
    return np.stack(rows)


def _oracle_hessian(model: Any, x: Any, y: Any) -> np.ndarray:
    """Nested tapes, with Keras's moments made twice differentiable as the engine does (their
    ``tf.nn.moments`` is not; ``test_tensorflow_normalisation.py`` checks the fix against
    finite differences of exact gradients)."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer, exact_moments():
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(cross_entropy(y, model(x, training=False)))
        grad = _flat(inner.gradient(loss, variables))
        entries = [grad[j] for j in range(int(grad.shape[0]))]
    rows = [
        _flat(outer.gradient(entry, variables, unconnected_gradients="zero")).numpy()
        for entry in entries
    ]
    del outer
    hessian = np.stack(rows)
    return (hessian + hessian.T) / 2


@functools.cache
def case(name: str, dtype: str) -> Case:
    layer = LAYERS[name]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(sum(map(ord, name)))
    inputs = keras.Input(layer.input_shape, dtype="int32" if layer.integer_input else dtype)
    features = layer.body(dtype)(inputs)
    model = keras.Model(inputs, L.Dense(2, dtype=dtype)(features))
    _randomise(model, rng)
    shape = (NUM_EXAMPLES, *layer.input_shape)
    if layer.integer_input:
        x = rng.integers(0, layer.integer_input, shape).astype(np.int32)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    y = rng.integers(0, 2, NUM_EXAMPLES).astype(np.int32)
    bound = {
        route: krylov_influence.InfluenceModel(model, cross_entropy, projection=route)
        for route in ("gradients", "jvp")
    }
    bound["forward-over-reverse"] = krylov_influence.InfluenceModel(
        model, cross_entropy, hvp_mode="forward-over-reverse"
    )
    return Case(model, x, y, _oracle_gradients(model, x, y), _oracle_hessian(model, x, y), bound)


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("route", ["gradients", "jvp"])
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_projection_matches_per_example_gradients(name, dtype, route):
    c = case(name, dtype)
    model = c.bound[route]
    p = model.num_parameters
    assert p == c.grads.shape[1]
    projector = np.random.default_rng(1).standard_normal((3, p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        projected = model.project(model.from_numpy(projector), (c.x, c.y)).numpy()
    assert_products_close(projected, c.grads, projector.T, dtype)
    per_example = expected_route(name, dtype, "per_example_grads")
    if route == "jvp":
        assert model.routes["project (jvp)"] == expected_route(name, dtype, "project (jvp)")
    if route == "gradients" or model.routes["project (jvp)"] == GRADIENTS_IN_CHUNKS:
        # The projection's own per-example pass (per parameter, times G's blocks) takes
        # the route per_example_grads takes.
        assert model.routes["project (gradients)"] == per_example
    if route == "gradients":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RouteFallbackWarning)
            grads = model.per_example_grads((c.x, c.y)).numpy()
        assert_products_close(grads, c.grads, np.eye(p), dtype)
        assert model.routes["per_example_grads"] == per_example
    _check_project_and_losses(c, model, projector, dtype)


def _check_project_and_losses(c: Case, model, projector: np.ndarray, dtype: str, rows=None):
    """``project_and_losses``: the projections of the tape's gradients, and the losses of the
    Keras model called directly (on the gradient routes they come from the gradient pass)."""
    x, y, grads = (c.x, c.y, c.grads) if rows is None else (c.x[rows], c.y[rows], c.grads[rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        both, losses = model.project_and_losses(model.from_numpy(projector), (x, y))
    assert_products_close(both.numpy(), grads, projector.T, dtype)
    expected = cross_entropy(y, c.model(x)).numpy().astype(np.float64)
    assert losses.dtype == model.dtype and tuple(losses.shape) == (len(y),)
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(losses.numpy().astype(np.float64), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse"])
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_hvps_match_the_dense_hessian(name, dtype, block, mode):
    c = case(name, dtype)
    model = c.bound["forward-over-reverse" if mode == "forward-over-reverse" else "jvp"]
    vectors = np.random.default_rng(2).standard_normal((block, model.num_parameters))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        products = model.hvps(model.from_numpy(vectors), [(c.x, c.y)]).numpy()
    assert_products_close(products, vectors, c.hessian, dtype)
    kernel = "hvp" if block == 1 else "hvps"
    expected = f"{kernel} (forward-over-reverse)" if mode == "forward-over-reverse" else kernel
    assert model.routes[kernel] == expected_route(name, dtype, expected)


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_linearised_hvps_match_the_dense_hessian(name, dtype):
    """Single products through the product's graph split where the vector enters
    (``linearize_batch``), twice (the residuals are kept); a block through its own route on
    the same batch. Keras's recurrent layers are not split (the gradient of their
    ``while_loop`` does not trace in ``wrap_function``'s graph): their batches stay staged."""
    c = case(name, dtype)
    model = c.bound["jvp"]
    staged, _ = model.stage_batch((c.x, c.y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        result = model.linearize_batch(staged, 2**30)
        if name in RECURRENT:
            assert result is None
            return
        linearized, nbytes = result
        assert nbytes > 0
        vectors = np.random.default_rng(3).standard_normal((3, model.num_parameters))
        tensors = model.from_numpy(vectors)
        for _ in range(2):
            products = np.stack([model.hvp(v, [linearized]).numpy() for v in tensors])
            assert_products_close(products, vectors, c.hessian, dtype)
        assert linearized.keep() == nbytes  # what was counted is what is kept
        block = model.hvps(tensors, [linearized]).numpy()
    assert_products_close(block, vectors, c.hessian, dtype)


@pytest.mark.parametrize(("name", "dtype"), [("Conv2D", "float64"), ("LSTM", "float32")])
def test_unrolled_blocks_loop_past_the_limit_and_trace_each_size(name, dtype):
    """The unrolled reverse-over-reverse route writes out blocks of up to ``UNROLLED_BLOCK``
    products in one graph, and traces each block size with that size known (a fit's last,
    smaller block is unrolled too); a larger block takes whole products in a ``while_loop``.
    All three are checked against the dense Hessian, on the route the matrix above expects."""
    c = case(name, dtype)
    model = krylov_influence.InfluenceModel(c.model, cross_entropy)  # fresh traces
    model.UNROLLED_BLOCK = 3
    rng = np.random.default_rng(5)
    for size in (3, 4, 2):  # unrolled; past the limit; a new size, unrolled
        vectors = rng.standard_normal((size, model.num_parameters))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RouteFallbackWarning)
            products = model.hvps(model.from_numpy(vectors), [(c.x, c.y)]).numpy()
        assert_products_close(products, vectors, c.hessian, dtype)
        assert model.routes["hvps"] == f"{REVERSE_OVER_REVERSE}, {UNROLLED}"
    if name == "Conv2D":  # (the LSTM has while_loops of its own)
        traces = model._hvp_block._compiled[model._hvp_block._index]._concrete
        loops = {
            key[0][1][0]: any("While" in op.type for op in fn.graph.get_operations())
            for key, fn in traces.items()
        }
        assert loops == {3: False, 4: True, 2: False}


# XLA (``jit_compile``) for the single HVP: a dense layer, the layers whose graphs differ most
# (a gather, recurrent while_loop, attention, exact layer-norm moments) and a convolution.
XLA_CASES = [
    ("Dense", "float64"),
    ("Dense", "float32"),
    ("Embedding", "float64"),
    ("LSTM", "float32"),
    ("MultiHeadAttention", "float32"),
    ("LayerNormalization", "float64"),
    ("Conv2D", "float64"),
]


@pytest.mark.parametrize("jit", [True, "auto"])
@pytest.mark.parametrize(("name", "dtype"), XLA_CASES, ids=[f"{n}-{d}" for n, d in XLA_CASES])
def test_xla_hvps_match_the_dense_hessian(name, dtype, jit):
    c = case(name, dtype)
    model = krylov_influence.InfluenceModel(c.model, cross_entropy, jit_compile=jit)
    vector = np.random.default_rng(2).standard_normal((1, model.num_parameters))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouteFallbackWarning)  # XLA compiles every one of these
        product = model.hvp(model.from_numpy(vector[0]), [(c.x, c.y)]).numpy()
    assert_products_close(product[None, :], vector, c.hessian, dtype)
    graph = expected_route(name, dtype, "hvp")
    # "auto" leaves XLA out before convolutions (XLA:CPU runs them slower), without a warning.
    convolves = jit == "auto" and name.startswith("Conv")
    assert model.routes["hvp"] == (graph if convolves else f"{graph}, XLA")


def test_jit_compile_is_checked():
    c = case("Dense", "float64")
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=f"jit_compile={bad!r}: expected True, False or"):
            krylov_influence.InfluenceModel(c.model, cross_entropy, jit_compile=bad)
    assert krylov_influence.InfluenceModel(c.model, cross_entropy).routes["hvp"] == (
        expected_route("Dense", "float64", "hvp")  # no XLA unless asked for
    )


def test_a_fallback_is_noted_once_and_a_fast_route_not_at_all():
    c = case("Conv2D", "float64")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy, projection="jvp")
    projector = model.from_numpy(np.ones((2, model.num_parameters)))
    with pytest.warns(RouteFallbackWarning, match="loop invariant") as noted:
        model.project(projector, (c.x, c.y))
    assert len(noted) == 1 and "per-example gradients" in str(noted[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.project(projector, (c.x[:3], c.y[:3]))  # the route is kept: no second note
        dense = case("Dense", "float64")
        fast = krylov_influence.InfluenceModel(dense.model, cross_entropy, projection="jvp")
        fast.project(fast.from_numpy(np.ones((2, fast.num_parameters))), (dense.x, dense.y))
        fast.hvps(fast.from_numpy(np.ones((4, fast.num_parameters))), [(dense.x, dense.y)])


@pytest.mark.parametrize(("k", "gathers"), [(3, True), (20, False)])
def test_embedding_projection_gathers_the_projector_where_that_moves_less(k, gathers):
    """The gradient projection of an Embedding (40 rows, examples of 4 tokens) gathers the
    projector's rows at each example's tokens when 4 k ≤ 40, and otherwise projects the dense
    table gradient (the conversion of IndexedSlices is an UnsortedSegmentSum in the traced
    graph); exact either way, a repeated token included. Against the tape's per-example
    gradients, one example at a time."""
    rng = np.random.default_rng(11)
    inputs = keras.Input((4,), dtype="int32")
    features = L.Flatten(dtype="float64")(L.Embedding(40, 3, dtype="float64")(inputs))
    model = keras.Model(inputs, L.Dense(2, dtype="float64")(features))
    _randomise(model, rng)
    x = rng.integers(0, 40, (NUM_EXAMPLES, 4)).astype(np.int32)
    x[0, 1] = x[0, 0]
    y = rng.integers(0, 2, NUM_EXAMPLES).astype(np.int32)
    bound = krylov_influence.InfluenceModel(model, cross_entropy)
    projector = bound.from_numpy(rng.standard_normal((k, bound.num_parameters)))
    projected, losses = bound.project_and_losses(projector, (x, y))
    assert_products_close(
        projected.numpy(), _oracle_gradients(model, x, y), projector.numpy().T, "float64"
    )
    expected_losses = cross_entropy(y, model(x)).numpy()
    np.testing.assert_allclose(losses.numpy(), expected_losses, rtol=1e-12, atol=1e-12)
    kernel = bound._gradient_projection._compiled[0]  # the vectorised route, traced above
    staged = bound._stage((x, y))
    graph = kernel.get_concrete_function(*staged, projector, *bound._split_projector(projector))
    ops = {op.type for op in graph.graph.get_operations()}
    assert ("UnsortedSegmentSum" not in ops) is gathers
    assert bound.routes["project (gradients)"] == VECTORISED


def test_projection_in_chunks_of_examples_matches(monkeypatch):
    """The JVP fallback splits the batch when its gradient block exceeds the budget."""
    c = case("Conv2D", "float64")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy, projection="jvp")
    p = model.num_parameters
    monkeypatch.setattr(model, "GRADIENT_PROJECTION_BYTES", 2 * p * 8)  # two examples a chunk
    projector = np.random.default_rng(3).standard_normal((2, p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        projected = model.project(model.from_numpy(projector), (c.x, c.y)).numpy()
    assert projected.shape == (NUM_EXAMPLES, 2)
    assert_products_close(projected, c.grads, projector.T, "float64")


@pytest.mark.parametrize("name", ["Conv2D", "LSTM", "Embedding"])
def test_auto_projection_past_the_budget_takes_gradients_in_chunks(name, monkeypatch):
    """Above the gradient budget ``"auto"`` projects by per-example gradients over chunks of
    three examples (every per-example route here is vectorised), traced for one chunk shape,
    and never traces the JVP kernel. Against per-example gradients by a tape, one example at
    a time."""
    c = case(name, "float64")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy)  # projection="auto"
    p = model.num_parameters
    monkeypatch.setattr(model, "GRADIENT_PROJECTION_BYTES", 3 * p * 8)
    projector = np.random.default_rng(6).standard_normal((3, p))
    # Five examples: two chunks of three, the last example copied into the second and its
    # projection dropped after (a chunk of two was a second trace).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        projected = model.project(model.from_numpy(projector), (c.x, c.y)).numpy()
    assert_products_close(projected, c.grads, projector.T, "float64")
    assert model._gradient_projection.experimental_get_tracing_count() == 1
    _check_project_and_losses(c, model, projector, "float64")
    assert model.tracing_counts()["project"] == 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_batch_of_one_after_larger_batches(dtype):
    """A training set of ``B m + 1`` examples ends with a batch of one: per-example gradients
    and projections of it, after larger batches, match the tape's (the LSTM used to fail
    inside pfor)."""
    c = case("LSTM", dtype)
    model = krylov_influence.InfluenceModel(c.model, cross_entropy)
    projector = np.random.default_rng(7).standard_normal((3, model.num_parameters))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        for rows in (slice(0, 4), slice(1, 4), slice(4, 5), slice(0, 1)):
            grads = model.per_example_grads((c.x[rows], c.y[rows])).numpy()
            assert_products_close(grads, c.grads[rows], np.eye(grads.shape[1]), dtype)
            _check_project_and_losses(c, model, projector, dtype, rows=rows)


@pytest.mark.parametrize("name", ["Conv2D", "LSTM", "Embedding"])
def test_fit_in_blocks_and_score_past_the_gradient_budget(name, monkeypatch):
    """Issue 12 end to end: ``projection="auto"`` on a batch whose gradient block exceeds the
    budget takes per-example gradients in chunks of one example, and the fit runs block
    HVPs; both used to raise for conv, recurrent and embedding layers. Against the truncated
    inverse of the oracle Hessian."""
    c = case(name, "float64")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy)  # projection="auto"
    monkeypatch.setattr(model, "GRADIENT_PROJECTION_BYTES", 8)  # chunks of 1 example
    batches = [(c.x[:3], c.y[:3]), (c.x[3:], c.y[3:])]
    p, k = model.num_parameters, 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        calc = ArnoldiInfluenceCalculator(model, batches, p, True, k, "float64", block_size=4)
        self_influence = calc.self_influence(batches)
        pairs = calc.influence_matrix(batches[:1], batches)
    inverse = exact.truncated_inverse_hessian(c.hessian, k)  # full Krylov space: exact pairs
    expected = np.einsum("np,pq,nq->n", c.grads, inverse, c.grads)
    scale = float(np.max(np.abs(expected)))
    bound = rtol("float64") * scale  # measured errors are about 1e-15 of the scale
    np.testing.assert_allclose(self_influence, expected, rtol=0, atol=bound)
    np.testing.assert_allclose(pairs, c.grads[:3] @ inverse @ c.grads.T, rtol=0, atol=bound)


def test_a_user_error_is_not_retried_on_every_route():
    c = case("Dense", "float64")
    model = krylov_influence.InfluenceModel(
        c.model, lambda y, logits: tf.reduce_sum(cross_entropy(y, logits))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback note: the error is the user's
        with pytest.raises(ValueError, match="returned a scalar"):
            model.per_example_grads((c.x, c.y))


# ------------------------------------------------------------------------------ the docs
def routes_table() -> str:
    """The markdown table of docs/layers.md: the routes these tests assert, per layer."""
    return layer_matrix.routes_table(
        "layer",
        [
            '`per_example_grads`, `projection="gradients"`',
            '`projection="jvp"`',
            "`hvps`, block 1",
            "`hvps`, block ≥ 2",
            '`hvps`, block 1, `hvp_mode="forward-over-reverse"`',
            "`hvps`, block ≥ 2, forward-over-reverse",
        ],
        CASES,
        lambda name, dtype, i: expected_route(name, dtype, KERNELS[i]),
        FAST,
    )


def test_the_docs_table_is_current():
    layer_matrix.assert_docs_has(routes_table(), "tests.engines.test_tensorflow_layers")


if __name__ == "__main__":
    print(routes_table(), end="")
