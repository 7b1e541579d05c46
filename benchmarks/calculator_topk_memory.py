"""Peak memory of ``ArnoldiInfluenceCalculator.top_k`` as the training set grows.

Softmax regression on the NumPy reference engine (d features, c classes, p = (d + 1) c),
a query set 10x smaller than the training set, every result consumed and dropped. The peak is
measured with ``tracemalloc`` (NumPy reports its buffers to it) from just before ``top_k`` to
the end of the iteration, so the data and the fitted calculator, which exist anyway, are not
counted. For comparison: ``N_train × p`` float64 (what materialising training gradients costs)
and ``N_train × k`` (the influence vectors that ``CACHE.MEMORY`` keeps).

Run: ``python benchmarks/calculator_topk_memory.py [--sizes 2000 20000]``.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from krylov_influence import CACHE, ArnoldiInfluenceCalculator
from krylov_influence.reference import SoftmaxRegression


def batches(rng: np.random.Generator, n: int, d: int, c: int, size: int) -> list:
    x = rng.standard_normal((n, d))
    y = rng.integers(0, c, n)
    return [(x[s : s + size], y[s : s + size]) for s in range(0, n, size)]


def measure(calc, queries, train, k, cache) -> tuple[float, float]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    for result in calc.top_k(queries, train, k=k, influence_vector_in_cache=cache):
        del result
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--features", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rank", type=int, default=20, help="k_largest_eig_vals")
    parser.add_argument("--top", type=int, default=10, help="k of top_k")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    d, c = args.features, args.classes
    p = (d + 1) * c
    model = SoftmaxRegression(rng.standard_normal((d, c)) / np.sqrt(d), np.zeros(c), l2=1e-2)
    print(
        f"p = {p}, k_largest_eig_vals = {args.rank}, top_k k = {args.top}, "
        f"batch = {args.batch_size}, float64"
    )
    print(
        f"{'N_train':>8} {'N_query':>8} {'cache':>9} {'peak MiB':>9} {'time s':>7} "
        f"{'N×p MiB':>8} {'N×k MiB':>8}"
    )
    for n in args.sizes:
        train = batches(rng, n, d, c, args.batch_size)
        queries = batches(rng, n // 10, d, c, args.batch_size)
        calc = ArnoldiInfluenceCalculator(
            model, train, 2 * args.rank, True, args.rank, "float64", show_progress=False
        )
        for cache in (CACHE.NO_CACHE, CACHE.DISK, CACHE.MEMORY):
            peak, elapsed = measure(calc, queries, train, args.top, cache)
            print(
                f"{n:>8} {n // 10:>8} {cache.name:>9} {peak:>9.2f} {elapsed:>7.2f} "
                f"{n * p * 8 / 2**20:>8.1f} {n * args.rank * 8 / 2**20:>8.2f}"
            )


if __name__ == "__main__":
    main()
