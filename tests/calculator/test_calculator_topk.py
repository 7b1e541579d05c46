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
from krylov_influence.topk import RunningTopK, as_order, stable_smallest_k


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


@st.composite
def wide_keys(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """Rows wide enough (W > 4k) for the selection path, with ties at every threshold."""
    rows = draw(st.integers(1, 4))
    width = draw(st.integers(9, 60))
    spread = draw(st.sampled_from([1, 3, 1000]))  # from all-equal rows to few ties
    keys = np.array(
        draw(st.lists(st.integers(-spread, spread), min_size=rows * width, max_size=rows * width)),
        dtype=np.float64,
    ).reshape(rows, width)
    return keys, draw(st.integers(1, (width - 1) // 4))


def check_stable_smallest_k(xp: object, keys: np.ndarray, k: int) -> None:
    positions = stable_smallest_k(xp, xp.asarray(keys, dtype=xp.float64), k)
    expected = np.argsort(keys, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(to_numpy(positions), expected)


@pytest.mark.parametrize("space", ["numpy", "torch"])
@settings(deadline=None)
@given(case=wide_keys())
def test_stable_smallest_k_is_a_stable_sort(space: str, case: tuple) -> None:
    """The selection (argpartition, Tensor.topk) with the tie fix-up, against a stable sort."""
    xp = np_xp if space == "numpy" else _engine_namespace("torch")
    check_stable_smallest_k(xp, *case)


def _engine_namespace(name: str) -> object:
    """The namespace an engine hands to the core (with its hooks), or a skip."""
    if name == "torch":
        pytest.importorskip("torch")
        import array_api_compat.torch as xp

        return xp
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        from krylov_influence_jax._namespace import JAX_NAMESPACE

        return JAX_NAMESPACE
    pytest.importorskip("tensorflow")
    from krylov_influence_tf._namespace import namespace

    return namespace


@pytest.mark.parametrize("name", ["numpy", "array_api_strict", "torch", "jax", "tensorflow"])
def test_stable_smallest_k_in_every_engine_namespace(name: str) -> None:
    """Ties straddling the k-th position in a wide row; the engines' hooks (JAX's lax.top_k,
    TensorFlow's math.top_k) and the generic selection."""
    if name == "numpy":
        xp = np_xp
    elif name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
    else:
        xp = _engine_namespace(name)
    keys = np.array(
        [
            [3, 1, 2, 1, 5, 1, 0, 4, 1, 2, 6, 1, 7, 1, 8, 9, 2, 1, 3, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8, -9, 5],
        ],
        dtype=np.float64,
    )
    for k in (1, 3, 4, 19, 20):
        check_stable_smallest_k(xp, keys, k)
        if name == "jax":  # the accelerator path (lax.top_k), which the CPU does not take
            from krylov_influence_jax._namespace import _stable_smallest_k

            expected = np.argsort(keys, axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(
                np.asarray(_stable_smallest_k(xp.asarray(keys), k)), expected
            )


@pytest.mark.parametrize("block_columns", [1, 10, 4096])
def test_linear_search_over_blocks(xp: object, block_columns: int) -> None:
    """Blocks scored one by one, joined in threes (10 columns), or all at once."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 6))
    queries = rng.standard_normal((4, 6))
    sizes = [7, 7, 7, 7, 7, 7, 7, 1]

    def blocks():
        start = 0
        for size in sizes:
            yield start, xp.asarray(vectors[start : start + size], dtype=xp.float64)
            start += size

    search = LinearNearestNeighbors(block_columns)
    search.build(blocks, num_examples=None, xp=xp)
    values, indices = search.query(xp.asarray(queries, dtype=xp.float64), 5, ORDER.DESCENDING)
    scores = queries @ vectors.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(to_numpy(indices), expected)
    np.testing.assert_allclose(to_numpy(values), np.take_along_axis(scores, expected, 1))
    with pytest.raises(ValueError, match="k=51"):
        search.query(xp.asarray(queries, dtype=xp.float64), 51, ORDER.DESCENDING)


def test_order_values_and_errors() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_columns="):
            LinearNearestNeighbors(bad)
    assert ORDER.ASCENDING.value == 1 and ORDER.DESCENDING.value == 2
    assert as_order(2) is ORDER.DESCENDING
    for bad in ("descending", 3, True, None):
        with pytest.raises(ValueError, match="order="):
            as_order(bad)
    with pytest.raises(RuntimeError, match="before build"):
        LinearNearestNeighbors().query(np.zeros((1, 2)), 1, ORDER.DESCENDING)
