"""The demo's printed report, from its summary."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]

# Baselines of the detection: (summary key prefix, plain-report label, table label).
_BASELINES = (
    ("loss_ranking", "loss", "training loss"),
    ("gradient_norm_ranking", "gradient-norm", "gradient norm"),
)

_STAGE_NAMES = {
    "data": "data",
    "train": "train",
    "fit": "Arnoldi fit",
    "self_influence": "self-influence",
    "baselines": "baselines",
    "scores": "scores",
    "plot": "plot",
    "total": "total",
}


def format_report(summary: dict[str, Any], *, decorated: bool = True) -> str:
    """The report printed at the end of the demo.

    Parameters
    ----------
    summary : dict
        The content of ``summary.json``.
    decorated : bool
        Title rule, section headings and blank lines; ``False`` (``--quiet``) gives the
        same figures as plain ``key: value`` lines.

    Returns
    -------
    str
    """
    settings, results = summary["settings"], summary["results"]
    diagnostics = results["diagnostics"]
    kept = results["kept_eigenvalues"]

    def pct(value: float) -> str:
        return f"{100 * value:.0f} %"

    # (label in the plain report, label in the table, AUC, found after inspecting), for
    # self-influence and each baseline the summary holds.
    rankings = [
        (
            "detection",
            "self-influence",
            results["detection_auc"],
            results["found_after_inspecting"],
        )
    ]
    for key, plain, label in _BASELINES:
        if f"{key}_auc" in results:
            found = results[f"{key}_found_after_inspecting"]
            rankings.append((plain, label, results[f"{key}_auc"], found))
    facts = [
        ("engine", f"{settings['engine']} ({summary['versions']['engine_framework']})"),
        ("model", f"{settings['model']}; {settings['num_parameters']} parameters"),
        (
            "data",
            f"{settings['num_train']} training digits ({settings['num_flipped']} labels flipped), "
            f"{settings['num_test']} test digits, seed {settings['seed']}",
        ),
        (
            "accuracy",
            f"train {results['train_accuracy_given_labels']:.3f} (on the given labels), "
            f"test {results['test_accuracy']:.3f}",
        ),
        (
            "arnoldi",
            f"{settings['subspace_dim']} steps, {len(kept)} eigenvalues kept in "
            f"[{min(kept):.3g}, {max(kept):.3g}], damping {settings['damping']:g}",
        ),
        (
            "diagnostics",
            f"max Ritz residual {diagnostics['max_ritz_residual']:.2g}, orthogonality loss "
            f"{_maybe(diagnostics['orthogonality_loss'])}, "
            f"{len(diagnostics['arnoldi_restarts'])} restarts",
        ),
    ]
    detection = []
    for plain, _, auc, found in rankings:
        line = "   ".join(f"{pct(float(f))}: {pct(v)}" for f, v in found.items())
        prefix = "" if plain == "detection" else f"{plain} "
        detection += [(f"{plain} AUC", f"{auc:.4f}"), (f"{prefix}found after", line)]
    fractions = " / ".join(pct(float(f)) for f in rankings[0][3])
    table = [f"  {'ranking':<17}{'AUC':<9}found after inspecting {fractions}"]
    for plain, label, auc, found in rankings:
        cells = " / ".join(pct(v) for v in found.values())
        note = "" if plain == "detection" else "   (baseline)"
        table.append(f"  {label:<17}{auc:<9.4f}{cells}{note}")
    queries = []
    for query in results["queries"]:
        head = f"test #{query['test_index']} ({query['label']}, predicted {query['predicted']})"
        pros = ", ".join(_neighbour(n) for n in query["proponents"])
        cons = ", ".join(_neighbour(n) for n in query["opponents"])
        queries.append((head, f"proponents {pros}; opponents {cons}"))
    timings = " · ".join(
        f"{_STAGE_NAMES.get(name, name)} {seconds:.1f}"
        for name, seconds in summary["timings_s"].items()
    )
    outputs = summary["outputs"]
    written = [outputs[key] for key in ("picture", "summary", "scores") if key in outputs]

    if not decorated:
        lines = [f"{key}: {value}" for key, value in facts + detection]
        lines += [f"{head}: {rest}" for head, rest in queries]
        lines.append(f"timings (s): {timings}")
        lines.append(f"wrote: {', '.join(written)}")
        return "\n".join(lines)

    width = 78
    lines = ["━━ krylov-influence demo ".ljust(width, "━"), ""]
    lines += [f"  {key:<12}{value}" for key, value in facts]
    lines += ["", "Mislabel detection: training set ranked by self-influence g_xᵀ H⁻¹ g_x"]
    lines += ["and, as baselines, by training loss and by gradient norm ‖g_x‖"]
    lines += table
    lines += ["", "Test digits: strongest proponents (+) and opponents (−), as #index:label"]
    for head, rest in queries:
        lines += [f"  {head}", f"    {rest}"]
    lines += ["", "Wall time per stage (s)", f"  {timings}", ""]
    lines += [f"Wrote {', '.join(written[:-1])} and {written[-1]}", "━" * width]
    return "\n".join(lines)


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _neighbour(row: dict[str, Any]) -> str:
    text = f"#{row['train_index']}:{row['given_label']}"
    if row["given_label"] != row["true_label"]:
        text += f"(true {row['true_label']})"
    return text
