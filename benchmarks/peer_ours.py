"""krylov_influence on the benchmark problem, through its public API (main environment).

``--engine torch`` binds the PyTorch module itself with ``krylov_influence.InfluenceModel``;
``--engine jax`` / ``--engine tensorflow`` build the same MLP (same weights, same flat order)
from the neutral spec (``Engine.from_neutral_spec``), so all three score the same parameters.

Convention. The benchmark problem is the one every peer can express: per-example gradients of
the cross-entropy alone, the Hessian of the trained objective (mean cross-entropy plus
``½ l2 ‖θ‖²``, whose Hessian adds ``l2·I``), damped by δ. So the model is bound with
``l2=0`` and the calculator gets ``damping = δ + l2``: by shift invariance of Krylov spaces
this is exactly the Hessian ``H_CE + l2 I`` damped by δ. Binding ``l2=1e-3`` instead would add
``l2 θ`` to every per-example gradient, a different problem from the peers'.
"""

from __future__ import annotations

import contextlib
import re
import sys
import traceback
from functools import partial
from typing import Any

import numpy as np

from bench_common import (
    TOP_K,
    StageRecorder,
    load_problem,
    peer_arguments,
    write_result,
)


def torch_side(problem: dict[str, Any], which: str, threads: int) -> tuple[Any, Any, Any]:
    import torch

    import krylov_influence as ki
    from bench_torch import load_model, tensors

    if threads:
        torch.set_num_threads(threads)
    config = problem["config"]
    module = load_model(problem, which)
    t = tensors(problem, which)
    train = [
        (t["x_train"][s : s + config["batch_size"]], t["y_train"][s : s + config["batch_size"]])
        for s in range(0, len(t["y_train"]), config["batch_size"])
    ]
    qb = config["query_batch_size"]
    queries = [
        (t["x_query"][s : s + qb], t["y_query"][s : s + qb])
        for s in range(0, len(t["y_query"]), qb)
    ]
    model = ki.InfluenceModel(module, torch.nn.CrossEntropyLoss(reduction="none"), l2=0.0)
    return model, train, queries


def neutral_side(problem: dict[str, Any], which: str, engine: str) -> tuple[Any, Any, Any]:
    from krylov_influence import get_engine
    from krylov_influence.testing import MLPSpec

    config = problem["config"]
    if config["kind"] != "mlp":
        raise SystemExit(f"the {engine} engine runs the neutral MLP only, not {config['kind']}")
    sizes = config["layer_sizes"]
    weights = tuple(
        np.ascontiguousarray(problem[f"{which}/{2 * i}.weight"].T) for i in range(len(sizes) - 1)
    )
    biases = tuple(problem[f"{which}/{2 * i}.bias"] for i in range(len(sizes) - 1))
    y_train = problem["y_train_flipped"] if which == "flipped" else problem["y_train"]

    def spec(x: np.ndarray, y: np.ndarray, batch_size: int) -> Any:
        return MLPSpec(
            tuple(sizes), "tanh", "cross_entropy", weights, biases, x, y, batch_size, 0.0
        )

    if engine == "jax" and config["dtype"] == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)  # process-wide, before any array exists
    cls = get_engine(engine)
    model, train = cls.from_neutral_spec(
        spec(problem["x_train"], y_train, config["batch_size"]), dtype=config["dtype"]
    )
    _, queries = cls.from_neutral_spec(
        spec(problem["x_query"], problem["y_query"], config["query_batch_size"]),
        dtype=config["dtype"],
    )
    return model, train, queries


def block_size_of(engine: str) -> tuple[str, int]:
    """``"jax-b8"`` -> ``("jax", 8)``: our engines with block Arnoldi; ``("jax", 1)`` without."""
    match = re.fullmatch(r"(.+)-b(\d+)", engine)
    return (match.group(1), int(match.group(2))) if match else (engine, 1)


def build(problem: dict[str, Any], which: str, engine: str, threads: int) -> tuple[Any, Any, Any]:
    engine, _ = block_size_of(engine)
    if engine == "torch":
        return torch_side(problem, which, threads)
    return neutral_side(problem, which, engine)


def main() -> None:
    import krylov_influence as ki

    args = peer_arguments("benchmark: krylov_influence")
    problem = load_problem(args.problem)
    config = problem["config"]
    damping = config["damping"] + config["l2"]
    recorder = StageRecorder()
    _, block_size = block_size_of(args.engine)
    notes = [
        "l2 = 0 in the model, damping = δ + l2 (see peer_ours.py)",
        "training vectors kept from the self-influence stage (cache_training_vectors); "
        "scores_cold / top_k_cold re-project the training set",
    ]
    if block_size > 1:
        notes.append(f"block Arnoldi, block_size={block_size}")

    def fit(model: Any, train: Any) -> Any:
        calc = ki.ArnoldiInfluenceCalculator(
            model,
            train,
            config["subspace_dim"],
            True,
            config["k"],
            config["dtype"],
            damping=damping,
            block_size=block_size,
            show_progress=False,
        )
        calc.model.to_numpy(calc.G)  # make sure lazy/asynchronous engines have finished
        return calc

    def top_k(calc: Any, queries: Any, train: Any) -> np.ndarray:
        if not hasattr(calc, "top_k"):
            notes.append("no calculator.top_k on this branch: full matrix + argpartition")
            from bench_common import top_k_indices

            return top_k_indices(calc.influence_matrix(queries, train), TOP_K)
        rows = [calc.model.to_numpy(b.indices) for b in calc.top_k(queries, train, k=TOP_K)]
        return np.concatenate(rows, axis=0)

    def self_influence(calc: Any, train: Any) -> np.ndarray:
        # The one projection pass over the training set, kept for the stages that follow.
        calc.cache_training_vectors(train)
        return calc.self_influence(train)

    model, train, queries = build(problem, "clean", args.engine, args.threads)
    si = sc = tk = None
    for _ in range(args.repeats):
        calc = recorder.run("fit", lambda: fit(model, train))
        si = recorder.run("self_influence", partial(self_influence, calc, train))
        sc = recorder.run("scores", partial(calc.influence_matrix, queries, train))
        tk = recorder.run("top_k", partial(top_k, calc, queries, train))
        # The same two stages re-projecting the training set, as every peer does.
        calc.clear_training_vectors()
        recorder.run("scores_cold", partial(calc.influence_matrix, queries, train))
        recorder.run("top_k_cold", partial(top_k, calc, queries, train))
    flipped = None
    if not args.no_mislabel:
        fmodel, ftrain, _ = build(problem, "flipped", args.engine, args.threads)
        flipped = fit(fmodel, ftrain).self_influence(ftrain)
    versions = {"krylov_influence": ki.__version__, "engine": args.engine}
    with contextlib.suppress(Exception):  # a version is a nicety, never worth the figures
        versions["framework"] = ki.get_engine(block_size_of(args.engine)[0]).version()
    write_result(args, f"ours-{args.engine}", recorder, sc, si, flipped, tk, versions, notes)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        sys.exit(3)
