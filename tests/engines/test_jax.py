"""The JAX engine against independent oracles.

Oracles: the spec's NumPy forward pass (losses, and finite differences of it for gradients and
Hessians), the NumPy reference engine (analytic Hessians of the no-hidden-layer specs), and the
exact dense inverse Hessian (end to end). float64 needs ``jax_enable_x64``, enabled here for
the whole process; every array below is given an explicit dtype so that other test modules
are not affected by the flag.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import array_api_compat  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import krylov_influence as ki  # noqa: E402
from krylov_influence.exact import (  # noqa: E402
    dense_hessian,
    exact_influence,
    exact_self_influence,
    inverse_hessian,
)
from krylov_influence.reference import NumpyEngine  # noqa: E402
from krylov_influence.testing import MLPSpec, random_mlp_spec  # noqa: E402
from krylov_influence_jax import JaxEngine, JaxInfluenceModel  # noqa: E402
from krylov_influence_jax._spec import APPLY_FNS, cross_entropy  # noqa: E402

DTYPES = ("float32", "float64")
SMOOTH = ("tanh", "softplus", "gelu")


def rtol_of(dtype: str) -> float:
    """Agreement expected between two float computations of the same quantity."""
    return 4 * float(np.sqrt(np.finfo(dtype).eps)) if dtype == "float32" else 1e-10


def assert_close(actual, expected, rtol: float) -> None:
    """Entrywise, with round-off measured against the largest entry (sums cancel)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@st.composite
def specs(draw, activations=("tanh", "softplus", "gelu", "relu"), hidden=(0, 1, 2)):
    """Small random MLP specs with 2 to 40 parameters and uneven batches."""
    depth = draw(st.sampled_from(hidden))
    sizes = [draw(st.integers(1, 4))] + [draw(st.integers(1, 4)) for _ in range(depth)]
    sizes.append(draw(st.integers(1, 3)))
    loss = draw(st.sampled_from(("cross_entropy", "mse")))
    if loss == "cross_entropy" and sizes[-1] == 1:
        sizes[-1] = 2
    p = sum(a * b + b for a, b in itertools.pairwise(sizes))
    if not 2 <= p <= 40:
        sizes = [2, 3] if loss == "cross_entropy" else [3, 1]
    n = draw(st.integers(1, 12))
    return random_mlp_spec(
        np.random.default_rng(draw(st.integers(0, 2**31 - 1))),
        tuple(sizes),
        activation=draw(st.sampled_from(activations)),
        loss=loss,
        num_examples=n,
        batch_size=draw(st.integers(1, max(1, n))),
        l2=draw(st.sampled_from((0.0, 0.01, 0.3))),
    )


def spec_at(spec: MLPSpec, theta: np.ndarray) -> MLPSpec:
    """The same spec with flat parameters ``theta``."""
    weights, biases = spec.unflatten(theta)
    return dataclasses.replace(spec, weights=tuple(weights), biases=tuple(biases))


def all_data(spec: MLPSpec, model: JaxInfluenceModel) -> list:
    """The whole dataset as one batch, in the model's dtype."""
    y = spec.y if spec.loss == "cross_entropy" else spec.y.astype(model.dtype)
    return [(spec.x.astype(model.dtype), y)]


def numpy_x(spec: MLPSpec, batch_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return spec.numpy_batches()[batch_index]


# Each new architecture compiles its programs (~0.3 s each): keep the examples few.
def common_spec(seed: int, l2: float = 0.01) -> MLPSpec:
    """The fixed-shape spec of the non-Hypothesis tests, which then share compiled programs."""
    return random_mlp_spec(
        np.random.default_rng(seed), (3, 4, 2), num_examples=11, batch_size=4, l2=l2
    )


FEW = settings(max_examples=5, deadline=None)


# ------------------------------------------------------------------------------ operators
@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(spec=specs())
def test_losses_equal_numpy_forward_pass(dtype, spec):
    model, batches = JaxEngine.from_neutral_spec(spec, dtype=dtype)
    for batch, (x, y) in zip(batches, spec.numpy_batches()):
        assert_close(model.losses(batch), spec.losses(x, y), rtol_of(dtype))
    assert_close(model.flat_parameters(), spec.flat_parameters(), rtol_of(dtype))


@FEW
@given(spec=specs(activations=SMOOTH))
def test_per_example_grads_equal_finite_differences(spec):
    model, batches = JaxEngine.from_neutral_spec(spec, dtype="float64")
    theta, step = spec.flat_parameters(), 1e-6
    x, y = spec.x, spec.y
    columns = []
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = step
        columns.append((spec.losses(x, y, theta + e) - spec.losses(x, y, theta - e)) / (2 * step))
    finite = np.stack(columns, axis=1)
    grads = np.concatenate([np.asarray(model.per_example_grads(b)) for b in batches])
    # central differences: O(step²) truncation plus eps/step round-off, about 1e-9 here.
    assert_close(grads, finite, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(spec=specs(hidden=(0,)))
def test_hvp_equals_reference_engine_hessian(dtype, spec):
    if spec.loss == "mse" and spec.layer_sizes[-1] != 1:
        spec = dataclasses.replace(
            spec,
            layer_sizes=(spec.layer_sizes[0], 1),
            weights=(spec.weights[0][:, :1],),
            biases=(spec.biases[0][:1],),
            y=spec.y[:, :1],
        )
    model, batches = JaxEngine.from_neutral_spec(spec, dtype=dtype)
    reference, ref_batches = NumpyEngine.from_neutral_spec(spec, dtype="float64")
    hessian = dense_hessian(reference, ref_batches)
    v = np.random.default_rng(0).standard_normal(model.num_parameters)
    assert_close(model.hvp(model.from_numpy(v), batches), hessian @ v, rtol_of(dtype))
    assert_close(dense_hessian(model, batches), hessian, rtol_of(dtype))


@FEW
@given(spec=specs(activations=SMOOTH, hidden=(1, 2)))
def test_hvp_equals_finite_differences_of_gradients(spec):
    model, batches = JaxEngine.from_neutral_spec(spec, dtype="float64")
    v = np.random.default_rng(1).standard_normal(model.num_parameters)
    step = 1e-5
    theta = spec.flat_parameters()

    def mean_grad(at: np.ndarray) -> np.ndarray:
        shifted, shifted_batches = JaxEngine.from_neutral_spec(spec_at(spec, at), dtype="float64")
        grads = [np.asarray(shifted.per_example_grads(b)) for b in shifted_batches]
        return np.concatenate(grads).mean(axis=0)

    finite = (mean_grad(theta + step * v) - mean_grad(theta - step * v)) / (2 * step)
    # gradients are exact to round-off (tested above); the difference quotient is O(step²).
    assert_close(model.hvp(v, batches), finite, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(spec=specs())
def test_hvp_is_symmetric_linear_and_batch_independent(dtype, spec):
    model, batches = JaxEngine.from_neutral_spec(spec, dtype=dtype)
    rng = np.random.default_rng(2)
    u, v = (model.from_numpy(rng.standard_normal(model.num_parameters)) for _ in range(2))
    hu, hv = np.asarray(model.hvp(u, batches)), np.asarray(model.hvp(v, batches))
    u64, v64 = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    scale = np.linalg.norm(hu) * np.linalg.norm(v64) + np.linalg.norm(hv) * np.linalg.norm(u64)
    assert abs(u64 @ hv - v64 @ hu) <= rtol_of(dtype) * scale
    combined = model.hvp(2.0 * u - 3.0 * v, batches)
    assert_close(combined, 2.0 * hu - 3.0 * hv, rtol_of(dtype))
    # The uneven batches of the spec give the Hessian of the mean over all examples.
    assert_close(model.hvp(v, all_data(spec, model)), hv, rtol_of(dtype))
    # Staged batches (JAX arrays kept on the device) give the same products.
    staged = [model.stage_batch(batch)[0] for batch in batches]
    assert_close(model.hessian_operator(staged).mv(v), hv, rtol_of(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorised_and_staged_products_equal_hvp(dtype):
    spec = common_spec(13)
    model, batches = JaxEngine.from_neutral_spec(spec, dtype=dtype)
    vectors = model.from_numpy(np.random.default_rng(14).standard_normal((3, model.num_parameters)))
    expected = np.stack([np.asarray(model.hvp(vectors[i], batches)) for i in range(3)])
    assert_close(model.hvps(vectors, batches), expected, rtol_of(dtype))
    operator = model.hessian_operator([model.stage_batch(batch)[0] for batch in batches])
    assert_close(operator.mv(vectors[1]), expected[1], rtol_of(dtype))
    assert_close(operator.mm(vectors), expected, rtol_of(dtype))
    streamed = model.hessian_operator(iter_again(batches))  # not a list: streamed per product
    assert_close(streamed.mv(vectors[2]), expected[2], rtol_of(dtype))


class iter_again:
    """A re-iterable that is not a list (a DataLoader stand-in)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", ["jvp", "gradients", "auto"])
@FEW
@given(spec=specs(), k=st.integers(1, 7))
def test_project_equals_projected_per_example_grads(dtype, route, spec, k):
    """Every route of ``project`` against the spec's NumPy backprop gradients times G."""
    built, batches = JaxEngine.from_neutral_spec(spec, dtype=dtype)
    loss = built._program.loss_fn  # cross-entropy or squared error, as the spec says
    model = JaxEngine.bind(
        APPLY_FNS[spec.activation], loss, params=built.params, l2=spec.l2, projection=route
    )
    G = np.random.default_rng(3).standard_normal((k, model.num_parameters)).astype(dtype)
    for batch, (x, y) in zip(batches, spec.numpy_batches()):
        expected = spec.gradients(x, y) @ G.T.astype(np.float64)
        assert_close(model.project(model.from_numpy(G), batch), expected, rtol_of(dtype))
    with pytest.raises(ValueError, match="projection='vjp'"):
        JaxEngine.bind(
            APPLY_FNS[spec.activation], cross_entropy, params=model.params, projection="vjp"
        )


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_projection_equals_vectorised(chunk):
    spec = common_spec(15)
    model, batches = JaxEngine.from_neutral_spec(spec, dtype="float64")
    batch = batches[0]
    chunked = JaxEngine.bind(
        APPLY_FNS[spec.activation],
        cross_entropy,
        params=[(jnp.asarray(w), jnp.asarray(b)) for w, b in zip(spec.weights, spec.biases)],
        l2=spec.l2,
        jvp_chunk_size=chunk,
    )
    G = model.from_numpy(np.random.default_rng(16).standard_normal((7, model.num_parameters)))
    assert_close(chunked.project(G, batch), model.project(G, batch), 1e-12)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_auto_projection_past_the_budget_takes_gradients_in_chunks(rows, monkeypatch):
    """Above the gradient budget ``"auto"`` projects by per-example gradients over equal
    chunks of examples (``rows`` gradients fit the budget), never by JVPs; against the spec's
    NumPy backprop gradients times G."""
    spec = common_spec(17)
    model, batches = JaxEngine.from_neutral_spec(spec, dtype="float64")
    p = model.num_parameters
    monkeypatch.setattr(model, "GRADIENT_PROJECTION_BYTES", rows * p * 8)

    def no_jvps(*args, **kwargs):
        raise AssertionError("projection='auto' took the JVP route")

    monkeypatch.setattr(model._kernels, "project", no_jvps)
    chunks: list[int] = []  # rows of every chunk the kernels see
    kernel = model._kernels.gradient_project_and_losses

    def counted(theta, fixed, x, *rest):
        chunks.append(int(x.shape[0]))
        return kernel(theta, fixed, x, *rest)

    monkeypatch.setattr(model._kernels, "gradient_project_and_losses", counted)
    G = np.random.default_rng(18).standard_normal((5, p))
    for batch, (x, y) in zip(batches, spec.numpy_batches()):
        expected = spec.gradients(x, y) @ G.T
        chunks.clear()
        assert_close(model.project(model.from_numpy(G), batch), expected, rtol_of("float64"))
        projected, losses = model.project_and_losses(model.from_numpy(G), batch)
        assert_close(projected, expected, rtol_of("float64"))
        assert_close(losses, spec.losses(x, y), rtol_of("float64"))
        # Equal chunks (the last one padded, its extra rows dropped): one compiled shape.
        assert len(set(chunks)) == 1 and chunks[0] <= rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_projector_split_on_the_host_equals_the_split_on_the_device(dtype, monkeypatch):
    """On the CPU, NumPy cuts G into per-leaf blocks (``HOST_SPLIT_PLATFORMS``); the compiled
    split that other platforms keep gives the same blocks to the bit, on the model's device
    in its dtype, and both projections equal the spec's NumPy gradients times G."""
    spec = common_spec(19)
    host, batches = JaxEngine.from_neutral_spec(spec, dtype=dtype)
    monkeypatch.setattr(JaxInfluenceModel, "HOST_SPLIT_PLATFORMS", frozenset())
    device, _ = JaxEngine.from_neutral_spec(spec, dtype=dtype)
    rng = np.random.default_rng(20)
    G = host.from_numpy(rng.standard_normal((5, host.num_parameters)))
    (host_blocks, host_offset, _), (device_blocks, device_offset, _) = (
        host._split_projector(G),
        device._split_projector(G),
    )
    assert [b.shape for b in host_blocks] == [
        (int(np.prod(shape)), 5) for _, shape in host.parameter_layout
    ]
    for ours, theirs in zip(host_blocks, device_blocks):
        assert ours.dtype == np.dtype(dtype) and ours.devices() == {host.device}
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert_close(host_offset, device_offset, rtol_of(dtype))
    for batch, (x, y) in zip(batches, spec.numpy_batches()):
        expected = spec.gradients(x, y) @ np.asarray(G, dtype=np.float64).T
        assert_close(host.project(G, batch), expected, rtol_of(dtype))
        assert_close(device.project(G, batch), expected, rtol_of(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_follow_the_model_dtype_and_device(dtype):
    spec = common_spec(4)
    model, batches = JaxEngine.from_neutral_spec(spec, dtype=dtype, device="cpu:0")
    numpy_batch = spec.numpy_batches()[0]  # float64 NumPy data, cast by the engine
    v = model.from_numpy(np.ones(model.num_parameters))
    outputs = [
        model.flat_parameters(),
        model.losses(numpy_batch),
        model.hvp(v, batches),
        model.hvps(jnp.stack([v, v]), batches),
        model.hessian_operator(batches).mv(v),
        model.project(jnp.stack([v, v]), numpy_batch),
        model.per_example_grads(numpy_batch),
    ]
    # The model's namespace is jax.numpy (what array_api_compat finds for its arrays) plus
    # the core's donating set_row hook.
    namespace = array_api_compat.array_namespace(outputs[0])
    assert model.xp.matmul is namespace.matmul and model.xp.float32 is namespace.float32
    basis = model.xp.zeros((3, 4), dtype=model.dtype)
    updated = model.xp.set_row(basis, 1, model.xp.ones(4, dtype=model.dtype))
    np.testing.assert_array_equal(np.asarray(updated), [[0] * 4, [1] * 4, [0] * 4])
    assert model.dtype == np.dtype(dtype) and model.dtype_name == dtype
    for out in outputs:
        assert isinstance(out, jax.Array)
        assert out.dtype == model.dtype
        assert out.devices() == {model.device}
    assert str(model.device) == "cpu:0"
    assert model.on_device("cpu") is model
    assert model.on_device(jax.devices("cpu")[0]) is model
    assert model.capabilities.float64 and model.capabilities.vectorised_hvp
    assert "cpu:0" in JaxEngine.devices()


# --------------------------------------------------------------- Flax-style params and selection
def _dense(layer, x):
    return x @ layer["kernel"] + layer["bias"]


def flax_style_apply(variables, x):
    """What a Flax ``nn.Dense -> tanh -> nn.Dense`` module's ``apply`` computes."""
    params = variables["params"]
    return _dense(params["Dense_1"], jnp.tanh(_dense(params["Dense_0"], x)))


def flax_style_params(rng, dtype="float64"):
    return {
        "params": {
            "Dense_0": {
                "kernel": jnp.asarray(rng.standard_normal((3, 4)), dtype),
                "bias": jnp.asarray(rng.standard_normal(4), dtype),
            },
            "Dense_1": {
                "kernel": jnp.asarray(rng.standard_normal((4, 2)), dtype),
                "bias": jnp.asarray(rng.standard_normal(2), dtype),
            },
        },
        "step": jnp.asarray(7, jnp.int32),  # an integer leaf: never differentiated
    }


def _flax_data(rng, n=9):
    return rng.standard_normal((n, 3)), rng.integers(0, 2, n)


def test_flat_order_is_sorted_tree_leaves_order():
    variables = flax_style_params(np.random.default_rng(5))
    model = ki.InfluenceModel(flax_style_apply, cross_entropy, params=variables, dtype="float64")
    assert model.parameter_layout == [
        ("params/Dense_0/bias", (4,)),
        ("params/Dense_0/kernel", (3, 4)),
        ("params/Dense_1/bias", (2,)),
        ("params/Dense_1/kernel", (4, 2)),
    ]
    p = variables["params"]
    expected = np.concatenate(
        [
            np.ravel(p[layer][name])
            for layer in ("Dense_0", "Dense_1")
            for name in ("bias", "kernel")
        ]
    )
    np.testing.assert_array_equal(np.asarray(model.flat_parameters()), expected)
    rebuilt = model.unflatten(model.flat_parameters())
    np.testing.assert_array_equal(
        np.asarray(rebuilt["params"]["Dense_1"]["kernel"]), p["Dense_1"]["kernel"]
    )
    assert int(rebuilt["step"]) == 7


@pytest.mark.parametrize(
    "parameters",
    [["params/Dense_1"], "params/Dense_1", lambda path, leaf: path.startswith("params/Dense_1/")],
)
def test_parameter_subset_gives_the_sub_blocks(parameters):
    rng = np.random.default_rng(6)
    variables = flax_style_params(rng)
    batch = _flax_data(rng)
    full = ki.InfluenceModel(flax_style_apply, cross_entropy, params=variables, l2=0.1)
    sub = ki.InfluenceModel(
        flax_style_apply, cross_entropy, params=variables, parameters=parameters, l2=0.1
    )
    assert [name for name, _ in sub.parameter_layout] == [
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    ]
    block = slice(4 + 12, 4 + 12 + 2 + 8)  # after Dense_0's bias and kernel
    assert sub.num_parameters == 10
    assert_close(sub.flat_parameters(), np.asarray(full.flat_parameters())[block], 1e-15)
    assert_close(
        sub.per_example_grads(batch), np.asarray(full.per_example_grads(batch))[:, block], 1e-12
    )
    hessian = dense_hessian(full, [batch])
    assert_close(dense_hessian(sub, [batch]), hessian[block, block], 1e-12)
    assert_close(
        sub.losses(batch),
        full.losses(batch) - 0.05 * float(np.sum(np.asarray(full.flat_parameters())[:16] ** 2)),
        1e-12,
    )


def test_parameter_prefixes_match_whole_path_components():
    variables = flax_style_params(np.random.default_rng(7))
    with pytest.raises(ValueError, match=r"parameters: no leaf .* prefix 'params/Dense'"):
        ki.InfluenceModel(
            flax_style_apply, cross_entropy, params=variables, parameters=["params/Dense"]
        )
    with pytest.raises(ValueError, match=r"parameters: no leaf .* 'params/Conv_0'"):
        ki.InfluenceModel(
            flax_style_apply, cross_entropy, params=variables, parameters=["params/Conv_0"]
        )
    with pytest.raises(ValueError, match="parameters: leaf 'step' has dtype int32"):
        ki.InfluenceModel(flax_style_apply, cross_entropy, params=variables, parameters=["step"])
    with pytest.raises(ValueError, match="selection is empty"):
        ki.InfluenceModel(
            flax_style_apply, cross_entropy, params=variables, parameters=lambda path, leaf: False
        )


def test_dict_batches_and_batch_keys():
    rng = np.random.default_rng(8)
    variables = flax_style_params(rng)
    x, y = _flax_data(rng)
    model = ki.InfluenceModel(flax_style_apply, cross_entropy, params=variables)
    expected = np.asarray(model.losses((x, y)))
    assert_close(model.losses({"x": x, "y": y}), expected, 1e-15)
    assert_close(model.losses({"inputs": x, "targets": y}), expected, 1e-15)
    assert_close(model.losses([jnp.asarray(x), jnp.asarray(y)]), expected, 1e-15)
    keyed = ki.InfluenceModel(
        flax_style_apply, cross_entropy, params=variables, batch_keys=("image", "label")
    )
    assert_close(keyed.losses({"image": x, "label": y}), expected, 1e-15)
    assert keyed.batch_size({"image": x, "label": y}) == x.shape[0]
    with pytest.raises(TypeError, match=r"batch: a dict batch needs the keys \('image', 'label'\)"):
        keyed.losses({"x": x, "y": y})


def test_compiled_programs_are_reused_across_calls_batches_and_bindings():
    def apply_fn(params, x):  # a fresh function: nothing compiled for it yet
        return x @ params[0][0] + params[0][1]

    rng = np.random.default_rng(9)
    params = [(jnp.asarray(rng.standard_normal((3, 2))), jnp.asarray(rng.standard_normal(2)))]
    x, y = rng.standard_normal((10, 3)), rng.integers(0, 2, 10)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]

    model = ki.InfluenceModel(apply_fn, cross_entropy, params=params, l2=0.1)

    def sizes() -> tuple[int, int]:
        # The projection of this small model takes the gradients route (projection="auto").
        kernels = model._kernels
        return kernels.hvp_sum._cache_size(), kernels.gradient_project_and_losses._cache_size()

    before = sizes()
    v = model.from_numpy(np.ones(model.num_parameters))
    for _ in range(3):
        model.hvp(v, batches)
        model.project(jnp.stack([v, v]), batches[0])
    # Two batch shapes (4, and the short last batch of 2): two traces of the HVP, not one per
    # call; one of the projection.
    assert np.subtract(sizes(), before).tolist() == [2, 1]
    # Rebinding the same functions (other values, other l2) while the model is alive compiles
    # nothing new (tests/engines/test_jax_kernel_lifetime.py: every operator, dtypes, devices).
    again = ki.InfluenceModel(
        apply_fn, cross_entropy, params=jax.tree_util.tree_map(lambda a: 2 * a, params), l2=0.5
    )
    assert again._kernels is model._kernels
    again.hvp(v, batches)
    again.project(jnp.stack([v, v]), batches[1])
    assert np.subtract(sizes(), before).tolist() == [2, 1]


# ----------------------------------------------------------------------------- end to end
def test_calculator_matches_exact_influence():
    spec = common_spec(10, l2=0.05)
    model, batches = JaxEngine.from_neutral_spec(spec, dtype="float64")
    p = model.num_parameters
    calc = ki.ArnoldiInfluenceCalculator(model, batches, p, True, p, "float64")
    # subspace_dim = k = p: the Ritz pairs are exact eigenpairs, so only round-off amplified by
    # the conditioning of H separates the two.
    inverse = inverse_hessian(dense_hessian(model, batches))
    self_exact = exact_self_influence(model, batches, inverse=inverse)
    np.testing.assert_allclose(calc.self_influence(batches), self_exact, rtol=1e-6)
    queries = batches[:2]
    pairwise = exact_influence(model, batches, queries, inverse=inverse)
    scale = float(np.max(np.abs(pairwise)))
    np.testing.assert_allclose(calc.influence_matrix(queries, batches), pairwise, atol=1e-6 * scale)


# --------------------------------------------------------------------- inference and errors
def test_engine_is_inferred_from_jax_params():
    variables = flax_style_params(np.random.default_rng(11))
    model = ki.InfluenceModel(flax_style_apply, cross_entropy, params=variables)
    assert isinstance(model, JaxInfluenceModel) and model.engine_name == "jax"
    assert ki.infer_engine(flax_style_apply, params=variables) is JaxEngine
    assert JaxEngine.recognises(flax_style_apply, params=variables)
    assert not JaxEngine.recognises(flax_style_apply)
    assert not JaxEngine.recognises(object(), params=variables)
    numpy_params = jax.tree_util.tree_map(np.asarray, variables)
    assert not JaxEngine.recognises(flax_style_apply, params=numpy_params)
    with pytest.raises(ki.EngineNotFoundError):
        ki.InfluenceModel(flax_style_apply, cross_entropy, params=numpy_params)
    explicit = ki.InfluenceModel(
        flax_style_apply, cross_entropy, params=numpy_params, engine="jax", dtype="float64"
    )
    assert_close(explicit.flat_parameters(), model.flat_parameters(), 1e-15)


def test_bad_inputs_give_clear_errors():
    rng = np.random.default_rng(12)
    variables = flax_style_params(rng)
    x, y = _flax_data(rng)
    bind = lambda loss=cross_entropy, **kw: ki.InfluenceModel(  # noqa: E731
        flax_style_apply, loss, params=variables, **kw
    )

    def mean_loss(out, labels):
        return jnp.mean(cross_entropy(out, labels))

    with pytest.raises(ValueError, match=r"loss_fn: returned a scalar.*per-example"):
        bind(mean_loss).losses((x, y))
    with pytest.raises(ValueError, match=r"loss_fn: expected per-example losses of shape \(9,\)"):
        bind(lambda out, labels: out).hvp(np.ones(26), [(x, y)])
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        bind(None)
    with pytest.raises(TypeError, match="params: the jax engine needs the parameter pytree"):
        JaxEngine.bind(flax_style_apply, cross_entropy, params=None)
    model = bind()
    with pytest.raises(ValueError, match=r"vector: expected shape \(p,\) with p = 26"):
        model.hvp(np.ones(25), [(x, y)])
    with pytest.raises(ValueError, match=r"projector: expected shape \(m, p\) with p = 26"):
        model.project(np.ones(26), (x, y))
    with pytest.raises(ValueError, match="batch: x and y must have the same number of examples"):
        model.losses((x, y[:-1]))
    with pytest.raises(TypeError, match=r"batch: expected an \(x, y\) pair"):
        model.losses((x, y, y))
    with pytest.raises(ValueError, match="device='gpu:7': no such JAX device; available: cpu:0"):
        bind(device="gpu:7")
    with pytest.raises(ValueError, match="expected float32 or float64"):
        bind(dtype="float16")
    with pytest.raises(ValueError, match=r"l2=-1\.0"):
        bind(l2=-1.0)
    with pytest.raises(TypeError, match=r"unexpected options for the jax engine: \['lr'\]"):
        bind(lr=0.1)
    with pytest.raises(ValueError, match="batches: the Hessian data is empty"):
        model.hvp(np.ones(26), [])


def _run_python(code: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "backends")]))
    env.pop("JAX_ENABLE_X64", None)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )


def test_float64_without_x64_is_a_clear_error_and_the_flag_is_untouched():
    code = (
        "import jax, numpy as np, jax.numpy as jnp\n"
        "import krylov_influence as ki\n"
        "params = [(jnp.ones((2, 2)), jnp.zeros(2))]\n"
        "f = lambda p, x: x @ p[0][0] + p[0][1]\n"
        "loss = lambda out, y: jnp.sum((out - y) ** 2, axis=1)\n"
        "m = ki.InfluenceModel(f, loss, params=params)\n"
        "assert m.dtype_name == 'float32' and not m.capabilities.float64\n"
        "try:\n"
        "    ki.InfluenceModel(f, loss, params=params, dtype='float64')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
        "assert not jax.config.jax_enable_x64\n"
    )
    done = _run_python(code)
    assert done.returncode == 0, done.stderr
    assert "dtype='float64': JAX computes in float64 only with jax_enable_x64" in done.stdout


def test_importing_the_engine_does_not_import_jax():
    done = _run_python(
        "import sys, krylov_influence, krylov_influence_jax\n"
        "krylov_influence.available_engines()\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
    )
    assert done.returncode == 0, done.stderr


def test_every_matrix_product_is_traced_at_highest_precision():
    # float32 on GPUs would otherwise run in TF32 (~1e-3 relative); CPUs ignore the flag, so
    # the property is checked on the traced programs, including the transposed products.
    from jax.extend.core import jaxprs_in_params

    spec = common_spec(17)
    model, batches = JaxEngine.from_neutral_spec(spec, dtype="float32")
    x, y = batches[0]
    kernels = model._kernels
    args = (model._theta, model._fixed, x, y)
    G = jnp.stack([model._theta] * 3)
    traced = [
        kernels.losses.trace(*args, model._l2_array),
        kernels.hvp_sum.trace(*args, model._theta),
        kernels.hvps_sum.trace(*args, G),
        kernels.project.trace(*args, G, model._l2_array, chunk=3),
        kernels.project.trace(*args, G, model._l2_array, chunk=2),
        kernels.per_example_grads.trace(*args, model._l2_array),
    ]

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jaxprs_in_params(eqn.params):
                yield from dots(sub)

    for trace in traced:
        found = list(dots(trace.jaxpr.jaxpr))
        assert found
        for eqn in found:
            assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2, eqn
