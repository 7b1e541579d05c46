"""save(path) / ArnoldiInfluenceCalculator.load(path, model): round trip, refusals, engines."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from calculator_support import (
    MLP_ENGINES,
    Problem,
    build,
    engine_class,
    make_problem,
    query_spec,
    training_spec,
)

from krylov_influence import ArnoldiInfluenceCalculator, IncompatibleStoreError
from krylov_influence.testing import random_mlp_spec


def test_round_trip_on_the_same_model(numpy_problem: Problem, tmp_path) -> None:
    problem = numpy_problem
    path = problem.calc.save(tmp_path / "calc.npz")
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read("metadata.json"))
    assert meta["num_parameters"] == 15 and meta["engine"] == "numpy"
    assert meta["fingerprint"] == problem.model.fingerprint()
    assert meta["dtype"] == "float64" and meta["k_largest_eig_vals"] == 15

    model, train = build(engine_class("numpy"), problem.spec)  # a fresh binding, same values
    loaded = ArnoldiInfluenceCalculator.load(path, model, check_model=False)
    np.testing.assert_array_equal(loaded.eig_vals, problem.calc.eig_vals)
    np.testing.assert_array_equal(loaded.G, problem.calc.G)
    assert loaded.eigenbasis_digest == problem.calc.eigenbasis_digest
    np.testing.assert_array_equal(
        loaded.self_influence(train), problem.calc.self_influence(problem.train)
    )
    # A loaded calculator refits only when given Hessian data.
    with pytest.raises(ValueError, match="hessian_dataset"):
        loaded.arnoldi(15)
    refit = ArnoldiInfluenceCalculator.load(path, model, train_dataset=train)
    refit.arnoldi(15)
    np.testing.assert_allclose(refit.self_influence(train), problem.self_influence, rtol=1e-9)


def test_a_store_saved_before_save_is_valid_after_load(numpy_problem: Problem, tmp_path):
    problem = numpy_problem
    store = tmp_path / "vectors.npz"
    expected = [v for _, v in problem.calc.compute_influence_vector(problem.train, store)]
    loaded = ArnoldiInfluenceCalculator.load(
        problem.calc.save(tmp_path / "c.npz"), problem.model, train_dataset=problem.train
    )
    got = [v for _, v in loaded.compute_influence_vector(problem.train, store)]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_refuses_another_model(numpy_problem: Problem, tmp_path) -> None:
    path = numpy_problem.calc.save(tmp_path)  # a directory: calculator.npz inside
    assert path.endswith("calculator.npz")
    engine = engine_class("numpy")
    other, _ = build(engine, training_spec(seed=9))  # same p, other values
    with pytest.raises(IncompatibleStoreError, match="model: its parameter values differ"):
        ArnoldiInfluenceCalculator.load(path, other)
    bigger, _ = build(engine, random_mlp_spec(np.random.default_rng(0), (5, 3), l2=0.1))
    with pytest.raises(IncompatibleStoreError, match=r"p = 18 parameters.*p = 15"):
        ArnoldiInfluenceCalculator.load(path, bigger)
    store = tmp_path / "v.npz"
    list(numpy_problem.calc.compute_influence_vector(numpy_problem.train, store))
    with pytest.raises(IncompatibleStoreError, match="not a valid saved calculator"):
        ArnoldiInfluenceCalculator.load(store, numpy_problem.model)


def test_basis_fitted_with_numpy_loads_into_every_engine(engine: object, tmp_path) -> None:
    """The same neutral model in another engine has the same fingerprint and flat order."""
    fitted = make_problem(engine_class("numpy"))
    path = fitted.calc.save(tmp_path / "calc.npz")
    model, train = build(engine, fitted.spec)
    loaded = ArnoldiInfluenceCalculator.load(path, model, train_dataset=train)
    np.testing.assert_allclose(
        loaded.self_influence(train), fitted.calc.self_influence(fitted.train), rtol=1e-10
    )
    # And back: a basis fitted in this engine loads into the NumPy engine.
    native = make_problem(engine)
    back = ArnoldiInfluenceCalculator.load(
        native.calc.save(tmp_path / "n.npz"), fitted.model, train_dataset=fitted.train
    )
    np.testing.assert_allclose(
        back.self_influence(fitted.train), native.calc.self_influence(native.train), rtol=1e-10
    )


def test_mlp_basis_moves_to_another_engine(mlp_problem: Problem, tmp_path) -> None:
    """The non-convex MLP's basis (indefinite and damped, or at a minimum), fitted in one
    engine, saved, loaded into the other: checked against its
    Hessian by the load, and its scores are the exact oracle's."""
    problem = mlp_problem
    path = problem.calc.save(tmp_path / "calc.npz")
    others = [name for name in MLP_ENGINES if name != problem.engine.name]
    other = engine_class(others[0])
    model, train = build(other, problem.spec)
    _, queries = build(other, query_spec(problem.spec))
    loaded = ArnoldiInfluenceCalculator.load(path, model, train_dataset=train)
    assert loaded.damping == problem.calc.damping
    scale = np.max(np.abs(problem.scores))
    np.testing.assert_allclose(
        loaded.influence_matrix(queries, train), problem.scores, rtol=0, atol=1e-9 * scale
    )
    scale = np.max(np.abs(problem.self_influence))
    np.testing.assert_allclose(
        loaded.self_influence(train), problem.self_influence, rtol=0, atol=1e-9 * scale
    )
