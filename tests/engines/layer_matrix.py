"""What the three layer-matrix test files share: the tolerance of a product check, and the
routes table of ``docs/layers.md`` that each file renders from the routes it asserts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DOCS = Path(__file__).resolve().parents[2] / "docs" / "layers.md"


def rtol(dtype: str) -> float:
    """``4·sqrt(eps)``: 1.4e-3 in float32, 6e-8 in float64."""
    return 4.0 * math.sqrt(float(np.finfo(dtype).eps))


def assert_products_close(actual: Any, left: Any, right: Any, dtype: str) -> None:
    """``actual ≈ left @ right`` within rtol × the row's largest entry of ``|left| @ |right|``.

    That is the scale of the rounding in each row's sums of products. Entries that vanish by
    structure (an attention key bias has zero gradient: softmax ignores it) come out as
    rounding noise, so an entrywise relative test would be meaningless for them.
    """
    left = np.asarray(left, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    expected = left @ right
    scale = np.max(np.abs(left) @ np.abs(right), axis=1, keepdims=True) + np.finfo(dtype).tiny
    error = np.abs(np.asarray(actual, dtype=np.float64) - expected)
    worst = float(np.max(error / scale))
    assert worst <= rtol(dtype), f"max relative error {worst:.2e} > {rtol(dtype):.2e}"


def routes_table(
    first_column: str,
    columns: Sequence[str],
    cases: Sequence[tuple[str, str]],
    route: Callable[[str, str, int], str],
    fast: Sequence[str],
) -> str:
    """A markdown table: one row per (layer, dtype), the route of each column, fallbacks bold.

    ``route(layer, dtype, i)`` is the route the tests assert for column ``i``; ``fast[i]`` is
    that column's first route (any other is a fallback).
    """
    header = f"| {first_column} | dtype | " + " | ".join(columns) + " |\n"
    header += "|---" * (len(columns) + 2) + "|\n"
    rows = []
    for name, dtype in cases:
        cells = [route(name, dtype, i) for i in range(len(columns))]
        marked = [cell if cell == first else f"**{cell}**" for cell, first in zip(cells, fast)]
        rows.append(f"| {name} | {dtype} | " + " | ".join(marked) + " |\n")
    return header + "".join(rows)


def assert_docs_has(table: str, module: str) -> None:
    """``docs/layers.md`` holds ``table`` as rendered now (else: how to regenerate it)."""
    assert table in DOCS.read_text(encoding="utf-8"), (
        f"docs/layers.md is stale: regenerate the table with `python -m {module}`"
    )
