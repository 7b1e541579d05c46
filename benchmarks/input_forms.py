"""Fit time of the digits MLP for each input form of the Hessian data, staged and streamed.

Run from the repository root, after ``python benchmarks/prepare.py digits``::

    PYTHONPATH=.:backends python benchmarks/input_forms.py
    PYTHONPATH=.:backends python benchmarks/input_forms.py --batch-size 128 --engines jax

Every engine runs in its own subprocess on one thread (``torch.set_num_threads(1)``; JAX with
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` set before
``import jax``; TensorFlow with one intra-op and one inter-op thread). The fit is
``ArnoldiInfluenceCalculator(model, data, 200, True, 50, "float64", damping=δ + l2)`` (the
settings of ``peer_ours.py``) with ``stage_hessian_data=True`` (staged) or ``False``
(streamed); each cell is the median of ``--repeats`` fits, taken round-robin over the cells
after one untimed warm-up fit per form (which compiles the JAX and TensorFlow programs for its
shapes), in wall seconds and CPU seconds of the process (steadier when the machine is
shared). The last column is the staged fit's CPU time over that of the staged list of the
same engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench_common import load_problem

ENGINES = ("torch", "jax", "tensorflow")


def class_iterable(batches: list[Any]) -> Any:
    """The batches behind a class with ``__iter__`` (what a custom data pipeline looks like)."""

    class Batches:
        def __iter__(self) -> Any:
            return iter(batches)

    return Batches()


def torch_forms(problem: dict[str, Any], batch_size: int) -> tuple[Any, dict[str, Any]]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import krylov_influence as ki
    from bench_torch import load_model, tensors

    torch.set_num_threads(1)
    t = tensors(problem)
    x, y = t["x_train"], t["y_train"]
    batches = [(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(y), batch_size)]
    model = ki.InfluenceModel(
        load_model(problem), torch.nn.CrossEntropyLoss(reduction="none"), l2=0.0
    )
    forms = {
        "list of (x, y) tensors": batches,
        f"DataLoader(TensorDataset, batch_size={batch_size})": DataLoader(
            TensorDataset(x, y), batch_size=batch_size
        ),
        "DataLoader(list of batches, batch_size=None)": DataLoader(batches, batch_size=None),
        "list of NumPy (x, y)": [(a.numpy(), b.numpy()) for a, b in batches],
    }
    return model, forms


def neutral_forms(
    problem: dict[str, Any], batch_size: int, engine: str
) -> tuple[Any, dict[str, Any]]:
    from krylov_influence import get_engine
    from krylov_influence.testing import MLPSpec

    config = problem["config"]
    sizes = config["layer_sizes"]
    weights = tuple(
        np.ascontiguousarray(problem[f"clean/{2 * i}.weight"].T) for i in range(len(sizes) - 1)
    )
    biases = tuple(problem[f"clean/{2 * i}.bias"] for i in range(len(sizes) - 1))
    spec = MLPSpec(
        tuple(sizes),
        "tanh",
        "cross_entropy",
        weights,
        biases,
        problem["x_train"],
        problem["y_train"],
        batch_size,
        0.0,
    )
    model, batches = get_engine(engine).from_neutral_spec(spec, dtype=config["dtype"])
    numpy_batches = [(np.asarray(x), np.asarray(y)) for x, y in batches]
    if engine == "jax":
        forms = {
            "list of (x, y) jax arrays": batches,
            "class with __iter__ (jax arrays)": class_iterable(batches),
            "list of NumPy (x, y)": numpy_batches,
        }
    else:
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices(
            (problem["x_train"], problem["y_train"])
        ).batch(batch_size)
        forms = {
            "list of (x, y) tensors": batches,
            f"tf.data.Dataset.batch({batch_size})": dataset,
            "list of NumPy (x, y)": numpy_batches,
        }
    return model, forms


def seconds(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()`` (CPU: all threads; steadier on a shared machine)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_engine(engine: str, batch_size: int, repeats: int) -> list[dict[str, Any]]:
    """Time every form of ``engine`` (in this process), staged and streamed."""
    import krylov_influence as ki

    problem = load_problem("digits")
    config = problem["config"]
    if engine == "torch":
        model, forms = torch_forms(problem, batch_size)
    else:
        model, forms = neutral_forms(problem, batch_size, engine)

    def fit(data: Any, staged: bool) -> None:
        calc = ki.ArnoldiInfluenceCalculator(
            model,
            data,
            config["subspace_dim"],
            True,
            config["k"],
            config["dtype"],
            damping=config["damping"] + config["l2"],
            show_progress=False,
            stage_hessian_data=staged,
        )
        calc.model.to_numpy(calc.G)  # wait for asynchronous engines

    for data in forms.values():  # warm-up: compile for every form's shapes and dtypes
        fit(data, True)
    cells = [(name, staged) for name in forms for staged in (True, False)]
    times: dict[tuple[str, bool], list[tuple[float, float]]] = {cell: [] for cell in cells}
    for _ in range(repeats):  # round-robin, so a busy spell of the machine hits every cell
        for name, staged in cells:
            times[name, staged].append(seconds(lambda: fit(forms[name], staged)))  # noqa: B023
    rows = []
    for name in forms:
        row: dict[str, Any] = {"engine": engine, "form": name}
        for staged in (True, False):
            key = "staged" if staged else "streamed"
            row[key] = statistics.median(wall for wall, _ in times[name, staged])
            row[f"{key}_cpu"] = statistics.median(cpu for _, cpu in times[name, staged])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | Hessian data | staged fit, wall (CPU) s | streamed fit, wall (CPU) s "
        "| staged / staged list (CPU) |",
        "|---|---|---:|---:|---:|",
    ]
    first: dict[str, float] = {}
    for row in rows:
        base = first.setdefault(row["engine"], row["staged_cpu"])
        lines.append(
            f"| {row['engine']} | {row['form']} | {row['staged']:.2f} ({row['staged_cpu']:.2f}) "
            f"| {row['streamed']:.2f} ({row['streamed_cpu']:.2f}) "
            f"| {row['staged_cpu'] / base:.2f} |"
        )
    return "\n".join(lines)


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batch-size", type=int, default=0, help="0: the problem's (1437)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_size = args.batch_size or load_problem("digits")["config"]["batch_size"]
    if args.child:  # one engine, in this (single-threaded) process
        if args.child == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)
        elif args.child == "tensorflow":
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        print(json.dumps(run_engine(args.child, batch_size, args.repeats)))
        return
    rows = []
    for engine in args.engines.split(","):
        command = [sys.executable, __file__, "--child", engine, "--batch-size", str(batch_size)]
        command += ["--repeats", str(args.repeats)]
        done = subprocess.run(
            command, env=child_environment(), capture_output=True, text=True, check=False
        )
        if done.returncode:
            print(f"{engine}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        rows += json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{engine}: done", file=sys.stderr)
    print(f"digits MLP, float64, n = 200, k = 50, batches of {batch_size}, one thread")
    print(table(rows))


if __name__ == "__main__":
    main()
