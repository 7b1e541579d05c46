"""influenciae's ArnoldiInfluenceCalculator on the benchmark problem (its own venv).

The torch MLP's weights go into the equivalent Keras model (Dense 64→32 tanh, Dense 32→10, float64;
Keras stores ``x @ W``, torch ``x @ Wᵀ``). influenciae 0.3.0 pins tensorflow < 2.10; it runs on
tensorflow-cpu 2.15.1 (installed with ``--no-deps``).

Convention mapping. influenciae's Hessian is the mean over the training data (one example at a
time through ``map_fn``) and its scores are ``g_zᵀ G ᵀ diag(1/λ) G g_x``, positive for proponents:
no rescaling. It has no damping and no L2 term, so after the fit the damping ``δ + l2`` is added
to its kept eigenvalues (``calc.eig_vals``): by shift invariance of Krylov spaces that is the
damped Hessian of the trained objective, as for the other peers. It keeps the k *smallest* |λ|
(REFERENCE.md §2): left as is — that is the library. Its top-k returns training samples, not
indices; they are mapped back to indices by their bytes.

Inputs. influenciae takes only a batched ``tf.data.Dataset`` (it reads the private
``dataset._batch_size`` and checks that the dataset is batched), so it runs in the
``dataloader`` form alone: ``tf.data.Dataset.from_tensor_slices((x, y)).batch(B)``, the
idiomatic TensorFlow pipeline. A list of pre-made batches, or a dataset of them built with
``from_tensors``, is not a ``BatchDataset`` and is refused; the driver does not ask for it.

Threads and warm-up. ``--threads`` sets TensorFlow's intra-op threads (and one inter-op
thread) before any operation. influenciae decorates its methods with ``tf.function``, traced
per instance: every repeat's fresh calculator traces again, which the library does for any
user; the first repeat also pays TensorFlow's start-up.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import numpy as np
import tensorflow as tf

from bench_common import (
    TOP_K,
    StageRecorder,
    dry_run_report,
    load_problem,
    peer_arguments,
    write_result,
)


def keras_mlp(problem: dict[str, Any], which: str) -> Any:
    sizes = problem["config"]["layer_sizes"]
    tf.keras.backend.set_floatx("float64")
    layers = [tf.keras.Input(shape=(sizes[0],), dtype="float64")]
    for i, width in enumerate(sizes[1:]):
        last = i == len(sizes) - 2
        layers.append(tf.keras.layers.Dense(width, activation=None if last else "tanh"))
    model = tf.keras.Sequential(layers)
    for i, layer in enumerate(model.layers):
        layer.set_weights([problem[f"{which}/{2 * i}.weight"].T, problem[f"{which}/{2 * i}.bias"]])
    return model


def main() -> None:
    from deel.influenciae.common import InfluenceModel
    from deel.influenciae.influence import ArnoldiInfluenceCalculator

    args = peer_arguments("benchmark peer: influenciae")
    if args.input_form != "dataloader":
        sys.exit(
            "influenciae peer: only --input-form dataloader (a batched tf.data.Dataset, "
            "the one input influenciae accepts)"
        )
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    problem = load_problem(args.problem)
    config = problem["config"]
    if config["kind"] != "mlp":
        sys.exit("influenciae peer: only the MLP problem has a Keras twin here")
    damping = config["damping"] + config["l2"]
    loss = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )

    def datasets(which: str) -> tuple[Any, Any]:
        y = problem["y_train_flipped"] if which == "flipped" else problem["y_train"]
        train = tf.data.Dataset.from_tensor_slices((problem["x_train"], y.astype(np.int64)))
        query = tf.data.Dataset.from_tensor_slices(
            (problem["x_query"], problem["y_query"].astype(np.int64))
        )
        return train.batch(config["batch_size"]), query.batch(config["query_batch_size"])

    def fit(which: str, train: Any) -> Any:
        model = InfluenceModel(
            keras_mlp(problem, which), start_layer=0, last_layer=-1, loss_function=loss
        )
        calc = ArnoldiInfluenceCalculator(
            model, train, config["subspace_dim"], True, config["k"], dtype=tf.float64
        )
        calc.eig_vals = calc.eig_vals + tf.constant(damping, tf.float64)
        return calc

    def self_influence(calc: Any, train: Any) -> np.ndarray:
        values = [v.numpy().reshape(-1) for _, v in calc.compute_influence_values(train)]
        return np.concatenate(values)

    def scores(calc: Any, query: Any, train: Any) -> np.ndarray:
        rows = []
        for _, per_train in calc.estimate_influence_values_in_batches(query, train):
            rows.append(np.concatenate([v.numpy() for _, v in per_train], axis=1))
        return np.concatenate(rows, axis=0)

    index = {row.tobytes(): i for i, row in enumerate(problem["x_train"].astype(np.float64))}

    def top_k(calc: Any, query: Any, train: Any) -> np.ndarray:
        out = []
        for _, _values, samples in calc.top_k(query, train, k=TOP_K, d_type=tf.float64):
            x = samples[0] if isinstance(samples, tuple) else samples
            x = x.numpy().astype(np.float64)
            out.append([[index.get(r.tobytes(), -1) for r in q] for q in x])
        return np.concatenate([np.asarray(o) for o in out], axis=0)

    train, query = datasets("clean")
    if args.dry_run:
        dry_run_report(args, "influenciae", {"train": train, "query": query})
        return
    recorder = StageRecorder()
    si = sc = tk = None
    for _ in range(args.repeats):
        calc = recorder.run("fit", lambda: fit("clean", train))
        si = recorder.run("self_influence", partial(self_influence, calc, train))
        sc = recorder.run("scores", partial(scores, calc, query, train))
        tk = recorder.run("top_k", partial(top_k, calc, query, train))
    flipped = None
    if not args.no_mislabel:
        ftrain, _ = datasets("flipped")
        flipped = self_influence(fit("flipped", ftrain), ftrain)
    import deel.influenciae

    versions = {
        "influenciae": getattr(deel.influenciae, "__version__", "0.3.0"),
        "tensorflow": tf.__version__,
    }
    notes = [
        "no damping in influenciae: δ + l2 added to its kept eigenvalues",
        "keeps the k smallest |λ| (its selection)",
        "top-k returns samples: mapped back",
        "input form dataloader: tf.data from_tensor_slices((x, y)).batch(B), its only input",
        "tf.function methods traced per calculator instance: every repeat traces again; "
        "medians over the repeats after the first",
    ]
    write_result(args, "influenciae", recorder, sc, si, flipped, tk, versions, notes)


if __name__ == "__main__":
    main()
