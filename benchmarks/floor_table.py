"""Markdown tables from ``engine_floor.py`` results: the floor per engine, and every stage of
our calculator as a ratio to that engine's floor.

    python benchmarks/floor_table.py benchmarks/results/floor/cnn-*.json

A file whose ``projection`` is ``jvp`` (run with ``--projection jvp --no-floor``) is the same
stages on the JVP route, printed beside the default's as the before/after of that route.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ENGINES = ("torch", "jax", "tensorflow")


def fmt(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{1000 * seconds:.1f} ms"


def tables(results: list[dict[str, Any]]) -> str:
    auto = {
        r["engine"]: r
        for r in results
        if r.get("projection", "auto") == "auto" and r.get("block_size", 1) == 1 and r["floor"]
    }
    jvp = {r["engine"]: r for r in results if r.get("projection") == "jvp"}
    blocks = {r["engine"]: r for r in results if r.get("block_size", 1) > 1}
    engines = [e for e in ENGINES if e in auto]
    if not engines:
        return ""
    first = auto[engines[0]]
    lines = [
        f"Problem `{first['problem']}`: p = {first['num_parameters']:,}, "
        f"{first['num_train']} training and {first['num_query']} query examples in batches of "
        f"{first['batch_size']}, k = {first['k']}; fit with n = {first['subspace_dim']}.",
        "",
        "Floor (median wall time, CPU time in brackets):",
        "",
        "| engine | HVP fwd-over-rev | HVP rev-over-rev | per-example grads, train | "
        f"{first['k']} JVPs, train | per-example grads, queries | {first['k']} JVPs, queries |",
        "|---|---|---|---|---|---|---|",
    ]
    order = ("hvp_fwd_rev", "hvp_rev_rev", "grads_train", "jvp_train", "grads_query", "jvp_query")
    for e in engines:
        f = auto[e]["floor"]
        cells = [f"{fmt(f[op]['s'])} ({fmt(f[op]['cpu_s'])})" for op in order]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Our stages (median of the repeats after the first; CPU in brackets) and their ratio to "
        "the floor of the same engine, by wall time / by CPU time:",
        "",
        "| engine | fit | fit / (n × cheaper HVP) | self-influence | / cheaper training pass "
        "| scores, re-projected | / cheaper training + query passes | routes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in engines:
        r = auto[e]
        s, q = r["stages"], r["ratios"]
        names = list(q)
        cells = []
        for stage, ratio in zip(("fit", "self_influence", "scores_cold"), names):
            st = s[stage]
            cells.append(f"{fmt(st['median_s'])} ({fmt(st['median_cpu_s'])})")
            cells.append(f"{q[ratio]['s']:.2f} / {q[ratio]['cpu_s']:.2f}")
        route = r.get("routes", {})
        used = f"hvp: {route.get('hvp', '?')}; per-example: {route.get('per_example_grads', '?')}"
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {used} |")
    if jvp:
        lines += [
            "",
            'Projection stages on the JVP route (`projection="jvp"`, what `"auto"` took '
            "before for batches over 64 MiB of gradients) against the default "
            '(`"auto"`: per-example gradients in chunks of examples), same process layout, '
            "run back to back:",
            "",
            "| engine | self-influence, JVPs | self-influence, auto | speed-up | "
            "scores, JVPs | scores, auto | speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in engines:
            if e not in jvp:
                continue
            a, j = auto[e]["stages"], jvp[e]["stages"]
            cells = []
            for stage in ("self_influence", "scores_cold"):
                before, after = j[stage]["median_cpu_s"], a[stage]["median_cpu_s"]
                cells += [fmt(before), fmt(after), f"{before / after:.1f}×"]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("(CPU times, the steadier figure on the shared machine.)")
    if blocks:
        lines += [
            "",
            "Block Arnoldi (`block_size` b): the fit against n × the cheaper single HVP of the "
            "same engine (CPU time):",
            "",
            "| engine | b | fit | fit / (n × cheaper HVP) | fit at b = 1 (its own run) |",
            "|---|---|---|---|---|",
        ]
        for e in engines:
            if e not in blocks:
                continue
            # The block run's own floor where it has one: the same minutes as its fit (this
            # machine's speed drifts by 10-25 % between runs).
            r = blocks[e]
            f = r["floor"] or auto[e]["floor"]
            hvp = r["subspace_dim"] * min(f["hvp_fwd_rev"]["cpu_s"], f["hvp_rev_rev"]["cpu_s"])
            fit = r["stages"]["fit"]["median_cpu_s"]
            one = (
                auto[e]["stages"]["fit"]["median_cpu_s"]
                * r["subspace_dim"]
                / auto[e]["subspace_dim"]
            )
            lines.append(f"| {e} | {r['block_size']} | {fmt(fit)} | {fit / hvp:.2f} | {fmt(one)} |")
    if "torch" in auto and len(engines) > 1:
        lines += [
            "",
            "Engine over torch, by CPU time:",
            "",
            "| engine | HVP (cheaper) | per-example grads | fit | self-influence | scores |",
            "|---|---|---|---|---|---|",
        ]
        t = auto["torch"]
        for e in engines[1:]:
            r = auto[e]

            def hvp(x: dict[str, Any]) -> float:
                return min(x["floor"]["hvp_fwd_rev"]["cpu_s"], x["floor"]["hvp_rev_rev"]["cpu_s"])

            cells = [
                hvp(r) / hvp(t),
                r["floor"]["grads_train"]["cpu_s"] / t["floor"]["grads_train"]["cpu_s"],
            ] + [
                r["stages"][st]["median_cpu_s"] / t["stages"][st]["median_cpu_s"]
                for st in ("fit", "self_influence", "scores_cold")
            ]
            lines.append(f"| {e} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    loads = [r.get("load_before", [0])[0] for r in results] + [
        r.get("load_after", [0])[0] for r in results
    ]
    lines += ["", f"Load average (1 min) from {min(loads):.1f} to {max(loads):.1f} on 2 CPUs."]
    return "\n".join(lines)


def main() -> None:
    results = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    problems = sorted({r["problem"] for r in results})
    for problem in problems:
        print(tables([r for r in results if r["problem"] == problem]))
        print()


if __name__ == "__main__":
    main()
