"""Staging the Hessian data: convert it to the engine's arrays once, under a memory budget.

The Arnoldi iteration makes one pass over the Hessian data per Hessian-vector product
(``subspace_dim`` passes in all). A ``DataLoader`` collates its examples, a ``tf.data``
pipeline runs its graph, and NumPy batches are copied to the device, on every one of those
passes; for small models that costs more than the products themselves. So before the
iteration the calculator iterates the data once and keeps every batch as the engine's arrays
on the model's device, in the model's dtype (integer leaves such as labels stay integer), as
long as their total size fits the budget ``stage_hessian_data``. Above it, the staged batches
are dropped and the user's data is streamed on every product, as before.

The engine does the conversion (:meth:`krylov_influence.InfluenceModel.stage_batch`), which
also reports the bytes of each staged batch; an engine without that hook is always streamed.
Staging changes no number: the staged batches are exactly what every product would otherwise
have converted afresh, visited in the same order (a shuffling loader is staged in the order of
its first pass, which does not change the mean Hessian).

The budget (``stage_hessian_data=`` of the calculator) is one of

- ``True``: the default budget, :data:`DEFAULT_STAGE_BYTES` (1 GiB);
- ``False`` or ``0``: never stage;
- a number: bytes (``1e9``);
- a string: a size with a unit, ``"512MiB"``, ``"2 GB"``, ``"100kB"`` (``B``, decimal ``kB``
  ``MB`` ``GB`` ``TB``, binary ``KiB`` ``MiB`` ``GiB`` ``TiB``; case-insensitive).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "DEFAULT_STAGE_BYTES",
    "HeldBatches",
    "StagedBatches",
    "format_bytes",
    "resolve_stage_budget",
    "stage_hessian_data",
]

logger = logging.getLogger("krylov_influence")

#: The default budget of staged Hessian data, in bytes (1 GiB).
DEFAULT_STAGE_BYTES = 2**30

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def resolve_stage_budget(
    value: Any, name: str = "stage_hessian_data", default: int = DEFAULT_STAGE_BYTES
) -> int:
    """The budget in bytes (0: never stage) for ``True`` (``default``), ``False``, bytes or
    ``"512MiB"``.

    Raises
    ------
    TypeError
        If ``value`` is not a bool, a number or a string.
    ValueError
        For a negative or infinite number, or a string that is not a size with a known unit.
    """
    expected = "True, False, a number of bytes >= 0, or a size such as '512MiB' or '2GB'"
    if isinstance(value, bool):
        return default if value else 0
    if isinstance(value, numbers.Real):
        size = float(value)
        if not (math.isfinite(size) and size >= 0):
            raise ValueError(f"{name}={value!r}: expected {expected}")
        return int(size)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            units = ", ".join(["B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"])
            raise ValueError(f"{name}={value!r}: expected {expected} (units: {units})")
        return int(float(match.group(1)) * _UNITS[unit])
    raise TypeError(f"{name}={value!r}: expected {expected}, got {type(value).__name__}")


def format_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class HeldBatches:
    """A re-iterable tuple of batches the engine prepared, with the bytes they hold."""

    __slots__ = ("batches", "nbytes")

    def __init__(self, batches: Iterable[Any], nbytes: int):
        self.batches = tuple(batches)
        self.nbytes = int(nbytes)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StagedBatches(HeldBatches):
    """Batches already converted by the engine, re-iterable, with their total size.

    Attributes
    ----------
    batches : tuple
        The staged batches, in the order of the pass that staged them.
    nbytes : int
        Their total size as the engine reported it.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"StagedBatches({len(self.batches)} batches, {format_bytes(self.nbytes)})"


def stage_hessian_data(
    model: Any, batches: Iterable[Any], budget: int
) -> tuple[Iterable[Any], str]:
    """Stage ``batches`` on ``model``'s device when they fit ``budget`` bytes.

    Parameters
    ----------
    model : InfluenceModel
        Its ``stage_batch(batch)`` returns ``(staged, nbytes)``, or ``None`` when the engine
        does not stage.
    batches : re-iterable of batches
        The Hessian data; iterated once here (stopped early when the budget is exceeded).
    budget : int
        Bytes, from :func:`resolve_stage_budget`; 0 never stages.

    Returns
    -------
    data : StagedBatches or the original ``batches``
        What the Hessian operator should iterate.
    note : str
        What happened, for progress output: ``"staged 1.4 MiB"`` or ``"streamed: ..."``.
    """
    if isinstance(batches, StagedBatches):
        return batches, f"staged {format_bytes(batches.nbytes)}"
    if budget <= 0:
        return batches, "streamed"
    staged, total = [], 0
    for batch in batches:
        result = model.stage_batch(batch)
        if result is None:
            note = f"streamed: the {model.engine_name} engine does not stage"
            logger.info("Hessian data %s", note)
            return batches, note
        item, size = result
        total += int(size)
        if total > budget:
            note = f"streamed: above stage_hessian_data={format_bytes(budget)}"
            logger.info("Hessian data %s (more than %d bytes)", note, budget)
            return batches, note
        staged.append(item)
    data = StagedBatches(staged, total)
    note = f"staged {format_bytes(total)}"
    logger.info("Hessian data %s on %s (%d batches)", note, model.device, len(data))
    return data, note
