"""The demo's picture, drawn with matplotlib's object API on the Agg canvas (no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from krylov_influence.demo.data import DigitsData
from krylov_influence.demo.metrics import INSPECTED_FRACTIONS, Detection, Neighbours

__all__ = ["draw_demo"]

# Red means one thing only: a flipped training label (frame and histogram). Proponents are
# blue, opponents purple; a misclassified test digit says so in words.
FLIPPED = "#c0392b"
CLEAN = "#2c3e50"
ACCENT = "#2471a3"
OPPONENT = "#7d3c98"
MUTED = "#95a5a6"
NUM_TOP = 12


def draw_demo(
    path: Path,
    *,
    data: DigitsData,
    self_influence: np.ndarray,
    by_influence: Detection,
    by_loss: Detection,
    eigenbasis: Any,
    by_gradient_norm: Detection | None = None,
    queries: np.ndarray,
    test_predictions: np.ndarray,
    neighbours: list[Neighbours],
    title: str,
) -> None:
    """Draw the four panels of the demo and save them as a PNG.

    Panels: the training digits of highest self-influence (given and true labels), the
    detection curve (self-influence against training loss, gradient norm and chance), the
    Ritz spectrum with the kept eigenvalues and the damping, and the proponents and
    opponents of a few test digits.

    Parameters
    ----------
    path : pathlib.Path
        Where the PNG goes.
    data : DigitsData
    self_influence : numpy.ndarray, shape (N,)
    by_influence, by_loss : Detection
        Rankings by self-influence and by training loss.
    by_gradient_norm : Detection, optional
        Ranking by per-example gradient norm, drawn when given.
    eigenbasis : EigenBasis
        The calculator's fitted eigenbasis (``ritz.spectrum``, ``eigenvalues``, ``damping``).
    queries : numpy.ndarray of int, shape (Q,)
        Test indices.
    test_predictions : numpy.ndarray of int, shape (M,)
    neighbours : list of Neighbours, length Q
    title : str
    """
    from matplotlib.figure import Figure

    num_cols = 1 + 2 * max(len(n.proponents) for n in neighbours)
    # Fixed margins rather than layout="constrained": the constrained solver draws the
    # figure an extra time, which doubled the cost of this stage with 40-odd axes.
    figure = Figure(figsize=(13, 4.95 + 1.3 * len(queries)))
    # An array of 4 subfigures (typed as "array or one subfigure").
    panels: Any = figure.subfigures(
        4, 1, height_ratios=[0.35, 1.15, 2.3, 1.3 * len(queries)], hspace=0.0
    )
    heading, top, middle, bottom = panels
    heading.text(0.5, 0.5, title, ha="center", va="center", fontsize=13, fontweight="bold")
    _top_self_influence(top, data, self_influence)
    left, centre, right = middle.subplots(
        1, 3, gridspec_kw={"left": 0.06, "right": 0.98, "bottom": 0.24, "top": 0.88, "wspace": 0.3}
    )
    _detection_curve(left, by_influence, by_loss, by_gradient_norm, data)
    _spectrum(centre, eigenbasis)
    _histogram(right, self_influence, data.flipped)
    _neighbours(bottom, data, queries, test_predictions, neighbours, num_cols)
    figure.savefig(path, dpi=100)


def _digit(axis: Any, image: np.ndarray, label: str, color: str) -> None:
    axis.imshow(image, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
    axis.set_title(label, fontsize=8, color=color, pad=2)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(1.5 if color == FLIPPED else 0.5)


def _top_self_influence(figure: Any, data: DigitsData, self_influence: np.ndarray) -> None:
    order = np.argsort(-self_influence, kind="stable")[:NUM_TOP]
    flipped_shown = int(np.count_nonzero(data.flipped[order]))
    figure.suptitle(
        f"The {NUM_TOP} training digits of highest self-influence "
        f"({flipped_shown} of them have a flipped label)",
        fontsize=10,
    )
    _frame_legend(figure)
    grid = {"left": 0.02, "right": 0.98, "bottom": 0.02, "top": 0.62, "wspace": 0.35}
    for axis, index in zip(figure.subplots(1, NUM_TOP, gridspec_kw=grid), order):
        flipped = bool(data.flipped[index])
        label = f"given {data.y_train[index]}\ntrue {data.y_train_true[index]}"
        _digit(axis, data.images_train[index], label, FLIPPED if flipped else CLEAN)


def _frame_legend(figure: Any) -> None:
    """The key to the digits' frames, top right of a row of digits."""
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor="none", edgecolor=FLIPPED, lw=1.5, label="red frame: flipped label"),
        Patch(facecolor="none", edgecolor=CLEAN, lw=0.5, label="thin frame: label as given"),
    ]
    figure.legend(handles=handles, loc="upper right", fontsize=7, ncols=2, frameon=False)


def _detection_curve(
    axis: Any,
    by_influence: Detection,
    by_loss: Detection,
    by_gradient_norm: Detection | None,
    data: Any,
) -> None:
    share = data.num_flipped / data.num_train
    axis.plot(
        by_influence.inspected,
        by_influence.recall,
        color=ACCENT,
        lw=2,
        label=f"self-influence (AUC {by_influence.auc:.3f})",
    )
    axis.plot(
        by_loss.inspected,
        by_loss.recall,
        color="#e67e22",
        lw=1.3,
        label=f"training loss (AUC {by_loss.auc:.3f})",
    )
    if by_gradient_norm is not None:
        axis.plot(
            by_gradient_norm.inspected,
            by_gradient_norm.recall,
            color="#27ae60",
            lw=1.1,
            ls="-.",
            label=f"gradient norm (AUC {by_gradient_norm.auc:.3f})",
        )
    grid = np.linspace(0.0, 1.0, 201)
    axis.plot(grid, np.minimum(1.0, grid / share), ":", color=MUTED, label="ideal")
    axis.plot(grid, grid, "--", color=MUTED, lw=1, label="random")
    for fraction in INSPECTED_FRACTIONS:
        found = by_influence.found[fraction]
        axis.plot([fraction], [found], "o", color=ACCENT, ms=4)
        axis.annotate(
            f"{100 * found:.0f} %",
            (fraction, found),
            textcoords="offset points",
            xytext=(6, -10),
            fontsize=8,
        )
    axis.set_xlim(0, 0.5)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("fraction of training set inspected\n(highest score first)")
    axis.set_ylabel("fraction of flipped labels found")
    axis.set_title("Finding the flipped labels", fontsize=10)
    axis.legend(fontsize=7, loc="lower right")
    axis.grid(alpha=0.3)


def _spectrum(axis: Any, eigenbasis: Any) -> None:
    spectrum = np.asarray(eigenbasis.ritz.spectrum)
    kept = np.asarray(eigenbasis.eigenvalues)
    rank = np.arange(1, spectrum.size + 1)
    is_kept = np.isin(spectrum, kept)
    magnitude = np.abs(spectrum)
    floor = max(float(magnitude.max()) * 1e-8, np.finfo(np.float64).tiny)
    shown = np.maximum(magnitude, floor)
    negative = spectrum < 0
    axis.semilogy(rank[~is_kept], shown[~is_kept], ".", color=MUTED, ms=3, label="not kept")
    axis.semilogy(rank[is_kept], shown[is_kept], ".", color=ACCENT, ms=4, label="kept")
    if np.any(negative):
        axis.semilogy(
            rank[negative], shown[negative], "x", color=CLEAN, ms=4, label="negative (|λ|)"
        )
    if eigenbasis.damping > 0:
        axis.axhline(
            eigenbasis.damping,
            color="#7f8c8d",
            lw=1,
            ls="--",
            label=f"damping {eigenbasis.damping:g}",
        )
    axis.set_xlabel("Ritz value, by decreasing |λ|")
    axis.set_ylabel("|λ|")
    axis.set_title(f"Hessian spectrum: {spectrum.size} Ritz values, {kept.size} kept", fontsize=10)
    axis.legend(fontsize=7, loc="upper right")
    axis.grid(alpha=0.3, which="both")


def _histogram(axis: Any, self_influence: np.ndarray, flipped: np.ndarray) -> None:
    positive = np.maximum(self_influence, np.finfo(np.float64).tiny)
    bins = np.geomspace(positive.min(), positive.max(), 40)
    axis.hist(positive[~flipped], bins=bins, color=CLEAN, alpha=0.6, label="clean label")
    axis.hist(positive[flipped], bins=bins, color=FLIPPED, alpha=0.7, label="flipped label")
    axis.set_xscale("log")
    axis.set_xlabel("self-influence  gᵀ H⁻¹ g")
    axis.set_ylabel("training digits")
    axis.set_title("Self-influence, clean vs flipped", fontsize=10)
    axis.legend(fontsize=7)


def _neighbours(
    figure: Any,
    data: DigitsData,
    queries: np.ndarray,
    test_predictions: np.ndarray,
    neighbours: list[Neighbours],
    num_cols: int,
) -> None:
    figure.suptitle(
        "Test digits (left, by index as in the console), their strongest proponents (blue "
        "scores: up-weighting them lowers the test loss) and opponents (purple scores)",
        fontsize=10,
    )
    grid = {"left": 0.05, "right": 0.95, "bottom": 0.02, "top": 0.9, "hspace": 0.55}
    axes = figure.subplots(len(queries), num_cols, squeeze=False, gridspec_kw=grid)
    for row, (query, near) in zip(axes, zip(queries, neighbours)):
        truth, predicted = int(data.y_test[query]), int(test_predictions[query])
        verdict = f"predicted {predicted}" if truth == predicted else f"WRONG: {predicted}"
        _digit(row[0], data.images_test[query], f"test #{query}: {truth}\n{verdict}", CLEAN)
        cells = [(i, s, ACCENT) for i, s in zip(near.proponents, near.proponent_scores)]
        cells += [(i, s, OPPONENT) for i, s in zip(near.opponents, near.opponent_scores)]
        for axis, (index, score, tone) in zip(row[1:], cells):
            given, true = int(data.y_train[index]), int(data.y_train_true[index])
            label = f"{score:+.2g}\ngiven {given}" + (f" (true {true})" if given != true else "")
            _digit(axis, data.images_train[index], label, FLIPPED if given != true else CLEAN)
            axis.set_title(label, fontsize=8, color=tone, pad=2)
        for axis in row[1 + len(cells) :]:
            axis.set_visible(False)
