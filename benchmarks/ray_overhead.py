"""The cost of one Hessian-vector product through Ray actors, against the same product in process.

On the digits MLP of the benchmark (``prepare.py``; p = 2410, float64, the PyTorch engine,
its 1437 training examples in 6 batches, staged once): the single-process operator
``model.hessian_operator(staged)`` and :class:`krylov_influence.ray.RayHessianOperator` with
1 and 2 actors on a local cluster (``ray.init(num_cpus=2)``). Prints the median wall time per
product (``mv``) and per block of 8 (``mm``), and the overhead against the single process
(one intra-op thread everywhere, as Ray gives a 1-CPU actor).

Then a whole fit (``--fit-subspace`` Arnoldi steps, ``--fit-k`` eigenpairs kept) with the
Hessian data over 2 shard actors (``hessian_dataset=RayHessianData(...)``) against the same
fit in one process: the largest relative difference of the kept eigenvalues, the wall times,
and the overhead per Hessian-vector product, (Ray fit − local fit) / products (the fit's
other work, one forward pass and the eigen-reduction, is the same in both; the actors'
start-up is timed apart).

    python benchmarks/ray_overhead.py --repeats 30
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench_common import load_problem
from complement_accuracy import build


def digits(l2: float, batch_size: int) -> tuple[Any, Any]:
    """The digits MLP (torch, float64) and its training set in batches of ``batch_size``."""
    problem = load_problem("digits")
    problem["config"]["batch_size"] = batch_size
    model, train, _ = build(problem, "torch", l2)
    return model, train


@dataclass(frozen=True)
class DigitsFactory:
    """What each actor calls: the digits MLP built from the prepared arrays."""

    l2: float
    batch_size: int

    def __call__(self) -> Any:
        return digits(self.l2, self.batch_size)[0]


def median_seconds(call: Any, repeats: int) -> float:
    call()  # warm-up: compilation, first transfers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=240, help="6 batches of 1437")
    parser.add_argument("--fit-subspace", type=int, default=100)
    parser.add_argument("--fit-k", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray
    import torch

    # Ray gives each 1-CPU actor one intra-op thread (OMP_NUM_THREADS=1); the single-process
    # figure uses the same, or it measures thread oversubscription on a small machine.
    torch.set_num_threads(1)

    import krylov_influence as ki
    from krylov_influence._staging import DEFAULT_STAGE_BYTES, stage_hessian_data
    from krylov_influence.ray import RayHessianData, split_batches

    model, train = digits(args.l2, args.batch_size)
    staged, _ = stage_hessian_data(model, train, DEFAULT_STAGE_BYTES)
    local = model.hessian_operator(staged)
    rng = np.random.default_rng(0)
    vector = model.from_numpy(rng.standard_normal(model.num_parameters))
    block = model.from_numpy(rng.standard_normal((8, model.num_parameters)))
    rows = [
        {
            "setting": "single process",
            "mv_ms": 1e3 * median_seconds(lambda: local.mv(vector), args.repeats),
            "mm8_ms": 1e3 * median_seconds(lambda: local.mm(block), args.repeats),
        }
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for actors in (1, 2):
            shards = split_batches(list(train), actors)
            factory = DigitsFactory(args.l2, args.batch_size)
            with RayHessianData(factory, shards, num_cpus=1) as data:
                operator = data.hessian_operator(model)
                mv = 1e3 * median_seconds(lambda: operator.mv(vector), args.repeats)  # noqa: B023
                mm = 1e3 * median_seconds(lambda: operator.mm(block), args.repeats)  # noqa: B023
                rows.append({"setting": f"Ray, {actors} actor(s)", "mv_ms": mv, "mm8_ms": mm})
        fit = fit_comparison(ki, model, train, args, RayHessianData, split_batches)
    finally:
        ray.shutdown()
    base = rows[0]
    print(f"digits MLP, p = {model.num_parameters}, N = {sum(model.batch_size(b) for b in train)}")
    print(f"{'setting':<20} {'mv (ms)':>9} {'overhead':>9} {'mm, 8 (ms)':>11} {'overhead':>9}")
    for row in rows:
        print(
            f"{row['setting']:<20} {row['mv_ms']:9.2f} {row['mv_ms'] - base['mv_ms']:+9.2f} "
            f"{row['mm8_ms']:11.2f} {row['mm8_ms'] - base['mm8_ms']:+9.2f}"
        )
    print(
        f"fit, subspace {args.fit_subspace}, k = {args.fit_k}: one process "
        f"{fit['local_s']:.2f} s, Ray with 2 shard actors {fit['ray_s']:.2f} s (actors started "
        f"in {fit['start_s']:.2f} s, apart); {fit['products']} products, overhead "
        f"{1e3 * fit['overhead_per_hvp_s']:+.2f} ms per product; kept eigenvalues equal to "
        f"{fit['eigenvalue_gap']:.1e} relative"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"products": rows, "fit": fit}, handle, indent=2)


def fit_comparison(
    ki: Any, model: Any, train: Any, args: Any, data_class: Any, split: Any
) -> dict[str, float]:
    """A fit with the Hessian data on 2 shard actors against the same fit in this process."""
    settings = (args.fit_subspace, True, args.fit_k)
    start = time.perf_counter()
    local = ki.ArnoldiInfluenceCalculator(model, train, *settings)
    local_s = time.perf_counter() - start
    start = time.perf_counter()
    factory = DigitsFactory(args.l2, args.batch_size)
    with data_class(factory, split(list(train), 2), num_cpus=1) as data:
        start_s = time.perf_counter() - start
        start = time.perf_counter()
        remote = ki.ArnoldiInfluenceCalculator(model, train, *settings, hessian_dataset=data)
        ray_s = time.perf_counter() - start
    expected = np.asarray(local.eigenbasis.eigenvalues, np.float64)
    found = np.asarray(remote.eigenbasis.eigenvalues, np.float64)
    products = int(args.fit_subspace)
    return {
        "local_s": local_s,
        "ray_s": ray_s,
        "start_s": start_s,
        "products": products,
        "overhead_per_hvp_s": (ray_s - local_s) / products,
        "eigenvalue_gap": float(np.max(np.abs(found - expected)) / np.max(np.abs(expected))),
    }


if __name__ == "__main__":
    main()
