"""What the demo measures: mislabel detection by self-influence, proponents and opponents.

Detection is :func:`krylov_influence.evaluation.mislabel_detection`, the function users call
on their own models; this module adds the demo's fractions and its choice of test digits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence.evaluation import DetectionCurve, mislabel_detection

__all__ = [
    "INSPECTED_FRACTIONS",
    "Detection",
    "Neighbours",
    "choose_queries",
    "detection",
    "proponents_and_opponents",
    "strongest_neighbours",
]

#: Fractions of the training set inspected, most self-influential first.
INSPECTED_FRACTIONS: tuple[float, ...] = (0.05, 0.10, 0.20)


#: How well one score ranks the flipped labels first (``auc``, ``found``, ``inspected``,
#: ``recall``): :class:`krylov_influence.evaluation.DetectionCurve`.
Detection = DetectionCurve


def detection(scores: np.ndarray, flipped: np.ndarray) -> Detection:
    """Rank the training set by ``scores`` (largest first) and measure mislabel detection.

    The ranking by ``scores`` of :func:`krylov_influence.evaluation.mislabel_detection` at
    :data:`INSPECTED_FRACTIONS`.

    Parameters
    ----------
    scores : numpy.ndarray, shape (N,)
    flipped : numpy.ndarray of bool, shape (N,)
        At least one flipped and one clean example.

    Returns
    -------
    Detection
    """
    return mislabel_detection(scores, flipped, fractions=INSPECTED_FRACTIONS).influence


def choose_queries(
    predictions: np.ndarray, labels: np.ndarray, count: int, seed: int
) -> np.ndarray:
    """Pick ``count`` test digits: up to half misclassified ones, the rest correct ones.

    Misclassified digits are the interesting queries (their proponents are often training
    digits with a wrong label); correct ones show what normal support looks like.

    Returns
    -------
    numpy.ndarray of int, shape (count,)
        Sorted test indices.
    """
    rng = np.random.default_rng([seed, 1])
    wrong = np.flatnonzero(predictions != labels)
    right = np.flatnonzero(predictions == labels)
    num_wrong = min(wrong.size, count // 2)
    chosen = np.concatenate(
        [
            rng.choice(wrong, size=num_wrong, replace=False),
            rng.choice(right, size=min(right.size, count - num_wrong), replace=False),
        ]
    )
    return np.sort(chosen).astype(np.int64)


@dataclass(frozen=True)
class Neighbours:
    """The strongest proponents and opponents of one query in the training set.

    Attributes
    ----------
    proponents : numpy.ndarray of int, shape (m,)
        Training indices with the largest scores ``I(x, z) > 0``: up-weighting them lowers
        the query's loss.
    proponent_scores : numpy.ndarray, shape (m,)
    opponents : numpy.ndarray of int, shape (m,)
        Training indices with the most negative scores: up-weighting them raises the loss.
    opponent_scores : numpy.ndarray, shape (m,)
    """

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


def proponents_and_opponents(scores: np.ndarray, count: int) -> list[Neighbours]:
    """The ``count`` largest and most negative scores of each row of a score matrix.

    Parameters
    ----------
    scores : numpy.ndarray, shape (Q, N)
        ``scores[i, j] = I(x_j, z_i)``.
    count : int

    Returns
    -------
    list of Neighbours, one per query
    """
    result = []
    for row in np.asarray(scores, dtype=np.float64):
        order = np.argsort(-row, kind="stable")
        top, bottom = order[:count], np.argsort(row, kind="stable")[:count]
        result.append(Neighbours(top, row[top], bottom, row[bottom]))
    return result


def strongest_neighbours(
    calc: Any, model: Any, queries: Iterable[Any], train_set: Iterable[Any], count: int
) -> list[Neighbours]:
    """Proponents and opponents of every query by the calculator's streaming top-k search.

    Two passes of :meth:`~krylov_influence.ArnoldiInfluenceCalculator.top_k`: highest scores
    first (proponents) and lowest first (opponents); no query × training matrix is formed.

    Parameters
    ----------
    calc : ArnoldiInfluenceCalculator
    model : InfluenceModel
        The calculator's model (for the conversion of results to NumPy).
    queries, train_set : re-iterables of batches
    count : int
        Proponents (and opponents) per query.

    Returns
    -------
    list of Neighbours, one per query, in query order
    """
    from krylov_influence import ORDER

    ends = []
    for order in (ORDER.DESCENDING, ORDER.ASCENDING):
        values, indices = [], []
        for found in calc.top_k(queries, train_set, k=count, order=order):
            values.append(model.to_numpy(found.values).astype(np.float64))
            indices.append(model.to_numpy(found.indices).astype(np.int64))
        ends.append((np.concatenate(values), np.concatenate(indices)))
    (pro_values, pro_indices), (con_values, con_indices) = ends
    return [
        Neighbours(pro_indices[i], pro_values[i], con_indices[i], con_values[i])
        for i in range(pro_values.shape[0])
    ]
