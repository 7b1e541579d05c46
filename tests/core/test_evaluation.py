"""``krylov_influence.evaluation``: AUC, Spearman, agreement and LDS against brute force.

The oracles are written out here independently of the module: pairwise counts for the AUC,
average ranks by counting for Spearman, expected recall under random tie-breaking by
counting, and a ridge regression whose retraining on a subset is closed-form for the LDS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import krylov_influence as ki
from krylov_influence.evaluation import (
    agreement,
    average_ranks,
    linear_datamodeling_score,
    mislabel_detection,
    roc_auc,
    spearman,
)
from krylov_influence.exact import exact_influence
from krylov_influence.reference import LinearRegression


# ------------------------------------------------------------------------------ oracles
def brute_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks by counting: #smaller + (#equal + 1) / 2."""
    less = (values[None, :] < values[:, None]).sum(axis=1)
    equal = (values[None, :] == values[:, None]).sum(axis=1)
    return less + (equal + 1) / 2


def brute_spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = brute_ranks(a), brute_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(np.sum(ra * rb) / np.sqrt(np.sum(ra**2) * np.sum(rb**2)))


def brute_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Over every (positive, negative) pair: 1 if the positive scores higher, ½ if tied."""
    pos, neg = scores[positives][:, None], scores[~positives][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def brute_expected_recall(scores: np.ndarray, flipped: np.ndarray, m: int) -> float:
    """Expected share of flipped examples in the top m when ties are ordered at random."""
    total = 0.0
    for i in np.flatnonzero(flipped):
        above = np.sum(scores > scores[i])
        tied = np.sum(scores == scores[i])  # includes i
        total += float(np.clip((m - above) / tied, 0.0, 1.0))
    return total / np.count_nonzero(flipped)


small_ints = st.lists(st.integers(-3, 3), min_size=2, max_size=40)


# ------------------------------------------------------------------------------ ranks, AUC
@given(small_ints)
def test_average_ranks_against_counting(values: list[int]) -> None:
    array = np.asarray(values, dtype=float)
    np.testing.assert_array_equal(average_ranks(array), brute_ranks(array))


@given(st.data())
def test_auc_against_pairwise_count_with_ties(data: st.DataObject) -> None:
    scores = np.asarray(data.draw(small_ints), dtype=float)
    flipped = np.asarray(
        data.draw(st.lists(st.booleans(), min_size=scores.size, max_size=scores.size))
    )
    if not 0 < flipped.sum() < flipped.size:
        with pytest.raises(ValueError, match="positives: expected both"):
            roc_auc(scores, flipped)
        return
    assert roc_auc(scores, flipped) == pytest.approx(brute_auc(scores, flipped), abs=1e-12)
    result = mislabel_detection(scores, flipped, fractions=(0.25, 0.5, 1.0))
    assert result.influence.auc == pytest.approx(brute_auc(scores, flipped), abs=1e-12)
    for m in range(scores.size + 1):
        assert result.influence.recall[m] == pytest.approx(
            brute_expected_recall(scores, flipped, m), abs=1e-12
        )


@given(st.data())
def test_spearman_against_brute_force_with_ties(data: st.DataObject) -> None:
    a = np.asarray(data.draw(small_ints), dtype=float)
    b = np.asarray(
        data.draw(st.lists(st.integers(-2, 2), min_size=a.size, max_size=a.size)), dtype=float
    )
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        assert np.isnan(spearman(a, b))
        return
    assert spearman(a, b) == pytest.approx(brute_spearman(a, b), abs=1e-12)


def test_spearman_rows_and_scipy_convention() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (5, 12)), rng.integers(0, 4, (5, 12))
    rows = spearman(a, b)
    assert isinstance(rows, np.ndarray) and rows.shape == (5,)
    for row_a, row_b, rho in zip(a, b, rows):
        assert rho == pytest.approx(brute_spearman(row_a, row_b), abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="b: 1 non-finite value"):
        spearman([1, 2, 3], [1, np.nan, 2])
    with pytest.raises(ValueError, match="a, b: expected equal shapes"):
        spearman([1, 2, 3], [1, 2])


# ------------------------------------------------------------------------------ mislabels
def test_mislabel_detection_reports_the_baselines() -> None:
    rng = np.random.default_rng(1)
    flipped = np.zeros(200, dtype=bool)
    flipped[rng.choice(200, 20, replace=False)] = True
    influence = rng.standard_normal(200) + 3.0 * flipped
    losses = rng.standard_normal(200) + 1.0 * flipped
    norms = np.abs(rng.standard_normal(200))
    result = mislabel_detection(influence, flipped, losses=losses, gradient_norms=norms)
    assert list(result.curves) == ["influence", "loss", "gradient_norm"]
    assert result.influence.auc > result.loss.auc > 0.5  # type: ignore[union-attr]
    assert result.gradient_norm.auc == pytest.approx(brute_auc(norms, flipped))  # type: ignore[union-attr]
    assert (result.num_examples, result.num_flipped) == (200, 20)
    order = np.argsort(-influence)
    for f in result.fractions:
        top = order[: round(f * 200)]
        assert result.influence.found[f] == pytest.approx(flipped[top].sum() / 20)
    curve = result.influence
    assert curve.inspected.shape == curve.recall.shape == (201,)
    assert curve.recall[0] == 0.0 and curve.recall[-1] == pytest.approx(1.0)
    assert np.all(np.diff(curve.recall) >= 0)
    table = result.table().splitlines()
    assert table[2].split()[:2] == ["influence", f"{result.influence.auc:.4f}"]
    assert table[3].startswith("loss") and table[4].startswith("gradient_norm")
    without = mislabel_detection(influence, flipped)
    assert without.loss is None and without.gradient_norm is None
    assert list(without.curves) == ["influence"]


def test_mislabel_detection_all_tied_is_chance() -> None:
    flipped = np.arange(10) < 3
    result = mislabel_detection(np.ones(10), flipped, fractions=(0.1, 0.5))
    assert result.influence.auc == 0.5
    assert result.influence.found == {0.1: pytest.approx(0.1), 0.5: pytest.approx(0.5)}
    np.testing.assert_allclose(result.influence.recall, np.linspace(0, 1, 11))


def test_mislabel_detection_takes_lists_and_other_array_libraries() -> None:
    xp = pytest.importorskip("array_api_strict")
    scores = [0.1, 0.9, 0.3, 0.7]
    flipped = [0, 1, 0, 1]
    assert mislabel_detection(scores, flipped).influence.auc == 1.0
    as_strict = xp.asarray(scores, dtype=xp.float64)
    assert mislabel_detection(as_strict, np.asarray(flipped, bool)).influence.auc == 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scores": np.ones((2, 3))}, ValueError, r"scores: expected shape \(N,\)"),
        ({"flipped": [True, False]}, ValueError, r"flipped: expected shape \(4,\)"),
        ({"flipped": [0, 2, 0, 1]}, ValueError, "flipped: expected booleans"),
        ({"flipped": [False] * 4}, ValueError, "flipped: no example is flipped"),
        ({"flipped": [True] * 4}, ValueError, "flipped: all 4 examples are flipped"),
        ({"scores": [0.0, np.nan, 1.0, 2.0]}, ValueError, "scores: 1 non-finite value"),
        ({"losses": [1.0, 2.0]}, ValueError, r"losses: expected shape \(4,\) like scores"),
        ({"gradient_norms": [1, 2, np.inf, 0]}, ValueError, "gradient_norms: 1 non-finite"),
        ({"fractions": (0.5, 0.0)}, ValueError, r"fractions: expected values in \(0, 1\]"),
        ({"scores": ["a", "b", "c", "d"]}, TypeError, "scores: expected an array of numbers"),
    ],
)
def test_mislabel_detection_errors(kwargs: dict, error: type, message: str) -> None:
    arguments = {"scores": [0.1, 0.9, 0.3, 0.7], "flipped": [False, True, False, True]}
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        mislabel_detection(arguments.pop("scores"), arguments.pop("flipped"), **arguments)


# ------------------------------------------------------------------------------ agreement
def test_agreement_identical_scaled_and_reversed() -> None:
    exact = np.random.default_rng(2).standard_normal((4, 30))
    same = agreement(exact, exact, k=5)
    assert same.spearman_mean == same.spearman_median == pytest.approx(1.0)
    assert same.pearson == pytest.approx(1.0) and same.scale == pytest.approx(1.0)
    assert same.sign_agreement == 1.0
    assert same.top_k_proponents_mean == same.top_k_opponents_mean == 1.0
    half = agreement(2.0 * exact, exact, k=5)  # twice too large: reference ≈ 0.5 · scores
    assert half.scale == pytest.approx(0.5) and half.spearman_mean == pytest.approx(1.0)
    flipped = agreement(-exact, exact, k=5)
    np.testing.assert_allclose(flipped.spearman, -1.0)
    assert flipped.sign_agreement == 0.0 and flipped.scale == pytest.approx(-1.0)
    # Reversed: the proponents are the reference's opponents, so no overlap.
    assert flipped.top_k_proponents_mean == flipped.top_k_opponents_mean == 0.0


def test_agreement_constructed_overlaps_and_signs() -> None:
    exact = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    # Proponents {0, 1, 2} vs {0, 1, 5}: 2 of 3. Opponents {8, 7, 6} vs {8, 7, 3}: 2 of 3.
    scores = np.array([[9.0, 8.0, 0.5, -5.0, 0.0, 7.0, -0.1, -6.0, -9.0]])
    result = agreement(scores, exact, k=3)
    np.testing.assert_allclose(result.top_k_proponents, [2 / 3])
    np.testing.assert_allclose(result.top_k_opponents, [2 / 3])
    # Signs: the reference's zero (index 5) is ignored; index 3 (-5 vs 2) and index 4
    # (0 vs 1) disagree: 6 of 8.
    assert result.sign_agreement == pytest.approx(6 / 8)
    assert result.spearman_mean == pytest.approx(brute_spearman(scores[0], exact[0]))
    assert result.pearson == pytest.approx(np.corrcoef(scores[0], exact[0])[0, 1])
    assert result.scale == pytest.approx(scores[0] @ exact[0] / (scores[0] @ scores[0]))


def test_agreement_vectors_and_constant_rows() -> None:
    result = agreement([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], k=1)  # a vector is one query
    assert result.spearman.shape == (1,) and result.spearman[0] == pytest.approx(0.5)
    constant = agreement(
        [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], k=2
    )
    assert np.isnan(constant.spearman[1]) and constant.spearman_mean == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("scores", "exact", "k", "message"),
    [
        (np.ones((2, 3)), np.ones((2, 4)), 1, "scores, exact_scores: expected equal shapes"),
        (np.ones((2, 3)), np.ones((2, 3)), 4, r"k=4: expected an integer with 1 <= k <= N = 3"),
        (np.ones((2, 3)), np.ones((2, 3)), 0, "k=0"),
        (np.ones((2, 1)), np.ones((2, 1)), 1, "scores: expected at least 2 training examples"),
        (np.ones((2, 2, 2)), np.ones((2, 2, 2)), 1, r"scores: expected shape \(Q, N\)"),
        (np.ones((2, 3)), np.full((2, 3), np.inf), 1, "exact_scores: 6 non-finite"),
    ],
)
def test_agreement_errors(scores, exact, k, message) -> None:
    with pytest.raises(ValueError, match=message):
        agreement(scores, exact, k=k)


# ------------------------------------------------------------------------------ LDS
class Ridge:
    """A ridge regression whose refit on any subset is closed-form.

    The reference engine's ``LinearRegression`` has per-example loss
    ``½ (zᵀθ − y)² + ½ l2 ‖θ‖²`` with ``z = [x, 1]``; the mean over a subset S of size m is
    minimised by ``(Z_Sᵀ Z_S / m + l2 I) θ = Z_Sᵀ y_S / m``.
    """

    def __init__(self, seed: int = 0, n: int = 150, d: int = 5, queries: int = 20):
        rng = np.random.default_rng(seed)
        w = rng.standard_normal(d)
        x = rng.standard_normal((n + queries, d))
        y = x @ w + 0.5 * rng.standard_normal(n + queries)
        # A few large residuals so that examples differ in how much they matter.
        y[: n // 10] += 3.0 * rng.standard_normal(n // 10)
        self.x, self.y = x[:n], y[:n]
        self.xq, self.yq = x[n:], y[n:]
        self.l2 = 0.05
        self.theta = self.refit(np.ones(n, dtype=bool))

    def refit(self, mask: np.ndarray) -> np.ndarray:
        z = np.hstack([self.x[mask], np.ones((int(mask.sum()), 1))])
        m = z.shape[0]
        return np.linalg.solve(z.T @ z / m + self.l2 * np.eye(z.shape[1]), z.T @ self.y[mask] / m)

    def query_losses(self, mask: np.ndarray) -> np.ndarray:
        """Each query's per-example loss (the model's own, L2 term included) after a refit."""
        theta = self.refit(mask)
        residual = self.xq @ theta[:-1] + theta[-1] - self.yq
        return 0.5 * residual**2 + 0.5 * self.l2 * theta @ theta

    def exact_scores(self) -> np.ndarray:
        """Exact influence of every training example on every query, (Q, N)."""
        model = ki.InfluenceModel(
            LinearRegression(self.theta[:-1], self.theta[-1], l2=self.l2), dtype="float64"
        )
        train = [(self.x[i : i + 64], self.y[i : i + 64]) for i in range(0, len(self.y), 64)]
        return exact_influence(model, train, [(self.xq, self.yq)])


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


def test_lds_of_exact_influence_on_ridge_is_high(ridge: Ridge) -> None:
    scores = ridge.exact_scores()
    assert scores.shape == (20, 150)
    result = linear_datamodeling_score(scores, ridge.query_losses, num_subsets=50, seed=0)
    # Measured (data seeds 0-5 of Ridge): LDS 0.860 0.923 0.874 0.840 0.833 0.870. Exact
    # first-order influence on a convex model whose retraining is exact; what it misses is
    # second order, which matters for queries the model already fits well: a squared loss
    # at a residual near 0 moves quadratically. On the half of the queries with the larger
    # residuals the per-query LDS is 0.96-0.98 on average (min 0.82 over the six seeds).
    assert result.score > 0.75, result.per_query
    theta = ridge.theta
    residuals = np.abs(ridge.xq @ theta[:-1] + theta[-1] - ridge.yq)
    large = residuals >= np.median(residuals)
    assert np.mean(result.per_query[large]) > 0.9, result.per_query[large]
    assert result.per_query.shape == (20,)
    assert result.masks.shape == (50, 150) and result.masks.dtype == np.bool_
    assert np.all(result.masks.sum(axis=1) == 75)
    assert result.outcomes.shape == result.predictions.shape == (50, 20)
    # The sign convention: positive scores lower the loss, so the loss is predicted by −Σ.
    np.testing.assert_allclose(result.predictions, -(result.masks @ scores.T))
    for q in (0, 7):
        assert result.per_query[q] == pytest.approx(
            brute_spearman(result.predictions[:, q], result.outcomes[:, q])
        )


def test_lds_sign_convention_and_shuffled_scores(ridge: Ridge) -> None:
    scores = ridge.exact_scores()
    right = linear_datamodeling_score(scores, ridge.query_losses, seed=3)
    # Scores of the wrong sign (e.g. the minus-sign convention of other libraries) give -LDS.
    wrong = linear_datamodeling_score(-scores, ridge.query_losses, seed=3)
    assert wrong.score == pytest.approx(-right.score)
    # A higher-is-better output (the negated loss) with output="utility": the same LDS.
    utility = linear_datamodeling_score(
        scores, lambda mask: -ridge.query_losses(mask), seed=3, output="utility"
    )
    assert utility.score == pytest.approx(right.score)
    # Scores shuffled across training examples carry no information: LDS near 0 (the spread
    # of a mean of 20 Spearman ρ over 50 subsets is about 0.14 / √20 ≈ 0.03).
    shuffled = np.random.default_rng(4).permuted(scores, axis=1)
    noise = linear_datamodeling_score(shuffled, ridge.query_losses, seed=3)
    assert abs(noise.score) < 0.15, noise.score


def test_lds_is_seeded_and_passes_a_fresh_mask() -> None:
    seen = []

    def evaluate(mask: np.ndarray) -> np.ndarray:
        seen.append(mask.copy())
        mask[:] = False  # mutating the argument must not change the recorded subsets
        return np.array([float(seen[-1][:5].sum()), float(len(seen))])

    scores = np.random.default_rng(5).standard_normal((2, 10))
    first = linear_datamodeling_score(scores, evaluate, num_subsets=6, subset_fraction=0.3)
    np.testing.assert_array_equal(first.masks, np.stack(seen))
    assert np.all(first.masks.sum(axis=1) == 3)
    again = linear_datamodeling_score(scores, evaluate, num_subsets=6, subset_fraction=0.3)
    other = linear_datamodeling_score(scores, evaluate, num_subsets=6, subset_fraction=0.3, seed=1)
    np.testing.assert_array_equal(first.masks, again.masks)
    assert not np.array_equal(first.masks, other.masks)


def test_lds_constant_outcomes_are_nan() -> None:
    scores = np.random.default_rng(6).standard_normal((2, 10))
    result = linear_datamodeling_score(
        scores, lambda mask: np.array([1.0, mask[:5].sum()]), num_subsets=8
    )
    assert np.isnan(result.per_query[0]) and not np.isnan(result.per_query[1])
    assert result.score == result.per_query[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_subsets": 2}, "num_subsets=2: expected an integer >= 3"),
        ({"num_subsets": 5.0}, "num_subsets=5.0: expected an integer"),
        ({"subset_fraction": 1.0}, r"subset_fraction=1.0: expected a number in \(0, 1\)"),
        ({"subset_fraction": 0.01}, "subset_fraction=0.01: keeps 0 of N = 10 examples"),
        ({"seed": -1}, "seed=-1: expected a non-negative integer"),
        ({"output": "accuracy"}, "output='accuracy': expected 'loss' or 'utility'"),
        ({"scores": np.ones((2, 10)) * np.nan}, "scores: 20 non-finite"),
        ({"retrain_and_evaluate": lambda m: np.ones(3)}, r"returned shape \(3,\) for subset 0"),
        ({"retrain_and_evaluate": lambda m: np.array([1, np.nan])}, "returned non-finite"),
    ],
)
def test_lds_errors(kwargs: dict, message: str) -> None:
    arguments = {"scores": np.ones((2, 10)), "retrain_and_evaluate": lambda m: np.ones(2)}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        linear_datamodeling_score(
            arguments.pop("scores"), arguments.pop("retrain_and_evaluate"), **arguments
        )


def test_lds_rejects_a_non_callable() -> None:
    with pytest.raises(TypeError, match="retrain_and_evaluate: expected a callable"):
        linear_datamodeling_score(np.ones((1, 4)), "train.py")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the docs
def test_docs_example_prints_what_the_page_shows() -> None:
    """docs/evaluation.md's example runs as printed and gives the output printed under it."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text("utf-8")
    code = re.findall(r"```python\n(.*?)```", page, re.S)[-1]
    shown = re.search(r"Output:\n\n```text\n(.*?)```", page, re.S)
    assert shown is not None
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "backends")])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown.group(1)
