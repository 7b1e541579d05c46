"""Batches: ``(x, y)`` pairs or dicts, converted to JAX arrays on the model's device.

A batch is ``(x, y)`` (a tuple or list of two), or a mapping with the keys ``"x"`` and
``"y"``, or ``"inputs"`` and ``"targets"`` (or the two keys named by ``batch_keys=`` at bind
time). ``x`` and ``y`` are arrays (NumPy, JAX, anything ``jnp.asarray`` takes) or pytrees of
them, all with the examples along the leading axis. Floating-point leaves are cast to the
model's dtype; integer leaves (labels, token ids) keep their kind. A :class:`Staged` batch
(what ``stage`` returns, kept by the calculator's staging of the Hessian data) is passed
through without any conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DEFAULT_KEYS", "Staged", "batch_size", "stage", "unpack"]

DEFAULT_KEYS: tuple[tuple[str, str], ...] = (("x", "y"), ("inputs", "targets"))


class Staged:
    """A batch as JAX arrays on ``device``, floating leaves in ``dtype``; ``size`` examples."""

    __slots__ = ("device", "dtype", "size", "x", "y")

    def __init__(self, x: Any, y: Any, size: int, dtype: np.dtype, device: Any):
        self.x, self.y, self.size, self.dtype, self.device = x, y, size, dtype, device

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays of ``x`` and ``y``."""
        return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves((self.x, self.y)))

    def __repr__(self) -> str:
        return f"Staged(size={self.size}, dtype={self.dtype}, device={self.device})"


def unpack(batch: Any, keys: tuple[str, str] | None) -> tuple[Any, Any]:
    """``(x, y)`` of ``batch``.

    Raises
    ------
    TypeError
        If ``batch`` is neither a pair nor a mapping with known keys.
    """
    if isinstance(batch, Staged):
        return batch.x, batch.y
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for x_key, y_key in (keys,) if keys is not None else DEFAULT_KEYS:
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
        expected = repr(keys) if keys is not None else " or ".join(map(repr, DEFAULT_KEYS))
        raise TypeError(
            f"batch: a dict batch needs the keys {expected} (got {sorted(map(str, batch))}); "
            "name yours with batch_keys=('inputs_key', 'targets_key') when binding"
        )
    raise TypeError(
        "batch: expected an (x, y) pair of arrays or a dict with keys 'x' and 'y', got "
        f"{type(batch).__name__}"
        + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
    )


def _leading(tree: Any, what: str) -> list[int]:
    sizes = []
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(f"batch: {what} has a scalar leaf; expected examples on axis 0")
        sizes.append(int(shape[0]))
    if not sizes:
        raise ValueError(f"batch: {what} has no arrays")
    return sizes


def batch_size(x: Any, y: Any) -> int:
    """Number of examples; every leaf of ``x`` and ``y`` must agree on it.

    Raises
    ------
    ValueError
        On scalar leaves or disagreeing leading dimensions.
    """
    xs, ys = _leading(x, "x"), _leading(y, "y")
    if len(set(xs + ys)) != 1:
        raise ValueError(
            f"batch: x and y must have the same number of examples on axis 0, got {xs} for "
            f"x and {ys} for y"
        )
    return xs[0]


def _to_device(leaf: Any, dtype: np.dtype, device: Any) -> Any:
    array = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
    kind = jnp.result_type(array)
    if jnp.issubdtype(kind, jnp.floating) and kind != dtype:
        array = array.astype(dtype)
    return jax.device_put(array, device)


def stage(batch: Any, keys: tuple[str, str] | None, dtype: np.dtype, device: Any) -> Staged:
    """``batch`` with every leaf a JAX array on ``device`` (floats in ``dtype``)."""
    if isinstance(batch, Staged) and batch.dtype == dtype and batch.device == device:
        return batch
    x, y = unpack(batch, keys)
    size = batch_size(x, y)
    place = lambda leaf: _to_device(leaf, dtype, device)  # noqa: E731
    return Staged(
        jax.tree_util.tree_map(place, x), jax.tree_util.tree_map(place, y), size, dtype, device
    )
