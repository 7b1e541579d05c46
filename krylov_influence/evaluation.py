"""Judging influence scores on your own model: mislabel detection, agreement, LDS.

Contract: every function takes scores you already computed (NumPy arrays, or anything
:func:`numpy.asarray` or DLPack can read, framework tensors included) and returns a frozen
dataclass of plain floats and NumPy arrays. Nothing here imports a framework or calls an
engine; the only model call is the user's own ``retrain_and_evaluate`` in
:func:`linear_datamodeling_score`. All statistics are computed in float64 with NumPy.

Three protocols (see REFERENCE.md §4):

:func:`mislabel_detection`
    Rank the training set by a score (self-influence, higher = more suspicious) and measure
    how early the examples with flipped labels come: the ROC AUC and the fraction found after
    inspecting 5 %, 10 %, 20 % of the data, beside the same figures for the baselines given
    (training loss, gradient norm), so it is plain whether influence beats the loss.
:func:`agreement`
    Compare a (Q, N) score matrix with a reference, typically exact influence from
    :mod:`krylov_influence.exact` on a small model: Spearman per query, Pearson of the whole
    matrix, sign agreement, top-k overlap of proponents and opponents, least-squares scale.
:func:`linear_datamodeling_score`
    Retrain on random subsets of the training set and measure, per query, the Spearman
    correlation across subsets between the outputs the scores predict and the outputs
    retraining gives (Park et al., "TRAK", ICML 2023).

Ties are handled exactly everywhere: ranks are average ranks, so the AUC is the
Mann–Whitney statistic (a tie counts one half) and Spearman's ρ is the Pearson correlation
of average ranks.

Sign convention (as everywhere in this library): ``I(x, z) = ∇L(z)ᵀ H⁻¹ ∇L(x)`` is positive
when ``x`` is a *proponent* of ``z``, i.e. up-weighting ``x`` *lowers* the loss on ``z``. Hence
the datamodel prediction of a query's *loss* after training on a subset ``S`` is
``−Σ_{j ∈ S} I(x_j, z)`` (up to a constant and a positive scale, to which Spearman is blind).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from krylov_influence import _xp
from krylov_influence._data import progress_bar, resolve_show_progress

__all__ = [
    "Agreement",
    "DetectionCurve",
    "LinearDatamodelingScore",
    "MislabelDetection",
    "agreement",
    "average_ranks",
    "linear_datamodeling_score",
    "mislabel_detection",
    "roc_auc",
    "spearman",
]


# ------------------------------------------------------------------------------ helpers
def _as_float_array(values: Any, name: str) -> np.ndarray:
    """``values`` as a float64 NumPy array, with an error naming ``name`` if it is not numeric."""
    array = _xp.to_numpy(values) if not isinstance(values, (list, tuple)) else values
    try:
        result = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name}: expected an array of numbers, got {type(values).__name__}"
        ) from None
    return result


def _require_finite(values: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(values)
    if np.any(bad):
        where = np.argwhere(bad)[0]
        index = tuple(int(i) for i in where) if values.ndim > 1 else int(where[0])
        raise ValueError(
            f"{name}: {int(np.count_nonzero(bad))} non-finite value(s), the first at index "
            f"{index} ({values[tuple(where)]!r}); scores must be finite to be ranked"
        )


def _as_vector(values: Any, name: str, size: int | None = None) -> np.ndarray:
    array = _as_float_array(values, name)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,), got {array.shape}")
    if size is not None and array.shape[0] != size:
        raise ValueError(f"{name}: expected shape ({size},) like scores, got {array.shape}")
    _require_finite(array, name)
    return array


def _as_matrix(values: Any, name: str) -> np.ndarray:
    """A (Q, N) score matrix; a vector (N,) is one query."""
    array = _as_float_array(values, name)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{name}: expected shape (Q, N) or (N,), got {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {array.shape}")
    _require_finite(array, name)
    return array


def _as_mask(values: Any, name: str, size: int) -> np.ndarray:
    array = _xp.to_numpy(values) if not isinstance(values, (list, tuple)) else values
    array = np.asarray(array)
    if array.shape != (size,):
        raise ValueError(f"{name}: expected shape ({size},) like scores, got {array.shape}")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.number) and np.all((array == 0) | (array == 1))):
        raise ValueError(f"{name}: expected booleans (or 0/1), got dtype {array.dtype}")
    return array.astype(bool)


def average_ranks(values: Any) -> np.ndarray:
    """Ranks ``1 … N`` of ``values`` along the last axis, tied values sharing their mean rank.

    The ``"average"`` method of ``scipy.stats.rankdata``, in NumPy.

    Parameters
    ----------
    values : array_like, shape (..., N)

    Returns
    -------
    numpy.ndarray, shape (..., N), float64
        ``ranks[..., i] = #{j : v_j < v_i} + (#{j : v_j = v_i} + 1) / 2``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0:
        raise ValueError("values: expected at least one axis, got a scalar")
    flat = values.reshape(-1, values.shape[-1])
    ranks = np.empty_like(flat)
    n = flat.shape[1]
    for row, out in zip(flat, ranks):
        order = np.argsort(row, kind="stable")
        ordered = row[order]
        # Start of each run of equal values in sorted order; runs span [start, stop).
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        stops = np.append(starts[1:], n)
        mean_rank = 0.5 * (starts + 1 + stops)  # mean of the ranks start+1 … stop
        out[order] = np.repeat(mean_rank, stops - starts)
    return ranks.reshape(values.shape)


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows (last axis); NaN where a row is constant."""
    constant = (np.ptp(a, axis=-1) == 0) | (np.ptp(b, axis=-1) == 0)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denominator = np.sqrt(np.sum(a * a, axis=-1) * np.sum(b * b, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.sum(a * b, axis=-1) / denominator
    # Round-off can push |ρ| a hair above 1.
    return np.where(constant | ~(denominator > 0), np.nan, np.clip(rho, -1.0, 1.0))


def spearman(a: Any, b: Any) -> np.ndarray | float:
    """Spearman's ρ of matching rows: the Pearson correlation of their average ranks.

    Parameters
    ----------
    a, b : array_like, shape (N,) or (Q, N)
        Correlated along the last axis, row by row.

    Returns
    -------
    float, or numpy.ndarray of shape (Q,)
        NaN where either row is constant (ρ is undefined).

    Raises
    ------
    ValueError
        On unequal shapes, fewer than 2 values per row, or non-finite values.
    """
    a, b = _as_float_array(a, "a"), _as_float_array(b, "b")
    _require_finite(a, "a")
    _require_finite(b, "b")
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(f"a, b: expected equal shapes (N,) or (Q, N), got {a.shape}, {b.shape}")
    if a.shape[-1] < 2:
        raise ValueError(f"a, b: expected at least 2 values per row, got {a.shape[-1]}")
    rho = _pearson(average_ranks(a), average_ranks(b))
    return float(rho) if a.ndim == 1 else rho


def roc_auc(scores: Any, positives: Any) -> float:
    """ROC AUC of ``scores`` as a detector of ``positives`` (higher score = more positive).

    The Mann–Whitney statistic: the probability that a random positive scores above a random
    negative, a tie counting one half; computed from average ranks in ``O(N log N)``.

    Parameters
    ----------
    scores : array_like, shape (N,)
        Finite.
    positives : array_like of bool, shape (N,)
        At least one positive and one negative.

    Returns
    -------
    float
        1: every positive above every negative; 0.5: chance; 0: the reverse.
    """
    scores = _as_vector(scores, "scores")
    positives = _as_mask(positives, "positives", scores.size)
    return _auc(scores, positives, "positives")


def _auc(scores: np.ndarray, positives: np.ndarray, name: str) -> float:
    num_pos = int(np.count_nonzero(positives))
    num_neg = positives.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"{name}: expected both positive and negative examples, got {num_pos} of "
            f"{positives.size} positive; the AUC is undefined"
        )
    rank_sum = float(np.sum(average_ranks(scores)[positives]))
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


# ------------------------------------------------------------------------------ mislabels
@dataclass(frozen=True)
class DetectionCurve:
    """How early one ranking (highest score first) finds the flipped examples.

    Attributes
    ----------
    name : str
        ``"influence"``, ``"loss"`` or ``"gradient_norm"``.
    auc : float
        ROC AUC of the score as a detector of flipped examples (ties count one half).
    found : dict of float to float
        Fraction of the flipped examples among the top ``round(f · N)`` examples, for each
        inspected fraction ``f``.
    inspected : numpy.ndarray, shape (N + 1,)
        ``0, 1/N, …, 1``: fraction of the data inspected.
    recall : numpy.ndarray, shape (N + 1,)
        Fraction of the flipped examples found after inspecting ``inspected``. Where tied
        scores straddle the cut, the expected value over the orders of the tied examples:
        the tied group's flipped count times the share of the group inspected.
    """

    name: str
    auc: float
    found: dict[float, float]
    inspected: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class MislabelDetection:
    """Mislabel detection by influence scores, beside the baselines that were given.

    Attributes
    ----------
    influence : DetectionCurve
        Ranking by ``scores``.
    loss : DetectionCurve or None
        Ranking by training loss (``losses=``), the baseline to beat.
    gradient_norm : DetectionCurve or None
        Ranking by per-example gradient norm (``gradient_norms=``).
    num_examples : int
        N.
    num_flipped : int
        Flipped examples among the N.
    fractions : tuple of float
        The inspected fractions of ``found``.
    """

    influence: DetectionCurve
    loss: DetectionCurve | None
    gradient_norm: DetectionCurve | None
    num_examples: int
    num_flipped: int
    fractions: tuple[float, ...]

    @property
    def curves(self) -> dict[str, DetectionCurve]:
        """The rankings computed, by name, influence first."""
        candidates = (self.influence, self.loss, self.gradient_norm)
        return {curve.name: curve for curve in candidates if curve is not None}

    def table(self) -> str:
        """A plain-text table: one row per ranking, AUC and fraction found.

        Returns
        -------
        str
        """
        head = "".join(f"{f'{100 * f:g} %':>8}" for f in self.fractions)
        lines = [f"{'ranking':<15}{'AUC':>8}   found after inspecting", f"{'':<26}{head}"]
        for curve in self.curves.values():
            found = "".join(f"{f'{100 * curve.found[f]:.0f} %':>8}" for f in self.fractions)
            lines.append(f"{curve.name:<15}{curve.auc:>8.4f}   {found}")
        return "\n".join(lines)


def mislabel_detection(
    scores: Any,
    flipped: Any,
    *,
    losses: Any = None,
    gradient_norms: Any = None,
    fractions: Sequence[float] = (0.05, 0.1, 0.2),
) -> MislabelDetection:
    """Rank examples by ``scores`` (highest first) and measure how early flipped labels come.

    Parameters
    ----------
    scores : array_like, shape (N,)
        Higher = more suspicious, e.g. self-influence ``g_xᵀ H⁻¹ g_x``. Finite.
    flipped : array_like of bool, shape (N,)
        Which examples carry a wrong label; at least one flipped and one clean.
    losses : array_like, shape (N,), optional
        Per-example training losses: the loss-only baseline (higher = more suspicious).
    gradient_norms : array_like, shape (N,), optional
        Per-example gradient norms ``‖∇L(x)‖``: the gradient-norm baseline.
    fractions : sequence of float
        Fractions of the data inspected, each in (0, 1].

    Returns
    -------
    MislabelDetection

    Raises
    ------
    ValueError
        On shape mismatches, non-finite values, no flipped or only flipped examples, or a
        fraction outside (0, 1].
    """
    scores = _as_vector(scores, "scores")
    n = scores.size
    flipped = _as_mask(flipped, "flipped", n)
    num_flipped = int(np.count_nonzero(flipped))
    if num_flipped == 0:
        raise ValueError("flipped: no example is flipped; detection is undefined")
    if num_flipped == n:
        raise ValueError(f"flipped: all {n} examples are flipped; detection is undefined")
    fractions = tuple(float(f) for f in fractions)
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions: expected values in (0, 1], got {f!r}")

    def curve(name: str, values: np.ndarray) -> DetectionCurve:
        recall = _expected_recall(values, flipped)
        found = {f: float(recall[round(f * n)]) for f in fractions}
        inspected = np.arange(n + 1, dtype=np.float64) / n
        return DetectionCurve(name, _auc(values, flipped, "flipped"), found, inspected, recall)

    baselines = {}
    for name, values in (("loss", losses), ("gradient_norm", gradient_norms)):
        label = "losses" if name == "loss" else "gradient_norms"
        baselines[name] = None if values is None else curve(name, _as_vector(values, label, n))
    return MislabelDetection(
        curve("influence", scores),
        baselines["loss"],
        baselines["gradient_norm"],
        n,
        num_flipped,
        fractions,
    )


def _expected_recall(scores: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Fraction of flipped examples among the top m, m = 0 … N; ties split pro rata."""
    n = scores.size
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], flipped[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    stops = np.append(starts[1:], n)
    before = np.concatenate([[0], np.cumsum(hits)])  # flipped among the first m, stable order
    m = np.arange(1, n + 1)
    group = np.searchsorted(starts, m - 1, side="right") - 1  # the tie group of position m-1
    start, stop = starts[group], stops[group]
    in_group = before[stop] - before[start]
    expected = before[start] + in_group * (m - start) / (stop - start)
    return np.concatenate([[0.0], expected]) / np.count_nonzero(flipped)


# ------------------------------------------------------------------------------ agreement
@dataclass(frozen=True)
class Agreement:
    """How closely a (Q, N) score matrix matches a reference (e.g. exact influence).

    Attributes
    ----------
    spearman : numpy.ndarray, shape (Q,)
        Spearman's ρ of each query's row against the reference row; NaN where a row is
        constant.
    spearman_mean, spearman_median : float
        Over the queries where ρ is defined (NaN if none).
    pearson : float
        Pearson correlation of the two matrices, all entries together.
    sign_agreement : float
        Fraction of entries whose sign matches the reference, over the entries where the
        reference is not exactly zero (NaN if it is zero everywhere).
    top_k_proponents, top_k_opponents : numpy.ndarray, shape (Q,)
        Per query, ``|A ∩ B| / k`` for the k largest (proponents) or k most negative
        (opponents) entries of each row; ties at the cut are broken by lower index.
    top_k_proponents_mean, top_k_opponents_mean : float
        Their means over queries.
    scale : float
        The least-squares ``a`` in ``reference ≈ a · scores``: ``⟨s, r⟩ / ⟨s, s⟩``. Near 1
        when the scores have the reference's scale.
    k : int
    """

    spearman: np.ndarray = field(repr=False)
    spearman_mean: float
    spearman_median: float
    pearson: float
    sign_agreement: float
    top_k_proponents: np.ndarray = field(repr=False)
    top_k_opponents: np.ndarray = field(repr=False)
    top_k_proponents_mean: float
    top_k_opponents_mean: float
    scale: float
    k: int


def agreement(scores: Any, exact_scores: Any, *, k: int = 10) -> Agreement:
    """Compare influence scores with a reference, query by query and as a whole.

    Parameters
    ----------
    scores : array_like, shape (Q, N) or (N,)
        ``scores[i, j] = I(x_j, z_i)``, e.g. from ``calc.influence_matrix``; a vector
        (self-influence, say) is one query.
    exact_scores : array_like, same shape
        The reference, e.g. :func:`krylov_influence.exact.exact_influence`.
    k : int
        Size of the top-k sets compared, ``1 ≤ k ≤ N``.

    Returns
    -------
    Agreement

    Raises
    ------
    ValueError
        On a shape mismatch, non-finite values, fewer than 2 columns, or ``k`` out of range.
    """
    s = _as_matrix(scores, "scores")
    r = _as_matrix(exact_scores, "exact_scores")
    if s.shape != r.shape:
        raise ValueError(f"scores, exact_scores: expected equal shapes, got {s.shape}, {r.shape}")
    n = s.shape[1]
    if n < 2:
        raise ValueError(f"scores: expected at least 2 training examples (columns), got {n}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k={k!r}: expected an integer with 1 <= k <= N = {n}")
    k = int(k)

    rho = _pearson(average_ranks(s), average_ranks(r))
    defined = rho[~np.isnan(rho)]
    pearson = float(_pearson(s.reshape(-1), r.reshape(-1)))
    nonzero = r != 0
    sign = float(np.mean(np.sign(s[nonzero]) == np.sign(r[nonzero]))) if nonzero.any() else math.nan

    def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]
        top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
        return np.array([np.intersect1d(x, y).size / k for x, y in zip(top_a, top_b)])

    pros, cons = overlap(s, r), overlap(-s, -r)
    norm = float(np.sum(s * s))
    return Agreement(
        spearman=rho,
        spearman_mean=float(np.mean(defined)) if defined.size else math.nan,
        spearman_median=float(np.median(defined)) if defined.size else math.nan,
        pearson=pearson,
        sign_agreement=sign,
        top_k_proponents=pros,
        top_k_opponents=cons,
        top_k_proponents_mean=float(np.mean(pros)),
        top_k_opponents_mean=float(np.mean(cons)),
        scale=float(np.sum(s * r)) / norm if norm > 0 else math.nan,
        k=k,
    )


# ------------------------------------------------------------------------------ LDS
@dataclass(frozen=True)
class LinearDatamodelingScore:
    """The linear datamodeling score and everything it was computed from.

    Attributes
    ----------
    score : float
        Mean of ``per_query`` over the queries where it is defined (NaN if none).
    per_query : numpy.ndarray, shape (Q,)
        Spearman's ρ, across subsets, between ``predictions[:, i]`` and ``outcomes[:, i]``;
        NaN for a query whose outcomes (or predictions) are the same for every subset.
    masks : numpy.ndarray of bool, shape (S, N)
        The training subsets: ``masks[s, j]`` is True when example ``j`` was kept.
    outcomes : numpy.ndarray, shape (S, Q)
        What ``retrain_and_evaluate(masks[s])`` returned.
    predictions : numpy.ndarray, shape (S, Q)
        What the scores predict: ``−Σ_{j kept} scores[i, j]`` for losses, ``+Σ`` for
        ``output="utility"``.
    output : {"loss", "utility"}
    """

    score: float
    per_query: np.ndarray = field(repr=False)
    masks: np.ndarray = field(repr=False)
    outcomes: np.ndarray = field(repr=False)
    predictions: np.ndarray = field(repr=False)
    output: str


def linear_datamodeling_score(
    scores: Any,
    retrain_and_evaluate: Callable[[np.ndarray], Any],
    *,
    num_subsets: int = 50,
    subset_fraction: float = 0.5,
    seed: int = 0,
    output: Literal["loss", "utility"] = "loss",
    show_progress: bool | None = None,
) -> LinearDatamodelingScore:
    """Retrain on random subsets and correlate predicted with actual query outputs (LDS).

    Draws ``num_subsets`` subsets of ``round(subset_fraction · N)`` training examples each
    (without replacement, from ``numpy.random.default_rng(seed)``), calls
    ``retrain_and_evaluate(mask)`` on each, predicts each subset's query outputs from the
    scores and returns the mean over queries of the Spearman correlation, across subsets,
    between prediction and outcome.

    Sign convention: a positive score ``I(x_j, z_i)`` says up-weighting ``x_j`` *lowers*
    the loss on ``z_i``. So with ``output="loss"`` (the default: ``retrain_and_evaluate``
    returns query losses) the prediction is ``−Σ_{j ∈ S} scores[i, j]``; with
    ``output="utility"`` (it returns something higher-is-better: log-probability of the
    label, margin, accuracy) it is ``+Σ_{j ∈ S} scores[i, j]``. Either way a good attribution
    gives an LDS near 1, and the wrong sign a negative one.

    Parameters
    ----------
    scores : array_like, shape (Q, N) or (N,)
        ``scores[i, j] = I(x_j, z_i)`` for the model trained on all N examples.
    retrain_and_evaluate : callable
        ``retrain_and_evaluate(mask) -> outputs``: ``mask`` is a bool array of shape (N,)
        (True = keep the example); train on those examples and return the Q query outputs,
        shape (Q,) (a scalar when Q = 1). It receives a fresh copy of the mask each time.
    num_subsets : int
        S ≥ 3: subsets, i.e. retrainings.
    subset_fraction : float
        In (0, 1): the share of the training set each subset keeps (the LDS literature uses
        0.5); ``round(subset_fraction · N)`` must be between 1 and N − 1.
    seed : int
        Seeds the subsets; the same seed gives the same masks.
    output : {"loss", "utility"}
        What ``retrain_and_evaluate`` returns (see the sign convention above).
    show_progress : bool, optional
        A tqdm bar over the retrainings; default: when standard error is a terminal.

    Returns
    -------
    LinearDatamodelingScore

    Raises
    ------
    ValueError
        On invalid arguments (each error names the argument), or when
        ``retrain_and_evaluate`` returns the wrong shape or a non-finite value.
    """
    s = _as_matrix(scores, "scores")
    q, n = s.shape
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, (int, np.integer)):
        raise ValueError(f"num_subsets={num_subsets!r}: expected an integer >= 3")
    if num_subsets < 3:
        raise ValueError(f"num_subsets={num_subsets!r}: expected an integer >= 3")
    if not isinstance(subset_fraction, (float, int, np.floating)) or not (
        0.0 < float(subset_fraction) < 1.0
    ):
        raise ValueError(f"subset_fraction={subset_fraction!r}: expected a number in (0, 1)")
    size = round(float(subset_fraction) * n)
    if not 1 <= size <= n - 1:
        raise ValueError(
            f"subset_fraction={subset_fraction!r}: keeps {size} of N = {n} examples; "
            "expected between 1 and N - 1"
        )
    if output not in ("loss", "utility"):
        raise ValueError(f"output={output!r}: expected 'loss' or 'utility'")
    if not callable(retrain_and_evaluate):
        raise TypeError(
            f"retrain_and_evaluate: expected a callable, got {type(retrain_and_evaluate).__name__}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer")

    rng = np.random.default_rng(int(seed))
    masks = np.zeros((int(num_subsets), n), dtype=bool)
    for row in masks:
        row[rng.choice(n, size=size, replace=False)] = True
    outcomes = np.empty((int(num_subsets), q))
    with progress_bar(resolve_show_progress(show_progress), len(masks), "LDS retraining") as bar:
        for index, mask in enumerate(masks):
            result = _as_float_array(retrain_and_evaluate(mask.copy()), "retrain_and_evaluate")
            if result.size != q or result.ndim > 1:
                raise ValueError(
                    f"retrain_and_evaluate: returned shape {result.shape} for subset {index}; "
                    f"expected ({q},), one output per query (row of scores)"
                )
            if not np.all(np.isfinite(result)):
                raise ValueError(
                    f"retrain_and_evaluate: returned non-finite outputs for subset {index}: "
                    f"{result.reshape(-1)}"
                )
            outcomes[index] = result.reshape(-1)
            bar.update(1)
    sign = -1.0 if output == "loss" else 1.0
    predictions = sign * (masks.astype(np.float64) @ s.T)  # (S, Q)
    per_query = _pearson(average_ranks(predictions.T), average_ranks(outcomes.T))
    defined = per_query[~np.isnan(per_query)]
    return LinearDatamodelingScore(
        score=float(np.mean(defined)) if defined.size else math.nan,
        per_query=per_query,
        masks=masks,
        outcomes=outcomes,
        predictions=predictions,
        output=output,
    )
