"""Fixtures of the calculator tests (helpers live in ``calculator_support``)."""

from __future__ import annotations

from typing import Any

import pytest
from calculator_support import ENGINE_KINDS, ENGINES, Problem, engine_class, make_problem


@pytest.fixture(params=ENGINES)
def engine(request: Any) -> Any:
    return engine_class(request.param)


@pytest.fixture(params=ENGINES[1:])
def mlp_engine(request: Any) -> Any:
    """The engines that build hidden layers (the NumPy reference engine has analytic
    regressions only: a spec with a hidden layer is not a model it can build)."""
    return engine_class(request.param)


@pytest.fixture(scope="session")
def fitted_mlp_bases() -> dict[tuple[str, str], Any]:
    """(engine, kind) -> path of that MLP problem's calculator, saved after its first fit."""
    return {}


def _problem_id(pair: tuple[str, str]) -> str:
    engine, kind = pair
    return engine if kind == "softmax" else f"{engine}-{kind}"


def _fitted(pair: tuple[str, str], bases: dict, tmp_path_factory: Any) -> Problem:
    engine, kind = pair
    if kind == "softmax":
        return make_problem(engine_class(engine))
    saved = bases.get(pair)
    fitted = make_problem(engine_class(engine), kind=kind, saved=saved)
    if saved is None:
        directory = tmp_path_factory.mktemp(f"{engine}-{kind}")
        bases[pair] = fitted.calc.save(directory / "calculator.npz")
    return fitted


@pytest.fixture(params=ENGINE_KINDS, ids=_problem_id)
def problem(request: Any, fitted_mlp_bases: dict, tmp_path_factory: Any) -> Problem:
    """Every engine on the convex softmax regression; torch and JAX also on the non-convex MLP,
    at a minimum and away from one (indefinite, damped); see ``calculator_support.KINDS``.

    An MLP problem is fitted once per engine and session (its fits dominate the run time);
    later tests get a fresh model and calculator loaded from the saved basis, which the load
    checks against the model's Hessian, and every test checks against the exact oracle.
    """
    return _fitted(request.param, fitted_mlp_bases, tmp_path_factory)


@pytest.fixture(params=[pair for pair in ENGINE_KINDS if pair[1] != "softmax"], ids=_problem_id)
def mlp_problem(request: Any, fitted_mlp_bases: dict, tmp_path_factory: Any) -> Problem:
    """The MLP problems alone (see ``problem``)."""
    return _fitted(request.param, fitted_mlp_bases, tmp_path_factory)


@pytest.fixture(params=ENGINES)
def softmax_problem(request: Any) -> Problem:
    """The softmax regression alone, on every engine (for tests of mechanics, not numerics)."""
    return make_problem(engine_class(request.param))


@pytest.fixture
def numpy_problem() -> Problem:
    return make_problem(engine_class("numpy"))
