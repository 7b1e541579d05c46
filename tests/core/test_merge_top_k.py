"""``merge_top_k``: partial top-k results over disjoint column sets merge to the exact top-k.

Oracle: a stable sort of every column (ties to the smaller index), which is what
``RunningTopK`` keeps. Integer-valued scores make ties frequent.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from krylov_influence.topk import ORDER, merge_top_k


def best(scores, columns, k, order):
    """Brute force: the best ``k`` of ``columns`` per row, by score then index."""
    key = -scores[:, columns] if order is ORDER.DESCENDING else scores[:, columns]
    picked = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores[:, columns], picked, axis=1), np.asarray(columns)[picked]


@given(
    seed=st.integers(0, 2**31 - 1),
    width=st.integers(1, 40),
    parts=st.integers(1, 6),
    k=st.integers(1, 12),
    order=st.sampled_from(list(ORDER)),
)
def test_merging_parts_in_any_order_gives_the_exact_top_k(seed, width, parts, k, order):
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, size=(3, width)).astype(np.float64)  # many ties
    owner = rng.integers(0, parts, size=width)  # disjoint, interleaved column sets
    values = np.zeros((3, 0))
    indices = np.zeros((3, 0), np.int64)
    for part in rng.permutation(parts):  # arrival order does not matter
        columns = np.flatnonzero(owner == part)
        if columns.size == 0:
            continue
        part_values, part_indices = best(scores, columns, k, order)
        values, indices = merge_top_k(values, indices, part_values, part_indices, k, order)
    expected_values, expected_indices = best(scores, np.arange(width), k, order)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)
    assert indices.dtype == np.int64
