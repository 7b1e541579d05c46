"""Self-influence and influence vectors of a ``ray.data.Dataset``: Ray Data batch inference.

The pattern Ray Data documents for batch inference: a callable class whose constructor builds
the model once per actor (here with the user's ``model_factory``, plus the fitted state as
host arrays) and whose ``__call__`` maps one batch of rows; ``map_batches(...,
concurrency=n)`` runs it on a pool of ``n`` actors. Rows carry their own global id (a column
of the dataset), so results keep their identity whatever order Ray Data streams them in. The
scoring code is the single-process calculator's
(:class:`krylov_influence._streaming.Placement`), spectral complement included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from krylov_influence._streaming import Placement
from krylov_influence.registry import bind_model

__all__ = ["score_dataset"]


class _RowScorer:
    """A Ray Data callable class: scores one batch of rows with a model built once."""

    def __init__(
        self,
        model_factory: Callable[[], Any],
        to_batch: Callable[[dict[str, np.ndarray]], Any],
        projector: np.ndarray,
        inverse: np.ndarray,
        complement_weight: float | None,
        id_column: str,
        vectors: bool,
        fingerprint: str,
    ):
        model = bind_model(model_factory())
        if model.fingerprint() != fingerprint:
            raise ValueError(
                "model_factory: builds a model whose parameters differ from the calculator's"
            )
        self.placement = Placement(
            model, model.from_numpy(projector), model.from_numpy(inverse), False, complement_weight
        )
        self.to_batch, self.id_column, self.vectors = to_batch, id_column, vectors

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        placement, model = self.placement, self.placement.model
        batch = self.to_batch(rows)
        ids = np.asarray(rows[self.id_column], dtype=np.int64)
        values = model.to_numpy(placement.self_influence(batch, 0, "dataset"))
        out = {"id": ids, "self_influence": np.asarray(values, np.float64)}
        if self.vectors:
            out["influence_vector"] = np.asarray(
                model.to_numpy(placement.vectors(batch, 0, "dataset"))
            )
        return out


def score_dataset(
    calculator: Any,
    model_factory: Callable[[], Any],
    dataset: Any,
    to_batch: Callable[[dict[str, np.ndarray]], Any],
    *,
    id_column: str = "id",
    vectors: bool = True,
    batch_size: int = 256,
    concurrency: int = 2,
    **map_batches_options: Any,
) -> Any:
    """Self-influence (and influence vectors) of every row of a ``ray.data.Dataset``, lazily.

    Parameters
    ----------
    calculator : ArnoldiInfluenceCalculator
        A fitted calculator; its ``G`` (k × p), ``1/(λ+δ)`` and spectral complement weight go
        to every actor once.
    model_factory : callable
        A picklable zero-argument callable building the calculator's model (fingerprint
        checked on every actor).
    dataset : ray.data.Dataset
        Rows with a global id column and whatever ``to_batch`` reads.
    to_batch : callable
        ``to_batch(rows) -> batch``: a dict of NumPy column arrays (Ray Data's ``"numpy"``
        batch format, up to ``batch_size`` rows) to a batch of the model's engine, e.g.
        ``lambda rows: (rows["x"], rows["y"])`` for the NumPy engine. Picklable.
    id_column : str, default "id"
        The column of global example ids (integers), copied to the output.
    vectors : bool, default True
        Also output influence vectors (one more projection pass per batch).
    batch_size : int, default 256
        Rows per ``map_batches`` call.
    concurrency : int, default 2
        Actors in the pool.
    **map_batches_options
        Passed to ``Dataset.map_batches`` (``num_gpus=``, ``num_cpus=``, ...).

    Returns
    -------
    ray.data.Dataset
        Columns ``id`` (int64), ``self_influence`` (float64) and ``influence_vector`` ((k,)
        per row, the model's dtype), one row per input row; lazy, like every Ray Data
        transform (``.to_pandas()``, ``.write_parquet(...)``, ``.take_all()`` run it). Rows
        may come in another order than the input's: join on ``id``.
    """
    model = calculator.model
    placement = calculator._placed(None)
    state = {
        "model_factory": model_factory,
        "to_batch": to_batch,
        "projector": np.asarray(model.to_numpy(placement.projector)),
        "inverse": np.asarray(calculator.eigenbasis.inverse_eigenvalues, np.float64),
        "complement_weight": placement.complement_weight,
        "id_column": id_column,
        "vectors": bool(vectors),
        "fingerprint": model.fingerprint(),
    }
    return dataset.map_batches(
        _RowScorer,
        fn_constructor_kwargs=state,
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=concurrency,
        **map_batches_options,
    )
