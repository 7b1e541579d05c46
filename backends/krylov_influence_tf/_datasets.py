"""What the TensorFlow engine can tell about a dataset without iterating it."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

__all__ = ["reshuffling_stage"]


def reshuffling_stage(dataset: Any) -> str | None:
    """Name the ``shuffle`` stage of a ``tf.data`` pipeline that reshuffles on every pass.

    Walks the pipeline's inputs (``Dataset._inputs()``, private but stable since TF 2.0) for
    a shuffle with ``reshuffle_each_iteration`` (the default). A pipeline built with
    ``reshuffle_each_iteration=False`` yields the same order on every pass and is accepted.
    """
    if not isinstance(dataset, tf.data.Dataset):
        return None
    pending, seen = [dataset], set()
    while pending:
        stage = pending.pop()
        if id(stage) in seen:
            continue
        seen.add(id(stage))
        if getattr(stage, "_reshuffle_each_iteration", False) is True:
            return (
                "a tf.data pipeline with .shuffle(..., reshuffle_each_iteration=True) (the default)"
            )
        try:
            pending.extend(stage._inputs())
        except Exception:  # a dataset type without the private method: nothing more to see
            continue
    return None
