"""Whether a ``DataLoader`` yields a new order on every pass."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["random_sampler"]

# Samplers that draw a new permutation (or a new sample) every time they are iterated.
_RANDOM_SAMPLERS = (
    torch.utils.data.RandomSampler,
    torch.utils.data.SubsetRandomSampler,
    torch.utils.data.WeightedRandomSampler,
)


def random_sampler(dataset: Any) -> str | None:
    """Name the random sampler of a ``DataLoader`` (``shuffle=True`` and the like), or None.

    A ``DistributedSampler`` draws its permutation from ``seed + epoch``: the same order on
    every pass until ``set_epoch`` is called, so it is accepted.
    """
    if not isinstance(dataset, torch.utils.data.DataLoader):
        return None
    candidates = [getattr(dataset, "sampler", None)]
    batch_sampler = getattr(dataset, "batch_sampler", None)
    candidates += [batch_sampler, getattr(batch_sampler, "sampler", None)]
    for sampler in candidates:
        if isinstance(sampler, _RANDOM_SAMPLERS):
            shuffled = isinstance(sampler, torch.utils.data.RandomSampler)
            detail = " (shuffle=True)" if shuffled else ""
            return f"a DataLoader with a {type(sampler).__name__}{detail}"
    return None
