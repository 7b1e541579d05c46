"""The running top-k merge and the linear search, against a full stable sort.

Run in every namespace of the ``xp`` fixture (tests/conftest.py): NumPy, ``array_api_strict``
(so a NumPy-only idiom in ``topk.py`` fails), PyTorch and JAX (immutable arrays).
"""

from __future__ import annotations

import itertools

import array_api_compat.numpy as np_xp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from krylov_influence import ORDER, LinearNearestNeighbors
from krylov_influence._xp import to_numpy
from krylov_influence.topk import RunningTopK, as_order


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


def check_running_top_k(xp: object, order: ORDER, case: tuple) -> None:
    scores, edges, k = case
    running = RunningTopK(k, order, xp=xp)
    for start, stop in itertools.pairwise(edges):
        running.update(xp.asarray(scores[:, start:stop], dtype=xp.float64), start)
    values, indices = running.result()
    sign = -1.0 if order is ORDER.DESCENDING else 1.0
    expected = np.argsort(sign * scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(to_numpy(indices), expected)
    np.testing.assert_array_equal(to_numpy(values), np.take_along_axis(scores, expected, 1))


@pytest.mark.parametrize("space", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
@settings(deadline=None)  # example count from the profile (tests/conftest.py)
@given(case=blocked_scores())
def test_running_top_k_is_a_stable_sort(space: str, order: ORDER, case: tuple) -> None:
    """Random shapes, blocks and ties; on the two host namespaces (every new shape would
    recompile in JAX, so the frameworks get the fixed cases below)."""
    xp = np_xp if space == "numpy" else pytest.importorskip("array_api_strict")
    check_running_top_k(xp, order, case)


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_running_top_k_in_every_namespace(xp: object, order: ORDER) -> None:
    """Ties across block boundaries, a block narrower than k, and a final partial block."""
    scores = np.array(
        [
            [1.0, 3.0, 3.0, -1.0, 3.0, 0.0, 2.0, 2.0, 3.0],
            [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, -2.0, 5.0, 1.0],
        ]
    )
    check_running_top_k(xp, order, (scores, [0, 2, 3, 7, 9], 4))


def test_linear_search_over_blocks(xp: object) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 6))
    queries = rng.standard_normal((4, 6))
    sizes = [7, 7, 7, 7, 7, 7, 7, 1]

    def blocks():
        start = 0
        for size in sizes:
            yield start, xp.asarray(vectors[start : start + size], dtype=xp.float64)
            start += size

    search = LinearNearestNeighbors()
    search.build(blocks, num_examples=None, xp=xp)
    values, indices = search.query(xp.asarray(queries, dtype=xp.float64), 5, ORDER.DESCENDING)
    scores = queries @ vectors.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(to_numpy(indices), expected)
    np.testing.assert_allclose(to_numpy(values), np.take_along_axis(scores, expected, 1))
    with pytest.raises(ValueError, match="k=51"):
        search.query(xp.asarray(queries, dtype=xp.float64), 51, ORDER.DESCENDING)


def test_order_values_and_errors() -> None:
    assert ORDER.ASCENDING.value == 1 and ORDER.DESCENDING.value == 2
    assert as_order(2) is ORDER.DESCENDING
    for bad in ("descending", 3, True, None):
        with pytest.raises(ValueError, match="order="):
            as_order(bad)
    with pytest.raises(RuntimeError, match="before build"):
        LinearNearestNeighbors().query(np.zeros((1, 2)), 1, ORDER.DESCENDING)
