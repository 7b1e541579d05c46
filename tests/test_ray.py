"""krylov_influence.ray against the single-process library, on a local two-CPU Ray cluster.

Oracles: the driver model's own ``hessian_operator`` over all batches, a calculator fitted in
this process, and its ``self_influence`` / ``compute_influence_vector`` / ``top_k`` /
``influence_matrix``. One cluster for the
module (Ray starts in seconds, not milliseconds): the whole file is in ``_SLOW``
(tests/conftest.py), about 90 s on two busy cores (each test under 25 s).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
zarr = pytest.importorskip("zarr")

import krylov_influence as ki  # noqa: E402
from krylov_influence.errors import IncompatibleStoreError  # noqa: E402
from krylov_influence.ray import (  # noqa: E402
    RayHessianData,
    ScorerPool,
    score_dataset,
    score_training_set,
    scores_from_store,
    split_batches,
    top_k_from_store,
    top_k_training_set,
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
        if self.engine == "jax":  # float64 in JAX needs the process-wide flag, on every actor
            import jax

            jax.config.update("jax_enable_x64", True)
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
    if engine != "numpy":
        pytest.importorskip(engine)
    if engine == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
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
        # Each actor staged and linearised its shard (products through the kept state).
        assert all(", linearised " in info["staging"] for info in data.description)
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
    # A finished store serves no longer data; a short block that is not the last is refused
    # before it is shipped.
    with pytest.raises(IncompatibleStoreError, match="batches have more"):
        longer = [*batches[:-1], batches[0], batches[-1]]
        score_training_set(calc, factory, longer, batches_per_block=2, store_path=store)
    uneven = [batches[0], batches[-1], *batches[1:-1]]  # 8, 5, 8, ...: block 0 has 13
    with pytest.raises(ValueError, match="block 1 has 16 examples"):
        score_training_set(calc, factory, uneven, batches_per_block=2, store_path=tmp_path / "u")


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


def expected_top_k(calc, queries, batches, k, order):
    results = list(calc.top_k(queries, batches, k=k, order=order))
    values = np.concatenate([calc.model.to_numpy(r.values) for r in results])
    indices = np.concatenate([calc.model.to_numpy(r.indices) for r in results])
    return values.astype(np.float64), indices.astype(np.int64)


@pytest.mark.parametrize(
    ("engine", "complement"),
    [("numpy", "none"), ("numpy", "mean"), ("torch", "none"), ("torch", "mean"), ("jax", "mean")],
)
def test_top_k_on_the_cluster_equals_the_calculator(engine, complement):
    _, factory, model, batches = problem(engine)
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6, complement=complement)
    assert (calc._placed(None).complement_weight is None) == (complement == "none")
    queries = [batches[2], batches[6]]  # 8 + 5 query points
    # Blocks of 3 + 3 + 1 batches (24, 24 and 5 examples): k = 7 exceeds the last block's
    # size, whose actor then returns all 5 of its examples as candidates.
    # Each call starts its actors (seconds for a framework): both cases on NumPy only.
    cases = [(7, ki.ORDER.DESCENDING), (NUM_EXAMPLES, ki.ORDER.ASCENDING)]
    if engine != "numpy":
        cases = cases[:1] if complement == "none" else [(7, ki.ORDER.ASCENDING)]
    for k, order in cases:
        found = top_k_training_set(
            calc, factory, queries, batches, k, order, batches_per_block=3, num_actors=2
        )
        values, indices = expected_top_k(calc, queries, batches, k, order)
        assert found.values.shape == found.indices.shape == (13, k)
        assert found.indices.dtype == np.int64
        assert_close(found.values.astype(np.float64), values, 1e-12)
        np.testing.assert_array_equal(found.indices, indices)  # no ties in random data
    if engine != "numpy":
        return
    # k = N: each query's ids are a permutation of the training set.
    assert all(sorted(row) == list(range(NUM_EXAMPLES)) for row in found.indices.tolist())
    if complement == "none":
        with pytest.raises(ValueError, match="k=54"):
            top_k_training_set(calc, factory, queries, batches, NUM_EXAMPLES + 1)


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_scores_and_top_k_from_a_store_equal_the_calculator(engine, tmp_path):
    _, factory, model, batches = problem(engine)
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6)
    store = tmp_path / "scores.zarr"
    score_training_set(calc, factory, batches, batches_per_block=2, store_path=store)
    queries = [batches[1], batches[6]]
    # Read 16 rows at a time: the chunk (2 batches of 8); the last block partial (5 rows).
    blocks = list(scores_from_store(calc, queries, store))
    assert [start for start, _ in blocks] == [0, 16, 32, 48]
    assert [s.shape for _, s in blocks] == [(13, 16)] * 3 + [(13, 5)]
    found = np.concatenate([s for _, s in blocks], axis=1).astype(np.float64)
    assert_close(found, calc.influence_matrix(queries, batches), 1e-12)
    for order in (ki.ORDER.DESCENDING, ki.ORDER.ASCENDING):
        top = top_k_from_store(calc, queries, store, k=6, order=order)
        values, indices = expected_top_k(calc, queries, batches, 6, order)
        assert_close(top.values.astype(np.float64), values, 1e-12)
        np.testing.assert_array_equal(top.indices, indices)
    if engine != "numpy":
        return
    # Refused: another fit, a calculator with the complement, an unfinished store, a store
    # without vectors, no store at all.
    other = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6, damping=0.1)
    with pytest.raises(IncompatibleStoreError, match="eigenbasis_digest"):
        top_k_from_store(other, queries, store)
    with_complement = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6, complement=3.0)
    with pytest.raises(ValueError, match="spectral complement"):
        next(scores_from_store(with_complement, queries, store))
    with pytest.raises(IncompatibleStoreError, match="no store"):
        top_k_from_store(calc, queries, tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncompatibleStoreError, match="not a zarr group"):
        top_k_from_store(calc, queries, tmp_path / "empty")
    group = zarr.open_group(str(store), mode="r+")
    group["completed"][1:2] = np.zeros(1, dtype=bool)  # a block lost after the run finished
    with pytest.raises(IncompatibleStoreError, match=r"unfinished.*1 of 4 blocks missing"):
        top_k_from_store(calc, queries, store)
    group["completed"][1:2] = np.ones(1, dtype=bool)
    del group.attrs["num_examples"]
    with pytest.raises(IncompatibleStoreError, match="unfinished"):
        top_k_from_store(calc, queries, store)
    bare = tmp_path / "bare.zarr"
    score_training_set(calc, factory, batches, batches_per_block=2, store_path=bare, vectors=False)
    with pytest.raises(IncompatibleStoreError, match="no influence vectors"):
        top_k_from_store(calc, queries, bare)


def generated_batches(num_batches, batch, features, classes):
    """Softmax-regression batches drawn on the fly: a generator, never a list."""
    for index in range(num_batches):
        rng = np.random.default_rng([7, index])
        yield rng.standard_normal((batch, features)), rng.integers(0, classes, batch)


def traced_peak(run):
    """Peak bytes the driver's Python heap grows by while ``run()`` runs (tracemalloc)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = run()
        return tracemalloc.get_traced_memory()[1] - before, result
    finally:
        tracemalloc.stop()


def test_the_driver_memory_does_not_grow_with_the_training_set(tmp_path):
    # 64 features: a training example is 520 bytes of data; k = 50: its influence vector is
    # 400 bytes. With a store the driver keeps 8 bytes of self-influence per example (plus the
    # ids and one concatenation); the batches are drawn by a generator, the vectors go to the
    # store. Two calibrations, measured the same way, show that the measurement sees both
    # the data and the vectors when the driver does hold them.
    features, batch = 64, 64
    spec = random_mlp_spec(np.random.default_rng(3), (features, 3), num_examples=200, l2=0.05)
    factory = SpecFactory("numpy", spec)
    model, fit_batches = ki.get_engine("numpy").from_neutral_spec(spec, dtype="float64")
    calc = ki.ArnoldiInfluenceCalculator(model, fit_batches, 60, True, 50)

    def score(num_batches, store):
        data = generated_batches(num_batches, batch, features, 3)
        return score_training_set(calc, factory, data, batches_per_block=4, store_path=store)

    # A first run takes the one-time costs (imports, first serialisations), which would
    # otherwise inflate the smaller run's peak and hide growth.
    score(8, None)
    growth = {}
    for name, run in (
        ("store", lambda n: score(n, tmp_path / f"scores-{n}.zarr")),
        ("vectors in memory", lambda n: score(n, None)),
        ("data in a list", lambda n: list(generated_batches(n, batch, features, 3))),
    ):
        small, _ = traced_peak(lambda r=run: r(32))  # N = 2048 examples
        large, _ = traced_peak(lambda r=run: r(128))  # 4N = 8192
        growth[name] = (large - small) / (96 * batch)  # bytes per extra example
    # Both calibrations read at least 5 times the bound below (the vectors' 400 bytes read
    # lower: part of them hides under the smaller run's start-up peak, pool and pickling).
    bound = 40
    assert growth["data in a list"] > 5 * bound, growth
    assert growth["vectors in memory"] > 5 * bound, growth
    # Self-influence (8), ids (8) and one concatenation (8) per example at most.
    assert growth["store"] < bound, growth
    # The last store is whole: every id once, the vectors equal the calculator's.
    group = zarr.open_group(str(tmp_path / "scores-128.zarr"), mode="r")
    np.testing.assert_array_equal(np.asarray(group["ids"][:]), np.arange(128 * batch))
    data = list(generated_batches(128, batch, features, 3))
    expected = np.concatenate([host(model, v) for _, v in calc.compute_influence_vector(data)])
    assert_close(np.asarray(group["vectors"][:]), expected, 1e-12)


class SlowLogged(NumpyInfluenceModel):
    """A reference model whose projections take a while and leave a file each."""

    directory = ""

    def project(self, projector, batch):
        time.sleep(0.15)
        Path(self.directory, f"batch-{os.getpid()}-{time.monotonic_ns()}").touch()
        return super().project(projector, batch)


@dataclass(frozen=True)
class SlowFactory:
    spec: object
    directory: str

    def __call__(self):
        model = SlowLogged(self.spec.reference_model(), dtype="float64")
        model.directory = self.directory
        Path(self.directory, f"pid-{os.getpid()}").touch()  # one per actor process
        return model


def test_killing_a_scoring_actor_mid_run_gives_the_identical_result(tmp_path):
    spec, _, model, batches = problem("numpy")
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6)
    log = tmp_path / "log"
    log.mkdir()
    store = tmp_path / "scores.zarr"
    outcome = {}

    def run():
        try:
            outcome["scores"] = score_training_set(
                calc, SlowFactory(spec, str(log)), batches, num_actors=2, store_path=store
            )
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 50
    while len(list(log.glob("batch-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = {int(p.name.split("-")[1]) for p in log.glob("pid-*")}
    assert len(pids) == 2 and thread.is_alive()  # both actors working, the run not over
    victim = min(pids)
    done_at_kill = len(list(log.glob("batch-*")))
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=50)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    scores = outcome["scores"]
    assert done_at_kill < 2 * len(batches)  # killed mid-run: projections were left to do
    (reborn,) = {int(p.name.split("-")[1]) for p in log.glob("pid-*")} - pids
    assert any(log.glob(f"batch-{reborn}-*"))  # Ray rebuilt the killed actor, which worked
    assert scores.blocks_computed == tuple(range(len(batches)))
    assert_close(scores.self_influence, calc.self_influence(batches), 1e-12)
    vectors = np.concatenate([host(model, v) for _, v in calc.compute_influence_vector(batches)])
    assert_close(np.asarray(scores.vectors[:]), vectors, 1e-12)
    ids = np.asarray(zarr.open_group(str(store), mode="r")["ids"][:])
    np.testing.assert_array_equal(np.sort(ids), np.arange(NUM_EXAMPLES))  # unique, complete


def test_a_pool_started_once_serves_several_calls_and_only_its_calculator():
    _, factory, model, batches = problem("numpy")
    calc = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 6, complement="mean")
    queries = [batches[2]]
    with ScorerPool(calc, factory, 2) as actors:
        pids = ray.get([actor.run.remote(_pid) for actor in actors.actors])
        scores = score_training_set(calc, actors, batches, batches_per_block=3)
        top = top_k_training_set(calc, actors, queries, batches, 5, batches_per_block=3)
        # The same actors, still running after both calls.
        assert ray.get([actor.run.remote(_pid) for actor in actors.actors]) == pids
        assert_close(scores.self_influence, calc.self_influence(batches), 1e-12)
        values, indices = expected_top_k(calc, queries, batches, 5, ki.ORDER.DESCENDING)
        assert_close(top.values, values, 1e-12)
        np.testing.assert_array_equal(top.indices, indices)
        other = ki.ArnoldiInfluenceCalculator(model, batches, 10, True, 5, complement="mean")
        with pytest.raises(ValueError, match="another calculator"):
            score_training_set(other, actors, batches)
    with pytest.raises(ValueError, match="shut down"):
        top_k_training_set(calc, actors, queries, batches, 5)


def _pid(placement):
    return {"placement": type(placement).__name__}
