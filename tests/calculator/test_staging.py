"""Staging the Hessian data (``stage_hessian_data=``): same numbers, one pass, a budget.

Oracles: the exact influence of the NumPy engine's dense Hessian of the same neutral spec
(independent of every engine's staging), and the streamed fit of the same engine. The number
of passes over the data is counted by a re-iterable that is not a list.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from calculator_support import build, query_spec, training_spec

from krylov_influence import ArnoldiInfluenceCalculator, exact
from krylov_influence._staging import (
    DEFAULT_STAGE_BYTES,
    StagedBatches,
    resolve_stage_budget,
    stage_hessian_data,
)
from krylov_influence.registry import get_engine

SUBSPACE_DIM = 10


class CountingBatches:
    """A re-iterable of batches (not a list) that counts the batches it hands out."""

    def __init__(self, batches: list[Any]):
        self.batches = batches
        self.yielded = 0

    def __iter__(self) -> Any:
        for batch in self.batches:
            self.yielded += 1
            yield batch

    @property
    def passes(self) -> float:
        """Full passes over the data so far."""
        return self.yielded / len(self.batches)


def rtol_of(dtype: str) -> float:
    """Two computations of the same quantity in ``dtype`` (the engines' tests use the same)."""
    return 4 * float(np.sqrt(np.finfo(dtype).eps)) if dtype == "float32" else 1e-10


def assert_close(actual: Any, expected: Any, rtol: float) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def fit(model: Any, data: Any, subspace_dim: int, **options: Any) -> ArnoldiInfluenceCalculator:
    p = model.num_parameters
    return ArnoldiInfluenceCalculator(
        model, data, subspace_dim, True, min(subspace_dim, p), model.dtype_name, **options
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_staged_and_streamed_fits_agree_and_match_the_exact_oracle(engine: Any, dtype: str):
    spec = training_spec()  # p = 15, 23 examples in batches of 5, 5, 5, 5, 3
    model, train = build(engine, spec, dtype)
    _, queries = build(engine, query_spec(spec), dtype)
    p = model.num_parameters
    reference = get_engine("numpy")
    ref_model, ref_train = reference.from_neutral_spec(spec)
    _, ref_queries = reference.from_neutral_spec(query_spec(spec))
    expected_scores = exact.exact_influence(ref_model, ref_train, ref_queries)
    rtol = rtol_of(dtype)
    for data in (train, CountingBatches(train)):
        staged = fit(model, data, p)
        streamed = fit(model, data, p, stage_hessian_data=False)
        assert_close(model.to_numpy(staged.eig_vals), model.to_numpy(streamed.eig_vals), rtol)
        scores = np.concatenate(
            [
                np.concatenate([model.to_numpy(s) for _, s in per_train], axis=1)
                for _, per_train in staged.estimate_influence_values_in_batches(queries, train)
            ]
        )
        # subspace_dim = p: the fit is exact up to round-off (float32: the Hessian's
        # condition number of this spec stays far below 1 / sqrt(eps)).
        assert_close(scores, expected_scores, rtol if dtype == "float64" else 1e-3)


def test_staged_data_is_iterated_once_and_the_budget_is_respected(engine: Any):
    model, train = build(engine, training_spec())
    size = sum(model.stage_batch(batch)[1] for batch in train)
    floats = 23 * 4 * 8  # x: 23 examples × 4 features in float64; labels: at most 8 bytes
    assert floats < size <= floats + 23 * 8

    def passes(budget: Any) -> float:
        data = CountingBatches(train)
        calc = fit(model, data, SUBSPACE_DIM, stage_hessian_data=budget)
        assert calc.eigenbasis.projector is not None
        return data.passes

    # one pass validates the losses, one stages; then no pass per Hessian-vector product
    assert passes(True) == 2
    assert passes(size) == 2
    # off: one pass per product; just above the budget: the staging pass stops early
    assert passes(False) == 1 + SUBSPACE_DIM
    assert passes(0) == 1 + SUBSPACE_DIM
    assert passes(size - 1) == 2 + SUBSPACE_DIM


def test_stage_hessian_data_returns_what_the_operator_iterates(engine: Any, caplog: Any):
    model, train = build(engine, training_spec())
    with caplog.at_level(logging.INFO, logger="krylov_influence"):
        data, note = stage_hessian_data(model, CountingBatches(train), DEFAULT_STAGE_BYTES)
    assert isinstance(data, StagedBatches) and len(data) == len(train)
    assert note.startswith("staged ") and "staged" in caplog.text
    assert [model.batch_size(b) for b in data] == [5, 5, 5, 5, 3]
    assert stage_hessian_data(model, data, DEFAULT_STAGE_BYTES)[0] is data  # not twice
    counted = CountingBatches(train)
    data, note = stage_hessian_data(model, counted, data.nbytes - 1)
    assert data is counted and note.startswith("streamed: above stage_hessian_data=")
    assert stage_hessian_data(model, counted, 0) == (counted, "streamed")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, 2**30),
        (False, 0),
        (0, 0),
        (12345, 12345),
        (np.int64(7), 7),
        (1e9, 10**9),
        ("512MiB", 512 * 2**20),
        ("2 GB", 2 * 10**9),
        ("1.5gib", 3 * 2**29),
        ("100kB", 10**5),
        ("64 B", 64),
    ],
)
def test_budget_values(value: Any, expected: int):
    assert resolve_stage_budget(value) == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        ("lots", ValueError),
        ("12 parsecs", ValueError),
        ("-5MiB", ValueError),
        ("", ValueError),
        (None, TypeError),
        ([1], TypeError),
    ],
)
def test_a_bad_budget_is_a_clear_error_naming_the_argument(value: Any, error: type):
    model, train = build(get_engine("numpy"), training_spec())
    with pytest.raises(error, match=r"stage_hessian_data=.*expected True, False, a number"):
        fit(model, train, SUBSPACE_DIM, stage_hessian_data=value)
