"""Run every influence library on the same model and data, and print one table.

Each peer runs in a subprocess in its own virtual environment (``benchmarks/.venvs/<peer>``,
made by ``setup_peers.sh``; ours in the main environment), writes its figures as JSON and its
score arrays (already mapped to the project's convention) as .npy. This driver computes the
exact oracle (dense Hessian, small model only), the accuracy of every peer against it, the
ratios against the fastest peer, and the autodiff-floor ratios, then prints the table and
writes ``results/<problem>-summary.json`` and ``results/<problem>-table.md``.

    python benchmarks/run.py                                  # digits, every peer, 3 repeats
    python benchmarks/run.py --problem cnn --peers ours-torch,captum,dattri,pydvl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import HERE, RESULTS, STAGES, TOP_K, load_problem, top_k_indices

ROOT = HERE.parent
VENVS = HERE / ".venvs"
LIBRARIES = ("captum", "dattri", "pydvl", "influenciae")
# "-b<b>": the same engine fitting by block Arnoldi with block_size=b.
OURS = (
    "ours-torch",
    "ours-torch-b4",
    "ours-jax",
    "ours-jax-b8",
    "ours-tensorflow",
    "ours-tensorflow-b8",
)
ALL_PEERS = OURS + LIBRARIES


# ------------------------------------------------------------------------------ the oracle
def exact_oracle(problem_name: str) -> dict[str, np.ndarray] | None:
    """Exact scores, self-influence and flipped-model self-influence, cached on disk.

    Returns None for models too large for a dense Hessian.
    """
    problem = load_problem(problem_name)
    if problem["config"]["num_parameters"] > 20_000:
        return None
    path = RESULTS / f"{problem_name}-oracle.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    out = {**_exact_for(problem, "clean"), **_exact_for(problem, "flipped")}
    np.savez(path, **out)
    return out


def _exact_for(problem: dict[str, Any], which: str) -> dict[str, np.ndarray]:
    """The oracle for one trained model (``"clean"`` or ``"flipped"``).

    Dense Hessian of the trained objective (mean cross-entropy + ½ l2 ‖θ‖²) from HVPs on unit
    vectors, per-example cross-entropy gradients by ``vmap(grad)``, then
    ``g_zᵀ (H + δI)⁻¹ g_x`` in float64 through the eigen-decomposition of H, which also gives
    the top-k truncation ``V_k diag(1/(λ_k + δ)) V_kᵀ`` (k largest |λ|): what an Arnoldi fit
    whose Krylov space has converged computes. Independent of every library.
    """
    import torch
    from torch.func import functional_call, grad, jvp, vmap

    from bench_torch import load_model, tensors

    config = problem["config"]
    model = load_model(problem, which).to(torch.float64)
    t = {
        k: v.to(torch.float64) if v.is_floating_point() else v
        for k, v in tensors(problem, which).items()
    }
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, sizes)
        return {n: q.reshape(s) for n, q, s in zip(names, parts, shapes)}

    def objective(flat: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, unflat(flat), (t["x_train"],))
        data = torch.nn.functional.cross_entropy(logits, t["y_train"])
        return data + 0.5 * config["l2"] * (flat @ flat)

    def example_loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            functional_call(model, unflat(flat), (x[None],)), y[None]
        )

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    # Rows of H by forward-over-reverse HVPs on unit vectors, 128 at a time through vmap
    # (torch.func.hessian in one go would hold p × N × hidden tangents).
    hvp = vmap(lambda u: jvp(grad(objective), (theta,), (u,))[1])
    eye = torch.eye(len(theta), dtype=torch.float64)
    with torch.no_grad():
        h = torch.cat([hvp(eye[i : i + 128]) for i in range(0, len(theta), 128)]).numpy()
        g_train = per_example(theta, t["x_train"], t["y_train"]).numpy()
        g_query = per_example(theta, t["x_query"], t["y_query"]).numpy()
    values, vectors = np.linalg.eigh(0.5 * (h + h.T))
    keep = np.argsort(-np.abs(values))[: config["k"]]
    c_train = g_train @ vectors  # gradients in the eigenbasis, (N, p)
    weights = 1.0 / (values + config["damping"])
    out = {f"{which}_self_influence": (c_train**2) @ weights}
    if which == "clean":
        c_query = g_query @ vectors
        out["scores"] = (c_query * weights) @ c_train.T
        out["scores_top_k"] = (c_query[:, keep] * weights[keep]) @ c_train[:, keep].T
        out["self_influence_top_k"] = (c_train[:, keep] ** 2) @ weights[keep]
        out["eigenvalues"] = values
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.reshape(-1), b.reshape(-1)).statistic)


def top_overlap(scores: np.ndarray, oracle: np.ndarray, k: int = TOP_K) -> float:
    """Mean over queries of |top-k(scores) ∩ top-k(oracle)| / k."""
    mine, theirs = top_k_indices(scores, k), top_k_indices(oracle, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(mine, theirs)]))


def auc(self_influence: np.ndarray, flipped: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(flipped, self_influence))


def accuracy(
    result: dict[str, Any], oracle: dict[str, np.ndarray] | None, problem: dict[str, Any]
) -> dict[str, Any]:
    files = result.get("files", {})
    acc: dict[str, Any] = {}
    if "flipped_self_influence" in files:
        acc["auc"] = auc(np.load(files["flipped_self_influence"]), problem["flip_mask"])
    if "scores" in files and "top_k" in files:
        scores = np.load(files["scores"])
        # The peer's own top-k against the top-k of its own score matrix (ties aside, 1.0).
        acc["top_k_self_consistency"] = float(
            np.mean(
                [
                    len(set(a) & set(b)) / TOP_K
                    for a, b in zip(np.load(files["top_k"]), top_k_indices(scores))
                ]
            )
        )
    if oracle is None:
        return acc
    if "scores" in files:
        scores = np.load(files["scores"])
        ref = oracle["scores"]
        acc["spearman"] = spearman(scores, ref)
        acc["top10_overlap"] = top_overlap(scores, ref)
        # Least-squares scale of the peer's scores against the oracle: ~1 when the mapping to
        # our convention (sign, N, damping) is right.
        acc["scale_vs_exact"] = float((scores * ref).sum() / (ref * ref).sum())
        # Against the exact top-k truncation: how well the Krylov space converged.
        acc["spearman_vs_top_k"] = spearman(scores, oracle["scores_top_k"])
    if "self_influence" in files:
        acc["self_influence_spearman"] = spearman(
            np.load(files["self_influence"]), oracle["clean_self_influence"]
        )
    return acc


# ---------------------------------------------------------------------------- subprocesses
def interpreter(peer: str) -> tuple[Path | None, str]:
    if peer in OURS:
        return Path(sys.executable), ""
    python = VENVS / peer / "bin" / "python"
    status = VENVS / "status.txt"
    if status.exists():
        lines = [ln for ln in status.read_text().splitlines() if ln.split(" ")[0] == peer]
        if lines and "FAILED" in lines[-1]:
            return None, f"failed to install ({lines[-1]}; log in benchmarks/.venvs/{peer}.log)"
    if not python.exists():
        return None, "not installed: run benchmarks/setup_peers.sh " + peer
    return python, ""


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONWARNINGS"] = "ignore"
    env["TQDM_DISABLE"] = "1"
    path = [str(HERE)]
    path += [str(ROOT), str(ROOT / "backends")]  # ours; harmless for the others
    env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        env["TF_NUM_INTRAOP_THREADS"] = str(threads)
        env["TF_NUM_INTEROP_THREADS"] = "1"
        if threads == 1:
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                " intra_op_parallelism_threads=1"
            ).strip()
    return env


def run_peer(peer: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    out = out_dir / f"{args.problem}-{peer}.json"
    if peer in args.reuse:
        if not out.exists():
            return {"peer": peer, "error": f"--reuse: {out} does not exist"}
        print(f"-- {peer}: reusing {out}", flush=True)
        earlier = json.loads(out.read_text())
        return earlier if "error" in earlier else {**earlier, "reused": True}
    python, why = interpreter(peer)
    if python is None:
        return {"peer": peer, "error": why}
    script = HERE / ("peer_ours.py" if peer in OURS else f"peer_{peer}.py")
    if out.exists():
        out.unlink()
    repeats = args.peer_repeats.get(peer, args.repeats)
    cmd = [
        str(python),
        str(script),
        "--problem",
        args.problem,
        "--repeats",
        str(repeats),
        "--out",
        str(out),
        "--threads",
        str(args.threads),
    ]
    if peer in OURS:
        cmd += ["--engine", peer.removeprefix("ours-")]
    if args.no_mislabel:
        cmd.append("--no-mislabel")
    print(f"-- {peer}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            env=thread_env(args.threads),
            capture_output=True,
            text=True,
            timeout=args.timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"peer": peer, "error": f"timed out after {args.timeout} s"}
    elapsed = time.perf_counter() - start
    (out_dir / f"{args.problem}-{peer}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"peer": peer, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(out.read_text())
    result["subprocess_s"] = elapsed
    print(f"   done in {elapsed:.0f} s", flush=True)
    return result


def run_floor(args: argparse.Namespace, out_dir: Path) -> dict[str, Any] | None:
    out = out_dir / f"{args.problem}-floor.json"
    if "floor" in args.reuse and out.exists():
        print(f"-- floor: reusing {out}", flush=True)
        return json.loads(out.read_text())
    cmd = [
        sys.executable,
        str(HERE / "floor.py"),
        "--problem",
        args.problem,
        "--out",
        str(out),
        "--threads",
        str(args.threads),
    ]
    print(f"-- floor: {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(
        cmd, env=thread_env(args.threads), capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return None
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------ the table
def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1e3:.1f} ms" if x < 0.1 else f"{x:.2f} s"


def table(
    results: list[dict[str, Any]],
    floor: dict[str, Any] | None,
    args: argparse.Namespace,
    info: dict[str, Any],
) -> str:
    ok = [r for r in results if "stages" in r]
    libraries = [r for r in ok if r["peer"] in LIBRARIES]
    fastest = {
        stage: min(
            (r["stages"][stage]["median_s"] for r in libraries if stage in r["stages"]),
            default=None,
        )
        for stage in STAGES
    }
    fastest_cpu = {
        stage: min(
            (r["stages"][stage]["median_cpu_s"] for r in libraries if stage in r["stages"]),
            default=None,
        )
        for stage in STAGES
    }
    lines = [
        f"Problem `{args.problem}`: {info['problem']}.",
        "",
        f"Wall time, median of {args.repeats} repeats"
        + (
            f" ({', '.join(f'{k}: {v}' for k, v in args.peer_repeats.items())})"
            if args.peer_repeats
            else ""
        )
        + " (× the fastest other library at that stage; "
        "below 1 is faster). CPU seconds (all threads) in the second table. Our engines keep "
        "the training vectors of the self-influence stage (`cache_training_vectors`) for the "
        "scores and top-10 stages; their rows 'training re-projected' give those stages "
        "without it, re-projecting the training set at each call as the peers do.",
        "",
        "| peer | fit | self-influence (train) | scores (queries × train) | top-10 |",
        "|---|---|---|---|---|",
    ]
    for r in ok:
        cells = []
        for stage in STAGES:
            s = r["stages"].get(stage)
            if s is None:
                cells.append("–")
                continue
            ratio = s["median_s"] / fastest[stage] if fastest[stage] else None
            cells.append(fmt_s(s["median_s"]) + (f" ({ratio:.2f}×)" if ratio else ""))
        name = r["peer"] + (" (earlier run)" if r.get("reused") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        cold = [r["stages"].get(f"{stage}_cold") for stage in ("scores", "top_k")]
        if all(cold):  # ours, with the training set re-projected at each call as peers do
            cells = [
                fmt_s(s["median_s"])
                + (f" ({s['median_s'] / fastest[stage]:.2f}×)" if fastest[stage] else "")
                for s, stage in zip(cold, ("scores", "top_k"))
            ]
            lines.append(f"| {name}, training re-projected | – | – | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| peer | CPU s: fit | self-influence | scores | top-10 | peak MB: fit | "
        "self-influence | scores | top-10 | max RSS MB |",
        "|---|" + "---|" * 9,
    ]
    for r in ok:
        st = r["stages"]
        cpu = [
            fmt_s(st[s]["median_cpu_s"])
            + (f" ({st[s]['median_cpu_s'] / fastest_cpu[s]:.2f}×)" if fastest_cpu[s] else "")
            if s in st
            else "–"
            for s in STAGES
        ]
        mem = [f"{st[s]['peak_mb']:.0f}" if s in st else "–" for s in STAGES]
        lines.append(f"| {r['peer']} | " + " | ".join(cpu + mem) + f" | {r['max_rss_mb']:.0f} |")
    lines += [
        "",
        "Accuracy against the exact oracle (dense Hessian, float64) and mislabel "
        "detection (AUC of self-influence, 10 % flipped labels, retrained model):",
        "",
        "| peer | Spearman (scores) | top-10 overlap | scale vs exact | "
        "Spearman vs exact top-k truncation | Spearman (self-influence) | mislabel AUC | "
        "own top-k = top-k of own scores |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f3(x: Any) -> str:
        return "–" if x is None else f"{x:.4f}"

    oracle_auc = info.get("oracle_auc")
    if oracle_auc is not None:
        lines.append(f"| exact oracle | 1 | 1 | 1 | – | 1 | {oracle_auc:.4f} | – |")
        trunc = info.get("truncated")
        if trunc:
            lines.append(
                f"| exact top-k truncation | {trunc['spearman']:.4f} | {trunc['top10_overlap']:.4f}"
                f" | {trunc['scale_vs_exact']:.4f} | 1 | {trunc['self_influence_spearman']:.4f} "
                "| – | – |"
            )
    for r in ok:
        a = r.get("accuracy", {})
        lines.append(
            f"| {r['peer']} | {f3(a.get('spearman'))} | {f3(a.get('top10_overlap'))} | "
            f"{f3(a.get('scale_vs_exact'))} | {f3(a.get('spearman_vs_top_k'))} | "
            f"{f3(a.get('self_influence_spearman'))} | "
            f"{f3(a.get('auc'))} | {f3(a.get('top_k_self_consistency'))} |"
        )
    if floor:
        hvp = min(floor["hvp_s"], floor["hvp_rev_rev_s"])
        pg = floor["per_example_grads_s"]
        project = floor[next(k for k in floor if k.startswith("project_jvp"))]
        fit_floor = fmt_s(floor["subspace_dim"] * hvp)
        lines += [
            "",
            f"Autodiff floor (torch.func, same model, {floor['threads']} thread(s)): one HVP "
            f"over the {floor['num_train']} training points {fmt_s(floor['hvp_s'])} "
            f"(forward-over-reverse) / {fmt_s(floor['hvp_rev_rev_s'])} (reverse-over-reverse); "
            f"10 HVPs sharing a vmap pass {fmt_s(floor['hvp_vmap10_per_vector_s'])} per vector; "
            f"one vmap(grad) per-example-gradient pass {fmt_s(pg)}; k JVPs of every "
            f"per-example loss vmapped over k {fmt_s(project)}. CPU time of the same: "
            + ", ".join(f"{k} {fmt_s(v)}" for k, v in floor.get("cpu_s", {}).items())
            + " (hvp10: per vector).",
            "",
            "Lower-bound ratios: a stage's time over the autodiff it cannot avoid, by wall "
            "time and by CPU time (CPU seconds of the stage over CPU seconds of the floor "
            "operation; steadier on a shared machine).",
            "",
            f"| peer | fit / ({floor['subspace_dim']} × one HVP = {fit_floor}), wall | "
            "fit / HVPs, CPU | self-influence / one per-example-gradient pass, wall | "
            "self-influence / per-example gradients, CPU |",
            "|---|---|---|---|---|",
        ]
        cpu = floor.get("cpu_s", {})
        hvp_cpu = min(cpu.get("hvp", np.inf), cpu.get("hvp_rev_rev", np.inf))
        pg_cpu = cpu.get("per_example_grads")
        for r in ok:
            st = r["stages"]
            fit_cpu = st["fit"]["median_cpu_s"] / (floor["subspace_dim"] * hvp_cpu)
            si_cpu = st["self_influence"]["median_cpu_s"] / pg_cpu if pg_cpu else np.nan
            lines.append(
                f"| {r['peer']} | {st['fit']['median_s'] / (floor['subspace_dim'] * hvp):.2f} | "
                f"{fit_cpu:.2f} | {st['self_influence']['median_s'] / pg:.2f} | {si_cpu:.2f} |"
            )
    failed = [r for r in results if "error" in r]
    if failed:
        lines += ["", "Not measured:", ""]
        lines += [f"- {r['peer']}: {r['error']}" for r in failed]
    lines += [
        "",
        f"Machine: {info['machine']['nproc']} CPUs ({info['machine']['cpu']}), "
        f"load average before {info['load_before']}, after {info['load_after']}; "
        f"{args.threads or 'default'} intra-op thread(s) per process.",
        "",
        f"Command: `{info['command']}`",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="digits", choices=("digits", "cnn"))
    parser.add_argument(
        "--peers", default=",".join(ALL_PEERS), help=f"comma-separated, from {', '.join(ALL_PEERS)}"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per process (0: each library's default)",
    )
    parser.add_argument(
        "--peer-repeats",
        default="",
        help="per-peer repeats overriding --repeats, e.g. influenciae=1",
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per peer")
    parser.add_argument(
        "--reuse",
        default="",
        help="peers whose JSON from an earlier run (same --out-dir) is reused",
    )
    parser.add_argument("--no-mislabel", action="store_true")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--floor-repeats", type=int, default=10, help="repeats of each floor op")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    try:
        args.peer_repeats = {
            name.strip(): int(n)
            for name, n in (
                item.split("=") for item in args.peer_repeats.split(",") if item.strip()
            )
        }
    except ValueError:
        parser.error(f"--peer-repeats={args.peer_repeats!r}: expected peer=int[,peer=int...]")
    args.reuse = {p.strip() for p in args.reuse.split(",") if p.strip()}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(ALL_PEERS)
    if unknown:
        parser.error(f"--peers: unknown {sorted(unknown)}; expected some of {ALL_PEERS}")
    if not (RESULTS / f"{args.problem}.npz").exists():
        subprocess.run([sys.executable, str(HERE / "prepare.py"), args.problem], check=True)
    problem = load_problem(args.problem)
    config = problem["config"]
    info: dict[str, Any] = {
        "command": "python benchmarks/run.py " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "config": config,
        "problem": (
            f"{config['kind'].upper()} with p = {config['num_parameters']} ({config['dtype']}), "
            f"{config['num_train']} training and {config['num_query']} query examples, "
            f"subspace_dim = {config['subspace_dim']}, k = {config['k']}, "
            f"damping δ = {config['damping']} on top of the L2 term l2 = {config['l2']}"
        ),
    }
    oracle = exact_oracle(args.problem)
    if oracle is not None:
        info["oracle_auc"] = auc(oracle["flipped_self_influence"], problem["flip_mask"])
        ref, trunc = oracle["scores"], oracle["scores_top_k"]
        info["truncated"] = {
            "spearman": spearman(trunc, ref),
            "top10_overlap": top_overlap(trunc, ref),
            "scale_vs_exact": float((trunc * ref).sum() / (ref * ref).sum()),
            "self_influence_spearman": spearman(
                oracle["self_influence_top_k"], oracle["clean_self_influence"]
            ),
        }
    floor = None if args.no_floor else run_floor(args, out_dir)
    results = []
    for peer in peers:
        result = run_peer(peer, args, out_dir)
        if "error" in result and not result.get("reused"):
            # Kept so that a later --reuse reports the same reason.
            (out_dir / f"{args.problem}-{peer}.json").write_text(json.dumps(result))
        if "stages" in result:
            result["accuracy"] = accuracy(result, oracle, problem)
        else:
            print(f"   {peer}: {result['error']}", flush=True)
        results.append(result)
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = table(results, floor, args, info)
    print()
    print(text)
    (out_dir / f"{args.problem}-table.md").write_text(text + "\n")
    (out_dir / f"{args.problem}-summary.json").write_text(
        json.dumps({"info": info, "floor": floor, "results": results}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
