"""Every standard ``torch.nn`` layer on every route of the PyTorch engine, against plain torch.

For each layer a tiny model (the layer, then an ``nn.Linear`` head to two logits) is checked:

- ``per_example_grads(batch)``, and ``project(G, batch)`` with ``projection="gradients"`` and
  ``projection="jvp"`` against ``grads @ G.T``, where ``grads`` are per-example gradients taken
  with ``torch.autograd.grad`` one example at a time through the module itself (not through
  ``torch.func``);
- ``hvps(V, batches)`` with blocks of 1 and 4 vectors, in both ``hvp_mode``\\ s, against
  ``V @ H``, with ``H`` the dense Hessian of the mean loss by double backward, one row at a
  time (no ``torch.func``). The oracle runs attention with the math kernel
  (``sdpa_kernel(SDPBackend.MATH)``): the fused CPU kernel has no second derivative.

Each check also asserts the route the engine took (:attr:`TorchInfluenceModel.routes`), so the
table in ``docs/layers.md`` is what these tests check; regenerate it with
``python -m tests.engines.test_torch_layers`` (a test fails when it is stale).

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

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import krylov_influence  # noqa: E402
from krylov_influence import exact  # noqa: E402
from krylov_influence.calculator import ArnoldiInfluenceCalculator  # noqa: E402
from krylov_influence_torch import RouteFallbackWarning  # noqa: E402
from krylov_influence_torch._model import (  # noqa: E402
    COMPOSITE,
    FACTORED_LINEAR,
    FORMED_GRADIENTS,
    FORWARD_OVER_REVERSE,
    JVP_VECTORISED,
    PER_EXAMPLE_LOOP,
    REVERSE_OVER_REVERSE,
    VECTORISED,
)

try:  # pytest puts this folder on sys.path; `python -m tests.engines...` does not
    import layer_matrix
    from layer_matrix import assert_products_close, rtol
except ImportError:  # pragma: no cover - only when run as a module for the docs table
    from tests.engines import layer_matrix
    from tests.engines.layer_matrix import assert_products_close, rtol
NUM_EXAMPLES = 5


def cross_entropy(logits, y):
    """Per-example softmax cross-entropy, in plain torch (the oracle's loss too)."""
    return F.cross_entropy(logits, y, reduction="none")


# ------------------------------------------------------------------------------ the layers
class LastStep(nn.Module):
    """A batch-first recurrent layer's output at the last time step."""

    def __init__(self, recurrent: nn.Module):
        super().__init__()
        self.recurrent = recurrent

    def forward(self, x):
        return self.recurrent(x)[0][:, -1]


class MeanOverTime(nn.Module):
    """A batch-first recurrent layer's outputs, averaged over time."""

    def __init__(self, recurrent: nn.Module):
        super().__init__()
        self.recurrent = recurrent

    def forward(self, x):
        return self.recurrent(x)[0].mean(dim=1)


class SelfAttention(nn.Module):
    """Batch-first multi-head self-attention, flattened."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0].flatten(1)


@dataclass(frozen=True)
class Layer:
    """A tiny model around one layer: ``body()`` maps inputs to ``features`` per example."""

    input_shape: tuple[int, ...]
    body: Any
    features: int
    dtypes: tuple[str, ...] = ("float64", "float32")
    integer_input: int = 0  # > 0: token ids in [0, integer_input)


BOTH = ("float64", "float32")
LAYERS: dict[str, Layer] = {
    "Linear": Layer((3,), lambda: nn.Sequential(nn.Linear(3, 3), nn.Tanh()), 3, BOTH),
    "Conv1d": Layer((2, 5), lambda: nn.Sequential(nn.Conv1d(2, 2, 3), nn.Tanh()), 6),
    "Conv2d": Layer((1, 4, 4), lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh()), 8, BOTH),
    "Conv3d": Layer((1, 3, 3, 3), lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh()), 16),
    "ConvTranspose2d": Layer(
        (1, 2, 2), lambda: nn.Sequential(nn.ConvTranspose2d(1, 2, 2), nn.Tanh()), 18
    ),
    "depthwise Conv2d (groups=C)": Layer(
        (2, 4, 4), lambda: nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Tanh()), 8, BOTH
    ),
    "separable conv (depthwise, pointwise)": Layer(
        (2, 4, 4),
        lambda: nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Conv2d(2, 2, 1), nn.Tanh()),
        8,
    ),
    "Embedding": Layer((3,), lambda: nn.Embedding(5, 2), 6, BOTH, integer_input=5),
    "RNN": Layer((3, 2), lambda: LastStep(nn.RNN(2, 2, batch_first=True)), 2),
    "LSTM": Layer((3, 2), lambda: LastStep(nn.LSTM(2, 2, batch_first=True)), 2, BOTH),
    "GRU, mean over time": Layer((3, 2), lambda: MeanOverTime(nn.GRU(2, 2, batch_first=True)), 2),
    "MultiheadAttention": Layer((3, 4), lambda: SelfAttention(4, 2), 12, BOTH),
    "BatchNorm1d": Layer(
        (3,), lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Tanh()), 3
    ),
    "BatchNorm2d": Layer(
        (1, 3, 3),
        lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.Tanh()),
        8,
    ),
    "LayerNorm": Layer((3,), lambda: nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Tanh()), 3),
    "MaxPool2d + AvgPool2d": Layer(
        (2, 4, 4),
        lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.Tanh(), nn.MaxPool2d(2), nn.AvgPool2d(2)),
        2,
    ),
    "Dropout": Layer((3,), lambda: nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Dropout(0.5)), 3),
}

# The route each operator takes, per layer: per_example_grads, project (jvp), then hvp and hvps
# with hvp_mode="reverse-over-reverse" (the default) and "forward-over-reverse".
# Layers not listed take the fast routes everywhere.
KERNELS = (
    "per_example_grads",
    "project (jvp)",
    "hvp",
    "hvps",
    "hvp, forward-over-reverse",
    "hvps, forward-over-reverse",
)
FAST = (
    VECTORISED,
    JVP_VECTORISED,
    REVERSE_OVER_REVERSE,
    f"{REVERSE_OVER_REVERSE}, batched",
    FORWARD_OVER_REVERSE,
    f"{FORWARD_OVER_REVERSE}, {VECTORISED}",
)
_RECURRENT = (PER_EXAMPLE_LOOP, *FAST[1:])
_LSTM_ONEDNN = (
    PER_EXAMPLE_LOOP,
    f"{JVP_VECTORISED}, {COMPOSITE}",
    *FAST[2:4],
    f"{FORWARD_OVER_REVERSE}, {COMPOSITE}",
    f"{FORWARD_OVER_REVERSE}, {VECTORISED}, {COMPOSITE}",
)
_ATTENTION = tuple(f"{route}, {COMPOSITE}" for route in FAST)
ROUTES: dict[tuple[str, str], tuple[str, ...]] = {
    ("RNN", "float64"): _RECURRENT,
    ("RNN", "float32"): _RECURRENT,
    ("LSTM", "float64"): _RECURRENT,
    ("LSTM", "float32"): _LSTM_ONEDNN,
    ("GRU, mean over time", "float64"): _RECURRENT,
    ("GRU, mean over time", "float32"): _RECURRENT,
    ("MultiheadAttention", "float64"): _ATTENTION,
    ("MultiheadAttention", "float32"): _ATTENTION,
}


def expected_route(layer: str, dtype: str, kernel: str) -> str:
    if kernel == "query gradients":  # the spectral complement's g_zᵀ g_x
        loops = expected_route(layer, dtype, "per_example_grads") == PER_EXAMPLE_LOOP
        return FORMED_GRADIENTS if loops else FACTORED_LINEAR
    return ROUTES.get((layer, dtype), FAST)[KERNELS.index(kernel)]


CASES = [(name, dtype) for name, layer in LAYERS.items() for dtype in layer.dtypes]
CASE_IDS = [f"{name}-{dtype}" for name, dtype in CASES]


# --------------------------------------------------------------------- models and oracles
def _randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Nonzero weights everywhere (biases, BN statistics), so no second derivative hides."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.6 * torch.randn(parameter.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif name.endswith("running_mean"):
                buffer.copy_(0.6 * torch.randn(buffer.shape, generator=generator))


def _flat(parts) -> torch.Tensor:
    return torch.cat([part.reshape(-1) for part in parts])


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    grads: np.ndarray  # (B, p): the oracle's per-example gradients
    hessian: np.ndarray  # (p, p): the oracle's Hessian of the mean loss
    bound: dict[str, Any]  # "gradients", "jvp", "forward" -> InfluenceModel, bound once


def _oracle_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    params = list(model.parameters())
    rows = []
    for i in range(len(y)):  # one example at a time, through the module itself
        loss = cross_entropy(model(x[i : i + 1]), y[i : i + 1]).sum()
        rows.append(_flat(torch.autograd.grad(loss, params)).double().numpy())
    return np.stack(rows)


def _oracle_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no second derivative
        loss = cross_entropy(model(x), y).mean()
        grad = _flat(torch.autograd.grad(loss, params, create_graph=True))
        rows = []
        for j in range(grad.numel()):
            row = torch.autograd.grad(grad[j], params, retain_graph=True, allow_unused=True)
            parts = [torch.zeros_like(p) if r is None else r for r, p in zip(row, params)]
            rows.append(_flat(parts).double().numpy())
    hessian = np.stack(rows)
    return (hessian + hessian.T) / 2


@functools.cache
def case(name: str, dtype: str) -> Case:
    layer = LAYERS[name]
    kind = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    torch.manual_seed(0)
    model = nn.Sequential(layer.body(), nn.Flatten(), nn.Linear(layer.features, 2)).to(kind)
    _randomise(model, generator)
    model.eval()
    shape = (NUM_EXAMPLES, *layer.input_shape)
    if layer.integer_input:
        x = torch.randint(0, layer.integer_input, shape, generator=generator)
    else:
        x = torch.randn(shape, generator=generator, dtype=kind)
    y = torch.randint(0, 2, (NUM_EXAMPLES,), generator=generator)
    bound = {
        "gradients": krylov_influence.InfluenceModel(model, cross_entropy, projection="gradients"),
        "jvp": krylov_influence.InfluenceModel(model, cross_entropy, projection="jvp"),
        "forward": krylov_influence.InfluenceModel(
            model, cross_entropy, projection="jvp", hvp_mode="forward-over-reverse"
        ),
    }
    return Case(model, x, y, _oracle_gradients(model, x, y), _oracle_hessian(model, x, y), bound)


def _quietly(function, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        return function(*args)


# -------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_per_example_grads_match_autograd_one_example_at_a_time(name, dtype):
    c = case(name, dtype)
    model = c.bound["gradients"]
    grads = _quietly(model.per_example_grads, (c.x, c.y)).numpy()
    assert grads.shape == c.grads.shape
    assert_products_close(grads, c.grads, np.eye(grads.shape[1]), dtype)
    assert model.routes["per_example_grads"] == expected_route(name, dtype, "per_example_grads")


@pytest.mark.parametrize("route", ["gradients", "jvp"])
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_projection_matches_per_example_gradients(name, dtype, route):
    c = case(name, dtype)
    model = c.bound[route]
    p = model.num_parameters
    assert p == c.grads.shape[1]
    projector = np.random.default_rng(1).standard_normal((3, p))
    projected = _quietly(model.project, torch.from_numpy(projector), (c.x, c.y)).numpy()
    assert_products_close(projected, c.grads, projector.T, dtype)
    kernel = "per_example_grads" if route == "gradients" else "project (jvp)"
    assert model.routes[kernel] == expected_route(name, dtype, kernel)
    _check_project_and_losses(c, model, projector, dtype)


def _check_project_and_losses(c: Case, model, projector: np.ndarray, dtype: str) -> None:
    """``project_and_losses``: the projections of autograd's gradients, and the losses of
    the module called directly (on the gradient routes they come from the gradient pass)."""
    both, losses = _quietly(model.project_and_losses, torch.from_numpy(projector), (c.x, c.y))
    assert_products_close(both.numpy(), c.grads, projector.T, dtype)
    with torch.no_grad():
        expected = cross_entropy(c.model(c.x), c.y).double().numpy()
    assert losses.dtype == model.dtype and losses.shape == (NUM_EXAMPLES,)
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(losses.double().numpy(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_query_gradient_inner_products_match_the_oracle(name, dtype):
    """The spectral complement's ``g_zᵀ g_x`` and ``G g_z``, dense layers factored."""
    c = case(name, dtype)
    model = c.bound["gradients"]
    query, train = (c.x[:3], c.y[:3]), (c.x[3:], c.y[3:])
    gradients = _quietly(model.query_gradients, query)
    inner = _quietly(model.gradient_inner_products, gradients, train).numpy()
    assert_products_close(inner, c.grads[:3], c.grads[3:].T, dtype)
    projector = np.random.default_rng(2).standard_normal((3, model.num_parameters))
    found = model.project_query_gradients(gradients, torch.from_numpy(projector)).numpy()
    assert_products_close(found, c.grads[:3], projector.T, dtype)
    assert model.routes["query gradients"] == expected_route(name, dtype, "query gradients")


@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse"])
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_hvps_match_the_dense_hessian(name, dtype, block, mode):
    c = case(name, dtype)
    model = c.bound["jvp" if mode == "reverse-over-reverse" else "forward"]
    vectors = np.random.default_rng(2).standard_normal((block, model.num_parameters))
    products = _quietly(model.hvps, torch.from_numpy(vectors), [(c.x, c.y)]).numpy()
    assert_products_close(products, vectors, c.hessian, dtype)
    kernel = ("hvp" if block == 1 else "hvps") + (
        "" if mode == "reverse-over-reverse" else f", {mode}"
    )
    assert model.routes[kernel.split(",")[0]] == expected_route(name, dtype, kernel)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize(("name", "dtype"), CASES, ids=CASE_IDS)
def test_linearised_hvps_match_the_dense_hessian(name, dtype, block):
    """Products through the kept autograd graph (``linearize_batch``): MultiheadAttention's
    fused kernels have no second derivative, so its graph is recorded with composite kernels."""
    c = case(name, dtype)
    model = c.bound["jvp"]
    staged, _ = model.stage_batch((c.x, c.y))
    linearized, nbytes = _quietly(model.linearize_batch, staged, 2**30)
    assert nbytes > 0
    vectors = np.random.default_rng(3).standard_normal((block, model.num_parameters))
    for _ in range(2):  # the graph is kept for every product
        products = _quietly(model.hvps, torch.from_numpy(vectors), [linearized]).numpy()
        assert_products_close(products, vectors, c.hessian, dtype)


def test_a_fallback_is_noted_once_and_a_fast_route_not_at_all():
    c = case("LSTM", "float64")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy, projection="gradients")
    projector = torch.ones((2, model.num_parameters), dtype=torch.float64)
    with pytest.warns(RouteFallbackWarning, match="cannot take the route 'vectorised'") as noted:
        model.project(projector, (c.x, c.y))
    assert len(noted) == 1 and "per_example_grads" in str(noted[0].message)
    assert PER_EXAMPLE_LOOP in str(noted[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouteFallbackWarning)
        model.project(projector, (c.x[:3], c.y[:3]))  # the route is kept: no second note
        dense = case("Linear", "float64")
        fast = krylov_influence.InfluenceModel(dense.model, cross_entropy, projection="jvp")
        ones = torch.ones((4, fast.num_parameters), dtype=torch.float64)
        fast.project(ones[:2], (dense.x, dense.y))
        fast.hvps(ones, [(dense.x, dense.y)])
        fast.per_example_grads((dense.x, dense.y))


def test_auto_projects_by_jvps_once_per_example_gradients_need_a_backward_each():
    c = case("GRU, mean over time", "float64")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy)  # projection="auto"
    projector = np.random.default_rng(4).standard_normal((2, model.num_parameters))
    first = _quietly(model.project, torch.from_numpy(projector), (c.x, c.y)).numpy()
    assert model.routes["per_example_grads"] == PER_EXAMPLE_LOOP
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouteFallbackWarning)  # the JVP route is fast: no note
        again = model.project(torch.from_numpy(projector), (c.x, c.y)).numpy()
    assert model.routes["project (jvp)"] == JVP_VECTORISED
    assert_products_close(first, c.grads, projector.T, "float64")
    assert_products_close(again, c.grads, projector.T, "float64")


class TwoInputs(nn.Module):
    """Two inputs (a tuple x); outputs a tuple of logits, an unused aux tensor and the argmax."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)
        self.aux = nn.Linear(3, 1)

    def forward(self, left, right):
        logits = torch.tanh(self.a(left)) + self.b(right)
        return logits, self.aux(left), logits.argmax(dim=1)


def test_the_loop_over_examples_handles_nested_inputs_and_outputs(monkeypatch):
    """The last per-example route on a tuple input and a tuple output with integer leaves."""
    torch.manual_seed(0)
    net = TwoInputs().double().eval()
    x = (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    y = torch.tensor([0, 1, 1, 0, 1, 0])

    def loss(outputs, targets):
        return cross_entropy(outputs[0], targets) + 0.5 * outputs[1][:, 0] ** 2

    model = krylov_influence.InfluenceModel(net, loss)
    operator = model._operators["per_example_grads"]
    monkeypatch.setattr(operator, "_index", len(operator._routes) - 1)
    assert model.routes["per_example_grads"] == PER_EXAMPLE_LOOP
    grads = model.per_example_grads((x, y)).numpy()
    params = list(net.parameters())
    expected = []
    for i in range(6):  # the oracle: autograd through the module, one example at a time
        one = loss(net(x[0][i : i + 1], x[1][i : i + 1]), y[i : i + 1]).sum()
        expected.append(_flat(torch.autograd.grad(one, params)).numpy())
    assert_products_close(grads, np.stack(expected), np.eye(grads.shape[1]), "float64")


def test_projection_in_chunks_of_examples_matches(monkeypatch):
    """The JVP fallback splits the batch when its gradient block exceeds the budget."""
    c = case("LSTM", "float32")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy, projection="jvp")
    p = model.num_parameters
    # LSTM in float32 on CPU: oneDNN kernels have no forward-mode derivative; the composite
    # route does. Force the last route: budget of two examples a chunk, first routes failing.
    monkeypatch.setattr(model, "GRADIENT_PROJECTION_BYTES", 2 * p * 4)
    operator = model._operators["project (jvp)"]
    monkeypatch.setattr(operator, "_index", len(operator._routes) - 1)
    projector = np.random.default_rng(3).standard_normal((2, p)).astype(np.float32)
    projected = _quietly(model.project, torch.from_numpy(projector), (c.x, c.y)).numpy()
    assert projected.shape == (NUM_EXAMPLES, 2)
    assert_products_close(projected, c.grads, projector.T, "float32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse"])
@pytest.mark.parametrize("name", ["LSTM", "MultiheadAttention"])
def test_cudnn_and_fused_attention_on_cuda(name, mode):
    """On a GPU, cuDNN's recurrent kernels have no second derivative and attention takes
    fused kernels: every operator still matches the CPU oracle (routes not asserted)."""
    c = case(name, "float32")
    model = krylov_influence.InfluenceModel(
        c.model, cross_entropy, device="cuda", projection="jvp", hvp_mode=mode
    )
    p = model.num_parameters
    rows = np.random.default_rng(5).standard_normal((4, p)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RouteFallbackWarning)
        grads = model.per_example_grads((c.x, c.y)).cpu().numpy()
        projected = model.project(torch.from_numpy(rows), (c.x, c.y)).cpu().numpy()
        one = model.hvps(torch.from_numpy(rows[:1]), [(c.x, c.y)]).cpu().numpy()
        block = model.hvps(torch.from_numpy(rows), [(c.x, c.y)]).cpu().numpy()
    assert_products_close(grads, c.grads, np.eye(p), "float32")
    assert_products_close(projected, c.grads, rows.T, "float32")
    assert_products_close(one, rows[:1], c.hessian, "float32")
    assert_products_close(block, rows, c.hessian, "float32")


FAMILIES = ["Conv2d", "LSTM", "Embedding", "MultiheadAttention", "BatchNorm2d"]


@pytest.mark.parametrize("name", ["Conv2d", "Embedding", "LSTM"])
def test_auto_projection_past_the_budget_takes_gradients_in_chunks(name, monkeypatch):
    """Above the gradient budget ``"auto"`` projects by per-example gradients over chunks of
    two examples, never by JVPs, unless per-example gradients loop over the examples (LSTM):
    then by JVPs, once the first call has found that they loop. Against per-example
    gradients by autograd, one example at a time."""
    c = case(name, "float32")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy)  # projection="auto"
    p = model.num_parameters
    monkeypatch.setattr(model, "GRADIENT_PROJECTION_BYTES", 2 * p * 4)
    calls = []
    jvp = model._operators["project (jvp)"]
    monkeypatch.setitem(model._operators, "project (jvp)", lambda *a: calls.append(1) or jvp(*a))
    projector = np.random.default_rng(4).standard_normal((3, p)).astype(np.float32)
    for _ in range(2):  # the first call finds the per-example route; the second uses it
        calls.clear()
        projected = _quietly(model.project, torch.from_numpy(projector), (c.x, c.y)).numpy()
        assert_products_close(projected, c.grads, projector.T, "float32")
        _check_project_and_losses(c, model, projector, "float32")
    loops = model._operators["per_example_grads"].route != VECTORISED
    assert bool(calls) == loops == (name == "LSTM")


@pytest.mark.parametrize("name", FAMILIES)
def test_fit_in_blocks_and_score_past_the_gradient_budget(name, monkeypatch):
    """End to end: ``projection="auto"`` on a batch whose gradient block exceeds the budget
    takes per-example gradients in chunks of one example (JVPs for the recurrent layers, whose
    per-example gradients loop), and the fit runs block HVPs. Against the truncated inverse of the
    oracle Hessian (p Arnoldi iterations: the Krylov space is all of R^p)."""
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
    bound = rtol("float64") * scale
    np.testing.assert_allclose(self_influence, expected, rtol=0, atol=bound)
    np.testing.assert_allclose(pairs, c.grads[:3] @ inverse @ c.grads.T, rtol=0, atol=bound)


def test_a_user_error_is_not_retried_on_every_route():
    c = case("Linear", "float64")
    model = krylov_influence.InfluenceModel(
        c.model, lambda logits, y: cross_entropy(logits, y).sum()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback note: the error is the user's
        with pytest.raises(ValueError, match="reduced to a scalar"):
            model.per_example_grads((c.x, c.y))
    assert model.routes["per_example_grads"] == VECTORISED


def test_a_module_that_rejects_the_batch_raises_its_own_error():
    c = case("Linear", "float64")
    model = krylov_influence.InfluenceModel(c.model, cross_entropy)
    wrong = torch.zeros((NUM_EXAMPLES, 4), dtype=torch.float64)  # 4 features, not 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            model.per_example_grads((wrong, c.y))


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
            'block 1, `hvp_mode="forward-over-reverse"`',
            "block ≥ 2, forward-over-reverse",
            "`query_gradients` (the complement's scores)",
        ],
        CASES,
        lambda name, dtype, i: expected_route(name, dtype, (*KERNELS, "query gradients")[i]),
        (*FAST, FACTORED_LINEAR),
    )


def test_the_docs_table_is_current():
    layer_matrix.assert_docs_has(routes_table(), "tests.engines.test_torch_layers")


if __name__ == "__main__":
    print(routes_table(), end="")
