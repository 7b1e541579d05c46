"""Stored results are served only to the model, data and order that produced them.

Each test here is one of the ways a store used to return silently wrong numbers: a basis
loaded onto another model with the same parameters, a vector store reused for another
training set with the same batch layout, a stream that followed a replaced file, and a
shuffling loader whose passes were paired with each other. Every one now refuses clearly, or
returns the right numbers, and the tests check the numbers against the exact oracle.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from calculator_support import Problem, build, engine_class, scores_of, top_k_of, training_spec

from krylov_influence import CACHE, ArnoldiInfluenceCalculator, IncompatibleStoreError, exact
from krylov_influence.registry import get_engine
from krylov_influence.testing import random_mlp_spec


# ---------------------------------------------------------------- 1. the model behind a basis
def _mlp_spec(activation: str = "tanh", l2: float = 0.1) -> object:
    rng = np.random.default_rng(3)
    return random_mlp_spec(
        rng, (4, 6, 3), activation=activation, num_examples=23, batch_size=5, l2=l2
    )


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"activation": "softplus"}, id="activation"),
        pytest.param({"l2": 0.3}, id="l2"),
    ],
)
def test_load_refuses_a_model_with_the_same_parameters_but_another_hessian(
    mlp_engine: object, change: dict, tmp_path
) -> None:
    engine = mlp_engine
    fitted_spec = _mlp_spec()
    model, train = build(engine, fitted_spec)
    calc = ArnoldiInfluenceCalculator(model, train, 20, True, 8, "float64")
    path = calc.save(tmp_path / "calc.npz")
    other_spec = dataclasses.replace(fitted_spec, **change)
    other, other_train = build(engine, other_spec)
    assert other.fingerprint() == model.fingerprint()  # parameters cannot tell them apart

    with pytest.raises(IncompatibleStoreError, match="does not fit this model's Hessian"):
        ArnoldiInfluenceCalculator.load(path, other, train_dataset=other_train)
    # What the check prevents: the trusted basis gives the other model's self-influence wrong
    # (against the same rank-8 fit on the right model).
    trusted = ArnoldiInfluenceCalculator.load(path, other, check_model=False)
    right = ArnoldiInfluenceCalculator(other, other_train, 20, True, 8, "float64")
    error = np.max(
        np.abs(trusted.self_influence(other_train) - right.self_influence(other_train))
        / np.abs(right.self_influence(other_train))
    )
    assert error > 0.05
    # The right model passes, with the data it was fitted on.
    again = ArnoldiInfluenceCalculator.load(path, model, train_dataset=train)
    np.testing.assert_array_equal(again.self_influence(train), calc.self_influence(train))


def test_load_needs_the_hessian_data_or_an_explicit_opt_out(numpy_problem: Problem, tmp_path):
    problem = numpy_problem
    path = problem.calc.save(tmp_path / "calc.npz")
    with pytest.raises(ValueError, match=r"pass train_dataset=.*check_model=False"):
        ArnoldiInfluenceCalculator.load(path, problem.model)
    with pytest.raises(IncompatibleStoreError, match=r"train_dataset: has 10 examples.*23"):
        ArnoldiInfluenceCalculator.load(path, problem.model, train_dataset=problem.train[:2])
    separate = ArnoldiInfluenceCalculator(
        problem.model, problem.train, 15, True, 15, "float64", hessian_dataset=problem.train[:3]
    )
    saved = separate.save(tmp_path / "separate.npz")
    with pytest.raises(ValueError, match="pass hessian_dataset="):
        ArnoldiInfluenceCalculator.load(saved, problem.model, train_dataset=problem.train)
    loaded = ArnoldiInfluenceCalculator.load(
        saved, problem.model, hessian_dataset=problem.train[:3]
    )
    np.testing.assert_array_equal(loaded.G, separate.G)


@pytest.mark.parametrize("target", ["numpy", "torch", "jax", "tensorflow"])
def test_float32_basis_loads_into_every_engine_with_the_check(target: str, tmp_path) -> None:
    """No false refusal: float32 round-off of another engine stays inside the tolerance."""
    spec = training_spec(seed=4, num_examples=60, batch_size=16)
    source = engine_class("numpy")
    model, train = build(source, spec, "float32")
    calc = ArnoldiInfluenceCalculator(model, train, 12, True, 6, "float32", damping=1e-2)
    path = calc.save(tmp_path / "calc.npz")
    other, other_train = build(engine_class(target), spec, "float32")
    loaded = ArnoldiInfluenceCalculator.load(path, other, train_dataset=other_train)
    np.testing.assert_allclose(
        loaded.self_influence(other_train), calc.self_influence(train), rtol=2e-3
    )


def test_torch_tanh_basis_is_refused_for_a_relu_net_with_the_same_weights(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    import krylov_influence as ki

    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    train = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def net(activation: object) -> object:
        torch.manual_seed(1)
        layers = [torch.nn.Linear(5, 8), activation, torch.nn.Linear(8, 3)]
        return torch.nn.Sequential(*layers).double().eval()

    loss = torch.nn.CrossEntropyLoss(reduction="none")
    tanh = ki.InfluenceModel(net(torch.nn.Tanh()), loss, l2=1e-2)
    relu = ki.InfluenceModel(net(torch.nn.ReLU()), loss, l2=1e-2)
    calc = ki.ArnoldiInfluenceCalculator(tanh, train, 30, True, 10, "float64")
    path = calc.save(tmp_path / "tanh.npz")
    with pytest.raises(IncompatibleStoreError, match="does not fit this model's Hessian"):
        ki.ArnoldiInfluenceCalculator.load(path, relu, train_dataset=train)


# ---------------------------------------------------------- 2. the training set behind a store
def _same_layout_other_data(problem: Problem, seed: int = 11) -> list:
    spec = dataclasses.replace(
        problem.spec,
        x=np.random.default_rng(seed).standard_normal(problem.spec.x.shape),
    )
    return build(problem.engine, spec)[1]


def test_store_of_another_training_set_with_the_same_layout_is_refused(
    softmax_problem: Problem, tmp_path
) -> None:
    problem = softmax_problem
    calc, path = problem.calc, tmp_path / "vectors.npz"
    list(calc.compute_influence_vector(problem.train, path))
    other = _same_layout_other_data(problem)
    relabelled_spec = dataclasses.replace(problem.spec, y=(problem.spec.y + 1) % 3)
    relabelled = build(problem.engine, relabelled_spec)[1]
    reordered_spec = dataclasses.replace(
        problem.spec, x=problem.spec.x[::-1].copy(), y=problem.spec.y[::-1].copy()
    )
    reordered = build(problem.engine, reordered_spec)[1]
    for data in (other, relabelled, reordered):
        with pytest.raises(IncompatibleStoreError, match="another training set"):
            calc.compute_influence_vector(data, path)
        with pytest.raises(IncompatibleStoreError, match="load_influence_vector_path"):
            calc.estimate_influence_values_in_batches(
                problem.queries, data, load_influence_vector_path=path
            )
        with pytest.raises(IncompatibleStoreError, match="load_influence_vector_ds_path"):
            calc.top_k(problem.queries, data, load_influence_vector_ds_path=path)
    # The same data still reuses the store, and its scores are exact.
    got = scores_of(
        problem,
        calc.estimate_influence_values_in_batches(
            problem.queries, problem.train, load_influence_vector_path=path
        ),
    )
    scale = np.abs(problem.scores).max()
    np.testing.assert_allclose(got, problem.scores, rtol=0, atol=problem.rtol * scale)


def test_a_store_is_reused_across_engines(engine: object, tmp_path) -> None:
    """The same neutral data in another engine has the same losses: the store is its own."""
    numpy_model, numpy_train = build(engine_class("numpy"), training_spec())
    numpy_calc = ArnoldiInfluenceCalculator(numpy_model, numpy_train, 15, True, 15, "float64")
    path = numpy_calc.save(tmp_path / "calc.npz")
    store = tmp_path / "vectors.npz"
    expected = [v for _, v in numpy_calc.compute_influence_vector(numpy_train, store)]
    model, train = build(engine, training_spec())
    calc = ArnoldiInfluenceCalculator.load(path, model, train_dataset=train)
    got = [model.to_numpy(v) for _, v in calc.compute_influence_vector(train, store)]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


# ---------------------------------------------------------- 3. the file behind an open stream
def _other_models_store(problem: Problem, tmp_path) -> str:
    other_model, other_train = build(problem.engine, training_spec(seed=5))
    other = ArnoldiInfluenceCalculator(other_model, other_train, 15, True, 15, "float64")
    path = str(tmp_path / "other_vectors.npz")
    list(other.compute_influence_vector(other_train, path))
    return path


def test_a_stream_keeps_serving_the_file_it_checked(numpy_problem: Problem, tmp_path) -> None:
    problem, calc = numpy_problem, numpy_problem.calc
    path = str(tmp_path / "vectors.npz")
    stream = calc.compute_influence_vector(problem.train, path)
    top = calc.top_k(
        problem.queries,
        problem.train,
        k=3,
        influence_vector_in_cache=CACHE.DISK,
        load_influence_vector_ds_path=path,
    )
    expected = [v.copy() for _, v in stream]
    expected_top = top_k_of(problem, top)
    os.replace(_other_models_store(problem, tmp_path), path)  # another writer replaces it
    for (_, got), want in zip(stream, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(top_k_of(problem, top)[1], expected_top[1])
    # And a new call checks the new file, which is another model's.
    with pytest.raises(IncompatibleStoreError, match="another model"):
        calc.compute_influence_vector(problem.train, path)


def test_a_stream_survives_another_process_replacing_its_file(
    numpy_problem: Problem, tmp_path
) -> None:
    problem, calc = numpy_problem, numpy_problem.calc
    path = str(tmp_path / "vectors.npz")
    stream = calc.compute_influence_vector(problem.train, path)
    expected = [v.copy() for _, v in stream]
    other = _other_models_store(problem, tmp_path)
    copy = other + ".copy"
    script = f"import os, shutil\nfor _ in range(50):\n    shutil.copyfile({other!r}, {copy!r})\n"
    script += f"    os.replace({copy!r}, {path!r})\n"
    writer = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(20):  # read while the other process keeps replacing the file
            for (_, got), want in zip(stream, expected, strict=True):
                np.testing.assert_array_equal(got, want)
    finally:
        assert writer.wait(timeout=60) == 0


def test_saves_never_overwrite_another_models_results(numpy_problem: Problem, tmp_path) -> None:
    problem, calc = numpy_problem, numpy_problem.calc
    foreign = _other_models_store(problem, tmp_path)
    before = Path(foreign).read_bytes()
    with pytest.raises(IncompatibleStoreError, match=r"save_influence_vector_ds_path=.*another"):
        calc.top_k(problem.queries, problem.train, save_influence_vector_ds_path=foreign)
    with pytest.raises(IncompatibleStoreError, match=r"save_influence_vector_path=.*another"):
        calc.estimate_influence_values_in_batches(
            problem.queries, problem.train, save_influence_vector_path=foreign
        )
    with pytest.raises(IncompatibleStoreError, match=r"save_top_k_ds_path=.*not 'top_k'"):
        calc.top_k(problem.queries, problem.train, save_top_k_ds_path=foreign)
    with pytest.raises(IncompatibleStoreError, match=r"save_influence_value_path=.*not"):
        calc.estimate_influence_values_in_batches(
            problem.queries, problem.train, save_influence_value_path=foreign
        )
    text = tmp_path / "notes.txt"
    text.write_text("a user's file")
    with pytest.raises(IncompatibleStoreError, match="not overwritten"):
        calc.top_k(problem.queries, problem.train, save_top_k_ds_path=text)
    assert Path(foreign).read_bytes() == before and text.read_text() == "a user's file"
    # Our own earlier results are replaced as before.
    mine = tmp_path / "top.npz"
    list(calc.top_k(problem.queries, problem.train, k=2, save_top_k_ds_path=mine))
    list(calc.top_k(problem.queries, problem.train, k=3, save_top_k_ds_path=mine))
    assert np.load(mine)["indices_000000"].shape == (3, 3)


# ------------------------------------------------------------- 4. loaders that reshuffle
def test_a_shuffling_dataloader_is_refused_for_scoring_and_fine_for_the_hessian() -> None:
    torch = pytest.importorskip("torch")
    spec = training_spec(num_examples=40, batch_size=8)
    engine = engine_class("torch")
    model, _ = build(engine, spec)
    x = torch.tensor(spec.x)
    y = torch.tensor(spec.y)
    dataset = torch.utils.data.TensorDataset(x, y)
    ordered = torch.utils.data.DataLoader(dataset, batch_size=8)
    shuffled = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
    p = model.num_parameters
    calc = ArnoldiInfluenceCalculator(model, shuffled, p, True, p, "float64")  # H: any order
    reference = ArnoldiInfluenceCalculator(model, ordered, p, True, p, "float64")
    np.testing.assert_allclose(
        calc.self_influence(ordered), reference.self_influence(ordered), rtol=1e-9
    )
    ref_model, ref_train = get_engine("numpy").from_neutral_spec(spec)
    np.testing.assert_allclose(
        calc.self_influence(ordered), exact.exact_self_influence(ref_model, ref_train), rtol=1e-9
    )
    message = r"train_set: a DataLoader with a RandomSampler \(shuffle=True\)"
    for call in (
        lambda: calc.self_influence(shuffled),
        lambda: calc.compute_influence_vector(shuffled),
        lambda: calc.top_k(ordered, shuffled),
        lambda: calc.estimate_influence_values_in_batches(ordered, shuffled),
        lambda: calc.compute_top_k_from_training_dataset(shuffled, 3),
        lambda: calc.cache_training_vectors(shuffled),
        lambda: calc.locate_examples(shuffled, np.arange(3)),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="dataset_to_evaluate: a DataLoader"):
        calc.top_k(shuffled, ordered)


def test_a_reshuffling_tf_data_pipeline_is_refused_for_scoring() -> None:
    tf = pytest.importorskip("tensorflow")
    spec = training_spec()
    model, train = build(engine_class("tensorflow"), spec)
    calc = ArnoldiInfluenceCalculator(model, train, 15, True, 15, "float64")
    data = tf.data.Dataset.from_tensor_slices((spec.x, spec.y))
    with pytest.raises(ValueError, match=r"train_set: a tf.data pipeline with .shuffle"):
        calc.self_influence(data.shuffle(23).batch(5))
    fixed = data.shuffle(23, seed=0, reshuffle_each_iteration=False).batch(5)
    assert len(calc.self_influence(fixed)) == 23  # the same order on every pass: accepted


def test_a_store_written_from_kept_vectors_carries_the_data_they_came_from(
    numpy_problem: Problem, tmp_path
) -> None:
    """Kept vectors belong to the data as it was when kept: a store written from them after
    the list changed in place records the old data's losses, so the new data is refused."""
    problem, calc = numpy_problem, numpy_problem.calc
    train = list(problem.train)
    calc.cache_training_vectors(train)
    other = _same_layout_other_data(problem)
    train[2] = other[2]  # changed in place, same batch size: the kept vectors are now stale
    path = tmp_path / "vectors.npz"
    list(calc.compute_influence_vector(train, path))
    with pytest.raises(IncompatibleStoreError, match="batch 2 of train_set"):
        calc.estimate_influence_values_in_batches(
            problem.queries, list(train), load_influence_vector_path=path
        )
    # The data the vectors were computed on is accepted, with exact scores.
    got = scores_of(
        problem,
        calc.estimate_influence_values_in_batches(
            problem.queries, list(problem.train), load_influence_vector_path=path
        ),
    )
    scale = np.abs(problem.scores).max()
    np.testing.assert_allclose(got, problem.scores, rtol=0, atol=problem.rtol * scale)
