"""The autodiff floor of one engine on one problem, and our calculator's stages against it.

``floor.py`` measures the floor in PyTorch only; this measures it in the framework of
``--engine`` (torch, jax or tensorflow), written as a user of that framework would write each
operation, on the same model and batches our engine gets (``bench_engines.py``), then times
our calculator's stages in the same process and prints each as a ratio to its floor:

- **hvp_fwd_rev** / **hvp_rev_rev**: one Hessian-vector product of the mean loss over the
  Hessian data (the problem's training batches), forward-over-reverse and
  reverse-over-reverse (torch: ``torch.func.jvp(grad)`` and double ``autograd.grad``; JAX:
  ``jax.jit`` of ``jvp(grad)`` and ``grad(vdot(grad, v))``; TensorFlow: ``tf.function`` of a
  ``ForwardAccumulator`` over a ``GradientTape``, and nested tapes);
- **grads_train** / **grads_query**: one per-example-gradient pass over the training / query
  batches (``vmap(grad)``; ``tf.vectorized_map`` of a tape's gradient);
- **jvp_train** / **jvp_query**: k directional derivatives of every per-example loss,
  vectorised over the k directions (``vmap(jvp)``; ``jax.linearize`` then ``vmap``;
  ``tf.vectorized_map`` of a ``ForwardAccumulator``, with its while-loop fallback for ops that
  ``pfor`` cannot vectorise).

Stages of ``ArnoldiInfluenceCalculator`` (the engine's defaults, ``block_size``
from ``--block-size``, ``linearize_hessian_data`` from ``--[no-]linearize-hessian-data``), as
``peer_ours.py`` times them:
**fit** (``--subspace-dim`` HVPs, default the problem's n) against n × the cheaper HVP;
**self_influence** (``cache_training_vectors`` + ``self_influence``, one projection pass over
the training set) against the cheaper of grads_train and jvp_train; **scores_cold** (the
training set re-projected, then the queries) against the cheaper training pass plus the
cheaper query pass.

Every floor operation is called once to warm up (compile, trace) and then timed
``--repeats`` times; every stage is run ``--stage-repeats`` times, the first reported as the
first call and the median taken over the others. Before every repeat of the stages, the
HVPs and the per-example-gradient passes of the floor are timed once more, and their medians
are over all their samples: the machine's speed drifts by 10-20 % within minutes, so a floor
measured only before the stages gave ratios that moved by as much between runs. The process
pins itself to
one CPU (``--cpu``) and sets one thread per framework before importing any, as ``run.py``
does for every peer.

    PYTHONPATH=.:backends python benchmarks/engine_floor.py --engine jax --problem cnn \\
        --subspace-dim 20 --out benchmarks/results/floor-cnn-jax.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

FLOOR_OPS = ("hvp_fwd_rev", "hvp_rev_rev", "grads_train", "grads_query", "jvp_train", "jvp_query")


def one_thread(cpu: int | None) -> None:
    """One CPU and one thread for every framework, before any is imported (as run.py)."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()


# The floor operations timed again before every repeat of the stages (the cheap ones: the
# JVP passes cost 5-10 HVPs and are never the cheaper pass on these problems).
INTERLEAVED_OPS = ("hvp_fwd_rev", "hvp_rev_rev", "grads_train", "grads_query")


def timed(fn: Callable[[], Any], repeats: int, finish: Callable[[Any], Any]) -> dict[str, Any]:
    """Median wall and CPU seconds of ``finish(fn())`` over ``repeats`` calls, after one, and
    the samples (``wall``, ``cpu``) the medians are taken over."""
    finish(fn())
    timing: dict[str, Any] = {"wall": [], "cpu": []}
    for _ in range(repeats):
        sample(fn, finish, timing)
    return timing


def sample(fn: Callable[[], Any], finish: Callable[[Any], Any], timing: dict[str, Any]) -> None:
    """Time one more call of ``fn`` into ``timing`` and update its medians."""
    start, cpu_start = time.perf_counter(), time.process_time()
    finish(fn())
    timing["wall"].append(time.perf_counter() - start)
    timing["cpu"].append(time.process_time() - cpu_start)
    timing["s"] = statistics.median(timing["wall"])
    timing["cpu_s"] = statistics.median(timing["cpu"])


# ------------------------------------------------------------------------------ floors
def torch_floor(problem: dict[str, Any], k: int) -> dict[str, Callable[[], Any]]:
    import torch
    from torch.func import functional_call, grad, jvp, vmap

    from bench_engines import batches
    from bench_torch import load_model

    torch.set_num_threads(1)
    module = load_model(problem)
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach() for _, p in module.named_parameters())
    train, query = batches(problem, "torch", "train"), batches(problem, "torch", "query")
    count = sum(len(y) for _, y in train)
    gen = torch.Generator().manual_seed(0)
    v = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params)
    vk = tuple(torch.randn((k, *p.shape), generator=gen, dtype=p.dtype) for p in params)
    ce = torch.nn.functional.cross_entropy

    def batch_loss(ps: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> Any:
        return ce(functional_call(module, dict(zip(names, ps)), (x,)), y, reduction="sum") / count

    def example_loss(ps: tuple[torch.Tensor, ...], xi: torch.Tensor, yi: torch.Tensor) -> Any:
        return ce(functional_call(module, dict(zip(names, ps)), (xi[None],)), yi[None])

    grad_fn = grad(batch_loss)

    def hvp_fwd_rev() -> Any:
        with torch.no_grad():
            parts = [
                jvp(lambda ps, x=x, y=y: grad_fn(ps, x, y), (params,), (v,))[1] for x, y in train
            ]
        return [sum(p) for p in zip(*parts)]

    def hvp_rev_rev() -> Any:
        ps = tuple(p.clone().requires_grad_(True) for p in params)
        total = None
        for x, y in train:
            gs = torch.autograd.grad(batch_loss(ps, x, y), ps, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(gs, v))
            part = torch.autograd.grad(dot, ps)
            total = part if total is None else [a + b for a, b in zip(total, part)]
        return total

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def losses(ps: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> Any:
        return ce(functional_call(module, dict(zip(names, ps)), (x,)), y, reduction="none")

    def grads(data: list) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return [per_example(params, x, y) for x, y in data]

        return run

    def jvps(data: list) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return [
                    vmap(lambda d, x=x, y=y: jvp(lambda ps: losses(ps, x, y), (params,), (d,))[1])(
                        vk
                    )
                    for x, y in data
                ]

        return run

    return {
        "hvp_fwd_rev": hvp_fwd_rev,
        "hvp_rev_rev": hvp_rev_rev,
        "grads_train": grads(train),
        "grads_query": grads(query),
        "jvp_train": jvps(train),
        "jvp_query": jvps(query),
    }


def jax_floor(problem: dict[str, Any], k: int) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.numpy as jnp

    from bench_engines import batches, jax_loss, jax_model

    apply_fn, params = jax_model(problem)
    train, query = batches(problem, "jax", "train"), batches(problem, "jax", "query")
    count = sum(len(y) for _, y in train)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 2 * len(params)))
    v = {n: jax.random.normal(next(keys), p.shape, p.dtype) for n, p in params.items()}
    vk = {n: jax.random.normal(next(keys), (k, *p.shape), p.dtype) for n, p in params.items()}

    def batch_loss(ps: Any, x: Any, y: Any) -> Any:
        return jnp.sum(jax_loss(apply_fn(ps, x), y)) / count

    @jax.jit
    def hvp_fwd(ps: Any, x: Any, y: Any, u: Any) -> Any:
        return jax.jvp(lambda q: jax.grad(batch_loss)(q, x, y), (ps,), (u,))[1]

    @jax.jit
    def hvp_rev(ps: Any, x: Any, y: Any, u: Any) -> Any:
        def dot(q: Any) -> Any:
            g = jax.grad(batch_loss)(q, x, y)
            return sum(jnp.vdot(g[n], u[n]) for n in g)

        return jax.grad(dot)(ps)

    @jax.jit
    def per_example(ps: Any, x: Any, y: Any) -> Any:
        def one(xi: Any, yi: Any) -> Any:
            return jax.grad(lambda q: jax_loss(apply_fn(q, xi[None]), yi[None])[0])(ps)

        return jax.vmap(one)(x, y)

    @jax.jit
    def project(ps: Any, x: Any, y: Any, directions: Any) -> Any:
        _, tangent = jax.linearize(lambda q: jax_loss(apply_fn(q, x), y), ps)
        return jax.vmap(tangent)(directions)

    def summed(kernel: Any, data: list, *extra: Any) -> Callable[[], Any]:
        return lambda: [kernel(params, x, y, *extra) for x, y in data]

    return {
        "hvp_fwd_rev": summed(hvp_fwd, train, v),
        "hvp_rev_rev": summed(hvp_rev, train, v),
        "grads_train": summed(per_example, train),
        "grads_query": summed(per_example, query),
        "jvp_train": summed(project, train, vk),
        "jvp_query": summed(project, query, vk),
    }


def tf_floor(problem: dict[str, Any], k: int) -> dict[str, Callable[[], Any]]:
    import keras
    import tensorflow as tf

    from bench_engines import batches, keras_model

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = keras_model(problem)
    # The tf.Variable behind each Keras 3 variable: what tapes and forward accumulators take.
    thetas = [getattr(var, "value", var) for var in model.trainable_variables]
    train, query = batches(problem, "tensorflow", "train"), batches(problem, "tensorflow", "query")
    count = float(sum(int(y.shape[0]) for _, y in train))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    v = [tf.random.normal(t.shape, seed=1, dtype=t.dtype) for t in thetas]
    vk = [tf.random.normal((k, *t.shape), seed=2, dtype=t.dtype) for t in thetas]

    def batch_loss(x: Any, y: Any) -> Any:
        return tf.reduce_sum(loss_fn(y, model(x))) / count

    def dense(gs: list) -> list:
        return [tf.convert_to_tensor(g) for g in gs]  # Embedding: IndexedSlices

    @tf.function
    def hvp_fwd(x: Any, y: Any) -> Any:
        with tf.autodiff.ForwardAccumulator(thetas, v) as acc:
            with tf.GradientTape() as tape:
                loss = batch_loss(x, y)
            gs = dense(tape.gradient(loss, thetas))
        return acc.jvp(gs)

    @tf.function
    def hvp_rev(x: Any, y: Any) -> Any:
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = batch_loss(x, y)
            gs = dense(inner.gradient(loss, thetas))
            dot = tf.add_n([tf.reduce_sum(g * u) for g, u in zip(gs, v)])
        return dense(outer.gradient(dot, thetas))

    @tf.function
    def per_example(x: Any, y: Any) -> Any:
        def one(example: Any) -> Any:
            xi, yi = example
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(loss_fn(yi[None], model(xi[None])))
            return dense(tape.gradient(loss, thetas))

        return tf.vectorized_map(one, (x, y), fallback_to_while_loop=True)

    @tf.function
    def project(x: Any, y: Any) -> Any:
        def one(direction: Any) -> Any:
            with tf.autodiff.ForwardAccumulator(thetas, list(direction)) as acc:
                losses = loss_fn(y, model(x))
            return acc.jvp(losses)

        return tf.vectorized_map(one, vk, fallback_to_while_loop=True)

    def summed(kernel: Any, data: list) -> Callable[[], Any]:
        return lambda: [kernel(x, y) for x, y in data]

    return {
        "hvp_fwd_rev": summed(hvp_fwd, train),
        "hvp_rev_rev": summed(hvp_rev, train),
        "grads_train": summed(per_example, train),
        "grads_query": summed(per_example, query),
        "jvp_train": summed(project, train),
        "jvp_query": summed(project, query),
    }


def finisher(engine: str) -> Callable[[Any], Any]:
    """Wait for an engine's (possibly asynchronous) results: JAX dispatches asynchronously."""
    if engine == "jax":
        import jax

        return jax.block_until_ready
    return lambda out: out


# ------------------------------------------------------------------------------ stages
def problem_fit(
    problem: dict[str, Any],
    model: Any,
    train: Any,
    n: int,
    block_size: int = 1,
    linearize_hessian_data: bool = True,
) -> Any:
    """The calculator fitted as ``peer_ours.py`` fits it (the problem's k, dtype and damping),
    its basis brought to the host so that the time includes the last product."""
    import krylov_influence as ki

    config = problem["config"]
    calc = ki.ArnoldiInfluenceCalculator(
        model,
        train,
        n,
        True,
        min(config["k"], n),
        config["dtype"],
        damping=config["damping"] + config["l2"],
        block_size=block_size,
        linearize_hessian_data=linearize_hessian_data,
        show_progress=False,
    )
    calc.model.to_numpy(calc.G)
    return calc


def stages(
    problem: dict[str, Any],
    engine: str,
    n: int,
    repeats: int,
    options: dict[str, Any],
    before_repeat: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, Any]]:
    """Our calculator's fit, self-influence and re-projected scores, as ``peer_ours.py``;
    ``before_repeat`` runs before each repeat (the interleaved floor samples)."""
    from bench_common import StageRecorder
    from bench_engines import batches, bind

    bound = {k: v for k, v in options.items() if k == "projection" and v}
    model = bind(problem, engine, **bound)
    train, queries = batches(problem, engine, "train"), batches(problem, engine, "query")
    recorder = StageRecorder()
    block_size = options.get("block_size", 1)

    def fit() -> Any:
        linearize = options.get("linearize_hessian_data", True)
        return problem_fit(problem, model, train, n, block_size, linearize)

    def self_influence(calc: Any) -> Any:
        calc.cache_training_vectors(train)
        return calc.model.to_numpy(calc.self_influence(train))

    def scores_cold(calc: Any) -> Any:
        calc.clear_training_vectors()
        return calc.model.to_numpy(calc.influence_matrix(queries, train))

    for _ in range(repeats):
        before_repeat()
        calc = recorder.run("fit", fit)
        recorder.run("self_influence", lambda c=calc: self_influence(c))
        recorder.run("scores_cold", lambda c=calc: scores_cold(c))
    summary = recorder.summary()
    summary["routes"] = dict(getattr(model, "routes", {}))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="torch", choices=("torch", "jax", "tensorflow"))
    parser.add_argument("--problem", default="cnn")
    parser.add_argument("--subspace-dim", type=int, default=0, help="n of the fit (0: problem's)")
    parser.add_argument("--block-size", type=int, default=1)
    parser.add_argument("--projection", default="", help="auto, jvp or gradients (default auto)")
    parser.add_argument(
        "--linearize-hessian-data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the calculator's option of that name (default: on, the calculator's default)",
    )
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3, help="of each floor operation")
    parser.add_argument("--stage-repeats", type=int, default=3)
    parser.add_argument("--no-stages", action="store_true")
    parser.add_argument("--cpu", type=int, default=1, help="CPU to pin to (-1: no pinning)")
    parser.add_argument("--out")
    args = parser.parse_args()
    one_thread(None if args.cpu < 0 else args.cpu)

    from bench_common import load_problem

    problem = load_problem(args.problem)
    config = problem["config"]
    k = config["k"]
    n = args.subspace_dim or config["subspace_dim"]
    load_before = os.getloadavg()
    build_floor = {"torch": torch_floor, "jax": jax_floor, "tensorflow": tf_floor}[args.engine]
    floor: dict[str, dict[str, Any]] = {}
    ops: dict[str, Callable[[], Any]] = {}
    finish = finisher(args.engine)
    if args.floor:
        ops = build_floor(problem, k)
        for name in FLOOR_OPS:
            floor[name] = timed(ops[name], args.repeats, finish)
            s, cpu = floor[name]["s"], floor[name]["cpu_s"]
            print(f"floor {name}: {s:.4f} s (CPU {cpu:.4f})", flush=True)

    def interleave() -> None:
        # This machine's speed drifts by 10-20 % within minutes, idle or not: the floor is
        # sampled again beside every repeat of the stages, so that its medians and the
        # stages' span the same minutes.
        for name in INTERLEAVED_OPS if ops else ():
            sample(ops[name], finish, floor[name])

    result: dict[str, Any] = {
        "engine": args.engine,
        "problem": args.problem,
        "num_parameters": config["num_parameters"],
        "num_train": config["num_train"],
        "num_query": config["num_query"],
        "batch_size": config["batch_size"],
        "k": k,
        "subspace_dim": n,
        "block_size": args.block_size,
        "projection": args.projection or "auto",
        "linearize_hessian_data": args.linearize_hessian_data,
        "floor": floor,
        "load_before": load_before,
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    if not args.no_stages:
        options = {
            "block_size": args.block_size,
            "projection": args.projection,
            "linearize_hessian_data": args.linearize_hessian_data,
        }
        measured = stages(problem, args.engine, n, args.stage_repeats, options, interleave)
        for name in INTERLEAVED_OPS if floor else ():
            s, cpu = floor[name]["s"], floor[name]["cpu_s"]
            print(f"floor {name}, interleaved: {s:.4f} s (CPU {cpu:.4f})", flush=True)
        result["routes"] = measured.pop("routes")
        result["stages"] = measured
        for name in ("fit", "self_influence", "scores_cold"):
            m = measured[name]
            print(
                f"{name}: {m['median_s']:.3f} s (CPU {m['median_cpu_s']:.3f}), first call "
                f"{m['first_s']:.3f} s",
                flush=True,
            )
        if floor:
            result["ratios"] = ratios(floor, measured, n)
            for name, value in result["ratios"].items():
                print(f"{name}: {value['s']:.2f} (CPU {value['cpu_s']:.2f})", flush=True)
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text if not args.out else f"written {args.out}")


def ratios(
    floor: dict[str, dict[str, float]], measured: dict[str, Any], n: int
) -> dict[str, dict[str, float]]:
    """Each stage over its floor, by wall and by CPU time."""
    out = {}
    for key in ("s", "cpu_s"):
        stage_key = "median_s" if key == "s" else "median_cpu_s"
        hvp = n * min(floor["hvp_fwd_rev"][key], floor["hvp_rev_rev"][key])
        train = min(floor["grads_train"][key], floor["jvp_train"][key])
        query = min(floor["grads_query"][key], floor["jvp_query"][key])
        values = {
            "fit / (n x cheaper HVP)": measured["fit"][stage_key] / hvp,
            "self_influence / cheaper training pass": measured["self_influence"][stage_key] / train,
            "scores_cold / cheaper training + query passes": measured["scores_cold"][stage_key]
            / (train + query),
        }
        for name, value in values.items():
            out.setdefault(name, {})[key] = value
    return out


if __name__ == "__main__":
    sys.exit(main())
