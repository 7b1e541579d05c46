"""Fixtures of the calculator tests (helpers live in ``calculator_support``)."""

from __future__ import annotations

from typing import Any

import pytest
from calculator_support import ENGINES, Problem, engine_class, make_problem


@pytest.fixture(params=ENGINES)
def engine(request: Any) -> Any:
    return engine_class(request.param)


@pytest.fixture
def problem(engine: Any) -> Problem:
    return make_problem(engine)


@pytest.fixture
def numpy_problem() -> Problem:
    return make_problem(engine_class("numpy"))
