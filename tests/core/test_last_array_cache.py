"""``LastArrayCache``: what an engine derives from a projector is served only for that very
array, and goes when the array goes."""

from __future__ import annotations

import gc
import weakref

import numpy as np

from krylov_influence.engine import LastArrayCache


class _Derived:
    """A derived value that can be weakly referenced (to see when the cache lets it go)."""

    def __init__(self, array: np.ndarray):
        self.sum = float(array.sum())


def _counting_cache() -> tuple[LastArrayCache, list[int]]:
    calls: list[int] = []

    def derive(array: np.ndarray) -> _Derived:
        calls.append(id(array))
        return _Derived(array)

    return LastArrayCache(derive), calls


def test_the_same_array_is_derived_once_another_one_anew():
    cache, calls = _counting_cache()
    first, equal = np.ones(3), np.ones(3)
    assert cache(first) is cache(first)
    assert len(calls) == 1
    cache(equal)  # equal values, another array: derived again, never matched by value
    assert len(calls) == 2
    cache(first)  # only the last array is kept
    assert len(calls) == 3


def test_the_value_goes_with_its_array_and_a_reused_id_is_derived_anew():
    cache, calls = _counting_cache()
    array = np.arange(4.0)
    derived = weakref.ref(cache(array))
    del array
    gc.collect()
    assert derived() is None  # the cache let go of the value with the array
    for value in range(20):  # new arrays, some of which reuse the freed id
        assert cache(np.full(4, float(value))).sum == 4.0 * value
    assert len(calls) == 21


def test_arrays_without_weak_references_are_derived_every_time():
    calls: list[int] = []
    cache = LastArrayCache(lambda values: calls.append(1) or sum(values))
    values = (1.0, 2.0)  # a tuple cannot be weakly referenced
    assert cache(values) == cache(values) == 3.0
    assert len(calls) == 2
