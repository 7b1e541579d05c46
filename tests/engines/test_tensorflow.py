"""The TensorFlow engine against independent oracles.

Oracles: the spec's NumPy forward pass (losses), central differences of it (gradients, and a
second-difference Hessian), the analytic NumPy reference engine (regressions), NumPy itself
(the array namespace and the Arnoldi iteration) and the exact dense-Hessian influence.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from itertools import permutations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import krylov_influence  # noqa: E402
from krylov_influence import exact  # noqa: E402
from krylov_influence.arnoldi import arnoldi_iteration  # noqa: E402
from krylov_influence.calculator import ArnoldiInfluenceCalculator  # noqa: E402
from krylov_influence.errors import EngineNotFoundError  # noqa: E402
from krylov_influence.reference import NumpyEngine  # noqa: E402
from krylov_influence.testing.spec import MLPSpec, random_mlp_spec  # noqa: E402
from krylov_influence_tf import TensorFlowEngine  # noqa: E402
from krylov_influence_tf._namespace import canonical_device, namespace  # noqa: E402

DTYPES = ("float32", "float64")
CPU = canonical_device("/CPU:0")


def rtol(dtype: str) -> float:
    """``4·sqrt(eps)``: 4.9e-4 in float32, 6e-8 in float64."""
    return 4.0 * math.sqrt(float(np.finfo(dtype).eps))


def close(actual, expected, dtype: str, scale: float = 1.0) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    bound = rtol(dtype) * scale * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    assert float(np.max(np.abs(actual - expected), initial=0.0)) <= bound


@st.composite
def specs(draw, max_hidden: int = 1, smooth: bool = False) -> MLPSpec:
    """Small MLP specs (2–40 parameters)."""
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    hidden = draw(st.integers(0, max_hidden))
    d_in = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 4)) for _ in range(hidden)]
    d_out = draw(st.integers(2, 3)) if loss == "cross_entropy" else draw(st.integers(1, 2))
    activations = ["tanh", "softplus", "gelu"] + ([] if smooth else ["relu"])
    return random_mlp_spec(
        np.random.default_rng(draw(st.integers(0, 2**31 - 1))),
        (d_in, *widths, d_out),
        activation=draw(st.sampled_from(activations)),
        loss=loss,
        num_examples=draw(st.integers(3, 12)),
        batch_size=draw(st.integers(1, 5)),
        l2=draw(st.sampled_from([0.0, 1e-2])),
    )


def fd_gradients(spec: MLPSpec, x, y, step: float = 1e-6) -> np.ndarray:
    theta = spec.flat_parameters()
    eye = np.eye(theta.size)
    columns = [
        (spec.losses(x, y, theta + step * e) - spec.losses(x, y, theta - step * e)) / (2 * step)
        for e in eye
    ]
    return np.stack(columns, axis=1)


def fd_hessian(spec: MLPSpec, step: float = 1e-4) -> np.ndarray:
    """Second differences of the NumPy mean loss (float64)."""
    theta = spec.flat_parameters()
    p = theta.size
    eye = np.eye(p) * step

    def mean(t):
        return float(np.mean(spec.losses(spec.x, spec.y, t)))

    hessian = np.empty((p, p))
    for i in range(p):
        for j in range(i, p):
            value = (
                mean(theta + eye[i] + eye[j])
                - mean(theta + eye[i] - eye[j])
                - mean(theta - eye[i] + eye[j])
                + mean(theta - eye[i] - eye[j])
            ) / (4 * step * step)
            hessian[i, j] = hessian[j, i] = value
    return hessian


# ------------------------------------------------------------------------------ namespace
def test_namespace_matches_numpy():
    xp = namespace
    rng = np.random.default_rng(0)
    a, b, v = rng.standard_normal((3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    ta = xp.asarray(a, dtype=xp.float64, device=CPU)
    tb, tv = xp.asarray(b, device=CPU), xp.asarray(v, device=CPU)
    host = xp.to_numpy
    np.testing.assert_allclose(host(xp.matmul(ta, tb)), a @ b, rtol=1e-14)
    np.testing.assert_allclose(host(ta @ tb), a @ b, rtol=1e-14)
    np.testing.assert_allclose(host(xp.matmul(ta, tv)), a @ v, rtol=1e-14)
    np.testing.assert_allclose(host(xp.matmul(tv[:3], ta)), v[:3] @ a, rtol=1e-14)
    np.testing.assert_allclose(float(host(xp.matmul(tv, tv))), v @ v, rtol=1e-14)
    np.testing.assert_allclose(host(xp.matrix_transpose(ta)), a.T)
    np.testing.assert_allclose(host(xp.permute_dims(ta, (1, 0))), a.T)
    np.testing.assert_allclose(host(xp.vecdot(ta, ta)), np.sum(a * a, axis=-1), rtol=1e-14)
    np.testing.assert_allclose(host(xp.sum(ta, axis=1)), a.sum(axis=1), rtol=1e-14)
    np.testing.assert_allclose(host(xp.sqrt(xp.abs(ta))), np.sqrt(np.abs(a)), rtol=1e-14)
    np.testing.assert_allclose(float(host(xp.linalg.vector_norm(ta))), np.linalg.norm(a))
    assert float(host(xp.max(ta))) == a.max()
    assert bool(xp.all(xp.isfinite(ta))) and not bool(xp.all(ta > 0))
    bad = xp.asarray(np.array([1.0, np.nan, np.inf]), device=CPU)
    np.testing.assert_array_equal(host(xp.isfinite(bad)), [True, False, False])
    np.testing.assert_array_equal(host(xp.stack([tv, tv], axis=1)), np.stack([v, v], axis=1))
    np.testing.assert_array_equal(host(xp.concat([tv, tv])), np.concatenate([v, v]))
    np.testing.assert_array_equal(host(xp.reshape(ta, (4, 3))), a.reshape(4, 3))
    np.testing.assert_array_equal(host(xp.expand_dims(tv, axis=0)), v[None])
    np.testing.assert_array_equal(host(xp.take(tv, xp.asarray([2, 0]), axis=0)), v[[2, 0]])
    for dtype, name in ((xp.float32, "float32"), (xp.float64, "float64")):
        assert xp.astype(ta, dtype).dtype == dtype
        assert xp.zeros((2, 3), dtype=dtype, device=CPU).dtype.name == name
        assert xp.finfo(dtype).eps == np.finfo(name).eps
    np.testing.assert_array_equal(host(xp.ones((2,), dtype=xp.float32, device=CPU)), [1, 1])
    np.testing.assert_array_equal(host(xp.arange(4, dtype=xp.int64, device=CPU)), np.arange(4))
    # argsort: stable in both directions, int64, as the standard says
    ties = np.array([[3.0, 1.0, 3.0, 2.0, 1.0]])
    t_ties = xp.asarray(ties, device=CPU)
    ascending = xp.argsort(t_ties, axis=-1, stable=True)
    descending = xp.argsort(t_ties, axis=-1, descending=True, stable=True)
    assert ascending.dtype == xp.int64
    np.testing.assert_array_equal(host(ascending), np.argsort(ties, kind="stable"))
    np.testing.assert_array_equal(host(descending), [[0, 2, 3, 1, 4]])
    np.testing.assert_array_equal(
        host(xp.take_along_axis(t_ties, descending, axis=-1)), [[3, 3, 2, 1, 1]]
    )
    cols = np.argsort(a, axis=0)
    np.testing.assert_array_equal(
        host(xp.take_along_axis(ta, xp.asarray(cols), axis=0)), np.take_along_axis(a, cols, 0)
    )
    updated = xp.set_row(ta, 1, tv[:4] * 0 + 7.0)
    expected = a.copy()
    expected[1] = 7.0
    np.testing.assert_array_equal(host(updated), expected)
    for out in (ta, updated, xp.zeros((2,), dtype=xp.float64, device=CPU)):
        assert out.device == CPU


def test_device_names_are_normalised():
    for name in ("/CPU:0", "cpu", "CPU:0", "/device:CPU:0", "cpu:0", CPU):
        assert canonical_device(name) == CPU
    for bad in ("/TPU:7", "gpu:99", "banana", 3):
        with pytest.raises(ValueError, match="device="):
            canonical_device(bad)


class _TensorOperator:
    """A dense symmetric matrix as an operator in the TF namespace (``MatrixOperator`` finds
    its namespace with array-api-compat, which does not know TensorFlow)."""

    def __init__(self, matrix, dtype):
        self.xp = namespace
        self.matrix = namespace.asarray(matrix, dtype=getattr(namespace, dtype), device=CPU)
        self.shape = tuple(matrix.shape)
        self.dtype = self.matrix.dtype
        self.device = CPU

    def mv(self, vector):
        return namespace.matmul(self.matrix, vector)


@settings(max_examples=10)
@given(p=st.integers(2, 12), seed=st.integers(0, 1000), data=st.data())
@pytest.mark.parametrize("dtype", DTYPES)
def test_arnoldi_on_tensorflow_tensors_matches_numpy(dtype, p, seed, data):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    matrix = (q * rng.uniform(-3.0, 3.0, p)) @ q.T
    matrix = 0.5 * (matrix + matrix.T)
    dim = data.draw(st.integers(1, p), label="subspace_dim")
    import array_api_compat.numpy as np_xp

    from krylov_influence.arnoldi import MatrixOperator

    expected = arnoldi_iteration(
        MatrixOperator(np_xp.asarray(matrix.astype(dtype))),
        dim,
        seed=seed,
        check_orthogonality=False,
    )
    result = arnoldi_iteration(_TensorOperator(matrix, dtype), dim, seed=seed)
    assert isinstance(result.basis, tf.Tensor) and result.basis.device == CPU
    assert result.basis.dtype.name == dtype
    assert result.orthogonality_loss < 4 * np.sqrt(np.finfo(dtype).eps)
    basis = result.basis.numpy().astype(np.float64)
    scale = float(np.abs(matrix).max())
    close(result.hessenberg, expected.hessenberg, dtype, scale=4.0 * scale)
    close(basis @ basis.T, np.eye(dim), dtype)
    close(result.hessenberg, basis @ matrix @ basis.T, dtype, scale=4.0 * scale)


def test_arnoldi_orthogonality_check_on_tensorflow_tensors():
    matrix = np.diag([3.0, 2.0, 1.0, 0.5])
    result = arnoldi_iteration(_TensorOperator(matrix, "float64"), 4, seed=0)
    assert result.orthogonality_loss < 1e-12


# --------------------------------------------------------------------- operators vs oracles
@settings(max_examples=6)
@given(spec=specs())
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_and_gradients_match_numpy(dtype, spec):
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype=dtype)
    close(model.flat_parameters().numpy(), spec.flat_parameters(), dtype)
    for batch, index in zip(batches, spec.batch_slices()):
        x, y = spec.x[index], spec.y[index]
        close(model.losses(batch).numpy(), spec.losses(x, y), dtype)
        # relu kinks make central differences unreliable only at measure-zero points
        close(model.per_example_grads(batch).numpy(), fd_gradients(spec, x, y), dtype, 4.0)


@settings(max_examples=5)
@given(spec=specs(smooth=True), seed=st.integers(0, 99))
@pytest.mark.parametrize("dtype", DTYPES)
def test_hvp_equals_the_finite_difference_hessian(dtype, spec, seed):
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype=dtype)
    hessian = fd_hessian(spec)
    vectors = np.random.default_rng(seed).standard_normal((3, spec.num_parameters))
    # second differences are accurate to ~1e-7 relative: the float64 bound is loosened to it
    slack = 1.0 if dtype == "float32" else 1e3
    for v in vectors:
        close(model.hvp(model.from_numpy(v), batches).numpy(), hessian @ v, dtype, 4 * slack)
    close(
        model.hvps(model.from_numpy(vectors), batches).numpy(), vectors @ hessian, dtype, 4 * slack
    )


@settings(max_examples=6)
@given(spec=specs(max_hidden=0), seed=st.integers(0, 99))
@pytest.mark.parametrize("dtype", DTYPES)
def test_regressions_match_the_numpy_reference_engine(dtype, spec, seed):
    if spec.loss == "mse" and spec.layer_sizes[-1] != 1:
        spec = random_mlp_spec(np.random.default_rng(seed), (spec.layer_sizes[0], 1), loss="mse")
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype=dtype)
    reference, ref_batches = NumpyEngine.from_neutral_spec(spec, dtype="float64")
    hessian = exact.dense_hessian(reference, ref_batches)
    close(exact.dense_hessian(model, batches), hessian, dtype, 4.0)
    grads = exact.per_example_gradients(reference, ref_batches)
    close(exact.per_example_gradients(model, batches), grads, dtype, 2.0)


@settings(max_examples=6)
@given(spec=specs(), seed=st.integers(0, 99), k=st.integers(1, 7))
@pytest.mark.parametrize("dtype", DTYPES)
def test_hvp_symmetry_linearity_and_projection(dtype, spec, seed, k):
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype=dtype)
    rng = np.random.default_rng(seed)
    p = spec.num_parameters
    u, v = rng.standard_normal((2, p))
    hu = model.hvp(model.from_numpy(u), batches).numpy().astype(np.float64)
    hv = model.hvp(model.from_numpy(v), batches).numpy().astype(np.float64)
    scale = np.linalg.norm(hu) * np.linalg.norm(v) + np.linalg.norm(hv) * np.linalg.norm(u)
    assert abs(u @ hv - v @ hu) <= rtol(dtype) * max(scale, 1e-12)
    combined = model.hvp(model.from_numpy(2 * u - 3 * v), batches).numpy()
    close(combined, 2 * hu - 3 * hv, dtype, 2.0)
    projector = rng.standard_normal((k, p))
    tolerance = 2.0 * max(1.0, np.abs(projector).sum(1).max())
    for route in ("jvp", "gradients", "auto"):  # against NumPy backprop, every route
        model._projection = route
        for batch, (x, y) in zip(batches, spec.numpy_batches()):
            projected = model.project(model.from_numpy(projector), batch).numpy()
            close(projected, spec.gradients(x, y) @ projector.T, dtype, tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_hvp_modes_give_the_hessian_and_say_which_route_they_took(dtype):
    spec = random_mlp_spec(np.random.default_rng(4), (4, 3), num_examples=9, batch_size=4)
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype=dtype)
    forward = type(model)(
        model._functional,
        model._loss,
        dtype=dtype,
        device=model.device,
        l2=spec.l2,
        hvp_mode="forward-over-reverse",
    )
    hessian = exact.dense_hessian(*NumpyEngine.from_neutral_spec(spec))  # the NumPy oracle
    v = np.random.default_rng(5).standard_normal(spec.num_parameters)
    for bound, route in ((model, "reverse-over-reverse"), (forward, "forward-over-reverse")):
        close(bound.hvp(bound.from_numpy(v), batches).numpy(), hessian @ v, dtype, 4.0)
        assert bound.routes["hvp"] == route
    with pytest.raises(ValueError, match="hvp_mode='reverse'"):
        type(model)(
            model._functional, model._loss, dtype=dtype, device=model.device, hvp_mode="reverse"
        )


def test_unknown_projection_route_is_refused():
    spec = random_mlp_spec(np.random.default_rng(1), (3, 2), num_examples=4, batch_size=4)
    model, _ = TensorFlowEngine.from_neutral_spec(spec)
    with pytest.raises(ValueError, match="projection='vjp'"):
        type(model)(
            model._functional, model._loss, dtype="float64", device=model.device, projection="vjp"
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_uneven_batches_give_the_exact_mean(dtype):
    spec = random_mlp_spec(np.random.default_rng(3), (3, 4, 2), num_examples=13, batch_size=5)
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype=dtype)  # 5, 5, 3
    whole = (tf.concat([b[0] for b in batches], 0), tf.concat([b[1] for b in batches], 0))
    v = model.from_numpy(np.random.default_rng(0).standard_normal(spec.num_parameters))
    close(model.hvp(v, batches).numpy(), model.hvp(v, [whole]).numpy(), dtype)
    # a tf.data pipeline with a partial last batch and unknown cardinality, and NumPy tuples
    dataset = tf.data.Dataset.from_tensor_slices(whole).filter(lambda x, y: True).batch(4)
    assert dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY
    close(model.hvp(v, dataset).numpy(), model.hvp(v, [whole]).numpy(), dtype)
    numpy_batches = [(b[0].numpy(), b[1].numpy()) for b in batches]
    close(model.hvp(v, numpy_batches).numpy(), model.hvp(v, [whole]).numpy(), dtype)
    operator = model.hessian_operator(numpy_batches)
    close(operator.mv(v).numpy(), model.hvp(v, [whole]).numpy(), dtype)


def test_a_tf_data_pipeline_is_staged_once_and_fits_as_the_list_does():
    spec = random_mlp_spec(np.random.default_rng(4), (3, 4, 2), num_examples=13, batch_size=5)
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype="float64")
    p = model.num_parameters
    calls = []

    def count(x, y):  # runs eagerly once per batch the pipeline yields
        calls.append(1)
        return x, y

    dataset = (
        tf.data.Dataset.from_tensor_slices((spec.x, spec.y.astype(np.int32)))
        .batch(5)
        .map(lambda x, y: tf.py_function(count, [x, y], [tf.float64, tf.int32]))
    )

    def fit(data, staged=True):
        return ArnoldiInfluenceCalculator(
            model, data, p, True, p, "float64", stage_hessian_data=staged
        )

    expected = fit(batches, staged=False).eig_vals.numpy()
    close(fit(dataset).eig_vals.numpy(), expected, "float64")
    assert len(calls) == 3 * 2  # one validation pass, one staging pass
    calls.clear()
    close(fit(dataset, staged=False).eig_vals.numpy(), expected, "float64")
    assert len(calls) == 3 * (1 + p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_follow_the_model_dtype_and_device(dtype):
    spec = random_mlp_spec(np.random.default_rng(1), (3, 4, 2), num_examples=7, batch_size=4)
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype=dtype, device="cpu")
    assert model.dtype == getattr(tf, dtype) and model.dtype_name == dtype
    assert model.device == CPU
    p = model.num_parameters
    outputs = [
        model.flat_parameters(),
        model.losses(batches[0]),
        model.per_example_grads(batches[0]),
        model.hvp(model.from_numpy(np.ones(p)), batches),
        model.hvps(model.from_numpy(np.ones((2, p))), batches),
        model.project(model.from_numpy(np.ones((3, p))), batches[0]),
    ]
    for out in outputs:
        assert isinstance(out, tf.Tensor)
        assert out.dtype.name == dtype and out.device == CPU
    assert model.on_device("/CPU:0") is model


def test_new_batch_sizes_do_not_retrace_every_time():
    spec = random_mlp_spec(np.random.default_rng(4), (3, 4, 2), num_examples=40, batch_size=40)
    model, (whole,) = TensorFlowEngine.from_neutral_spec(spec, dtype="float64")
    p = model.num_parameters

    def run(sizes, rows):
        batches = [(whole[0][:size], whole[1][:size]) for size in sizes]
        for batch, k in zip(batches, rows):
            model.losses(batch)
            model.per_example_grads(batch)
            model.project(model.from_numpy(np.ones((k, p))), batch)
            model.hvps(model.from_numpy(np.ones((k, p))), [batch])
        return batches

    # reduce_retracing: each dimension that varies is generalised to None once (one vector and
    # a block of vectors are separate kernels, so both are warmed up)
    run((3, 5, 7, 9), (2, 1, 4, 1))
    warm = model.tracing_counts()
    batches = run((11, 13, 17, 19, 23, 1, 40), (5, 1, 7, 2, 9, 3, 6))
    model.hvp(model.from_numpy(np.ones(p)), batches)
    assert model.tracing_counts() == warm
    with pytest.raises(ValueError, match="at least one row"):
        model.project(model.from_numpy(np.ones((0, p))), batches[0])


# ------------------------------------------------------------------------- Keras binding
def _keras_mlp(dtype="float32"):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,), dtype=dtype),
            keras.layers.Dense(4, activation="tanh", dtype=dtype, name="hidden"),
            keras.layers.Dense(2, dtype=dtype, name="logits"),
        ],
        name="net",
    )


def _keras_data(n=9):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3)), rng.integers(0, 2, n)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def test_keras_model_infers_the_engine_and_selects_parameters():
    net = _keras_mlp("float64")
    x, y = _keras_data()
    batches = [(x, y)]
    full = krylov_influence.InfluenceModel(net, LOSS)
    assert full.engine_name == "tensorflow" and full.num_parameters == 3 * 4 + 4 + 4 * 2 + 2
    assert [n for n, _ in full.parameter_layout] == [v.path for v in net.trainable_variables]
    np.testing.assert_array_equal(
        full.flat_parameters().numpy(),
        np.concatenate([v.numpy().reshape(-1) for v in net.trainable_variables]),
    )
    hessian = exact.dense_hessian(full, batches)
    grads = exact.per_example_gradients(full, batches)
    last = slice(3 * 4 + 4, full.num_parameters)
    selections = [
        {"start_layer": -1},
        {"start_layer": 1, "last_layer": 1},
        slice(1, None),
        "logits",
        ["net/logits/kernel", "net/logits/bias"],
        lambda variable: variable.path.startswith("net/logits"),
    ]
    for selection in selections:
        sub = krylov_influence.InfluenceModel(net, LOSS, parameters=selection)
        assert [n for n, _ in sub.parameter_layout] == [
            "net/logits/kernel",
            "net/logits/bias",
        ], selection
        close(exact.dense_hessian(sub, batches), hessian[last, last], "float64")
        close(exact.per_example_gradients(sub, batches), grads[:, last], "float64")
    first = krylov_influence.InfluenceModel(net, LOSS, parameters={"last_layer": 0})
    assert [s for _, s in first.parameter_layout] == [(3, 4), (4,)]
    with pytest.raises(ValueError, match="parameters"):
        krylov_influence.InfluenceModel(net, LOSS, parameters=["no_such_layer"])
    with pytest.raises(ValueError, match="parameters"):
        krylov_influence.InfluenceModel(net, LOSS, parameters={"first_layer": 0})
    with pytest.raises(ValueError, match="selects no"):
        krylov_influence.InfluenceModel(net, LOSS, parameters=lambda v: False)


def test_float64_on_a_float32_model_uses_a_copy():
    net = _keras_mlp("float32")
    before = [v.numpy().copy() for v in net.variables]
    x, y = _keras_data()
    m64 = krylov_influence.InfluenceModel(net, LOSS, dtype="float64")
    m32 = krylov_influence.InfluenceModel(net, LOSS)
    assert m64.dtype == tf.float64 and m32.dtype == tf.float32
    l64, l32 = m64.losses((x, y)).numpy(), m32.losses((x, y)).numpy()
    assert l64.dtype == np.float64
    close(l32, l64, "float32")
    v = np.random.default_rng(0).standard_normal(m64.num_parameters)
    close(
        m32.hvp(m32.from_numpy(v), [(x, y)]).numpy(),
        m64.hvp(m64.from_numpy(v), [(x, y)]),
        "float32",
    )
    for old, new in zip(before, net.variables):  # the user's model is untouched
        np.testing.assert_array_equal(old, new.numpy())
        assert new.dtype == "float32"


def test_apply_fn_with_explicit_params():
    spec = random_mlp_spec(np.random.default_rng(5), (3, 2), num_examples=6, batch_size=4)
    reference, ref_batches = NumpyEngine.from_neutral_spec(spec, dtype="float64")
    params = {"w": tf.Variable(spec.weights[0]), "b": tf.constant(spec.biases[0])}

    def apply_fn(p, x):
        return x @ p["w"] + p["b"]

    model = krylov_influence.InfluenceModel(apply_fn, LOSS, params=params, l2=spec.l2)
    assert model.engine_name == "tensorflow"
    # leaves in sorted-key order: b, then w
    assert model.parameter_layout == [("b", (2,)), ("w", (3, 2))]
    order = np.r_[np.arange(6, 8), np.arange(6)]  # reference order is weight, then bias
    hessian = exact.dense_hessian(reference, ref_batches)[np.ix_(order, order)]
    close(exact.dense_hessian(model, ref_batches), hessian, "float64")
    only_w = krylov_influence.InfluenceModel(apply_fn, LOSS, params=params, parameters="w")
    assert only_w.num_parameters == 6


def test_a_graph_with_random_ops_before_the_vector_is_not_linearised():
    """A kept residual would freeze a random draw that every product takes anew: such a graph
    is not split, and its batches keep the engine's own products."""
    spec = random_mlp_spec(np.random.default_rng(5), (3, 2), num_examples=6, batch_size=6)
    params = {"w": tf.constant(spec.weights[0]), "b": tf.constant(spec.biases[0])}

    def plain(p, x):
        return x @ p["w"] + p["b"]

    def noisy(p, x):  # the draw changes nothing here, but the op is in the graph
        return (x + 0.0 * tf.random.uniform(tf.shape(x), dtype=x.dtype)) @ p["w"] + p["b"]

    batch = (spec.x.astype(np.float64), spec.y)
    for apply_fn, split in ((plain, True), (noisy, False)):
        model = krylov_influence.InfluenceModel(apply_fn, LOSS, params=params)
        staged, _ = model.stage_batch(batch)
        result = model.linearize_batch(staged, 2**30)
        assert (result is not None) is split, apply_fn.__name__
        if result is not None:
            assert model.linearize_batch(staged, result[1] - 1) is None  # above the budget


def test_full_subspace_equals_exact_influence():
    spec = random_mlp_spec(np.random.default_rng(2), (3, 3, 2), num_examples=10, batch_size=4)
    model, batches = TensorFlowEngine.from_neutral_spec(spec, dtype="float64")
    p = model.num_parameters
    hessian = exact.dense_hessian(model, batches)
    inverse = exact.inverse_hessian(hessian)
    calc = ArnoldiInfluenceCalculator(model, batches, p, True, p, "float64")
    actual = calc.self_influence(batches)
    pairs = calc.influence_matrix(batches[:1], batches)
    expected = exact.exact_self_influence(model, batches, inverse=inverse)
    assert np.max(np.abs(actual - expected)) <= 1e-6 * np.max(np.abs(expected))
    expected_pairs = exact.exact_influence(model, batches, batches[:1], inverse=inverse)
    assert np.max(np.abs(pairs - expected_pairs)) <= 1e-6 * np.max(np.abs(expected_pairs))


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors():
    net = _keras_mlp()
    x, y = _keras_data()
    reducing = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match="reduction=None"):
        krylov_influence.InfluenceModel(net, reducing)
    scalar = krylov_influence.InfluenceModel(
        net, lambda y_true, y_pred: tf.reduce_mean(LOSS(y_true, y_pred))
    )
    with pytest.raises(ValueError, match="per-example"):
        scalar.losses((x, y))
    with pytest.raises(TypeError, match="loss_fn"):
        krylov_influence.InfluenceModel(net, None)
    model = krylov_influence.InfluenceModel(net, LOSS)
    with pytest.raises(ValueError, match="vector: expected shape"):
        model.hvp(np.ones(model.num_parameters + 1), [(x, y)])
    with pytest.raises(ValueError, match="projector: expected shape"):
        model.project(np.ones(model.num_parameters), (x, y))
    with pytest.raises(TypeError, match="batch"):
        model.losses(x)
    with pytest.raises(ValueError, match="examples"):
        model.losses((x, y[:-1]))
    with pytest.raises(ValueError, match="dtype"):
        krylov_influence.InfluenceModel(net, LOSS, dtype="float16")
    with pytest.raises(ValueError, match="device"):
        krylov_influence.InfluenceModel(net, LOSS, device="/GPU:42")
    with pytest.raises(ValueError, match="l2"):
        krylov_influence.InfluenceModel(net, LOSS, l2=-1.0)
    with pytest.raises(TypeError, match=r"tf\.Module"):
        krylov_influence.InfluenceModel(tf.Module(), LOSS)
    with pytest.raises(EngineNotFoundError):
        krylov_influence.InfluenceModel(object(), LOSS)


# ------------------------------------------------------------------------- import orders
_ORDER_SCRIPT = textwrap.dedent(
    """
    import importlib, sys
    for name in sys.argv[1:]:
        importlib.import_module(name)
    import jax.numpy as jnp, tensorflow as tf, torch
    a = float(torch.ones(3) @ torch.ones(3))
    b = float(jnp.ones(3) @ jnp.ones(3))
    c = float(tf.reduce_sum(tf.ones(3) * tf.ones(3)))
    import jax, numpy as np, krylov_influence
    from krylov_influence.testing import random_mlp_spec
    jax.config.update("jax_enable_x64", True)
    spec = random_mlp_spec(np.random.default_rng(0), (2, 3, 2), num_examples=4, batch_size=4)
    # The same HVP in each engine, imported in this order, against the engine-independent
    # oracle: central differences of the spec's analytic gradients (~1e-10 relative).
    v = np.random.default_rng(1).standard_normal(spec.num_parameters)
    expected = spec.hessian() @ v
    for name in ("tensorflow", "torch", "jax"):
        engine = krylov_influence.registry.get_engine(name)
        model, batches = engine.from_neutral_spec(spec, dtype="float64")
        d = np.asarray(model.to_numpy(model.hvp(model.from_numpy(v), batches)))
        scale = np.abs(expected).max()
        assert np.abs(d - expected).max() <= 1e-8 * scale, (name, d, expected)
    assert (a, b, c) == (3.0, 3.0, 3.0), (a, b, c)
    print("ok")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("order", list(permutations(["torch", "jax", "tensorflow"])))
def test_frameworks_import_in_any_order(order):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _ORDER_SCRIPT, *order],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_concrete_calls_run_the_traces_of_the_tf_function():
    """``ConcreteCalls`` (the engine's dispatch without ``tf.function``'s per-call binding):
    the same values as calling the function, one trace per signature as the function keys
    them (Python scalars by value, nests by structure), and variables through the function."""
    from krylov_influence_tf._dispatch import ConcreteCalls

    def scaled(x, factor, extra):
        return x * factor + extra["shift"]

    plain, calls = tf.function(scaled), ConcreteCalls(tf.function(scaled))
    x = tf.constant(np.arange(4.0))
    for factor in (2.0, 3.0, 2.0):
        for shift in (tf.constant(1.0, tf.float64), tf.constant([1.0, 2, 3, 4], tf.float64)):
            got = calls(x, factor, {"shift": shift}).numpy()
            np.testing.assert_array_equal(got, plain(x, factor, {"shift": shift}).numpy())
            np.testing.assert_array_equal(got, np.arange(4.0) * factor + shift.numpy())
    assert calls.experimental_get_tracing_count() == plain.experimental_get_tracing_count() == 4
    variable = tf.Variable(np.ones(4))
    np.testing.assert_array_equal(calls(variable, 2.0, {"shift": x}).numpy(), 2 + np.arange(4.0))
