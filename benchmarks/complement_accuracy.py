"""Accuracy of truncation and of the spectral complement against the exact inverse Hessian.

On the digits MLP of the benchmark (``prepare.py``; p = 2410, float64, n = 200 HVPs), in one
of two settings: ``--l2 model`` (default) binds the model with its training ``l2 = 1e-3`` (the
L2 term is part of every per-example loss and gradient) and damps by δ = 1e-2; ``--l2
damping`` is the peers' convention of ``peer_ours.py`` (cross-entropy gradients only, the L2
term folded into the damping δ + l2). For each engine and each ``k``: the mean per-query
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
from functools import partial
from typing import Any

import numpy as np

from bench_common import load_problem


def build(problem: dict[str, Any], engine: str, l2: float) -> tuple[Any, Any, Any]:
    """The digits MLP in ``engine`` from the neutral spec, bound with ``l2``."""
    from krylov_influence import get_engine
    from krylov_influence.testing import MLPSpec

    config = problem["config"]
    sizes = tuple(config["layer_sizes"])
    weights = tuple(
        np.ascontiguousarray(problem[f"clean/{2 * i}.weight"].T) for i in range(len(sizes) - 1)
    )
    biases = tuple(problem[f"clean/{2 * i}.bias"] for i in range(len(sizes) - 1))
    if engine == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)

    def spec(x: np.ndarray, y: np.ndarray, batch_size: int) -> Any:
        return MLPSpec(sizes, "tanh", "cross_entropy", weights, biases, x, y, batch_size, l2)

    cls = get_engine(engine)
    model, train = cls.from_neutral_spec(
        spec(problem["x_train"], problem["y_train"], config["batch_size"]), dtype="float64"
    )
    _, queries = cls.from_neutral_spec(
        spec(problem["x_query"], problem["y_query"], config["query_batch_size"]),
        dtype="float64",
    )
    return model, train, queries


def softmax_regression(problem: dict[str, Any], l2: float) -> tuple[Any, Any, Any]:
    """Multinomial logistic regression on the same digits (p = 650), trained by L-BFGS to a
    gradient norm below 1e-10 on the mean cross-entropy plus ½ l2 ‖θ‖², NumPy engine."""
    from scipy.optimize import minimize

    from krylov_influence.reference import SoftmaxRegression

    x, y = problem["x_train"], problem["y_train"]
    d, classes = x.shape[1], int(y.max()) + 1
    z = np.concatenate([x, np.ones((len(y), 1))], axis=1)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta.reshape(d + 1, classes)
        logits = z @ w
        logits -= logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=1))
        loss = np.mean(log_norm - logits[np.arange(len(y)), y]) + 0.5 * l2 * theta @ theta
        probs = np.exp(logits - log_norm[:, None])
        probs[np.arange(len(y)), y] -= 1
        grad = (z.T @ probs / len(y)).reshape(-1) + l2 * theta
        return float(loss), grad

    theta = minimize(
        objective,
        np.zeros((d + 1) * classes),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": 1e-10},
    ).x.reshape(d + 1, classes)
    model = SoftmaxRegression(theta[:d], theta[d], l2=l2)
    config = problem["config"]
    b, qb = config["batch_size"], config["query_batch_size"]
    train = [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]
    xq, yq = problem["x_query"], problem["y_query"]
    queries = [(xq[i : i + qb], yq[i : i + qb]) for i in range(0, len(yq), qb)]
    return model, train, queries


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
    parser.add_argument("--l2", choices=("model", "damping"), default="model")
    parser.add_argument(
        "--timing",
        action="store_true",
        help="time self-influence and the 200 x 1437 scores with and without the complement "
        "(median of 5, training re-projected) instead of measuring accuracy",
    )
    parser.add_argument(
        "--model",
        choices=("mlp", "softmax"),
        default="mlp",
        help="the benchmark's MLP, or softmax regression (NumPy engine, no damping)",
    )
    args = parser.parse_args()
    import krylov_influence as ki
    from krylov_influence import exact

    problem = load_problem("digits")
    if args.timing:
        return timing(problem, args)
    config = problem["config"]
    in_model = args.l2 == "model"
    damping = config["damping"] + (0.0 if in_model else config["l2"])
    rows: list[dict[str, Any]] = []
    first: dict[tuple[int, str], np.ndarray] = {}  # the first engine's scores, for agreement
    for engine in args.engines.split(","):
        if args.model == "softmax":
            import krylov_influence as ki_

            engine = "numpy"
            model, train, queries = softmax_regression(problem, config["l2"])
            model = ki_.InfluenceModel(model)
            damping = 0.0
        else:
            model, train, queries = build(problem, engine, config["l2"] if in_model else 0.0)
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
                reference = first.setdefault((k, complement), scores)
                agreement = float(np.max(np.abs(scores - reference)) / np.max(np.abs(reference)))
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
                        "vs_first_engine": agreement,
                    }
                )
                print(rows[-1], flush=True)
    header = ["engine", "n", "k", "complement", "per-query Spearman", "sign agreement"]
    header += ["self-influence Spearman", "c ± stderr", "vs first engine", "fit s"]
    print("\n| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for r in rows:
        c = "" if r["c"] is None else f"{r['c']:.4g} ± {r['c_stderr']:.2g}"
        print(
            f"| {r['engine']} | {r['n']} | {r['k']} | {r['complement']} | {r['spearman']:.3f} | "
            f"{r['sign']:.3f} | {r['self_spearman']:.3f} | {c} | {r['vs_first_engine']:.1e} | "
            f"{r['fit_s']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


def timing(problem: dict[str, Any], args: argparse.Namespace) -> None:
    """Median wall time of each scoring stage with ``complement="none"`` and ``"mean"``."""
    import statistics

    import krylov_influence as ki

    config = problem["config"]
    print("| engine | k | stage | truncation | complement | ratio |")
    print("|---|---|---|---|---|---|")
    for engine in args.engines.split(","):
        model, train, queries = build(problem, engine, config["l2"])
        for k in (int(v) for v in args.k.split(",")):
            times: dict[tuple[str, str], float] = {}
            for complement in ("none", "mean"):
                calc = ki.ArnoldiInfluenceCalculator(
                    model,
                    train,
                    config["subspace_dim"],
                    True,
                    k,
                    damping=config["damping"],
                    complement=complement,
                    show_progress=False,
                )
                stages = {
                    "self-influence": partial(calc.self_influence, train),
                    "scores 200 x 1437": partial(calc.influence_matrix, queries, train),
                }
                for stage, run in stages.items():
                    run()  # warm-up: compilation and first-call costs
                    samples = []
                    for _ in range(5):
                        start = time.perf_counter()
                        run()
                        samples.append(time.perf_counter() - start)
                    times[stage, complement] = statistics.median(samples)
            for stage in ("self-influence", "scores 200 x 1437"):
                plain, completed = times[stage, "none"], times[stage, "mean"]
                print(
                    f"| {engine} | {k} | {stage} | {plain * 1e3:.1f} ms | "
                    f"{completed * 1e3:.1f} ms | {completed / plain:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
