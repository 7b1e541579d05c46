"""The demo's printed report, from its summary."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]

_STAGE_NAMES = {
    "data": "data",
    "train": "train",
    "fit": "Arnoldi fit",
    "self_influence": "self-influence",
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
    found = results["found_after_inspecting"]
    loss_found = results["loss_ranking_found_after_inspecting"]

    def pct(value: float) -> str:
        return f"{100 * value:.0f} %"

    found_line = "   ".join(f"{pct(float(f))}: {pct(v)}" for f, v in found.items())
    loss_line = "   ".join(f"{pct(float(f))}: {pct(v)}" for f, v in loss_found.items())
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
    detection = [
        ("detection AUC", f"{results['detection_auc']:.4f}"),
        ("found after", found_line),
        ("loss AUC", f"{results['loss_ranking_auc']:.4f} (baseline: rank by training loss)"),
        ("loss found after", loss_line),
    ]
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

    if not decorated:
        lines = [f"{key}: {value}" for key, value in facts + detection]
        lines += [f"{head}: {rest}" for head, rest in queries]
        lines.append(f"timings (s): {timings}")
        lines.append(f"wrote: {outputs['picture']}, {outputs['summary']}")
        return "\n".join(lines)

    width = 78
    lines = ["━━ krylov-influence demo ".ljust(width, "━"), ""]
    lines += [f"  {key:<12}{value}" for key, value in facts]
    lines += ["", "Mislabel detection: training set ranked by self-influence g_xᵀ H⁻¹ g_x"]
    lines += [f"  {key:<17}{value}" for key, value in detection]
    lines += ["", "Test digits: strongest proponents (+) and opponents (−), as #index:label"]
    for head, rest in queries:
        lines += [f"  {head}", f"    {rest}"]
    lines += ["", "Wall time per stage (s)", f"  {timings}", ""]
    lines += [f"Wrote {outputs['picture']} and {outputs['summary']}", "━" * width]
    return "\n".join(lines)


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _neighbour(row: dict[str, Any]) -> str:
    text = f"#{row['train_index']}:{row['given_label']}"
    if row["given_label"] != row["true_label"]:
        text += f"(true {row['true_label']})"
    return text
