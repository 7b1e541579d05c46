"""The JAX engine's compiled programs live as long as the models bound to them.

A model's operators are compiled once per input shape and shared by every live model bound to
the same ``apply_fn``, ``loss_fn`` and parameter layout; when the last of them is collected, the
compiled programs and the engine's references to the user's functions go too. Checked with
weak references (collected or not), a Python side effect in ``apply_fn`` (it runs only when JAX
traces), the jitted callables' cache sizes, and the exact Hessian of a softmax regression from
the NumPy reference engine (hand-written, no autodiff).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")

import jax.numpy as jnp  # noqa: E402

import krylov_influence as ki  # noqa: E402
from krylov_influence.exact import dense_hessian  # noqa: E402
from krylov_influence.reference import NumpyEngine  # noqa: E402
from krylov_influence.testing import random_mlp_spec  # noqa: E402
from krylov_influence_jax._spec import cross_entropy  # noqa: E402

OPERATORS = (
    "losses",
    "hvp_sum",
    "hvps_sum",
    "finish",
    "project",
    "projector_blocks",
    "projector_offsets",
    "example_chunks",
    "joined_chunks",
    "gradient_project_and_losses",
    "gradient_project_with_norms",
    "per_example_grads",
)


def _softmax_spec(seed: int = 21, l2: float = 0.05):
    """A softmax regression (no hidden layer): the reference engine's Hessian is analytic."""
    return random_mlp_spec(
        np.random.default_rng(seed), (3, 2), num_examples=10, batch_size=4, l2=l2
    )


def _traced_linear(traces: list[int]):
    """A fresh ``apply_fn`` (nothing compiled for it yet) that records every trace."""

    def apply_fn(params, x):
        traces.append(1)  # Python runs here only while JAX traces
        return x @ params[0][0] + params[0][1]

    return apply_fn


def _params(spec, scale: float = 1.0, dtype: str = "float64"):
    return [
        (jnp.asarray(scale * w, dtype=dtype), jnp.asarray(scale * b, dtype=dtype))
        for w, b in zip(spec.weights, spec.biases)
    ]


def _batches(spec):
    return [(x, y.astype(np.int32)) for x, y in spec.numpy_batches()]


def _run_every_operator(model, batches) -> None:
    """Each jitted operator of the model on every batch shape."""
    p = model.num_parameters
    v = model.from_numpy(np.linspace(-1.0, 1.0, p))
    G = model.from_numpy(np.stack([np.linspace(-1.0, 1.0, p), np.ones(p)]))
    model.hvp(v, batches)
    model.hvps(G, batches)
    for batch in batches:
        model.losses(batch)
        model.per_example_grads(batch)
        model.project_with_norms(G, batch)
        model.project(G, batch)  # auto: the gradients route on this small model
    # The gradients in chunks of examples, as past the gradient budget.
    model.GRADIENT_PROJECTION_BYTES = p * model.dtype.itemsize
    model.project(G, batches[0])
    del model.GRADIENT_PROJECTION_BYTES
    staged, _ = model.stage_batch(batches[0])
    # The projector split on the device, which the CPU leaves to NumPy.
    model._kernels.projector_blocks(G, model._theta, model._l2_array)
    # The JVP route, which projection="auto" does not take on this small model.
    model._kernels.project(
        model._theta, model._fixed, staged.x, staged.y, G, model._l2_array, chunk=1
    )


def _cache_sizes(model) -> list[int]:
    return [getattr(model._kernels, name)._cache_size() for name in OPERATORS]


# --------------------------------------------------------------------------------- freeing
def test_deleting_the_last_model_frees_its_programs_and_the_users_functions():
    spec = _softmax_spec()
    traces: list[int] = []
    apply_fn = _traced_linear(traces)

    def loss_fn(logits, labels):  # a fresh loss too: the program holds both
        return cross_entropy(logits, labels)

    first = ki.InfluenceModel(apply_fn, loss_fn, params=_params(spec), l2=spec.l2)
    second = ki.InfluenceModel(apply_fn, loss_fn, params=_params(spec, 0.5), l2=spec.l2)
    assert second._kernels is first._kernels
    _run_every_operator(first, _batches(spec))
    assert traces and min(_cache_sizes(first)) >= 1
    watched = {
        "apply_fn": weakref.ref(apply_fn),
        "loss_fn": weakref.ref(loss_fn),
        "kernels": weakref.ref(first._kernels),
        "compiled hvp_sum": weakref.ref(first._kernels.hvp_sum),
    }
    del apply_fn, loss_fn, first
    gc.collect()
    alive = [name for name, ref in watched.items() if ref() is not None]
    assert alive == list(watched), "a live model sharing the programs lost them"
    del second
    gc.collect()
    alive = [name for name, ref in watched.items() if ref() is not None]
    assert alive == [], f"still referenced after the last model was collected: {alive}"


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.hidden(x)))


class _LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(2)(jnp.tanh(linen.Dense(4)(x)))


def test_library_models_free_their_programs_with_the_last_model():
    """nnx and Equinox: the engine-built ``apply_fn`` (which holds the graphdef or static
    part); linen: the module whose ``apply`` was bound. Two live bindings share programs."""
    x = np.random.default_rng(3).standard_normal((5, 3))
    labels = np.array([0, 1, 1, 0, 1], dtype=np.int32)
    linen_module = _LinenMLP()
    variables = linen_module.init(jax.random.key(0), jnp.asarray(x))
    key = jax.random.key(1)
    bindings = {
        "nnx": lambda: ki.InfluenceModel(_NnxMLP(nnx.Rngs(0)), cross_entropy),
        "equinox": lambda: ki.InfluenceModel(eqx.nn.MLP(3, 2, 4, 1, key=key), cross_entropy),
        "linen": lambda: ki.InfluenceModel(linen_module.apply, cross_entropy, params=variables),
    }
    for library, bind in bindings.items():
        first, second = bind(), bind()
        assert second._kernels is first._kernels, library
        first.losses((x, labels))
        function = first._program.apply_fn
        watched = [weakref.ref(first._kernels)]
        if library == "linen":
            watched.append(weakref.ref(function.__self__))  # bound methods are fresh objects
        else:
            watched.append(weakref.ref(function))
        del first, second, function
        if library == "linen":
            del linen_module, variables
        gc.collect()
        assert [ref() for ref in watched] == [None, None], library


# ---------------------------------------------------------------------------------- reuse
def test_rebinding_while_a_model_is_alive_traces_nothing_new():
    spec = _softmax_spec()
    batches = _batches(spec)
    traces: list[int] = []
    apply_fn = _traced_linear(traces)
    model = ki.InfluenceModel(apply_fn, cross_entropy, params=_params(spec), l2=spec.l2)
    _run_every_operator(model, batches)
    _run_every_operator(model, batches)  # the second round reuses everything
    traced, sizes = len(traces), _cache_sizes(model)
    assert traced > 0

    # Other parameter values and l2, then the same values in float32 given as float64.
    perturbed = ki.InfluenceModel(
        apply_fn, cross_entropy, params=_params(spec, 0.5), l2=2 * spec.l2
    )
    assert perturbed._kernels is model._kernels
    _run_every_operator(perturbed, batches)
    assert (len(traces), _cache_sizes(model)) == (traced, sizes)

    # Another dtype traces once per shape for that dtype, and a second float32 binding not at
    # all: the count is taken after the first float32 model ran.
    single = ki.InfluenceModel(apply_fn, cross_entropy, params=_params(spec), dtype="float32")
    assert single._kernels is model._kernels
    _run_every_operator(single, batches)
    traced32, sizes32 = len(traces), _cache_sizes(model)
    assert traced32 > traced
    again = ki.InfluenceModel(
        apply_fn, cross_entropy, params=_params(spec, 2.0, "float32"), dtype="float32"
    )
    assert again._kernels is model._kernels
    _run_every_operator(again, batches)
    assert (len(traces), _cache_sizes(model)) == (traced32, sizes32)
    assert model.on_device("cpu:0") is model  # one CPU device here; see the subprocess test


def test_a_linen_modules_apply_bound_twice_shares_programs():
    """``module.apply`` is a new bound method on every access; two of the same module share
    the programs, two modules (even equal ones) do not."""
    x = np.random.default_rng(4).standard_normal((5, 3))
    module = _LinenMLP()
    variables = module.init(jax.random.key(0), jnp.asarray(x))
    a = ki.InfluenceModel(module.apply, cross_entropy, params=variables)
    b = ki.InfluenceModel(module, cross_entropy, params=variables)  # the module: its apply
    assert module.apply is not module.apply  # what makes bound methods need care
    assert b._kernels is a._kernels
    other = ki.InfluenceModel(_LinenMLP().apply, cross_entropy, params=variables)
    assert other._kernels is not a._kernels


def test_on_device_shares_programs_and_does_not_retrace():
    """Two host devices (XLA's forced device count, in a fresh process): the copy on the
    second device shares the first's programs, JAX does not trace ``apply_fn`` again (XLA
    compiles the traced program for the new device), and the products are equal."""
    code = (
        "import jax, numpy as np, jax.numpy as jnp\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "import krylov_influence as ki\n"
        "traces = []\n"
        "def apply_fn(p, x):\n"
        "    traces.append(1)\n"
        "    return x @ p[0][0] + p[0][1]\n"
        "def loss(out, y):\n"
        "    return 0.5 * jnp.sum((out - y) ** 2, axis=1)\n"
        "rng = np.random.default_rng(0)\n"
        "w, b = rng.standard_normal((3, 2)), rng.standard_normal(2)\n"
        "params = [(jnp.asarray(w), jnp.asarray(b))]\n"
        "batches = [(rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))]\n"
        "m = ki.InfluenceModel(apply_fn, loss, params=params, device='cpu:0', l2=0.1)\n"
        "v = np.linspace(-1, 1, m.num_parameters)\n"
        "h0 = np.asarray(m.hvp(m.from_numpy(v), batches))\n"
        "n = len(traces)\n"
        "moved = m.on_device('cpu:1')\n"
        "assert moved.device != m.device and moved._kernels is m._kernels\n"
        "h1 = moved.hvp(moved.from_numpy(v), batches)\n"
        "assert h1.devices() == {jax.devices('cpu')[1]}, h1.devices()\n"
        "assert len(traces) == n, (len(traces), n)\n"
        "np.testing.assert_allclose(np.asarray(h1), h0, rtol=1e-14, atol=0)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "backends")]))
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ------------------------------------------------------------------------------- numerics
def test_shared_and_recompiled_programs_give_each_models_exact_hessian():
    """Two live models sharing programs each get the Hessian and gradients at their own
    parameters (nothing of one is baked into the shared programs); a model bound after both
    were collected compiles afresh and gets the same numbers. Oracle: the reference engine's
    analytic softmax-regression Hessian and the spec's backprop gradients."""
    spec = _softmax_spec()
    other = dataclasses.replace(
        spec,
        weights=tuple(-0.7 * w for w in spec.weights),
        biases=tuple(0.3 + b for b in spec.biases),
    )
    batches = _batches(spec)

    def exact(s):
        reference, ref_batches = NumpyEngine.from_neutral_spec(s, dtype="float64")
        return dense_hessian(reference, ref_batches)

    def check(model, s):
        np.testing.assert_allclose(dense_hessian(model, batches), exact(s), rtol=1e-10, atol=1e-12)
        for batch, (x, y) in zip(batches, s.numpy_batches()):
            np.testing.assert_allclose(
                model.per_example_grads(batch), s.gradients(x, y), rtol=1e-10, atol=1e-12
            )

    traces: list[int] = []
    apply_fn = _traced_linear(traces)
    a = ki.InfluenceModel(apply_fn, cross_entropy, params=_params(spec), l2=spec.l2)
    b = ki.InfluenceModel(apply_fn, cross_entropy, params=_params(other), l2=other.l2)
    assert b._kernels is a._kernels
    check(a, spec)
    check(b, other)
    check(a, spec)  # b's calls changed nothing a computes
    old = weakref.ref(a._kernels)
    del a, b
    gc.collect()
    assert old() is None
    before = len(traces)
    fresh = ki.InfluenceModel(apply_fn, cross_entropy, params=_params(spec), l2=spec.l2)
    check(fresh, spec)
    assert len(traces) > before  # compiled afresh, and right
