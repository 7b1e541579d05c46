"""``top_k`` memory does not grow with the training set (beyond N × k for CACHE.MEMORY)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from krylov_influence import CACHE, ArnoldiInfluenceCalculator, LinearNearestNeighbors
from krylov_influence.reference import SoftmaxRegression

D, C, BATCH, RANK, TOP = 20, 5, 50, 8, 5  # p = 105


def batches(rng: np.random.Generator, n: int) -> list:
    x = rng.standard_normal((n, D))
    y = rng.integers(0, C, n)
    return [(x[s : s + BATCH], y[s : s + BATCH]) for s in range(0, n, BATCH)]


def peak_bytes(calc: ArnoldiInfluenceCalculator, queries: list, train: list, cache: CACHE) -> int:
    tracemalloc.start()
    try:
        # Blocks of one batch: the default joins batches up to 4096 examples, a constant
        # that would hide growth at these sizes (it is tested in test_calculator_topk).
        search = LinearNearestNeighbors(block_columns=BATCH)
        stream = calc.top_k(
            queries, train, k=TOP, nearest_neighbors=search, influence_vector_in_cache=cache
        )
        for result in stream:
            del result
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("cache", [CACHE.NO_CACHE, CACHE.DISK, CACHE.MEMORY])
def test_top_k_peak_memory_is_bounded(cache: CACHE) -> None:
    rng = np.random.default_rng(0)
    model = SoftmaxRegression(rng.standard_normal((D, C)) / np.sqrt(D), np.zeros(C), l2=0.01)
    peaks = {}
    for n in (400, 4000):
        train, queries = batches(rng, n), batches(rng, n // 10)
        calc = ArnoldiInfluenceCalculator(model, train, 2 * RANK, True, RANK, "float64")
        peaks[n] = peak_bytes(calc, queries, train, cache)
    p = (D + 1) * C
    growth = peaks[4000] - peaks[400]
    # 3600 more training examples would cost 3600 × p × 8 = 3 MB if gradients were held.
    assert growth < 0.1 * 3600 * p * 8, peaks
    if cache is CACHE.MEMORY:
        # The influence vectors (N × k) are the only thing allowed to grow, with slack for
        # the list of block arrays.
        assert growth < 2 * 3600 * RANK * 8, peaks
    else:
        # Nothing of size N × k or N × p grows; what remains is per *batch* bookkeeping (the
        # zip directory of a disk store holds one entry of ~1.5 KiB per block): allow 2 KiB
        # per extra training batch plus 64 KiB of allocator noise.
        extra_batches = (4000 - 400) // BATCH
        assert growth < 64 * 1024 + 2048 * extra_batches, peaks
