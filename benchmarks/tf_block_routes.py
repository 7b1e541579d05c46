"""TensorFlow's block HVP routes, per vector, against the engine's single HVP.

``model.hvps(V, batches)`` for a block of ``--block-size`` random vectors over the problem's
training batches, on each route of the TensorFlow engine's ``hvps`` kernel that this model
can take (a route that fails to trace is reported and skipped), beside ``model.hvp(v,
batches)``, timed in turn in one process (one CPU, one thread; CPU-time medians). Prints each
route's time per vector as a ratio to the single HVP, and each route's largest difference
from single HVPs (relative to the largest entry). With ``--fits N``, then N fits with
``block_size=1`` and N with ``--block-size`` (n = ``--subspace-dim``), alternating in the same
process, each against n single HVPs timed beside it::

    PYTHONPATH=.:backends python benchmarks/tf_block_routes.py --problem transformer \
        --block-size 8 --fits 3 --subspace-dim 24
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from typing import Any

from engine_floor import one_thread, problem_fit, sample


def cpu_median(fn: Callable[[], Any], repeats: int) -> float:
    """Median CPU seconds of ``repeats`` calls of ``fn`` (already warm), as engine_floor times."""
    timing: dict[str, Any] = {"wall": [], "cpu": []}
    for _ in range(repeats):
        sample(fn, lambda out: out, timing)
    return timing["cpu_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("digits", "cnn", "transformer"), required=True)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="of every route, in turn")
    parser.add_argument("--fits", type=int, default=0, help="alternating fits per block size")
    parser.add_argument("--subspace-dim", type=int, default=24, help="n of the --fits fits")
    parser.add_argument("--cpu", type=int, default=1, help="CPU to pin to (-1: no pinning)")
    args = parser.parse_args()
    one_thread(None if args.cpu < 0 else args.cpu)

    import numpy as np

    from bench_common import load_problem
    from peer_ours import neutral_side

    problem = load_problem(args.problem)
    model, train, _ = neutral_side(problem, "clean", "tensorflow", "prebatched")
    train = list(train)
    dtype = problem["config"]["dtype"]
    vectors = np.random.default_rng(0).standard_normal((args.block_size, model.num_parameters))
    block = model.from_numpy(vectors.astype(dtype))
    single = np.stack([model.hvp(row, train).numpy() for row in block])
    scale = float(np.max(np.abs(single)))
    kernel = model._hvp_block  # the engine's block kernel: its routes, taken one at a time
    routes = []
    for index, route in enumerate(kernel._routes):
        kernel._index, kernel._settled = index, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback note of a route that cannot trace
            products = model.hvps(block, train).numpy()
        if kernel._index != index:  # it failed to trace and fell back to a later route
            print(f"{route.name}: cannot trace for this model")
            continue
        difference = float(np.max(np.abs(products - single))) / scale
        print(f"{route.name}: max |difference| / max |Hv| = {difference:.1e}", flush=True)
        routes.append((index, route.name))

    samples: dict[str, list[float]] = {"single": []}
    for _ in range(args.rounds):
        samples["single"].append(
            cpu_median(lambda: model.hvp(block[0], train).numpy(), args.repeats)
        )
        for index, name in routes:
            kernel._index, kernel._settled = index, True
            run = lambda: model.hvps(block, train).numpy()  # noqa: E731
            samples.setdefault(name, []).append(cpu_median(run, args.repeats))
    one = statistics.median(samples.pop("single"))
    print(f"{args.problem}: single HVP {one * 1e3:.1f} ms (CPU)")
    for name, times in samples.items():
        per_vector = statistics.median(times) / args.block_size
        print(f"  {name}: {per_vector * 1e3:.1f} ms a vector, {per_vector / one:.2f}x the single")
    if args.fits:
        kernel._index, kernel._settled = 0, False  # the kernel's own choice again
        fits(problem, model, train, block[0], args)


def fits(problem: dict[str, Any], model: Any, train: list, vector: Any, args: Any) -> None:
    """``--fits`` fits at block sizes 1 and b in turn, each beside n single HVPs."""
    n = args.subspace_dim

    def fit(block_size: int) -> None:
        problem_fit(problem, model, train, n, block_size)

    sizes = (1, args.block_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an indefinite Hessian's note, at every fit
        for size in sizes:
            fit(size)  # traces
        samples: dict[int, list[float]] = {size: [] for size in sizes}
        hvps = []
        for _ in range(args.fits):
            hvps.append(cpu_median(lambda: model.hvp(vector, train).numpy(), 3))
            for size in sizes:
                samples[size].append(cpu_median(lambda s=size: fit(s), 1))
    one = statistics.median(hvps)
    print(f"fits, n = {n}: single HVP {one:.3f} s (CPU)")
    for size in sizes:
        times = ", ".join(f"{t:.2f}" for t in samples[size])
        ratio = statistics.median(samples[size]) / (n * one)
        print(f"  block_size={size}: {times} s; median / (n x single HVP) = {ratio:.2f}")


if __name__ == "__main__":
    main()
