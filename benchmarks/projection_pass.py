"""One projection pass over the training set against the engine's per-example-gradient floor.

``model.project_and_losses(G, batch)`` for every training batch (what
``cache_training_vectors`` runs), with a random (k, p) projector held as one engine array,
beside ``engine_floor.py``'s per-example-gradient pass of the same engine, the two timed in
turn in one process (one CPU, one thread). Prints the medians and their ratio; run it in two
checkouts, alternating, to compare commits::

    PYTHONPATH=.:backends python benchmarks/projection_pass.py --problem transformer \\
        --engine tensorflow
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from engine_floor import finisher, jax_floor, one_thread, tf_floor, torch_floor

FLOORS = {"torch": torch_floor, "jax": jax_floor, "tensorflow": tf_floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("cnn", "transformer"), required=True)
    parser.add_argument("--engine", choices=tuple(FLOORS), required=True)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=1, help="the CPU to pin the process to")
    args = parser.parse_args()
    one_thread(args.cpu)

    import numpy as np

    from bench_common import load_problem
    from bench_engines import batches, bind

    problem = load_problem(args.problem)
    floor = FLOORS[args.engine](problem, args.k)["grads_train"]
    finish = finisher(args.engine)
    train = batches(problem, args.engine, "train")
    model = bind(problem, args.engine)
    rng = np.random.default_rng(0)
    dtype = problem["config"]["dtype"]
    G = model.from_numpy(rng.standard_normal((args.k, model.num_parameters)).astype(dtype))

    def ours() -> Any:
        return [model.to_numpy(model.project_and_losses(G, batch)[0]) for batch in train]

    passes = {"floor": lambda: finish(floor()), "projection": ours}
    for run in passes.values():  # compilation and first calls
        run()
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    floor_s, ours_s = (statistics.median(times[name]) for name in ("floor", "projection"))
    print(
        f"{args.problem} {args.engine}: per-example-gradient floor {floor_s:.3f} s, "
        f"projection pass {ours_s:.3f} s, ratio {ours_s / floor_s:.2f} "
        f"(median of {args.repeats}; routes {getattr(model, 'routes', {})})"
    )


if __name__ == "__main__":
    main()
