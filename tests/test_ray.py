"""krylov_influence.ray against the single-process library, on a local two-CPU Ray cluster.

Oracles: the driver model's own ``hessian_operator`` over all batches, a calculator fitted in
this process, and its ``self_influence`` / ``compute_influence_vector``. One cluster for the
module (Ray starts in seconds, not milliseconds): the whole file is in ``_SLOW``
(tests/conftest.py), about 30 s on two busy cores.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import pytest

ray = pytest.importorskip("ray")
zarr = pytest.importorskip("zarr")

import krylov_influence as ki  # noqa: E402
from krylov_influence.errors import IncompatibleStoreError  # noqa: E402
from krylov_influence.ray import (  # noqa: E402
    RayHessianData,
    score_dataset,
    score_training_set,
    split_batches,
)
from krylov_influence.reference import NumpyInfluenceModel  # noqa: E402
from krylov_influence.testing.spec import random_mlp_spec  # noqa: E402

# 53 examples in batches of 8: six full batches and a partial last one of 5.
NUM_EXAMPLES, BATCH = 53, 8


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # The factories below live in this test module, which the workers cannot import: ship
    # them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class SpecFactory:
    """Builds the spec's model in an engine: what each actor calls once."""

    engine: str
    spec: object

    def __call__(self):
        return ki.get_engine(self.engine).from_neutral_spec(self.spec, dtype="float64")[0]


class DiesOnce(NumpyInfluenceModel):
    """A reference model whose actor exits at its third Hessian-vector product, once in all.

    Whichever actor renames the flag file first dies; the restarted actor finds no flag.
    """

    flag = ""
    calls = 0

    def _maybe_die(self):
        self.calls += 1
        if self.calls == 3:
            try:
                os.rename(self.flag, self.flag + ".used")
            except FileNotFoundError:
                return
            os._exit(1)

    def hvp(self, vector, batches):
        self._maybe_die()
        return super().hvp(vector, batches)

    def hvps(self, vectors, batches):
        self._maybe_die()
        return super().hvps(vectors, batches)


@dataclass(frozen=True)
class DyingFactory:
    spec: object
    flag: str

    def __call__(self):
        model = DiesOnce(self.spec.reference_model(), dtype="float64")
        model.flag = self.flag
        return model


def problem(engine, seed=0):
    rng = np.random.default_rng(seed)
    sizes = (5, 3) if engine == "numpy" else (5, 4, 3)
    spec = random_mlp_spec(rng, sizes, num_examples=NUM_EXAMPLES, batch_size=BATCH, l2=0.05)
    factory = SpecFactory(engine, spec)
    model, batches = ki.get_engine(engine).from_neutral_spec(spec, dtype="float64")
    assert model.batch_size(batches[-1]) == NUM_EXAMPLES % BATCH  # a partial last batch
    return spec, factory, model, batches


def host(model, array):
    return np.asarray(model.to_numpy(array), dtype=np.float64)


def assert_close(found, expected, rtol):
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(found - expected)) <= rtol * scale, np.max(np.abs(found - expected))


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_operator_and_fit_equal_the_single_process_ones(engine, tmp_path):
    if engine == "torch":
        pytest.importorskip("torch")
    _, factory, model, batches = problem(engine)
    shards = split_batches(batches, 2)  # 4 batches (32 examples) and 3 (21, the partial one)
    assert [len(s) for s in shards] == [4, 3]
    p = model.num_parameters
    rng = np.random.default_rng(1)
    with RayHessianData(factory, shards) as data:
        assert data.shard_sizes == [32, 21]
        operator = data.hessian_operator(model)
        local = model.hessian_operator(batches)
        vector = model.from_numpy(rng.standard_normal(p))
        vectors = model.from_numpy(rng.standard_normal((3, p)))
        assert_close(host(model, operator.mv(vector)), host(model, local.mv(vector)), 1e-12)
        assert_close(host(model, operator.mm(vectors)), host(model, local.mm(vectors)), 1e-12)

        fitted = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6, hessian_dataset=data)
        if engine == "numpy":
            # A saved fit is checked on load through the actors (Hessian-vector products).
            path = fitted.save(tmp_path / "calc.npz")
            loaded = ki.ArnoldiInfluenceCalculator.load(path, model, hessian_dataset=data)
            np.testing.assert_array_equal(
                loaded.eigenbasis.eigenvalues, fitted.eigenbasis.eigenvalues
            )
            with (
                RayHessianData(factory, shards[:1]) as part,
                pytest.raises(IncompatibleStoreError, match="32 examples"),
            ):
                ki.ArnoldiInfluenceCalculator.load(path, model, hessian_dataset=part)
    local_fit = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6)
    assert_close(fitted.eigenbasis.eigenvalues, local_fit.eigenbasis.eigenvalues, 1e-10)
    # Self-influence is blind to the signs of the Ritz vectors: the whole fitted state agrees.
    assert_close(fitted.self_influence(batches), local_fit.self_influence(batches), 1e-9)


def test_a_killed_actor_is_rebuilt_and_gives_identical_products():
    _, factory, model, batches = problem("numpy")
    vector = model.from_numpy(np.random.default_rng(2).standard_normal(model.num_parameters))
    with RayHessianData(factory, split_batches(batches, 2)) as data:
        operator = data.hessian_operator(model)
        before = host(model, operator.mv(vector))
        pids = [info["pid"] for info in data.description]
        ray.kill(data.actors[1], no_restart=False)  # between products, as a node loss would
        after = host(model, operator.mv(vector))
        assert data._call_all("pid")[1] != pids[1]  # a new process answered
    np.testing.assert_array_equal(after, before)


def test_an_actor_dying_mid_fit_leaves_the_fit_unchanged(tmp_path):
    spec, _, model, batches = problem("numpy")
    flag = tmp_path / "die"
    flag.write_text("")
    with RayHessianData(DyingFactory(spec, str(flag)), split_batches(batches, 2)) as data:
        pids = [info["pid"] for info in data.description]
        fitted = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6, hessian_dataset=data)
        assert not flag.exists() and (tmp_path / "die.used").exists()  # an actor did die
        assert data._call_all("pid") != pids
    local_fit = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6)
    assert_close(fitted.eigenbasis.eigenvalues, local_fit.eigenbasis.eigenvalues, 1e-10)


def test_vectors_in_memory_equal_the_calculator():
    _, factory, model, batches = problem("numpy")
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6)
    found = score_training_set(calc, factory, batches, batches_per_block=3, num_actors=2)
    np.testing.assert_array_equal(found.ids, np.arange(NUM_EXAMPLES))
    expected = np.concatenate([host(model, v) for _, v in calc.compute_influence_vector(batches)])
    assert_close(found.vectors, expected, 1e-12)
    assert_close(found.self_influence, calc.self_influence(batches), 1e-12)
    assert found.blocks_computed == (0, 1, 2)  # 3 + 3 + 1 batches


def test_store_with_complement_resumes_and_refuses_another_fit(tmp_path):
    _, factory, model, batches = problem("numpy")
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 8, True, 4, complement="mean")
    assert calc._placed(None).complement_weight is not None
    store = tmp_path / "scores.zarr"
    first = score_training_set(calc, factory, batches, batches_per_block=2, store_path=store)
    assert first.blocks_computed == (0, 1, 2, 3) and first.blocks_skipped == ()
    expected = calc.self_influence(batches)
    assert_close(first.self_influence, expected, 1e-12)
    vectors = np.concatenate([host(model, v) for _, v in calc.compute_influence_vector(batches)])
    assert_close(np.asarray(first.vectors[:]), vectors, 1e-12)
    group = zarr.open_group(str(store), mode="r")
    ids = np.asarray(group["ids"][:])
    assert sorted(ids.tolist()) == list(range(NUM_EXAMPLES))  # unique and complete

    # An interrupted run: block 2's marker never written, its rows lost.
    group = zarr.open_group(str(store), mode="r+")
    group["completed"][2:3] = np.zeros(1, dtype=bool)
    group["self_influence"][32:48] = np.zeros(16)
    second = score_training_set(calc, factory, batches, batches_per_block=2, store_path=store)
    assert second.blocks_computed == (2,) and second.blocks_skipped == (0, 1, 3)
    assert_close(second.self_influence, expected, 1e-12)
    assert_close(np.asarray(zarr.open_group(str(store))["self_influence"][:]), expected, 1e-12)

    # Completed blocks are reused only for the same data: a changed label is refused.
    changed = list(batches)
    changed[0] = (batches[0][0], (batches[0][1] + 1) % 3)
    with pytest.raises(IncompatibleStoreError, match="loss"):
        score_training_set(calc, factory, changed, batches_per_block=2, store_path=store)
    other = ki.ArnoldiInfluenceCalculator(model, batches, 8, True, 4, damping=0.1)
    with pytest.raises(IncompatibleStoreError, match="eigenbasis_digest"):
        score_training_set(other, factory, batches, batches_per_block=2, store_path=store)


class Stopped(Exception):
    pass


class StopAt:
    """An operator raising :class:`Stopped` at product ``after``: a crashed driver."""

    def __init__(self, inner, after):
        self.inner, self.after, self.products = inner, after, 0
        self.shape, self.dtype, self.device, self.xp = inner.shape, inner.dtype, None, inner.xp

    def mv(self, vector):
        self.products += 1
        if self.products >= self.after:
            raise Stopped
        return self.inner.mv(vector)


def test_a_sharded_fit_resumes_from_its_checkpoint(tmp_path):
    _, factory, model, batches = problem("numpy")
    path = tmp_path / "fit.npz"
    with RayHessianData(factory, split_batches(batches, 2)) as data:
        whole = ki.ArnoldiInfluenceCalculator(model, batches, 12, True, 6, hessian_dataset=data)
        settings = {"hessian_dataset": data, "checkpoint_path": path, "checkpoint_every": 3}
        operator = data.hessian_operator
        data.hessian_operator = lambda m: StopAt(operator(m), 8)
        with pytest.raises(Stopped):
            ki.ArnoldiInfluenceCalculator(model, batches, 12, True, 6, **settings)
        del data.hessian_operator
        assert path.exists()
        # The checkpoint recorded the shards' losses: other Hessian data is refused.
        changed = [(x, (y + 1) % 3) if i == 5 else (x, y) for i, (x, y) in enumerate(batches)]
        with RayHessianData(factory, split_batches(changed, 2)) as other:
            refit = {**settings, "hessian_dataset": other}
            with pytest.raises(IncompatibleStoreError, match="batch 5 of hessian_dataset"):
                ki.ArnoldiInfluenceCalculator(model, batches, 12, True, 6, **refit)
        resumed = ki.ArnoldiInfluenceCalculator(model, batches, 12, True, 6, **settings)
    assert resumed.resumed_from == 6
    np.testing.assert_array_equal(resumed.eigenbasis.ritz.spectrum, whole.eigenbasis.ritz.spectrum)


def test_a_ray_dataset_is_scored_by_id_like_the_calculator():
    _, factory, model, batches = problem("numpy")
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 8, True, 4, complement="mean")
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    rows = [{"id": i, "x": x[i], "y": y[i]} for i in range(NUM_EXAMPLES)]
    dataset = ray.data.from_items(rows[::-1], override_num_blocks=3)  # ids out of order
    scored = score_dataset(
        calc, factory, dataset, lambda r: (r["x"], r["y"]), batch_size=10, concurrency=2
    ).take_all()
    ids = np.array([row["id"] for row in scored])
    assert sorted(ids.tolist()) == list(range(NUM_EXAMPLES))  # unique and complete
    order = np.argsort(ids)
    found = np.array([row["self_influence"] for row in scored])[order]
    assert_close(found, calc.self_influence(batches), 1e-12)
    vectors = np.stack([row["influence_vector"] for row in scored])[order]
    expected = np.concatenate([host(model, v) for _, v in calc.compute_influence_vector(batches)])
    assert_close(vectors, expected, 1e-12)
