"""Flax nnx, Flax linen and Equinox models bound directly to the JAX engine.

For each library a small MLP, a small CNN and (Flax) a BatchNorm model, with random nonzero
weights and running statistics, against :mod:`jax_oracle`: per-example gradients by a Python
loop of ``jax.grad`` and the dense Hessian by ``jax.hessian`` over
``ravel_pytree`` of the library's own parameter container, each model called through the
library itself (``nnx.merge``, ``module.apply``, ``eqx.combine``) in eval mode. End to end, an
``ArnoldiInfluenceCalculator`` at full rank against ``krylov_influence.exact`` on the oracle's
Hessian; and the same weights in an nnx, a linen and an Equinox MLP give the same scores.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")

import jax.numpy as jnp  # noqa: E402
from jax_oracle import Oracle, assert_products_close, cross_entropy, oracle  # noqa: E402

import krylov_influence as ki  # noqa: E402
from krylov_influence import exact  # noqa: E402
from krylov_influence_jax import JaxEngine, JaxInfluenceModel  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[2] / "docs" / "quickstart-jax.md"
NUM_EXAMPLES = 6
L2 = 0.1  # keeps the random models' Hessians well conditioned for the end-to-end inverse
LIBRARIES = ("nnx", "linen", "equinox")
ARCHITECTURES = ("mlp", "cnn", "batchnorm")
CASES = [
    (library, arch)
    for library in LIBRARIES
    for arch in ARCHITECTURES
    if not (library == "equinox" and arch == "batchnorm")  # eqx.nn.BatchNorm needs eqx State
]
IDS = [f"{library}-{arch}" for library, arch in CASES]


def _random(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Nonzero everywhere (biases, running statistics); variances positive."""
    if name.endswith("var"):
        return rng.uniform(0.5, 1.5, shape)
    return 0.6 * rng.standard_normal(shape)


@functools.cache
def mlp_weights() -> tuple[np.ndarray, ...]:
    """``(W1, b1, W2, b2)`` (kernels (in, out)): one MLP, the same in every library."""
    rng = np.random.default_rng(3)
    return tuple(0.6 * rng.standard_normal(s) for s in [(4, 5), (5,), (5, 2), (2,)])


def _randomise(tree: Any, rng: np.random.Generator) -> Any:
    def draw(path, leaf):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return leaf
        name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
        return jnp.asarray(_random(rng, name, np.shape(leaf)), dtype=jnp.float64)

    return jax.tree_util.tree_map_with_path(draw, tree)


# ------------------------------------------------------------------------------------ nnx
class NnxMLP(nnx.Module):
    def __init__(self, rngs: Any, din: int = 4):
        self.hidden = nnx.Linear(din, 5, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(5, 2, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.hidden(x)))


class NnxCNN(nnx.Module):
    def __init__(self, rngs: Any):
        self.conv = nnx.Conv(1, 2, (3, 3), padding="VALID", param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(8, 2, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv(x))
        return self.head(h.reshape(h.shape[0], -1))


class NnxBatchNorm(nnx.Module):
    def __init__(self, rngs: Any):
        self.hidden = nnx.Linear(4, 3, param_dtype=jnp.float64, rngs=rngs)
        self.norm = nnx.BatchNorm(3, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(3, 2, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.norm(self.hidden(x))))


def _nnx(arch: str, rng: np.random.Generator) -> tuple[Any, Any]:
    """The module (left in train mode) and the oracle's loss over its nnx.Param state."""
    module = {"mlp": NnxMLP, "cnn": NnxCNN, "batchnorm": NnxBatchNorm}[arch](nnx.Rngs(0))
    if arch == "mlp":
        w1, b1, w2, b2 = mlp_weights()
        for layer, (w, b) in ((module.hidden, (w1, b1)), (module.head, (w2, b2))):
            layer.kernel[...], layer.bias[...] = jnp.asarray(w), jnp.asarray(b)
    else:
        nnx.update(module, _randomise(nnx.state(module), rng))
    evaluated = nnx.clone(module)
    evaluated.eval()
    graphdef, params, rest = nnx.split(evaluated, nnx.Param, ...)
    rest = nnx.to_pure_dict(rest)  # arrays: merge makes fresh variables inside the trace

    def loss(p, x, y):
        return cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

    return module, (loss, params)


# ---------------------------------------------------------------------------------- linen
class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        hidden = linen.Dense(5, param_dtype=jnp.float64)(x)  # made first: Dense_0
        return linen.Dense(2, param_dtype=jnp.float64)(jnp.tanh(hidden))


class LinenCNN(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        h = jnp.tanh(linen.Conv(2, (3, 3), padding="VALID", param_dtype=jnp.float64)(x))
        return linen.Dense(2, param_dtype=jnp.float64)(h.reshape(h.shape[0], -1))


class LinenBatchNorm(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        h = linen.Dense(3, param_dtype=jnp.float64)(x)
        h = linen.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(h)
        return linen.Dense(2, param_dtype=jnp.float64)(jnp.tanh(h))


def _linen(arch: str, rng: np.random.Generator, x: Any) -> tuple[Any, Any, Any]:
    """``(apply, variables)`` to bind, and the oracle's loss over ``variables["params"]``."""
    module = {"mlp": LinenMLP, "cnn": LinenCNN, "batchnorm": LinenBatchNorm}[arch]()
    variables = _randomise(module.init(jax.random.PRNGKey(0), x[:1]), rng)
    if arch == "mlp":
        w1, b1, w2, b2 = (jnp.asarray(a) for a in mlp_weights())
        dense = {"Dense_0": {"kernel": w1, "bias": b1}, "Dense_1": {"kernel": w2, "bias": b2}}
        variables = {"params": dense}
    others = {k: v for k, v in variables.items() if k != "params"}

    def loss(p, xs, y):
        return cross_entropy(module.apply({"params": p, **others}, xs, train=False), y)

    return functools.partial(module.apply, train=False), variables, (loss, variables["params"])


# -------------------------------------------------------------------------------- Equinox
class EqxMLP(eqx.Module):
    hidden: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key: Any, din: int = 4):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(din, 5, key=k1, dtype=jnp.float64)
        self.head = eqx.nn.Linear(5, 2, key=k2, dtype=jnp.float64)

    def __call__(self, x):  # one example, the Equinox convention
        return self.head(jnp.tanh(self.hidden(x)))


class EqxCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key: Any):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 2, 3, key=k1, dtype=jnp.float64)
        self.head = eqx.nn.Linear(8, 2, key=k2, dtype=jnp.float64)

    def __call__(self, x):  # x: (H, W, 1), channels last like the Flax models' data
        return self.head(jnp.tanh(self.conv(jnp.moveaxis(x, -1, 0))).reshape(-1))


def _equinox(arch: str, rng: np.random.Generator) -> tuple[Any, Any]:
    module = {"mlp": EqxMLP, "cnn": EqxCNN}[arch](jax.random.PRNGKey(0))
    params, static = eqx.partition(module, eqx.is_inexact_array)
    module = eqx.combine(_randomise(params, rng), static)
    if arch == "mlp":
        w1, b1, w2, b2 = mlp_weights()
        module = eqx.tree_at(
            lambda m: (m.hidden.weight, m.hidden.bias, m.head.weight, m.head.bias),
            module,
            tuple(jnp.asarray(a) for a in (w1.T, b1, w2.T, b2)),  # eqx weights are (out, in)
        )
    params, static = eqx.partition(module, eqx.is_inexact_array)

    def loss(p, x, y):
        return cross_entropy(jax.vmap(eqx.combine(p, static))(x), y)

    return module, (loss, params)


# ------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    bind: Any  # (**options) -> JaxInfluenceModel
    x: np.ndarray
    y: np.ndarray
    oracle: Oracle
    module: Any
    variables: Any = None  # linen: the whole variable dict


@functools.cache
def case(library: str, arch: str) -> Case:
    # The MLP's data (and weights) are the same in every library.
    rng = np.random.default_rng(sum(map(ord, arch if arch == "mlp" else library + arch)))
    shape = (4, 4, 1) if arch == "cnn" else (4,)
    x = rng.standard_normal((NUM_EXAMPLES, *shape))
    y = rng.integers(0, 2, NUM_EXAMPLES).astype(np.int32)
    variables = None
    if library == "nnx":
        module, (loss, params) = _nnx(arch, rng)
        bind = functools.partial(ki.InfluenceModel, module, cross_entropy)
    elif library == "linen":
        module, variables, (loss, params) = _linen(arch, rng, x)
        bind = functools.partial(ki.InfluenceModel, module, cross_entropy, params=variables)
    else:
        module, (loss, params) = _equinox(arch, rng)
        bind = functools.partial(ki.InfluenceModel, module, cross_entropy)
    return Case(bind, x, y, oracle(loss, params, x, y, l2=L2), module, variables)


@functools.cache
def bound(library: str, arch: str, projection: str = "auto") -> JaxInfluenceModel:
    return case(library, arch).bind(l2=L2, projection=projection)


# -------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module", autouse=True)
def _free_the_cached_models():
    """The cached cases hold bound models, and the JAX engine keeps a model's compiled programs
    while it is alive: drop them when this module's tests are done, not at the session's end."""
    yield
    scores.cache_clear()
    bound.cache_clear()
    case.cache_clear()


def assert_rows_close(actual: Any, expected: np.ndarray) -> None:
    """Each row within ``4·sqrt(eps)`` of its largest entry (float64)."""
    assert_products_close(actual, expected, np.eye(expected.shape[1]), "float64")


@pytest.mark.parametrize(("library", "arch"), CASES, ids=IDS)
def test_per_example_gradients_and_projections(library, arch):
    c = case(library, arch)
    projector = np.random.default_rng(1).standard_normal((3, c.oracle.theta.size))
    for projection in ("gradients", "jvp"):
        model = bound(library, arch, projection)
        assert isinstance(model, JaxInfluenceModel)
        np.testing.assert_allclose(model.flat_parameters(), c.oracle.theta, rtol=0, atol=0)
        identity = np.eye(c.oracle.theta.size)
        assert_products_close(
            model.per_example_grads((c.x, c.y)), c.oracle.grads, identity, "float64"
        )
        projected = model.project(projector, (c.x, c.y))
        assert_products_close(projected, c.oracle.grads, projector.T, "float64")
        # What a store records: the same projections and the losses, L2 term included.
        both, losses = model.project_and_losses(projector, (c.x, c.y))
        assert_products_close(both, c.oracle.grads, projector.T, "float64")
        np.testing.assert_allclose(np.asarray(losses), c.oracle.losses, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("library", "arch"), CASES, ids=IDS)
def test_hessian_vector_products(library, arch):
    c = case(library, arch)
    model = bound(library, arch)
    vectors = np.random.default_rng(2).standard_normal((4, model.num_parameters))
    batches = [(c.x[:4], c.y[:4]), (c.x[4:], c.y[4:])]  # the mean over unequal batches
    assert_products_close(model.hvps(vectors, batches), vectors, c.oracle.hessian, "float64")
    assert_products_close(
        model.hvp(vectors[0], batches)[None], vectors[:1], c.oracle.hessian, "float64"
    )


def _batches(c: Case) -> list[tuple[Any, Any]]:
    return [(c.x[:4], c.y[:4]), (c.x[4:], c.y[4:])]


@functools.cache
def scores(library: str) -> tuple[np.ndarray, np.ndarray]:
    """Self-influence and pairwise scores of the MLP by the calculator at full rank."""
    model, batches = bound(library, "mlp"), _batches(case(library, "mlp"))
    p = model.num_parameters
    calc = ki.ArnoldiInfluenceCalculator(model, batches, p, True, p, "float64")
    return calc.self_influence(batches), calc.influence_matrix(batches[:1], batches)


@pytest.mark.parametrize("library", LIBRARIES)
def test_calculator_at_full_rank_equals_exact_influence(library):
    c = case(library, "mlp")
    self_influence, pairs = scores(library)
    inverse = exact.inverse_hessian(c.oracle.hessian)
    expected = np.einsum("np,pq,nq->n", c.oracle.grads, inverse, c.oracle.grads)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(self_influence, expected, rtol=0, atol=1e-7 * scale)
    expected_pairs = c.oracle.grads[:4] @ inverse @ c.oracle.grads.T
    np.testing.assert_allclose(pairs, expected_pairs, rtol=0, atol=1e-7 * scale)


def test_the_same_weights_give_the_same_scores_in_every_library():
    """The MLP cases hold the same weights (mlp_weights) and data in nnx, linen and Equinox,
    with different parameter names, orders and layouts ((in, out) against (out, in))."""
    layouts = {library: bound(library, "mlp").parameter_layout for library in LIBRARIES}
    assert layouts["nnx"][0] == ("head/bias", (2,))
    assert layouts["linen"][0] == ("params/Dense_0/bias", (5,))
    assert layouts["equinox"][0] == ("hidden/weight", (5, 4))
    # A linen module itself binds as its apply (the cases bind partial(apply, train=False)).
    c = case("linen", "mlp")
    itself = ki.InfluenceModel(LinenMLP(), cross_entropy, params=c.variables, l2=L2)
    assert itself.parameter_layout == layouts["linen"]
    assert_rows_close(itself.per_example_grads((c.x, c.y)), c.oracle.grads)
    reference = scores("nnx")
    for library in ("linen", "equinox"):
        for ours, theirs in zip(scores(library), reference):
            scale = float(np.max(np.abs(theirs)))
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("library", ["nnx", "linen"])
def test_batch_statistics_are_held_fixed(library):
    c = case(library, "batchnorm")
    model = bound(library, "batchnorm")
    names = [name for name, _ in model.parameter_layout]
    if library == "nnx":
        assert names == [
            "head/bias",
            "head/kernel",
            "hidden/bias",
            "hidden/kernel",
            "norm/bias",
            "norm/scale",
        ]
        # The user's module keeps its train mode: the engine evaluates a clone.
        assert c.module.norm.use_running_average is False
        stats = model.params["norm"]
    else:
        assert all(name.startswith("params/") for name in names) and len(names) == 6
        stats = model.params["batch_stats"]["BatchNorm_0"]
    assert model.num_parameters == c.oracle.theta.size == 4 * 3 + 3 + 3 + 3 + 3 * 2 + 2
    # The running statistics travel with the model unchanged, and the outputs use them.
    assert float(jnp.min(stats["var"])) >= 0.5
    assert_products_close(
        model.per_example_grads((c.x, c.y)), c.oracle.grads, np.eye(29), "float64"
    )
    with pytest.raises(ValueError, match="held fixed"):
        c.bind(parameters=["norm/mean" if library == "nnx" else "batch_stats"])


def test_nnx_parameters_by_name_give_the_sub_blocks():
    c = case("nnx", "mlp")
    full = bound("nnx", "mlp")
    sub = c.bind(l2=L2, parameters=["head"])
    assert [n for n, _ in sub.parameter_layout] == ["head/bias", "head/kernel"]
    columns = np.arange(sub.num_parameters)  # head/* come first in the sorted order
    grads = np.asarray(full.per_example_grads((c.x, c.y)))
    np.testing.assert_allclose(sub.per_example_grads((c.x, c.y)), grads[:, columns], rtol=1e-12)
    v = np.random.default_rng(4).standard_normal(sub.num_parameters)
    block = c.oracle.hessian[np.ix_(columns, columns)]
    assert_products_close(sub.hvp(v, [(c.x, c.y)])[None], v[None], block, "float64")
    # unflatten names the parameters by their nnx paths and keeps the other state.
    tree = full.unflatten(full.flat_parameters())
    np.testing.assert_array_equal(tree["hidden"]["kernel"], c.module.hidden.kernel[...])
    # ... and goes back into a module with nnx.update (as docs/quickstart-jax.md says).
    copy = nnx.clone(c.module)
    nnx.update(copy, full.unflatten(2 * full.flat_parameters()))
    np.testing.assert_array_equal(copy.head.bias[...], 2 * c.module.head.bias[...])
    predicate = c.bind(parameters=lambda path, leaf: path.endswith("kernel"))
    assert [n for n, _ in predicate.parameter_layout] == ["head/kernel", "hidden/kernel"]


class BatchedMLP(eqx.Module):
    """An Equinox module written for whole batches (``batched=True``)."""

    w: jax.Array
    v: jax.Array

    def __call__(self, x):
        return jnp.tanh(x @ self.w) @ self.v


def test_equinox_batched_modules_and_recognition():
    rng = np.random.default_rng(5)
    w, v = jnp.asarray(rng.standard_normal((4, 5))), jnp.asarray(rng.standard_normal((5, 2)))
    x, y = rng.standard_normal((NUM_EXAMPLES, 4)), rng.integers(0, 2, NUM_EXAMPLES)
    batched = ki.InfluenceModel(BatchedMLP(w, v), cross_entropy, batched=True)
    assert [n for n, _ in batched.parameter_layout] == ["w", "v"]  # attribute (field) order

    def loss(p, xs, ys):
        return cross_entropy(jnp.tanh(xs @ p["w"]) @ p["v"], ys)

    want = oracle(loss, {"w": w, "v": v}, x, y)  # ravel order: v, w (sorted keys)
    swap = np.r_[np.arange(10, 30), np.arange(10)]  # the engine's (w, v) in the oracle's order
    np.testing.assert_allclose(
        batched.per_example_grads((x, y)), want.grads[:, swap], rtol=1e-12, atol=1e-14
    )
    assert JaxEngine.recognises(BatchedMLP(w, v))
    assert ki.infer_engine(case("equinox", "mlp").module) is JaxEngine
    assert ki.infer_engine(case("nnx", "cnn").module) is JaxEngine
    assert not JaxEngine.recognises(LinenMLP())  # linen keeps its variables outside


def test_bad_library_bindings_give_clear_errors():
    c = case("nnx", "mlp")
    with pytest.raises(TypeError, match="an nnx module holds its parameters"):
        ki.InfluenceModel(c.module, cross_entropy, params={"w": jnp.ones(2)}, engine="jax")
    with pytest.raises(TypeError, match="only Equinox modules take batched="):
        ki.InfluenceModel(c.module, cross_entropy, batched=True)
    with pytest.raises(ValueError, match="no leaf of params has the path prefix 'params'"):
        c.bind(parameters=["params"])
    with pytest.raises(TypeError, match="params: the jax engine needs the parameter pytree"):
        JaxEngine.bind(LinenMLP(), cross_entropy)


def test_rebinding_an_architecture_reuses_its_program():
    """One apply_fn per nnx graphdef and Equinox static part: compiled programs are shared."""
    for library in ("nnx", "equinox"):
        c = case(library, "mlp")
        first, second = c.bind(), c.bind(dtype="float32")
        assert first._program.apply_fn is second._program.apply_fn
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4))
    a, b = NnxMLP(nnx.Rngs(1)), NnxMLP(nnx.Rngs(2))  # same architecture, other weights
    ma, mb = (ki.InfluenceModel(m, cross_entropy) for m in (a, b))
    assert ma._program == mb._program
    labels = np.zeros(3, dtype=np.int32)
    np.testing.assert_allclose(ma.losses((x, labels)), cross_entropy(a(x), labels), rtol=1e-12)
    np.testing.assert_allclose(mb.losses((x, labels)), cross_entropy(b(x), labels), rtol=1e-12)


def _quickstart_examples() -> list[str]:
    text = QUICKSTART.read_text(encoding="utf-8")
    section = text[text.index("## Flax and Equinox models") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


# Each example in a fresh namespace, one interpreter for the three (imports once).
_RUN_EXAMPLES = """
import sys
for example in sys.argv[1:]:
    exec(compile(example, "quickstart-jax.md", "exec"), {"__name__": "__main__"})
    print("-- end of example --", flush=True)
"""


@pytest.mark.slow
def test_the_quickstart_examples_run(tmp_path):
    """docs/quickstart-jax.md's nnx, linen and Equinox examples run as printed, without x64
    (as a reader runs them), and print the parameter layout the page shows."""
    examples = _quickstart_examples()
    assert len(examples) == 3
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "backends")])
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _RUN_EXAMPLES, *examples],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = done.stdout.split("-- end of example --\n")
    assert outputs[-1] == "" and len(outputs) == 4, done.stdout
    for example, output in zip(examples, outputs):
        lines = output.splitlines()
        assert len(lines) == 2, lines
        comment = example.split("parameter_layout")[1].split("# ")[1].splitlines()[0]
        assert lines[0] == comment  # the layout printed is the one the page shows
        scores = np.array(lines[1].strip("[]").split(), dtype=float)
        assert scores.shape == (5,) and np.all(np.isfinite(scores))
