"""Accuracy of truncation and of the spectral complement against the exact inverse Hessian.

On the digits MLP of the benchmark (``prepare.py``; p = 2410, float64, n = 200 HVPs, damping
δ + l2 folded as in ``peer_ours.py``), for each engine and each ``k``: the mean per-query
Spearman correlation of the (queries × training) score matrix against the exact
``g_zᵀ (H + δI)⁻¹ g_x`` (dense Hessian from the engine's HVPs on unit vectors), the fraction of
scores with the right sign, the self-influence Spearman, and the estimated ``c`` with its
standard error. Prints one table; ``--json`` writes the figures.

    python benchmarks/complement_accuracy.py --engines torch,jax,tensorflow --k 20,50,100
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from bench_common import load_problem
from peer_ours import build


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (no ties here)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, axis=1, kind="stable")
        out = np.empty_like(order, dtype=np.float64)
        np.put_along_axis(out, order, np.arange(x.shape[1], dtype=np.float64)[None, :], axis=1)
        return out - out.mean(axis=1, keepdims=True)

    ra, rb = ranks(a), ranks(b)
    return (ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="torch")
    parser.add_argument("--k", default="20,50,100")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--n", type=int, default=None, help="subspace_dim (default: the config's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import krylov_influence as ki
    from krylov_influence import exact

    problem = load_problem("digits")
    config = problem["config"]
    damping = config["damping"] + config["l2"]
    rows: list[dict[str, Any]] = []
    for engine in args.engines.split(","):
        model, train, queries = build(problem, "clean", engine, 1)
        hessian = exact.dense_hessian(model, train)
        inverse = exact.inverse_hessian(hessian, damping)
        gx = exact.per_example_gradients(model, train)
        gz = exact.per_example_gradients(model, queries)
        truth = gz @ inverse @ gx.T
        truth_self = np.einsum("ip,pq,iq->i", gx, inverse, gx)
        for k in (int(v) for v in args.k.split(",")):
            for complement in ("none", "mean"):
                start = time.perf_counter()
                calc = ki.ArnoldiInfluenceCalculator(
                    model,
                    train,
                    args.n or config["subspace_dim"],
                    True,
                    k,
                    damping=damping,
                    complement=complement,
                    complement_probes=args.probes,
                    show_progress=False,
                )
                fit = time.perf_counter() - start
                scores = calc.influence_matrix(queries, train)
                self_values = calc.self_influence(train)
                found = calc.eigenbasis.complement
                rows.append(
                    {
                        "engine": engine,
                        "n": args.n or config["subspace_dim"],
                        "k": k,
                        "complement": complement,
                        "spearman": float(np.mean(spearman_rows(scores, truth))),
                        "sign": float(np.mean(np.sign(scores) == np.sign(truth))),
                        "self_spearman": float(
                            spearman_rows(self_values[None], truth_self[None])[0]
                        ),
                        "c": None if found is None else found.value,
                        "c_stderr": None if found is None else found.stderr,
                        "fit_s": fit,
                    }
                )
                print(rows[-1], flush=True)
    header = ["engine", "n", "k", "complement", "per-query Spearman", "sign agreement"]
    header += ["self-influence Spearman", "c ± stderr", "fit s"]
    print("\n| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = "" if r["c"] is None else f"{r['c']:.4g} ± {r['c_stderr']:.2g}"
        print(
            f"| {r['engine']} | {r['n']} | {r['k']} | {r['complement']} | {r['spearman']:.3f} | "
            f"{r['sign']:.3f} | {r['self_spearman']:.3f} | {c} | {r['fit_s']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
