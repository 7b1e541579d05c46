"""Wall time of the torch engine's operators on the digits-sized MLP (64-32-10 tanh, p = 2410).

One Hessian-vector product over the 1437 examples (one batch; both ``hvp_mode``s), one
projection with k = 50, one per-example-gradient pass; median of 5 after two warm-up calls,
float64 and float32.

    python benchmarks/torch_operator_timings.py            # OMP_NUM_THREADS=1 on a busy machine
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np
import torch

from krylov_influence.testing import random_mlp_spec
from krylov_influence_torch import TorchEngine

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_operators(spec, dtype: str) -> dict[str, float]:
    """Median milliseconds of one HVP, one k = 50 projection and one per-example-gradient pass."""
    model, batches = TorchEngine.from_neutral_spec(spec, dtype=dtype)
    reverse = TorchEngine.bind(
        model.module, model._loss_fn, l2=spec.l2, hvp_mode="reverse-over-reverse"
    )
    rng = np.random.default_rng(1)
    vector = model.from_numpy(rng.standard_normal(model.num_parameters))
    projector = model.from_numpy(rng.standard_normal((50, model.num_parameters)))
    operator = model.hessian_operator([model.stage_batch(b)[0] for b in batches])  # as a fit
    batch = model.prepare(batches[0])
    return {
        "hvp": median_ms(lambda: operator.mv(vector)),
        "hvp(reverse-over-reverse)": median_ms(lambda: reverse.hvp(vector, [batch])),
        "project(k=50)": median_ms(lambda: model.project(projector, batch)),
        "per_example_grads": median_ms(lambda: model.per_example_grads(batch)),
    }


def main() -> None:
    spec = random_mlp_spec(
        np.random.default_rng(0),
        (64, 32, 10),
        activation="tanh",
        num_examples=1437,
        batch_size=1437,
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), p = {spec.num_parameters}"
    )
    for dtype in ("float64", "float32"):
        figures = time_operators(spec, dtype)
        print(f"{dtype}: " + "  ".join(f"{name} {ms:.1f} ms" for name, ms in figures.items()))


if __name__ == "__main__":
    main()
