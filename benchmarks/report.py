"""The driver's report: headline ratios, tables, the one-core check, and publishing.

Every result is one library (or one of our engines and settings) in one input form. Ratios
compare like with like: a row's time over the fastest *peer library* at the same stage **in
the same input form**; our rows with the training set re-projected (``scores_cold``,
``top_k_cold``) are compared with the peers' scores and top-10, which re-project it too.

Medians are over the repeats after the first when there are two or more; the first repeat is
printed on its own as the "first call" (compilation and lazy initialisation included).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import HERE, STAGES

PUBLISHED = HERE / "published"
LIBRARIES = ("captum", "dattri", "pydvl", "influenciae")
STAGE_TITLES = {
    "fit": "fit",
    "self_influence": "self-influence",
    "scores": "scores",
    "top_k": "top-10",
}
#: Our re-projecting stages and the peer stage each is compared with.
COLD = {"scores_cold": "scores", "top_k_cold": "top_k"}
#: CPU time over wall time above which a stage used more than one core.
ONE_CORE_SLACK = 1.15


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1e3:.1f} ms" if x < 0.1 else f"{x:.2f} s"


def setting(peer: str, form: str) -> str:
    """``ours-jax-b8`` in ``prebatched`` -> ``ours-jax (engine jax, block_size=8, prebatched)``."""
    if not peer.startswith("ours-"):
        return f"{peer} ({form})"
    engine, _, block = peer.removeprefix("ours-").partition("-b")
    return f"ours-{engine} (engine {engine}, block_size={block or 1}, {form})"


class Ratios:
    """The fastest peer library per (input form, stage), by wall or CPU median."""

    def __init__(self, ok: list[dict[str, Any]]):
        self.best: dict[tuple[str, str, str], tuple[float, str]] = {}
        for r in ok:
            if r["peer"] not in LIBRARIES:
                continue
            for stage in STAGES:
                s = r["stages"].get(stage)
                for key in ("median_s", "median_cpu_s"):
                    if s is None:
                        continue
                    slot = (r["input_form"], stage, key)
                    if slot not in self.best or s[key] < self.best[slot][0]:
                        self.best[slot] = (s[key], r["peer"])

    def of(self, r: dict[str, Any], stage: str, key: str = "median_s") -> tuple[float, str] | None:
        """(ratio, fastest peer) of ``r`` at ``stage`` (ours' cold stages included)."""
        s = r["stages"].get(stage)
        best = self.best.get((r["input_form"], COLD.get(stage, stage), key))
        if s is None or best is None:
            return None
        return s[key] / best[0], best[1]

    def cell(self, r: dict[str, Any], stage: str, key: str = "median_s") -> str:
        s = r["stages"].get(stage)
        if s is None:
            return "–"
        ratio = self.of(r, stage, key)
        return fmt_s(s[key]) + (f" ({ratio[0]:.2f}×)" if ratio else "")


def by_peer(ok: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Results grouped by peer, in run order; each group's forms in run order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(r["peer"], []).append(r)
    return list(groups.items())


def headline(ok: list[dict[str, Any]], ratios: Ratios) -> tuple[list[str], list[dict]]:
    """Markdown lines and their data: per input form and engine setting, like-for-like ratios.

    First line: what a peer does (the training set re-projected at every call: ours'
    ``scores_cold`` / ``top_k_cold``); second line: the kept-vector workflow.
    """
    lines: list[str] = []
    data = []
    forms = list(dict.fromkeys(r["input_form"] for r in ok))
    for form in forms:
        block = []
        for r in ok:
            if not r["peer"].startswith("ours-") or r["input_form"] != form:
                continue
            entry: dict[str, Any] = {"peer": r["peer"], "input_form": form}
            parts = []
            for stage, title in (
                ("fit", "fit"),
                ("self_influence", "self-influence"),
                ("scores_cold", "scores"),
                ("top_k_cold", "top-10"),
            ):
                ratio = ratios.of(r, stage)
                if ratio is not None:
                    entry[stage] = {"ratio": ratio[0], "against": ratio[1]}
                    parts.append(f"{title} **{ratio[0]:.2f}×** {ratio[1]}")
            kept = []
            for stage, title in (("scores", "scores"), ("top_k", "top-10")):
                ratio = ratios.of(r, stage)
                if ratio is not None:
                    entry[f"{stage}_kept"] = {"ratio": ratio[0], "against": ratio[1]}
                    kept.append(f"{title} {ratio[0]:.2f}× {ratio[1]}")
            if not parts:
                continue
            data.append(entry)
            block.append(f"- {setting(r['peer'], form)}: " + ", ".join(parts))
            if kept:
                block.append(
                    "  - training vectors kept (`cache_training_vectors`): " + ", ".join(kept)
                )
        if block:
            lines += [f"Input form `{form}`:", "", *block, ""]
    return lines, data


def one_core_check(ok: list[dict[str, Any]], threads: int) -> list[str]:
    """Rows whose CPU time exceeds their wall time: more than one core at work."""
    if threads != 1:
        return []
    bad = []
    for r in ok:
        for stage, s in r["stages"].items():
            if s["median_s"] >= 0.02 and s["median_cpu_s"] > ONE_CORE_SLACK * s["median_s"]:
                bad.append(
                    f"{r['peer']} ({r['input_form']}) {stage}: CPU {fmt_s(s['median_cpu_s'])} "
                    f"for {fmt_s(s['median_s'])} of wall time"
                )
    return bad


def table(
    results: list[dict[str, Any]],
    floor: dict[str, Any] | None,
    args: argparse.Namespace,
    info: dict[str, Any],
) -> str:
    ok = [r for r in results if "stages" in r]
    ratios = Ratios(ok)
    repeats = f"{args.repeats} repeats" + (
        f" ({', '.join(f'{k}: {v}' for k, v in args.peer_repeats.items())})"
        if args.peer_repeats
        else ""
    )
    rounds = getattr(args, "rounds", 1)
    if rounds > 1:
        repeats += (
            f" in each of {rounds} rounds, every peer once per round in alternating order "
            "(the medians pool the rounds' repeats after each round's first)"
        )
    lines = [f"Problem `{args.problem}`: {info['problem']}.", ""]
    if info.get("provisional"):
        lines += [f"**Provisional figures**: {info['provisional']}.", ""]
    head, info["headline"] = headline(ok, ratios)
    lines += [
        "Headline: our time over the fastest peer library at the same stage, in the same "
        "input form (below 1 is faster), with the training set re-projected at every call as "
        "the peers do; the second line keeps the training vectors between calls.",
        "",
    ]
    single = sorted({r["peer"] for r in ok if r.get("repeats", 1) < 2})
    if single:
        lines += [
            "One repeat only for " + ", ".join(single) + ": their medians are first calls "
            "(compilation and lazy initialisation included), so their ratios do not measure "
            "steady-state speed.",
            "",
        ]
    lines += [
        *head,
        f"Wall time: {repeats}; median over the repeats after the first (over the one repeat "
        "when there is one); *first call* is the first repeat, compilation and lazy "
        "initialisation included. In brackets: × the fastest peer library at that stage in "
        "the same input form. `prebatched`: batches made once before timing; `dataloader`: "
        "the framework's own pipeline at every pass (torch `DataLoader(TensorDataset(x, y), "
        "batch_size=B)`, `tf.data`, JAX host NumPy batches). Rows 'training re-projected': "
        "our scores and top-10 after `clear_training_vectors()`.",
        "",
        "| peer | input | fit | first call | self-influence | first call | scores | "
        "first call | top-10 | first call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def first(r: dict[str, Any], stage: str) -> str:
        s = r["stages"].get(stage)
        return fmt_s(s.get("first_s")) if s else "–"

    for peer, group in by_peer(ok):
        for r in group:
            name = peer + (" (earlier run)" if r.get("reused") else "")
            cells = []
            for stage in STAGES:
                cells += [ratios.cell(r, stage), first(r, stage)]
            lines.append(f"| {name} | {r['input_form']} | " + " | ".join(cells) + " |")
        for r in group:
            if all(stage in r["stages"] for stage in COLD):
                cells = ["–", "–", "–", "–"]
                for stage in COLD:
                    cells += [ratios.cell(r, stage), first(r, stage)]
                lines.append(
                    f"| {peer}, training re-projected | {r['input_form']} | "
                    + " | ".join(cells)
                    + " |"
                )
    lines += [
        "",
        "CPU seconds (all threads of the process; median as above, × the fastest peer "
        "library's CPU time in the same form) and peak memory (rise of the resident set "
        "during the stage, MB):",
        "",
        "| peer | input | CPU s: fit | self-influence | scores | top-10 | peak MB: fit | "
        "self-influence | scores | top-10 | max RSS MB |",
        "|---|---|" + "---|" * 9,
    ]
    for peer, group in by_peer(ok):
        for r in group:
            st = r["stages"]
            cpu = [ratios.cell(r, s, "median_cpu_s") for s in STAGES]
            mem = [f"{st[s]['peak_mb']:.0f}" if s in st else "–" for s in STAGES]
            lines.append(
                f"| {peer} | {r['input_form']} | "
                + " | ".join(cpu + mem)
                + f" | {r['max_rss_mb']:.0f} |"
            )
    lines += accuracy_table(ok, info)
    if floor:
        lines += floor_table(ok, floor)
    bad = one_core_check(ok, args.threads)
    if args.threads == 1:
        lines += [""]
        if bad:
            lines += ["**More than one core** (CPU time above wall time):", ""]
            lines += [f"- {b}" for b in bad]
        else:
            lines.append(
                "One core per process: at every stage of every row, CPU time ≤ "
                f"{ONE_CORE_SLACK} × wall time."
            )
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["", "Not measured:", ""]
        lines += [f"- {r['peer']} ({r.get('input_form', '?')}): {r['error']}" for r in failed]
    if info.get("not_run"):
        lines += ["", "Input forms a library does not accept (not run):", ""]
        lines += [f"- {item}" for item in info["not_run"]]
    m = info["machine"]
    pinned = info.get("pinned_cpus")
    lines += [
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), load average before {info['load_before']}, "
        f"after {info['load_after']}; {args.threads or 'default'} intra-op thread(s) per "
        "process"
        + (f", every process pinned to CPU {pinned}" if pinned else ", no CPU pinning")
        + f"; started {info['started']}.",
        "",
        f"Command: `{info['command']}`",
    ]
    return "\n".join(lines)


def accuracy_table(ok: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """Accuracy per library, from its first input form; and whether its forms agree."""
    lines = [
        "",
        "Accuracy against the exact oracle (dense Hessian, float64) and mislabel "
        "detection (AUC of self-influence, 10 % flipped labels, retrained model), from each "
        "library's first input form; the last column compares its score matrices across "
        "the input forms (max |difference| / max |score|; 0 when they agree to the bit):",
        "",
        "| peer | Spearman (scores) | top-10 overlap | scale vs exact | "
        "Spearman vs exact top-k truncation | Spearman (self-influence) | mislabel AUC | "
        "own top-k = top-k of own scores | input forms agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f3(x: Any) -> str:
        return "–" if x is None else f"{x:.4f}"

    oracle_auc = info.get("oracle_auc")
    if oracle_auc is not None:
        lines.append(f"| exact oracle | 1 | 1 | 1 | – | 1 | {oracle_auc:.4f} | – | – |")
        trunc = info.get("truncated")
        if trunc:
            lines.append(
                f"| exact top-k truncation | {trunc['spearman']:.4f} | {trunc['top10_overlap']:.4f}"
                f" | {trunc['scale_vs_exact']:.4f} | 1 | {trunc['self_influence_spearman']:.4f} "
                "| – | – | – |"
            )
    for peer, group in by_peer(ok):
        a = group[0].get("accuracy", {})
        lines.append(
            f"| {peer} | {f3(a.get('spearman'))} | {f3(a.get('top10_overlap'))} | "
            f"{f3(a.get('scale_vs_exact'))} | {f3(a.get('spearman_vs_top_k'))} | "
            f"{f3(a.get('self_influence_spearman'))} | "
            f"{f3(a.get('auc'))} | {f3(a.get('top_k_self_consistency'))} | "
            f"{forms_agree(group)} |"
        )
    return lines


def forms_agree(group: list[dict[str, Any]]) -> str:
    files = [r.get("files", {}).get("scores") for r in group]
    if len(files) < 2 or not all(files) or not all(Path(f).exists() for f in files):
        return "–"
    ref = np.load(files[0])
    worst = max(float(np.abs(np.load(f) - ref).max()) for f in files[1:])
    return f"{worst / float(np.abs(ref).max()):.1e}"


def floor_table(ok: list[dict[str, Any]], floor: dict[str, Any]) -> list[str]:
    hvp = min(floor["hvp_s"], floor["hvp_rev_rev_s"])
    pg = floor["per_example_grads_s"]
    project = floor[next(k for k in floor if k.startswith("project_jvp"))]
    fit_floor = fmt_s(floor["subspace_dim"] * hvp)
    lines = [
        "",
        f"Autodiff floor (torch.func, same model, {floor['threads']} thread(s)): one HVP "
        f"over the {floor['num_train']} training points {fmt_s(floor['hvp_s'])} "
        f"(forward-over-reverse) / {fmt_s(floor['hvp_rev_rev_s'])} (reverse-over-reverse); "
        f"10 HVPs sharing a vmap pass {fmt_s(floor['hvp_vmap10_per_vector_s'])} per vector; "
        f"one vmap(grad) per-example-gradient pass {fmt_s(pg)}; k JVPs of every "
        f"per-example loss vmapped over k {fmt_s(project)}. CPU time of the same: "
        + ", ".join(f"{k} {fmt_s(v)}" for k, v in floor.get("cpu_s", {}).items())
        + " (hvp10: per vector). The floor works on tensors already in memory: the "
        "`prebatched` rows are its like for like.",
        "",
        "Lower-bound ratios: a stage's time over the autodiff it cannot avoid, by wall "
        "time and by CPU time (CPU seconds of the stage over CPU seconds of the floor "
        "operation; steadier on a shared machine).",
        "",
        f"| peer | input | fit / ({floor['subspace_dim']} × one HVP = {fit_floor}), wall | "
        "fit / HVPs, CPU | self-influence / one per-example-gradient pass, wall | "
        "self-influence / per-example gradients, CPU |",
        "|---|---|---|---|---|---|",
    ]
    cpu = floor.get("cpu_s", {})
    hvp_cpu = min(cpu.get("hvp", np.inf), cpu.get("hvp_rev_rev", np.inf))
    pg_cpu = cpu.get("per_example_grads")
    for peer, group in by_peer(ok):
        for r in group:
            st = r["stages"]
            fit_cpu = st["fit"]["median_cpu_s"] / (floor["subspace_dim"] * hvp_cpu)
            si_cpu = st["self_influence"]["median_cpu_s"] / pg_cpu if pg_cpu else np.nan
            lines.append(
                f"| {peer} | {r['input_form']} | "
                f"{st['fit']['median_s'] / (floor['subspace_dim'] * hvp):.2f} | "
                f"{fit_cpu:.2f} | {st['self_influence']['median_s'] / pg:.2f} | {si_cpu:.2f} |"
            )
    return lines


def publish(summary: dict[str, Any], text: str, problem: str, where: Path = PUBLISHED) -> Path:
    """Copy the run's summary (without the paths of its arrays) and table to ``where``.

    Named ``<problem>-<UTC date>.json`` / ``.md``; a second run on the same day gets the
    time appended, and a run on a loaded machine ``-provisional``. Returns the JSON's path.
    """
    where.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    stem = f"{problem}-{now:%Y-%m-%d}"
    if (where / f"{stem}.json").exists():
        stem += f"-{now:%H%M}"
    if summary["info"].get("provisional"):
        stem += "-provisional"
    slim = {
        **summary,
        "results": [{k: v for k, v in r.items() if k != "files"} for r in summary["results"]],
    }
    path = where / f"{stem}.json"
    path.write_text(json.dumps(slim, indent=1, default=str) + "\n")
    (where / f"{stem}.md").write_text(text + "\n")
    return path
