"""Run every influence library on the same model and data, and print one table.

Each peer runs in a subprocess in its own virtual environment (``benchmarks/.venvs/<peer>``,
made by ``setup_peers.sh``; ours in the main environment), writes its figures as JSON and its
score arrays (already mapped to the project's convention) as .npy. This driver computes the
exact oracle (dense Hessian, small model only), the accuracy of every peer against it, the
ratios against the fastest peer, and the autodiff-floor ratios, then prints the table and
writes ``results/<problem>-summary.json`` and ``results/<problem>-table.md`` (``--publish``:
also ``published/<problem>-<date>.json`` / ``.md``, committed).

Every library runs once per input form (``--input-form``, default both; see
``bench_common.INPUT_FORMS``), each form its own rows, and ratios compare rows of the same
form. With ``--threads 1`` every process is pinned to one CPU (``--pin-cpu``). Tables and
headline: ``report.py``.

    python benchmarks/run.py --peer-repeats influenciae=2     # digits, every peer, both forms
    python benchmarks/run.py --problem cnn --peers ours-torch,captum,dattri,pydvl
    python benchmarks/run.py --problem cnn --peers ours-torch,pydvl --dry-run  # inputs only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import report
from bench_common import (
    HERE,
    INPUT_FORMS,
    RESULTS,
    TOP_K,
    load_problem,
    top_k_indices,
)

ROOT = HERE.parent
VENVS = HERE / ".venvs"
PUBLISHED = report.PUBLISHED
LIBRARIES = report.LIBRARIES
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
#: Input forms a library accepts, where not both: influenciae takes only a batched
#: tf.data.Dataset (see peer_influenciae.py).
ACCEPTS = {"influenciae": ("dataloader",)}


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
    """The environment of every peer process: quiet logs, paths, and thread counts.

    With ``threads`` > 0 the BLAS and OpenMP pools get that many threads, TensorFlow's
    intra-op pool too (inter-op 1; the TF scripts also call ``tf.config.threading``), and
    with 1 thread XLA gets ``--xla_cpu_multi_thread_eigen=false
    intra_op_parallelism_threads=1`` before JAX is imported. On JAX 0.10 that alone does not
    stop XLA's CPU client from running work on its own pool (one thread per CPU it may use):
    :func:`pin` is what holds every process to one core.
    """
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


def pin_cpus(option: str, threads: int) -> set[int] | None:
    """The CPUs every peer process is confined to (``--pin-cpu``), or None for no pinning.

    ``auto``: with ``--threads 1`` the last CPU this driver may use (with more threads, or 0,
    none); ``none``: no pinning; ``3`` or ``2,3``: those CPUs.
    """
    if option == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    if option == "auto":
        return {max(os.sched_getaffinity(0))} if threads == 1 else None
    return {int(c) for c in option.split(",") if c.strip()}


def pin(cpus: set[int] | None) -> Any:
    """A ``preexec_fn`` setting the child's CPU affinity before it imports anything.

    XLA (and TensorFlow, and OpenMP) size their thread pools from the CPUs a process may
    run on, so a process pinned to one CPU gets pools of one thread, and whatever threads it
    still starts share that one core: its CPU time cannot exceed its wall time.
    """
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def forms_of(peer: str, args: argparse.Namespace) -> list[str]:
    """The input forms ``peer`` runs in: the requested ones that the library accepts."""
    return [form for form in args.input_forms if form in ACCEPTS.get(peer, INPUT_FORMS)]


def run_peer(peer: str, form: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    out = out_dir / f"{args.problem}-{peer}-{form}.json"
    tag = {"peer": peer, "input_form": form}
    if peer in args.reuse:
        if not out.exists():
            return {**tag, "error": f"--reuse: {out} does not exist"}
        print(f"-- {peer} ({form}): reusing {out}", flush=True)
        earlier = json.loads(out.read_text())
        return earlier if "error" in earlier else {**earlier, "reused": True}
    python, why = interpreter(peer)
    if python is None:
        return {**tag, "error": why}
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
        "--input-form",
        form,
    ]
    if peer in OURS:
        cmd += ["--engine", peer.removeprefix("ours-")]
    # The mislabel fit does not depend on the input form: once per library, in its first.
    if args.no_mislabel or form != forms_of(peer, args)[0]:
        cmd.append("--no-mislabel")
    if args.dry_run:
        cmd.append("--dry-run")
    print(f"-- {peer} ({form}): {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            env=thread_env(args.threads),
            capture_output=True,
            text=True,
            timeout=args.timeout,
            cwd=ROOT,
            preexec_fn=pin(args.cpus),
        )
    except subprocess.TimeoutExpired:
        return {**tag, "error": f"timed out after {args.timeout} s"}
    elapsed = time.perf_counter() - start
    (out_dir / f"{args.problem}-{peer}-{form}.log").write_text(proc.stdout + proc.stderr)
    if args.dry_run:
        said = [ln for ln in proc.stdout.splitlines() if ln.startswith("dry run")]
        ok = proc.returncode == 0 and bool(said)
        tail = said or (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        print(("   " if ok else "   FAILED: ") + " | ".join(tail), flush=True)
        return {**tag, "error": "dry run" if ok else f"dry run failed: exit {proc.returncode}"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {**tag, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(out.read_text())
    result["subprocess_s"] = elapsed
    print(f"   done in {elapsed:.0f} s", flush=True)
    return result


def pool_rounds(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One peer and form over two rounds: every repeat of both, the medians over each
    round's steady repeats (all but its first, a fresh process's first call, when it made two
    or more), the first call of the first round. A failed round fails the pair."""
    if "stages" not in earlier or "stages" not in later:
        return earlier if "stages" not in earlier else later
    pooled = dict(earlier)
    pooled["rounds"] = earlier.get("rounds", 1) + 1
    pooled["max_rss_mb"] = max(earlier.get("max_rss_mb", 0), later.get("max_rss_mb", 0))
    pooled["subprocess_s"] = earlier.get("subprocess_s", 0) + later.get("subprocess_s", 0)
    stages = {}
    for name, first in earlier["stages"].items():
        second = later["stages"].get(name)
        if second is None:
            stages[name] = first
            continue
        steady = first.get("steady", first["seconds"][1:] or first["seconds"])
        steady_cpu = first.get("steady_cpu", first["cpu_seconds"][1:] or first["cpu_seconds"])
        steady = steady + (second["seconds"][1:] or second["seconds"])
        steady_cpu = steady_cpu + (second["cpu_seconds"][1:] or second["cpu_seconds"])
        stages[name] = {
            **first,
            "seconds": first["seconds"] + second["seconds"],
            "cpu_seconds": first["cpu_seconds"] + second["cpu_seconds"],
            "steady": steady,
            "steady_cpu": steady_cpu,
            "median_s": statistics.median(steady),
            "median_cpu_s": statistics.median(steady_cpu),
            "median_of": f"the steady repeats of {pooled['rounds']} rounds",
            "round_medians_s": [
                *first.get("round_medians_s", [first["median_s"]]),
                second["median_s"],
            ],
            "peak_mb": max(first["peak_mb"], second["peak_mb"]),
        }
    pooled["stages"] = stages
    return pooled


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
        cmd,
        env=thread_env(args.threads),
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=pin(args.cpus),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="digits", choices=("digits", "cnn", "transformer"))
    parser.add_argument(
        "--peers", default=",".join(ALL_PEERS), help=f"comma-separated, from {', '.join(ALL_PEERS)}"
    )
    parser.add_argument(
        "--input-form",
        default="both",
        choices=("both", *INPUT_FORMS),
        help="how the data reaches every library: prebatched (batches made once), "
        "dataloader (the framework's own pipeline), or both (each its own rows)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=4,
        help="repeats per library and form; the first is reported as the first call, the "
        "median is over the others",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per process (0: each library's default)",
    )
    parser.add_argument(
        "--pin-cpu",
        default="auto",
        help="CPU(s) every process is pinned to: auto (with --threads 1, the last CPU), "
        "none, or a list such as 1 or 2,3",
    )
    parser.add_argument(
        "--peer-repeats",
        default="",
        help="per-peer repeats overriding --repeats, e.g. influenciae=2",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every peer this many times, in alternating order (ABBA), and pool their "
        "repeats: this machine's speed drifts by 10-40 %% over minutes, which a single pass "
        "charges to whichever peer ran during a slow spell",
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per peer and form")
    parser.add_argument(
        "--reuse",
        default="",
        help="peers whose JSON from an earlier run (same --out-dir) is reused",
    )
    parser.add_argument("--no-mislabel", action="store_true")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--floor-repeats", type=int, default=10, help="repeats of each floor op")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="every peer builds its model and inputs in every form and makes one pass over "
        "them; nothing is timed (checks a problem's paths, e.g. --problem cnn, in minutes)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also copy the summary JSON and the table to benchmarks/published/"
        "<problem>-<date>.json / .md (committed; what docs/benchmarks.md quotes)",
    )
    parser.add_argument("--publish-dir", default=str(PUBLISHED), help=argparse.SUPPRESS)
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
    if args.repeats < 1 or any(n < 1 for n in args.peer_repeats.values()):
        parser.error("repeats must be at least 1")
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds}: expected at least 1")
    args.input_forms = list(INPUT_FORMS) if args.input_form == "both" else [args.input_form]
    args.cpus = pin_cpus(args.pin_cpu, args.threads)
    args.reuse = {p.strip() for p in args.reuse.split(",") if p.strip()}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(ALL_PEERS)
    if unknown:
        parser.error(f"--peers: unknown {sorted(unknown)}; expected some of {ALL_PEERS}")
    if not (RESULTS / f"{args.problem}.npz").exists():
        subprocess.run([sys.executable, str(HERE / "prepare.py"), args.problem], check=True)
    if args.dry_run:
        dry_run(peers, args, out_dir)
        return
    problem = load_problem(args.problem)
    config = problem["config"]
    info: dict[str, Any] = {
        "command": "python benchmarks/run.py " + shlex.join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "input_forms": args.input_forms,
        "pinned_cpus": ",".join(map(str, sorted(args.cpus))) if args.cpus else None,
        "thread_env": {
            k: v
            for k, v in thread_env(args.threads).items()
            if k.endswith("_THREADS") or k == "XLA_FLAGS"
        },
        "timing": "median over the repeats after the first (over the one repeat when there "
        "is one); first_s: the first repeat, compilation and lazy initialisation included",
        "config": config,
        "problem": (
            f"{config['kind'].upper()} with p = {config['num_parameters']} ({config['dtype']}), "
            f"{config['num_train']} training and {config['num_query']} query examples, "
            f"subspace_dim = {config['subspace_dim']}, k = {config['k']}, "
            f"damping δ = {config['damping']} on top of the L2 term l2 = {config['l2']}"
        ),
    }
    loads = [os.getloadavg()[0]]
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
    pooled: dict[tuple[str, str], dict[str, Any]] = {}
    info["not_run"] = [
        f"{peer}: {', '.join(skipped)} (it accepts {', '.join(ACCEPTS[peer])} only)"
        for peer in peers
        if (skipped := [f for f in args.input_forms if f not in forms_of(peer, args)])
    ]
    info["rounds"] = args.rounds
    for round_index in range(args.rounds):
        for peer in peers if round_index % 2 == 0 else peers[::-1]:
            for form in forms_of(peer, args):
                result = run_peer(peer, form, args, out_dir)
                loads.append(os.getloadavg()[0])
                if "error" in result and not result.get("reused"):
                    # Kept so that a later --reuse reports the same reason.
                    (out_dir / f"{args.problem}-{peer}-{form}.json").write_text(json.dumps(result))
                if "stages" in result and (peer, form) not in pooled:
                    result["accuracy"] = accuracy(result, oracle, problem)
                elif "stages" not in result:
                    print(f"   {peer} ({form}): {result['error']}", flush=True)
                earlier = pooled.get((peer, form))
                pooled[(peer, form)] = result if earlier is None else pool_rounds(earlier, result)
    # In the first round's order (dicts keep insertion order).
    results = list(pooled.values())
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["load_max"] = max(loads)
    if info["load_max"] > (os.cpu_count() or 1):
        info["provisional"] = (
            f"the 1-minute load average reached {info['load_max']:.1f} on "
            f"{os.cpu_count()} CPUs during the run (other work on the machine)"
        )
    text = report.table(results, floor, args, info)
    print()
    print(text)
    summary = {"info": info, "floor": floor, "results": results}
    (out_dir / f"{args.problem}-table.md").write_text(text + "\n")
    (out_dir / f"{args.problem}-summary.json").write_text(
        json.dumps(summary, indent=1, default=str)
    )
    print(f"\nWritten: {out_dir / (args.problem + '-summary.json')} and -table.md")
    if args.publish:
        path = report.publish(summary, text, args.problem, Path(args.publish_dir))
        print(f"Published: {path} and {path.with_suffix('.md')} (commit them)")


def dry_run(peers: list[str], args: argparse.Namespace, out_dir: Path) -> None:
    """Every peer in every form builds its model and inputs and makes one pass; no timing."""
    failed = []
    for peer in peers:
        for form in forms_of(peer, args):
            result = run_peer(peer, form, args, out_dir)
            if result["error"] != "dry run":
                failed.append(f"{peer} ({form}): {result['error']}")
    if failed:
        print("dry run failed:\n" + "\n".join(failed))
        sys.exit(1)
    print("dry run: every peer and input form built its inputs")


if __name__ == "__main__":
    main()
