"""Timings of the JAX engine's operators on the digits-sized MLP (64-32-10 tanh, 1437 examples).

Run: ``PYTHONPATH=.:backends python benchmarks/jax_engine_timings.py`` (median of 5 runs
after a warm-up call that compiles).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from krylov_influence.testing import random_mlp_spec  # noqa: E402
from krylov_influence_jax import JaxEngine  # noqa: E402


def median_ms(fn, repeats: int = 5) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    spec = random_mlp_spec(
        np.random.default_rng(0),
        (64, 32, 10),
        activation="tanh",
        num_examples=1437,
        batch_size=1437,
    )
    print(f"jax {jax.__version__} on {jax.devices()[0]}, p = {spec.num_parameters}")
    for dtype in ("float64", "float32"):
        model, batches = JaxEngine.from_neutral_spec(spec, dtype=dtype)
        rng = np.random.default_rng(1)
        v = model.from_numpy(rng.standard_normal(model.num_parameters))
        G = model.from_numpy(rng.standard_normal((50, model.num_parameters)))
        operator = model.hessian_operator([model.stage_batch(b)[0] for b in batches])
        batch = batches[0]
        rows = {
            "hvp (model.hvp)": median_ms(partial(model.hvp, v, batches)),
            "hvp (staged operator.mv)": median_ms(partial(operator.mv, v)),
            "project k=50": median_ms(partial(model.project, G, batch)),
            "per_example_grads": median_ms(partial(model.per_example_grads, batch)),
        }
        for name, ms in rows.items():
            print(f"{dtype:8s} {name:26s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
