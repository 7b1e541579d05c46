"""Datasets as re-iterables of opaque batches: validation, lazy streams, progress bars."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["BatchStream", "progress_bar", "require_reiterable", "resolve_show_progress"]


def require_reiterable(dataset: Any, name: str) -> Iterable[Any]:
    """Check that ``dataset`` can be iterated several times.

    A generator or other one-shot iterator would be silently empty on the second pass over
    the data (the Arnoldi iteration makes one pass per Hessian-vector product).

    Raises
    ------
    TypeError
        If ``dataset`` is ``None``, not iterable, or a one-shot iterator.
    """
    if dataset is None:
        raise TypeError(f"{name}: expected a re-iterable dataset of batches, got None")
    try:
        iterator = iter(dataset)
    except TypeError:
        raise TypeError(
            f"{name}: expected a re-iterable dataset of batches (a list of batches, a "
            f"DataLoader, a tf.data.Dataset), got {type(dataset).__name__}"
        ) from None
    if iterator is dataset:
        raise TypeError(
            f"{name}: got a one-shot iterator ({type(dataset).__name__}), which would be empty "
            "on the second pass; pass a list of batches or a re-iterable dataset"
        )
    return dataset


class BatchStream:
    """A lazy, re-iterable sequence of per-batch results.

    Each iteration calls ``produce()`` afresh, so results are computed batch by batch when
    consumed and never all held in memory (unless the consumer keeps them).

    Parameters
    ----------
    produce : callable returning an iterator
    length : int, optional
        Number of batches, when the underlying dataset knows it.
    """

    def __init__(self, produce: Callable[[], Iterator[Any]], length: int | None = None):
        self._produce = produce
        self._length = length

    def __iter__(self) -> Iterator[Any]:
        return self._produce()

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("this stream does not know its number of batches")
        return self._length


def dataset_length(dataset: Any) -> int | None:
    """Number of batches of ``dataset`` when it says so cheaply, else ``None``."""
    try:
        n = len(dataset)
    except Exception:  # tf.data raises TypeError on unknown cardinality; others lack __len__
        return None
    return int(n) if n >= 0 else None


def resolve_show_progress(show_progress: bool | None) -> bool:
    """``None`` means: progress bars when standard error is a terminal."""
    if show_progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(show_progress)


def progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar (disabled ones cost nothing)."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
