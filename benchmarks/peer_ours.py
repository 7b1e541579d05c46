"""krylov_influence on the benchmark problem, through its public API (main environment).

``--engine torch`` binds the PyTorch module itself with ``krylov_influence.InfluenceModel``;
``--engine jax`` / ``--engine tensorflow`` build the same MLP (same weights, same flat order)
from the neutral spec (``Engine.from_neutral_spec``), so all three score the same parameters;
the ``cnn`` and ``transformer`` models are loaded into JAX functions and Keras models by
``bench_engines.py`` (checked against PyTorch by ``check_engines.py``).

Convention. The benchmark problem is the one every peer can express: per-example gradients of
the cross-entropy alone, the Hessian of the trained objective (mean cross-entropy plus
``½ l2 ‖θ‖²``, whose Hessian adds ``l2·I``), damped by δ. So the model is bound with
``l2=0`` and the calculator gets ``damping = δ + l2``: by shift invariance of Krylov spaces
this is exactly the Hessian ``H_CE + l2 I`` damped by δ. Binding ``l2=1e-3`` instead would add
``l2 θ`` to every per-example gradient, a different problem from the peers'.

Inputs (``--input-form``, see ``INPUT_NOTES``). ``prebatched``: batches made once (torch: the
list of tensor tuples the torch peers get; JAX and TensorFlow: the device batches of
``from_neutral_spec``). ``dataloader``: the framework's idiomatic pipeline, re-run at every
pass: torch ``DataLoader(TensorDataset(x, y), batch_size=B)`` (the peers' very object),
``tf.data.Dataset.from_tensor_slices((x, y)).batch(B)``, and for JAX, which has no loader,
host NumPy batches sliced at every pass (:class:`NumpyBatches`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from functools import partial
from typing import Any

import numpy as np

from bench_common import (
    TOP_K,
    StageRecorder,
    dry_run_report,
    load_problem,
    peer_arguments,
    tf_data_autotuned,
    tf_data_pipeline,
    write_result,
)


def torch_side(
    problem: dict[str, Any], which: str, threads: int, form: str
) -> tuple[Any, Any, Any]:
    import torch

    import krylov_influence as ki
    from bench_torch import load_model
    from peer_torch_common import inputs

    if threads:
        torch.set_num_threads(threads)
    module = load_model(problem, which)
    # The same objects the torch peers get: a list of (x, y) batch tuples, or
    # DataLoader(TensorDataset(x, y), batch_size=B).
    data = inputs(problem, which, form)
    model = ki.InfluenceModel(module, torch.nn.CrossEntropyLoss(reduction="none"), l2=0.0)
    return model, data["train"], data["query"]


class NumpyBatches:
    """Host NumPy ``(x, y)`` batches, sliced from the arrays afresh at every pass.

    JAX has no data loader of its own; this is what its pipelines (grain, tfds'
    ``as_numpy_iterator``, a NumPy loop) hand a JAX program: host arrays, which the engine
    converts and transfers to the device at every pass over the data.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Any:
        for start in range(0, len(self.y), self.batch_size):
            stop = start + self.batch_size
            yield self.x[start:stop], self.y[start:stop]


def neutral_side(
    problem: dict[str, Any], which: str, engine: str, form: str
) -> tuple[Any, Any, Any]:
    from krylov_influence import get_engine
    from krylov_influence.testing import MLPSpec

    config = problem["config"]
    if config["kind"] != "mlp":
        return engine_side(problem, which, engine, form)
    sizes = config["layer_sizes"]
    weights = tuple(
        np.ascontiguousarray(problem[f"{which}/{2 * i}.weight"].T) for i in range(len(sizes) - 1)
    )
    biases = tuple(problem[f"{which}/{2 * i}.bias"] for i in range(len(sizes) - 1))
    y_train = problem["y_train_flipped"] if which == "flipped" else problem["y_train"]
    x_query, y_query = problem["x_query"], problem["y_query"]

    def spec(x: np.ndarray, y: np.ndarray, batch_size: int) -> Any:
        return MLPSpec(
            tuple(sizes), "tanh", "cross_entropy", weights, biases, x, y, batch_size, 0.0
        )

    if engine == "jax" and config["dtype"] == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)  # process-wide, before any array exists
    cls = get_engine(engine)
    # prebatched: the batches from_neutral_spec makes once, on the device (JAX arrays or
    # tf.Tensor pairs).
    model, train = cls.from_neutral_spec(
        spec(problem["x_train"], y_train, config["batch_size"]), dtype=config["dtype"]
    )
    _, queries = cls.from_neutral_spec(
        spec(x_query, y_query, config["query_batch_size"]), dtype=config["dtype"]
    )
    if form == "prebatched":
        return model, train, queries
    x_train = problem["x_train"].astype(config["dtype"])
    x_query = x_query.astype(config["dtype"])
    if engine == "jax":
        return (
            model,
            NumpyBatches(x_train, y_train, config["batch_size"]),
            NumpyBatches(x_query, y_query, config["query_batch_size"]),
        )
    import tensorflow as tf

    return (
        model,
        tf_data_pipeline(tf, x_train, y_train.astype(np.int64), config["batch_size"]),
        tf_data_pipeline(tf, x_query, y_query.astype(np.int64), config["query_batch_size"]),
    )


def engine_side(
    problem: dict[str, Any], which: str, engine: str, form: str
) -> tuple[Any, Any, Any]:
    """The ``cnn`` / ``transformer`` model in JAX or Keras (``bench_engines.py``), same weights."""
    from bench_engines import batches, bind, engine_inputs

    config = problem["config"]
    model = bind(problem, engine, which)
    if form == "prebatched":
        return model, batches(problem, engine, "train", which), batches(problem, engine, "query")
    y_train = problem["y_train_flipped"] if which == "flipped" else problem["y_train"]
    pairs = [
        (engine_inputs(problem, engine, "train"), y_train, config["batch_size"]),
        (engine_inputs(problem, engine, "query"), problem["y_query"], config["query_batch_size"]),
    ]
    if engine == "jax":
        return model, *(NumpyBatches(x, y.astype(np.int32), b) for x, y, b in pairs)
    import tensorflow as tf

    return model, *(tf_data_pipeline(tf, x, y.astype(np.int64), b) for x, y, b in pairs)


def block_size_of(engine: str) -> tuple[str, int]:
    """``"jax-b8"`` -> ``("jax", 8)``: our engines with block Arnoldi; ``("jax", 1)`` without."""
    match = re.fullmatch(r"(.+)-b(\d+)", engine)
    return (match.group(1), int(match.group(2))) if match else (engine, 1)


def build(
    problem: dict[str, Any], which: str, engine: str, threads: int, form: str
) -> tuple[Any, Any, Any]:
    engine, _ = block_size_of(engine)
    if engine == "torch":
        return torch_side(problem, which, threads, form)
    return neutral_side(problem, which, engine, form)


def pin_threads(engine: str, threads: int) -> str:
    """Set the framework's own thread counts before its first operation; say how.

    torch: ``torch.set_num_threads`` (in ``torch_side``). TensorFlow:
    ``tf.config.threading`` intra-op = ``threads``, inter-op = 1. JAX has no such call: the
    driver sets ``XLA_FLAGS`` before JAX is imported and pins the process to one CPU, which
    is what bounds XLA's CPU thread pool (``XLA_FLAGS`` alone does not).
    """
    if not threads:
        return "threads: the framework's default"
    if engine == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        return f"tf.config.threading: intra-op {threads}, inter-op 1"
    if engine == "jax":
        return "XLA_FLAGS=" + os.environ.get("XLA_FLAGS", "(unset)").strip()
    return f"torch.set_num_threads({threads})"


WARMUP = {
    "torch": "eager torch.func: no compilation; the first repeat includes torch's lazy "
    "initialisation",
    "jax": "jax.jit: the first repeat traces and compiles every program (once per batch "
    "shape, kept by the bound model for the later repeats)",
    "tensorflow": "tf.function: the first repeat traces every function (kept by the bound "
    "model for the later repeats)",
}


INPUT_NOTES = {
    "torch": {
        "prebatched": "a list of (x, y) tensor batches, sliced once",
        "dataloader": "DataLoader(TensorDataset(x, y), batch_size=B), as the torch peers",
    },
    "jax": {
        "prebatched": "a list of (x, y) JAX arrays on the device, made once",
        "dataloader": "host NumPy (x, y) batches sliced at every pass (JAX has no loader)",
    },
    "tensorflow": {
        "prebatched": "a list of (x, y) tf.Tensor batches, made once",
        "dataloader": "tf.data.Dataset.from_tensor_slices((x, y)).batch(B)",
    },
}


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
    engine = block_size_of(args.engine)[0]
    notes += [
        f"input form {args.input_form}: " + INPUT_NOTES[engine][args.input_form],
        pin_threads(engine, args.threads),
        WARMUP[engine] + "; no separate warm-up, medians over the repeats after the first",
    ]

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

    model, train, queries = build(problem, "clean", args.engine, args.threads, args.input_form)
    if engine == "tensorflow" and args.input_form == "dataloader":
        state = "on (the default)" if tf_data_autotuned() else "off (one CPU, see bench_common)"
        notes.append(f"tf.data autotuning: {state}")
    if args.dry_run:
        dry_run_report(args, f"ours-{args.engine}", {"train": train, "query": queries})
        return
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
        fmodel, ftrain, _ = build(problem, "flipped", args.engine, args.threads, args.input_form)
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
