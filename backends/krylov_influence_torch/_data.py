"""Batches: the formats the torch engine accepts, converted once to tensors on the device.

A batch is one of

- ``(x, y)`` or ``[x, y]`` (what a ``DataLoader`` over ``(x, y)`` examples yields);
- a dict with keys ``"x"`` and ``"y"``, or ``"input"`` and ``"target"`` (other keys, such as
  an example index, are ignored);
- a :class:`Batch` already prepared by the engine (e.g. staged by ``stage_batch``).

``x`` is a tensor (passed as ``module(x)``), a tuple or list of tensors (``module(*x)``) or a
dict of tensors (``module(**x)``). ``y`` is a tensor, ``None``, or a tuple/list/dict of
tensors that the loss receives as they are. Every leaf is a ``torch.Tensor`` or a NumPy array
whose first axis is the batch axis (the same length B in every leaf). Floating leaves are cast
to the model's dtype, integer arrays and tensors become ``int64`` tensors (what
``cross_entropy`` expects), and everything moves to the model's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["Batch", "batch_size", "map_leaves", "prepare_batch", "split_batch"]

_DICT_KEYS = (("x", "y"), ("input", "target"))
_NARROW_INTEGERS = (torch.int8, torch.uint8, torch.int16, torch.int32)


class Batch:
    """A batch converted to tensors on one device and dtype.

    Attributes
    ----------
    x : tensor, or tuple / dict of tensors
        Leaves of shape (B, ...).
    y : tensor, or tuple / dict of tensors
        Leaves of shape (B, ...).
    size : int
        ``B``.
    """

    __slots__ = ("device", "dtype", "size", "x", "y")

    def __init__(self, x: Any, y: Any, size: int, device: torch.device, dtype: torch.dtype):
        self.x = x
        self.y = y
        self.size = size
        self.device = device
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"Batch(size={self.size}, device={self.device}, dtype={self.dtype})"

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors of ``x`` and ``y``."""
        total = 0

        def count(leaf: Any) -> None:
            nonlocal total
            if isinstance(leaf, torch.Tensor):
                total += leaf.numel() * leaf.element_size()

        map_leaves(count, (self.x, self.y))
        return total


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every leaf of nested tuples, lists and dicts."""
    if isinstance(tree, dict):
        return {key: map_leaves(fn, value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_leaves(fn, value) for value in tree)
    return fn(tree)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` of a batch in any accepted format (not converted)."""
    if isinstance(batch, Batch):
        return batch.x, batch.y
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for x_key, y_key in _DICT_KEYS:
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
        raise ValueError(
            f"batch: a dict batch needs the keys 'x' and 'y' (or 'input' and 'target'), got "
            f"keys {sorted(map(str, batch))}"
        )
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        raise TypeError(
            "batch: got a single array; expected an (x, y) pair or a dict with 'x' and 'y'. "
            "A dataset is an iterable of batches, e.g. [(x, y)] rather than (x, y)"
        )
    raise TypeError(
        "batch: expected an (x, y) tuple or list of tensors / NumPy arrays, or a dict with "
        f"'x' and 'y' (or 'input' and 'target'), got {type(batch).__name__}"
    )


def prepare_batch(batch: Any, device: torch.device, dtype: torch.dtype) -> Batch:
    """Convert ``batch`` to a :class:`Batch` on ``device`` with floating leaves in ``dtype``.

    Raises
    ------
    TypeError
        On an unknown batch format or a leaf that is not a tensor or NumPy array.
    ValueError
        If the leaves disagree on the batch size B, or a leaf has no batch axis.
    """
    if isinstance(batch, Batch) and batch.device == device and batch.dtype == dtype:
        return batch
    x, y = split_batch(batch)
    sizes: list[tuple[str, tuple[int, ...]]] = []

    def convert(where: str) -> Callable[[Any], torch.Tensor]:
        def leaf(value: Any) -> torch.Tensor | None:
            if value is None:  # e.g. no targets for a loss that needs none
                return None
            if isinstance(value, np.ndarray):
                if np.issubdtype(value.dtype, np.integer):
                    value = value.astype(np.int64, copy=False)
                tensor = torch.as_tensor(value)
            elif isinstance(value, torch.Tensor):
                tensor = value.detach()
            else:
                raise TypeError(
                    f"batch: {where} must hold torch tensors or NumPy arrays, got "
                    f"{type(value).__name__}"
                )
            if tensor.ndim == 0:
                raise ValueError(f"batch: {where} has a 0-d leaf; expected a batch axis first")
            sizes.append((where, tuple(tensor.shape)))
            if tensor.is_floating_point():
                return tensor.to(device=device, dtype=dtype)
            if tensor.dtype in _NARROW_INTEGERS:  # as NumPy integers: what cross_entropy takes
                return tensor.to(device=device, dtype=torch.int64)
            return tensor.to(device=device)

        return leaf

    x = map_leaves(convert("x"), x)
    y = map_leaves(convert("y"), y)
    if not sizes or sizes[0][0] != "x":
        raise ValueError("batch: x has no tensors")
    size = sizes[0][1][0]
    if any(shape[0] != size for _, shape in sizes):
        described = ", ".join(f"{w} {s}" for w, s in sizes)
        raise ValueError(
            f"batch: every tensor must have the batch size first; got shapes {described}"
        )
    return Batch(x, y, int(size), device, dtype)


def batch_size(batch: Any) -> int:
    """``B`` of a batch in any accepted format, without converting it."""
    if isinstance(batch, Batch):
        return batch.size
    x, _ = split_batch(batch)
    while isinstance(x, (tuple, list, dict)):
        if not x:
            raise ValueError("batch: x has no tensors")
        x = next(iter(x.values())) if isinstance(x, dict) else x[0]
    shape = getattr(x, "shape", None)
    if not shape:
        raise ValueError("batch: expected x with a batch axis first")
    return int(shape[0])
