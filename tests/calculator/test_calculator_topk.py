"""The running top-k merge and the linear search, against a full stable sort.

Run in NumPy and in ``array_api_strict`` (so a NumPy-only idiom in ``topk.py`` fails).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from krylov_influence import ORDER, LinearNearestNeighbors
from krylov_influence.topk import RunningTopK, as_order


def namespaces() -> list[object]:
    import array_api_compat.numpy as np_xp

    spaces = [np_xp]
    try:
        import array_api_strict

        spaces.append(array_api_strict)
    except ImportError:  # pragma: no cover - array-api-strict is a test dependency
        pass
    return spaces


@st.composite
def blocked_scores(draw: st.DrawFn) -> tuple[np.ndarray, list[int], int]:
    rows = draw(st.integers(1, 4))
    columns = draw(st.integers(1, 30))
    # Small integers: many ties, which must resolve to the smaller index.
    scores = np.array(
        draw(st.lists(st.integers(-3, 3), min_size=rows * columns, max_size=rows * columns)),
        dtype=np.float64,
    ).reshape(rows, columns)
    cuts = sorted(draw(st.sets(st.integers(1, columns - 1), max_size=6))) if columns > 1 else []
    k = draw(st.integers(1, columns))
    return scores, [0, *cuts, columns], k


@pytest.mark.parametrize("xp", namespaces(), ids=lambda xp: xp.__name__)
@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
@settings(deadline=None)  # example count from the profile (tests/conftest.py)
@given(case=blocked_scores())
def test_running_top_k_is_a_stable_sort(xp: object, order: ORDER, case: tuple) -> None:
    scores, edges, k = case
    running = RunningTopK(k, order, xp=xp)
    for start, stop in itertools.pairwise(edges):
        running.update(xp.asarray(scores[:, start:stop]), start)
    values, indices = running.result()
    sign = -1.0 if order is ORDER.DESCENDING else 1.0
    expected = np.argsort(sign * scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(indices), expected)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(scores, expected, 1))


@pytest.mark.parametrize("xp", namespaces(), ids=lambda xp: xp.__name__)
def test_linear_search_over_blocks(xp: object) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 6))
    queries = rng.standard_normal((4, 6))
    sizes = [7, 7, 7, 7, 7, 7, 7, 1]

    def blocks():
        start = 0
        for size in sizes:
            yield start, xp.asarray(vectors[start : start + size])
            start += size

    search = LinearNearestNeighbors()
    search.build(blocks, num_examples=None, xp=xp)
    values, indices = search.query(xp.asarray(queries), 5, ORDER.DESCENDING)
    scores = queries @ vectors.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(np.asarray(indices), expected)
    np.testing.assert_allclose(np.asarray(values), np.take_along_axis(scores, expected, 1))
    with pytest.raises(ValueError, match="k=51"):
        search.query(xp.asarray(queries), 51, ORDER.DESCENDING)


def test_order_values_and_errors() -> None:
    assert ORDER.ASCENDING.value == 1 and ORDER.DESCENDING.value == 2
    assert as_order(2) is ORDER.DESCENDING
    for bad in ("descending", 3, True, None):
        with pytest.raises(ValueError, match="order="):
            as_order(bad)
    with pytest.raises(RuntimeError, match="before build"):
        LinearNearestNeighbors().query(np.zeros((1, 2)), 1, ORDER.DESCENDING)
