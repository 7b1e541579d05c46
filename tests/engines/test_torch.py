"""The torch engine against independent oracles.

Oracles: the spec's NumPy forward pass (losses), central finite differences of it (per-example
gradients), the NumPy reference engine's analytic Hessian (specs without a hidden layer),
finite differences of the mean gradient (specs with one), plain ``torch.autograd`` on the
user's own module (brute force, one example at a time), and ``krylov_influence.exact``.

Tolerances: float64 results agree with analytic oracles to ~1e-10 relative; float32 results
to ``4 * sqrt(eps32)`` relative to the largest entry; finite-difference oracles carry their
own truncation error, stated where they are used.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import krylov_influence as ki  # noqa: E402
from krylov_influence.exact import (  # noqa: E402
    dense_hessian,
    exact_influence,
    exact_self_influence,
)
from krylov_influence.reference import NumpyEngine  # noqa: E402
from krylov_influence.testing import random_mlp_spec  # noqa: E402
from krylov_influence_torch import RouteFallbackWarning, TorchEngine  # noqa: E402
from krylov_influence_torch._data import Batch  # noqa: E402
from krylov_influence_torch._model import HVP_MODES, TorchInfluenceModel  # noqa: E402

DTYPES = ("float32", "float64")
F64_RTOL = 1e-10
F32_RTOL = 4 * float(np.sqrt(np.finfo(np.float32).eps))
# Central differences with h = eps^(1/3): truncation h²·f'''/6 and rounding eps·|f|/h are
# both ~eps^(2/3) ≈ 4e-11 times the scale of the losses; 1e-7 leaves a wide margin.
FD_RTOL = 1e-7
CUDA = torch.cuda.is_available()


def rtol_for(dtype: str) -> float:
    return F64_RTOL if dtype == "float64" else F32_RTOL


def assert_close(actual, expected, rtol, what=""):
    """Entrywise, relative to the largest entry of ``expected`` (a normwise comparison)."""
    actual = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, float)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max(initial=0.0)), np.finfo(np.float64).tiny)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def numpy_of(tensor):
    return tensor.detach().cpu().numpy().astype(np.float64)


@st.composite
def specs(draw, hidden=None, activations=("tanh", "softplus", "gelu")):
    """Small random MLP specs with 2–40 parameters, uneven batches, with or without L2."""
    d_in = draw(st.integers(1, 4))
    layers = draw(st.integers(0, 1)) if hidden is None else hidden
    widths = [draw(st.integers(1, 4)) for _ in range(layers)]
    loss = draw(st.sampled_from(("cross_entropy", "mse")))
    # A single class makes cross-entropy identically zero: nothing to test.
    d_out = draw(st.integers(2, 3) if loss == "cross_entropy" else st.integers(1, 3))
    sizes = (d_in, *widths, d_out)
    p = sum(a * b + b for a, b in itertools.pairwise(sizes))
    assume(2 <= p <= 40)
    n = draw(st.integers(1, 12))
    return random_mlp_spec(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
        sizes,
        activation=draw(st.sampled_from(activations)),
        loss=loss,
        num_examples=n,
        batch_size=draw(st.integers(1, n)),
        l2=draw(st.sampled_from((0.0, 0.1))),
    )


def build(spec, dtype, **options):
    """``from_neutral_spec``, rebound with engine ``options`` (``hvp_mode``, ``chunk_size``)."""
    model, batches = TorchEngine.from_neutral_spec(spec, dtype=dtype)
    if options:
        model = TorchEngine.bind(model.module, model._loss_fn, dtype=dtype, l2=spec.l2, **options)
    return model, batches


def at_theta(spec, theta):
    """The same spec with its parameters replaced by the flat ``theta``."""
    weights, biases = spec.unflatten(theta)
    return dataclasses.replace(spec, weights=tuple(weights), biases=tuple(biases))


def fd_per_example_grads(spec, x, y):
    theta = spec.flat_parameters()
    grads = np.empty((len(x), theta.size))
    for j in range(theta.size):
        h = np.finfo(np.float64).eps ** (1 / 3) * max(1.0, abs(theta[j]))
        up, down = theta.copy(), theta.copy()
        up[j] += h
        down[j] -= h
        grads[:, j] = (spec.losses(x, y, up) - spec.losses(x, y, down)) / (2 * h)
    return grads


def mean_gradient(spec):
    model, batches = TorchEngine.from_neutral_spec(spec, dtype="float64")
    return np.concatenate([numpy_of(model.per_example_grads(b)) for b in batches]).mean(axis=0)


# ----------------------------------------------------------------------- neutral specs
@settings(deadline=None)
@given(spec=specs(activations=("tanh", "softplus", "gelu", "relu")), dtype=st.sampled_from(DTYPES))
def test_losses_equal_the_numpy_forward_pass(spec, dtype):
    model, batches = TorchEngine.from_neutral_spec(spec, dtype=dtype)
    assert len(batches) == len(spec.batch_slices())
    for batch, (x, y) in zip(batches, spec.numpy_batches()):
        assert_close(model.losses(batch), spec.losses(x, y), rtol_for(dtype))


@settings(deadline=None)
@given(spec=specs(), dtype=st.sampled_from(DTYPES))
def test_per_example_grads_equal_finite_differences(spec, dtype):
    model, batches = TorchEngine.from_neutral_spec(spec, dtype=dtype)
    rtol = FD_RTOL if dtype == "float64" else F32_RTOL
    for batch, (x, y) in zip(batches, spec.numpy_batches()):
        assert_close(model.per_example_grads(batch), fd_per_example_grads(spec, x, y), rtol)


@settings(deadline=None)
@given(spec=specs(hidden=0), dtype=st.sampled_from(DTYPES), mode=st.sampled_from(HVP_MODES))
def test_hessian_equals_the_analytic_reference(spec, dtype, mode):
    assume(spec.loss == "cross_entropy" or spec.layer_sizes[-1] == 1)
    model, batches = build(spec, dtype, hvp_mode=mode)
    reference, ref_batches = NumpyEngine.from_neutral_spec(spec, dtype="float64")
    assert_close(
        dense_hessian(model, batches), dense_hessian(reference, ref_batches), rtol_for(dtype)
    )


@settings(deadline=None)
@given(spec=specs(hidden=1), seed=st.integers(0, 2**32 - 1), mode=st.sampled_from(HVP_MODES))
def test_hvp_equals_finite_differences_of_the_gradient(spec, seed, mode):
    v = np.random.default_rng(seed).standard_normal(spec.num_parameters)
    model, batches = build(spec, "float64", hvp_mode=mode)
    theta = spec.flat_parameters()
    h = 1e-5 / np.linalg.norm(v)
    expected = (
        mean_gradient(at_theta(spec, theta + h * v)) - mean_gradient(at_theta(spec, theta - h * v))
    ) / (2 * h)
    # Truncation error h²‖∇³L‖‖v‖³/6 ≈ 1e-10 and rounding ≈ eps‖g‖/h ≈ 1e-11, relative.
    assert_close(model.hvp(model.from_numpy(v), batches), expected, 1e-6)


@settings(deadline=None)
@given(
    spec=specs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(HVP_MODES),
)
def test_hvp_is_symmetric_and_linear(spec, dtype, seed, mode):
    model, batches = build(spec, dtype, hvp_mode=mode)
    rng = np.random.default_rng(seed)
    u, v = (model.from_numpy(rng.standard_normal(spec.num_parameters)) for _ in range(2))
    a, b = 0.7, -1.3
    hu, hv = model.hvp(u, batches), model.hvp(v, batches)
    rtol = rtol_for(dtype)
    scale = float(torch.linalg.vector_norm(u) * torch.linalg.vector_norm(hv)) + float(
        torch.linalg.vector_norm(v) * torch.linalg.vector_norm(hu)
    )
    assert abs(float(u @ hv) - float(v @ hu)) <= rtol * scale
    assert_close(model.hvp(a * u + b * v, batches), numpy_of(a * hu + b * hv), rtol)


@settings(deadline=None)
@given(
    spec=specs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(HVP_MODES),
)
def test_uneven_batches_give_the_exact_mean(spec, dtype, seed, mode):
    one_batch = dataclasses.replace(spec, batch_size=spec.num_examples)
    model, batches = build(spec, dtype, hvp_mode=mode)
    whole, single = build(one_batch, dtype, hvp_mode=mode)
    vectors = model.from_numpy(
        np.random.default_rng(seed).standard_normal((3, spec.num_parameters))
    )
    assert_close(
        model.hvps(vectors, batches), numpy_of(whole.hvps(vectors, single)), rtol_for(dtype)
    )


@settings(deadline=None)
@given(
    spec=specs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
    mode=st.sampled_from(HVP_MODES),
)
def test_hvps_equal_stacked_hvps_also_when_chunked(spec, dtype, seed, mode):
    model, batches = build(spec, dtype, hvp_mode=mode)
    vectors = model.from_numpy(
        np.random.default_rng(seed).standard_normal((5, spec.num_parameters))
    )
    rows = np.stack([numpy_of(model.hvp(vectors[i], batches)) for i in range(5)])
    assert_close(model.hvps(vectors, batches), rows, rtol_for(dtype))
    chunked, _ = build(spec, dtype, hvp_mode=mode, chunk_size=2)
    assert_close(chunked.hvps(vectors, batches), rows, rtol_for(dtype))


@settings(deadline=None)
@given(
    spec=specs(),
    dtype=st.sampled_from(DTYPES),
    k=st.integers(1, 7),
    chunk=st.sampled_from((None, 1, 3)),
    seed=st.integers(0, 2**32 - 1),
    route=st.sampled_from(("jvp", "gradients", "auto")),
)
def test_project_equals_projector_times_per_example_grads(spec, dtype, k, chunk, seed, route):
    # Every route of `project` (JVPs chunked or not, gradients × Gᵀ, the automatic choice)
    # against float64 per-example gradients times the projector.
    model, batches = TorchEngine.from_neutral_spec(spec, dtype=dtype)
    model = TorchEngine.bind(
        model.module, model._loss_fn, l2=spec.l2, chunk_size=chunk, projection=route
    )
    projector = np.random.default_rng(seed).standard_normal((k, spec.num_parameters))
    # The oracle in float64 from the float64 engine's gradients (checked above).
    full, full_batches = TorchEngine.from_neutral_spec(spec, dtype="float64")
    for batch, full_batch in zip(batches, full_batches):
        expected = numpy_of(full.per_example_grads(full_batch)) @ projector.T
        projected = model.project(model.from_numpy(projector), batch)
        assert projected.shape == (batch[0].shape[0], k)
        assert_close(projected, expected, rtol_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.skipif(not CUDA, reason="no CUDA"))]
)
def test_every_output_follows_the_model_dtype_and_device(dtype, device):
    spec = random_mlp_spec(np.random.default_rng(3), (3, 4, 2), num_examples=9, batch_size=4)
    model, batches = TorchEngine.from_neutral_spec(spec, dtype=dtype, device=device)
    expected_dtype = getattr(torch, dtype)
    assert model.dtype == expected_dtype
    assert model.device == torch.device(device)
    assert model.xp.__name__ == "array_api_compat.torch"
    p = model.num_parameters
    vectors = model.xp.ones((2, p), dtype=model.dtype, device=model.device)
    outputs = {
        "flat_parameters": model.flat_parameters(),
        "losses": model.losses(batches[0]),
        "hvp": model.hvp(vectors[0], batches),
        "hvps": model.hvps(vectors, batches),
        "project": model.project(vectors, batches[0]),
        "per_example_grads": model.per_example_grads(batches[0]),
        "hessian_operator.mv": model.hessian_operator(batches).mv(vectors[0]),
    }
    for name, value in outputs.items():
        assert value.dtype == expected_dtype, name
        assert value.device == torch.device(device), name
        assert not value.requires_grad, name
    assert model.to_numpy(outputs["hvp"]).dtype == np.dtype(dtype)
    assert_close(model.flat_parameters(), spec.flat_parameters(), rtol_for(dtype))
    assert [name for name, _ in model.parameter_layout] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    ]
    assert [shape for _, shape in model.parameter_layout] == [(3, 4), (4,), (4, 2), (2,)]


@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_on_device_moves_a_copy_and_agrees():
    spec = random_mlp_spec(np.random.default_rng(4), (3, 4, 2), num_examples=9, batch_size=4)
    model, batches = TorchEngine.from_neutral_spec(spec, dtype="float64")
    moved = model.on_device("cuda:0")
    assert moved.device == torch.device("cuda:0") and model.device == torch.device("cpu")
    v = model.from_numpy(np.ones(model.num_parameters))
    assert_close(moved.hvp(v.to("cuda:0"), batches), numpy_of(model.hvp(v, batches)), 1e-10)


def test_on_device_same_device_is_identity():
    spec = random_mlp_spec(np.random.default_rng(4), (3, 2), num_examples=5, batch_size=5)
    model, _ = TorchEngine.from_neutral_spec(spec)
    assert model.on_device("cpu") is model
    assert model.on_device(None) is model


def test_end_to_end_arnoldi_equals_exact_influence():
    spec = random_mlp_spec(
        np.random.default_rng(5),
        (4, 5, 3),
        activation="tanh",
        num_examples=30,
        batch_size=7,
        l2=0.1,
    )
    model, batches = TorchEngine.from_neutral_spec(spec, dtype="float64")
    p = model.num_parameters
    calc = ki.ArnoldiInfluenceCalculator(model, batches, p, True, p, "float64")
    queries = batches[:2]
    exact_self = exact_self_influence(model, batches)
    exact_pairs = exact_influence(model, batches, queries)
    np.testing.assert_allclose(calc.self_influence(batches), exact_self, rtol=1e-6)
    pairs = calc.influence_matrix(queries, batches)
    np.testing.assert_allclose(pairs, exact_pairs, rtol=1e-6, atol=1e-6 * np.abs(exact_pairs).max())


# ------------------------------------------------------------------- user modules
def mlp(seed=0, dtype=torch.float64, dropout=0.0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(4, 6, dtype=dtype), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(6, 3, dtype=dtype))
    return torch.nn.Sequential(*layers).eval()


def classification_data(n=11, seed=0, d=4, classes=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, classes, n)


CE = torch.nn.CrossEntropyLoss(reduction="none")


def autograd_per_example_grads(net, x, y, names):
    """Brute force: one ``torch.autograd.grad`` per example on the user's module."""
    named = dict(net.named_parameters())
    rows = []
    for i in range(len(x)):
        loss = CE(net(torch.as_tensor(x[i : i + 1])), torch.as_tensor(y[i : i + 1]))[0]
        grads = torch.autograd.grad(loss, [named[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


def test_inferred_engine_and_registry():
    net = mlp()
    model = ki.InfluenceModel(net, CE)
    assert isinstance(model, TorchInfluenceModel)
    assert model.engine_name == "torch"
    assert ki.get_engine("torch") is TorchEngine
    assert ki.infer_engine(net) is TorchEngine
    assert TorchEngine.version() == torch.__version__
    assert "cpu" in TorchEngine.devices()
    assert ki.InfluenceModel(model) is model


def test_per_example_grads_of_a_user_module_equal_autograd():
    net = mlp()
    x, y = classification_data()
    names = [name for name, _ in net.named_parameters()]
    model = ki.InfluenceModel(net, CE)
    assert_close(
        model.per_example_grads((x, y)), autograd_per_example_grads(net, x, y, names), 1e-12
    )


@pytest.mark.parametrize(
    ("parameters", "names"),
    [
        (None, ["0.weight", "0.bias", "2.weight", "2.bias"]),
        (["2"], ["2.weight", "2.bias"]),
        ("2.bias", ["2.bias"]),
        # The module's order wins over the order the names are given in.
        (["2.bias", "0.weight"], ["0.weight", "2.bias"]),
        (lambda name, param: name.endswith("weight"), ["0.weight", "2.weight"]),
    ],
)
def test_parameter_selection_and_flat_order(parameters, names):
    net = mlp()
    x, y = classification_data()
    named = dict(net.named_parameters())
    model = ki.InfluenceModel(net, CE, parameters=parameters)
    assert [name for name, _ in model.parameter_layout] == names
    assert [shape for _, shape in model.parameter_layout] == [tuple(named[n].shape) for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    assert torch.equal(model.flat_parameters(), flat)
    # Gradient columns and the Hessian block of the chosen parameters, from the full model.
    full = ki.InfluenceModel(net, CE)
    offsets = np.cumsum([0] + [named[n].numel() for n, _ in full.parameter_layout])
    index = np.concatenate(
        [
            np.arange(offsets[i], offsets[i + 1])
            for i, (n, _) in enumerate(full.parameter_layout)
            if n in names
        ]
    )
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    assert_close(
        model.per_example_grads(batches[1]),
        numpy_of(full.per_example_grads(batches[1]))[:, index],
        1e-12,
    )
    assert_close(
        dense_hessian(model, batches), dense_hessian(full, batches)[np.ix_(index, index)], 1e-10
    )


def test_parameter_objects_and_frozen_parameters():
    net = mlp()
    net[0].weight.requires_grad_(False)
    model = ki.InfluenceModel(net, CE)
    assert [n for n, _ in model.parameter_layout] == ["0.bias", "2.weight", "2.bias"]
    by_object = ki.InfluenceModel(net, CE, parameters=[net[2].bias, net[0].weight])
    assert [n for n, _ in by_object.parameter_layout] == ["0.weight", "2.bias"]


def test_shared_parameters_appear_once_and_get_the_summed_gradient():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(3, 3, dtype=torch.float64)
            self.again = self.inner

        def forward(self, x):
            return self.again(torch.tanh(self.inner(x)))

    torch.manual_seed(1)
    net = Tied().eval()
    x, y = classification_data(n=5, d=3)
    model = ki.InfluenceModel(net, CE)
    assert [n for n, _ in model.parameter_layout] == ["inner.weight", "inner.bias"]
    assert (
        ki.InfluenceModel(net, CE, parameters=["again"]).parameter_layout == model.parameter_layout
    )
    expected = autograd_per_example_grads(net, x, y, ["inner.weight", "inner.bias"])
    assert_close(model.per_example_grads((x, y)), expected, 1e-12)


def test_fixed_parameters_are_held_at_their_values():
    net = mlp()
    x, y = classification_data()
    last = ki.InfluenceModel(net, CE, parameters=["2"])
    full = ki.InfluenceModel(net, CE)
    assert_close(last.losses((x, y)), numpy_of(full.losses((x, y))), 1e-14)


def test_dtype_casts_a_copy_and_leaves_the_module_alone():
    net = mlp(dtype=torch.float32)
    x, y = classification_data()
    model = ki.InfluenceModel(net, CE, dtype="float64")
    assert model.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in net.parameters())
    reference_f32 = ki.InfluenceModel(
        torch.nn.Sequential(*[m.double() for m in mlp(dtype=torch.float32)]).eval(), CE
    )
    # Casting float32 weights up is exact, so the float64 model equals the doubled module.
    assert torch.equal(model.flat_parameters(), reference_f32.flat_parameters())
    assert_close(
        model.per_example_grads((x, y)), numpy_of(reference_f32.per_example_grads((x, y))), 1e-14
    )
    assert model.losses((x, y)).dtype == torch.float64
    as_torch_dtype = ki.InfluenceModel(net, CE, dtype=torch.float64)
    assert as_torch_dtype.dtype == torch.float64


def test_the_module_is_untouched_and_its_modes_restored():
    net = mlp(dropout=0.5)
    net.train()
    net[1].eval()  # a submodule in another mode must get its own mode back
    x, y = classification_data()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode") as record:
        model = ki.InfluenceModel(net, CE)
    assert record[0].filename == __file__  # the warning points at the caller
    v = model.from_numpy(np.ones(model.num_parameters))
    model.losses((x, y))
    model.hvp(v, [(x, y)])
    model.project(v[None, :], (x, y))
    model.per_example_grads((x, y))
    assert net.training and not net[1].training and net[2].training
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def test_train_mode_module_runs_in_eval_mode():
    net = mlp(dropout=0.5)
    x, y = classification_data()
    expected = CE(net(torch.as_tensor(x)), torch.as_tensor(y)).detach()  # eval: no dropout
    net.train()
    with pytest.warns(UserWarning):
        model = ki.InfluenceModel(net, CE)
    assert torch.equal(model.losses((x, y)), expected)
    assert torch.equal(model.losses((x, y)), expected)  # deterministic: dropout is off


def test_batch_norm_uses_running_statistics_and_is_not_updated():
    torch.manual_seed(2)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5, dtype=torch.float64),
        torch.nn.BatchNorm1d(5, dtype=torch.float64),
        torch.nn.Linear(5, 3, dtype=torch.float64),
    )
    x, y = classification_data()
    net(torch.as_tensor(x) * 3 + 1)  # move the running statistics away from (0, 1)
    net.eval()
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    expected = CE(net(torch.as_tensor(x)), torch.as_tensor(y)).detach()
    net.train()
    with pytest.warns(UserWarning):
        model = ki.InfluenceModel(net, CE)
    assert_close(model.losses((x, y)), expected.numpy(), 1e-14)
    names = [n for n, _ in net.named_parameters()]
    net.eval()
    assert_close(
        model.per_example_grads((x, y)), autograd_per_example_grads(net, x, y, names), 1e-12
    )
    projector = model.from_numpy(
        np.random.default_rng(7).standard_normal((4, model.num_parameters))
    )
    expected = numpy_of(model.per_example_grads((x, y))) @ numpy_of(projector).T
    assert_close(model.project(projector, (x, y)), expected, 1e-12)
    hessian = dense_hessian(model, [(x, y)])
    assert_close(
        model.hvps(projector, [(x[:4], y[:4]), (x[4:], y[4:])]),
        numpy_of(projector) @ hessian,
        1e-12,
    )
    reverse = ki.InfluenceModel(net, CE, hvp_mode="reverse-over-reverse")
    assert_close(reverse.hvps(projector, [(x, y)]), numpy_of(projector) @ hessian, 1e-12)
    for key, value in net.named_buffers():
        assert torch.equal(value, buffers[key]), key


def test_batch_formats_agree():
    net = mlp()
    x, y = classification_data(n=8)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    model = ki.InfluenceModel(net, CE)
    expected = numpy_of(model.per_example_grads((xt, yt)))
    formats = {
        "tuple of tensors": (xt, yt),
        "list of tensors": [xt, yt],
        "tuple of arrays": (x, y),
        "int32 labels": (x, y.astype(np.int32)),
        "dict x/y": {"x": x, "y": y},
        "dict input/target with extra keys": {"input": xt, "target": yt, "index": np.arange(8)},
        "prepared": model.prepare((x, y)),
    }
    for name, batch in formats.items():
        assert model.batch_size(batch) == 8, name
        assert_close(model.per_example_grads(batch), expected, 1e-15, name)
    dataset = torch.utils.data.TensorDataset(xt, yt)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=False)
    v = model.from_numpy(np.linspace(-1, 1, model.num_parameters))
    listed = [(xt[i : i + 3], yt[i : i + 3]) for i in range(0, 8, 3)]
    assert_close(model.hvp(v, loader), numpy_of(model.hvp(v, listed)), 1e-14)
    assert_close(model.hessian_operator(loader).mv(v), numpy_of(model.hvp(v, [(x, y)])), 1e-12)


def test_targets_may_be_none():
    net = mlp()
    x, _ = classification_data()

    def energy(outputs, targets):
        assert targets is None
        return 0.5 * (outputs**2).sum(dim=-1)

    model = ki.InfluenceModel(net, energy)
    named = dict(net.named_parameters())
    rows = []
    for i in range(len(x)):
        loss = energy(net(torch.as_tensor(x[i : i + 1])), None)[0]
        rows.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(named.values()))])
        )
    assert_close(model.per_example_grads((x, None)), torch.stack(rows).numpy(), 1e-12)
    assert_close(
        model.losses({"x": x, "y": None}),
        energy(net(torch.as_tensor(x)), None).detach().numpy(),
        1e-14,
    )


def test_tuple_and_dict_inputs():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 3, dtype=torch.float64)
            self.b = torch.nn.Linear(4, 3, dtype=torch.float64)

        def forward(self, left, right):
            return self.a(left) * torch.tanh(self.b(right))

    torch.manual_seed(3)
    net = TwoInputs().eval()
    rng = np.random.default_rng(3)
    left, right, y = rng.standard_normal((6, 2)), rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    model = ki.InfluenceModel(net, CE)
    by_tuple = model.per_example_grads(((left, right), y))
    by_dict = model.per_example_grads({"x": {"left": left, "right": right}, "y": y})
    named = dict(net.named_parameters())
    rows = []
    for i in range(6):
        out = net(torch.as_tensor(left[i : i + 1]), torch.as_tensor(right[i : i + 1]))
        loss = CE(out, torch.as_tensor(y[i : i + 1]))[0]
        rows.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(named.values()))])
        )
    expected = torch.stack(rows).numpy()
    assert_close(by_tuple, expected, 1e-12)
    assert_close(by_dict, expected, 1e-12)
    projector = model.from_numpy(rng.standard_normal((3, model.num_parameters)))
    assert_close(
        model.project(projector, ((left, right), y)), expected @ numpy_of(projector).T, 1e-12
    )


def test_staged_batches_are_prepared_once_and_give_the_same_products():
    net = mlp()
    x, y = classification_data()
    model = ki.InfluenceModel(net, CE)
    # float32 tensors are cast to the model's float64; int32 NumPy labels become int64.
    first = (torch.as_tensor(x[:5], dtype=torch.float32), torch.as_tensor(y[:5]))
    batches = [first, (x[5:], y[5:].astype(np.int32))]
    staged = [model.stage_batch(batch) for batch in batches]
    assert all(isinstance(b, Batch) for b, _ in staged)
    assert [(b.x.dtype, b.y.dtype) for b, _ in staged] == [(torch.float64, torch.int64)] * 2
    assert [n for _, n in staged] == [5 * (4 * 8 + 8), 6 * (4 * 8 + 8)]
    operator = model.hessian_operator([b for b, _ in staged])
    v = model.from_numpy(np.arange(model.num_parameters, dtype=float))
    assert_close(operator.mv(v), numpy_of(model.hvp(v, batches)), 1e-14)
    assert_close(operator.mm(v[None, :]), numpy_of(model.hvp(v, batches))[None, :], 1e-12)


def test_dataloaders_are_collated_once_per_fit_and_fit_as_the_list_does():
    # The oracle is the streamed fit of the same data as a list of tensors; the shuffled
    # loader sums the batches in another order, so it agrees to round-off only.
    x, y = classification_data(n=23)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    model = ki.InfluenceModel(mlp(), CE, l2=0.1)
    n = 20
    listed = [(xt[s : s + 5], yt[s : s + 5]) for s in range(0, 23, 5)]

    def fit(data, staged=True):
        return ki.ArnoldiInfluenceCalculator(
            model, data, n, True, 10, "float64", stage_hessian_data=staged
        )

    expected = numpy_of(fit(listed, staged=False).eig_vals)
    collated = []

    def counting_collate(examples):
        collated.append(len(examples))
        return torch.utils.data.default_collate(examples)

    dataset = torch.utils.data.TensorDataset(xt, yt)
    loaders = {
        "TensorDataset": torch.utils.data.DataLoader(
            dataset, batch_size=5, collate_fn=counting_collate
        ),
        "shuffled": torch.utils.data.DataLoader(
            dataset,
            batch_size=5,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
            collate_fn=counting_collate,
        ),
        "list, batch_size=None": torch.utils.data.DataLoader(listed, batch_size=None),
    }
    for name, loader in loaders.items():
        collated.clear()
        assert_close(fit(loader).eig_vals, expected, 1e-10, name)
        if name != "list, batch_size=None":  # that one converts, it does not collate
            assert collated == [5, 5, 5, 5, 3] * 2, name  # validation + staging passes
    collated.clear()
    assert_close(fit(loaders["TensorDataset"], staged=False).eig_vals, expected, 1e-10)
    assert len(collated) == 5 * (1 + n)  # streamed: one pass per Hessian-vector product


@pytest.mark.parametrize("mode", HVP_MODES)
def test_losses_linear_or_constant_in_theta_have_a_zero_hessian(mode):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3, dtype=torch.float64)).eval()
    x, _ = classification_data()
    v = torch.linspace(-1, 1, 15, dtype=torch.float64)
    linear = ki.InfluenceModel(net, lambda out, _: out.sum(dim=-1), hvp_mode=mode, l2=0.5)
    assert_close(linear.hvp(v, [(x, None)]), 0.5 * v.numpy(), 1e-15)
    assert_close(linear.hvps(v[None, :], [(x, None)]), 0.5 * v.numpy()[None, :], 1e-15)
    constant = ki.InfluenceModel(net, lambda out, _: torch.ones(out.shape[0]), hvp_mode=mode)
    assert_close(constant.hvp(v, [(x, None)]), np.zeros(15), 1e-15)


def test_l2_adds_exactly_its_terms():
    net = mlp()
    x, y = classification_data()
    plain = ki.InfluenceModel(net, CE, parameters=["2"])
    l2 = 0.3
    model = ki.InfluenceModel(net, CE, parameters=["2"], l2=l2)
    theta = numpy_of(plain.flat_parameters())
    rng = np.random.default_rng(6)
    v = rng.standard_normal(theta.size)
    projector = rng.standard_normal((4, theta.size))
    assert_close(
        model.losses((x, y)), numpy_of(plain.losses((x, y))) + 0.5 * l2 * theta @ theta, 1e-14
    )
    assert_close(
        model.per_example_grads((x, y)),
        numpy_of(plain.per_example_grads((x, y))) + l2 * theta,
        1e-14,
    )
    assert_close(
        model.hvp(model.from_numpy(v), [(x, y)]),
        numpy_of(plain.hvp(plain.from_numpy(v), [(x, y)])) + l2 * v,
        1e-14,
    )
    assert_close(
        model.project(model.from_numpy(projector), (x, y)),
        numpy_of(plain.project(plain.from_numpy(projector), (x, y))) + l2 * (projector @ theta),
        1e-13,
    )


# ------------------------------------------------------------------------ bad inputs
def test_reduced_losses_are_rejected():
    net = mlp()
    x, y = classification_data()
    with pytest.raises(ValueError, match="reduction='none'"):
        ki.InfluenceModel(net, torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="reduction='none'"):
        ki.InfluenceModel(net, torch.nn.MSELoss(reduction="sum"))
    mean_loss = ki.InfluenceModel(net, lambda out, target: CE(out, target).mean())
    with pytest.raises(ValueError, match=r"shape \(11,\).*got shape \(\)"):
        mean_loss.losses((x, y))
    with pytest.raises(ValueError, match=r"shape \(1,\).*got shape \(\)"):
        mean_loss.per_example_grads((x, y))
    per_output = ki.InfluenceModel(net, torch.nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match=r"got shape \(11, 3\)"):
        per_output.losses((x, np.zeros((11, 3))))
    with pytest.raises(TypeError, match="loss_fn"):
        ki.InfluenceModel(net, None)


def test_bad_arguments_give_clear_errors(monkeypatch):
    net = mlp()
    x, y = classification_data()
    model = ki.InfluenceModel(net, CE)
    p = model.num_parameters
    with pytest.raises(ValueError, match=r"vector: expected shape \(p,\)"):
        model.hvp(torch.ones(p + 1, dtype=torch.float64), [(x, y)])
    with pytest.raises(ValueError, match=r"projector: expected shape \(k, p\)"):
        model.project(torch.ones(p, dtype=torch.float64), (x, y))
    with pytest.raises(ValueError, match=r"projector: expected shape \(k, p\) with k >= 1"):
        model.project(torch.ones(0, p, dtype=torch.float64), (x, y))
    with pytest.raises(ValueError, match="vectors"):
        model.hvps(torch.ones(2, p - 1, dtype=torch.float64), [(x, y)])
    with pytest.raises(ValueError, match="'fc9'"):
        ki.InfluenceModel(net, CE, parameters=["fc9"])
    with pytest.raises(ValueError, match="not a parameter of this module"):
        ki.InfluenceModel(net, CE, parameters=[torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="empty"):
        ki.InfluenceModel(net, CE, parameters=lambda name, param: False)
    with pytest.raises(TypeError, match="parameters"):
        ki.InfluenceModel(net, CE, parameters=3)
    with pytest.raises(ValueError, match="dtype"):
        ki.InfluenceModel(net, CE, dtype="float16")
    with pytest.raises(ValueError, match="dtype"):
        ki.InfluenceModel(net.half(), CE)
    net.double()
    with pytest.raises(ValueError, match="device="):
        ki.InfluenceModel(net, CE, device="tpu:0")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            ki.InfluenceModel(net, CE, device="cuda:0")
    with pytest.raises(ValueError, match="l2"):
        ki.InfluenceModel(net, CE, l2=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        ki.InfluenceModel(net, CE, chunk_size=0)
    with pytest.raises(ValueError, match="hvp_mode"):
        ki.InfluenceModel(net, CE, hvp_mode="reverse")
    with pytest.raises(TypeError, match="unexpected options"):
        ki.InfluenceModel(net, CE, params={})
    with pytest.raises(ValueError, match="empty"):
        model.hvp(torch.ones(p, dtype=torch.float64), [])
    # float64 where the device has none (MPS): refused before anything is placed there.
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(ValueError, match="float64"):
        ki.InfluenceModel(net, CE, device="mps", dtype="float64")


def test_bad_batches_give_clear_errors():
    model = ki.InfluenceModel(mlp(), CE)
    x, y = classification_data()
    v = torch.ones(model.num_parameters, dtype=torch.float64)
    with pytest.raises(TypeError, match="single batch"):
        model.hvp(v, (x, y))
    with pytest.raises(TypeError, match="batch: expected an"):
        model.losses("data")
    with pytest.raises(ValueError, match="keys 'x' and 'y'"):
        model.losses({"inputs": x, "labels": y})
    with pytest.raises(ValueError, match="batch size first"):
        model.losses((x, y[:-1]))
    with pytest.raises(TypeError, match="tensors or NumPy arrays"):
        model.losses((x, list(y)))


def test_importing_the_engine_does_not_import_torch():
    script = textwrap.dedent(
        """
        import sys
        import krylov_influence_torch
        assert krylov_influence_torch.TorchEngine.name == "torch"
        print("torch" in sys.modules)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_no_warnings_for_a_module_in_eval_mode():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ki.InfluenceModel(mlp(), CE)


def _item_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    scale = 1.0 + 0.0 * float(outputs.detach().abs().max().item())  # .item(): no vmap
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none") * scale


def _one_hot_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    hot = torch.nn.functional.one_hot(targets).to(outputs.dtype)  # data-dependent shape
    return -(hot * torch.log_softmax(outputs, dim=-1)).sum(dim=-1)


@pytest.mark.parametrize("projection", ["auto", "gradients"])
@pytest.mark.parametrize("loss_fn", [_item_loss, _one_hot_loss])
def test_a_loss_that_vmap_cannot_run_takes_an_exact_fallback_once(loss_fn, projection) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    net = net.double().eval()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.tensor([0, 1, 2] * 4)
    model = ki.InfluenceModel(net, loss_fn, projection=projection)
    rows = torch.randn(4, model.num_parameters, dtype=torch.float64)
    # Oracle: one autograd gradient per example, in a Python loop (no vmap, no engine code).
    params = [p for p in net.parameters()]
    losses = loss_fn(net(x), y)  # the whole batch: one_hot sees every class
    grads = []
    for i in range(12):
        parts = torch.autograd.grad(losses[i], params, retain_graph=True)
        grads.append(torch.cat([g.reshape(-1) for g in parts]))
    expected = torch.stack(grads) @ rows.T
    with pytest.warns(RouteFallbackWarning, match="per_example_grads cannot take the route"):
        first = model.project(rows, (x, y))
    assert model.routes["per_example_grads"] == "loop over examples, composite kernels"
    with warnings.catch_warnings():  # "auto" now projects by JVPs, which may note a fallback
        warnings.simplefilter("ignore", RouteFallbackWarning)
        again = model.project(rows, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouteFallbackWarning)  # every route is kept: no note
        third = model.project(rows, (x, y))
        grads_now = model.per_example_grads((x, y))
    for projected in (first, again, third):
        torch.testing.assert_close(projected, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads_now, torch.stack(grads), rtol=1e-10, atol=1e-12)
