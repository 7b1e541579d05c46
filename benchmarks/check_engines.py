"""Check that the three engines score the same model: loss, gradient and one HVP agree.

The ``cnn`` and ``transformer`` problems are trained in PyTorch and loaded into JAX (plain
functions) and Keras (standard layers) by ``bench_engines.py``. This binds each with our
engine (``ki.InfluenceModel``) and compares, on the training set, against the PyTorch engine:

- the per-example losses (``model.losses``);
- the gradient of the mean loss (the mean of ``per_example_grads``), mapped back to the
  PyTorch names and shapes;
- one Hessian-vector product of the mean loss along a random vector (``model.hvp``).

Each is compared by the relative error ``‖a − b‖ / ‖b‖`` (per-example losses: the largest
absolute difference over the largest loss), which must stay below ``--tolerance``
(default 1e-4: float32 round-off over a few hundred thousand terms, far below any layout
mistake, which gives errors of order 1). Exit status 1 if any comparison fails.

    PYTHONPATH=.:backends python benchmarks/check_engines.py --problem transformer
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench_common import load_problem
from bench_engines import batches, bind, flat_to_torch, torch_to_flat

ENGINES = ("torch", "jax", "tensorflow")


def figures(problem: dict, engine: str, direction: dict[str, np.ndarray]) -> dict:
    """Per-example losses, mean gradient and ``H v`` of ``engine``, in the PyTorch layout."""
    model = bind(problem, engine)
    train = batches(problem, engine, "train")
    losses = np.concatenate([model.to_numpy(model.losses(b)) for b in train])
    grads = sum(model.to_numpy(model.per_example_grads(b)).sum(axis=0) for b in train)
    vector = model.from_numpy(torch_to_flat(problem, model, direction))
    hvp = model.to_numpy(model.hvp(vector, train))
    return {
        "losses": losses,
        "gradient": flat_to_torch(problem, model, grads / len(losses)),
        "hvp": flat_to_torch(problem, model, hvp),
        "routes": dict(model.routes) if hasattr(model, "routes") else {},
    }


def relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b)
    den = sum(float(np.sum(b[k] ** 2)) for k in b)
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="transformer", choices=("cnn", "transformer"))
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    problem = load_problem(args.problem)
    rng = np.random.default_rng(0)
    names = [k.removeprefix("clean/") for k in problem if k.startswith("clean/")]
    direction = {
        name: rng.standard_normal(problem[f"clean/{name}"].shape).astype(np.float32)
        for name in names
    }
    results = {engine: figures(problem, engine, direction) for engine in ENGINES}
    reference = results["torch"]
    failed = False
    print(
        f"{args.problem}: p = {problem['config']['num_parameters']}, mean loss (torch) "
        f"{reference['losses'].mean():.6f}"
    )
    for engine in ENGINES[1:]:
        got = results[engine]
        errors = {
            "losses": float(
                np.abs(got["losses"] - reference["losses"]).max()
                / np.abs(reference["losses"]).max()
            ),
            "gradient": relative(got["gradient"], reference["gradient"]),
            "hvp": relative(got["hvp"], reference["hvp"]),
        }
        bad = {k: v for k, v in errors.items() if not v <= args.tolerance}
        failed |= bool(bad)
        print(
            f"{engine} vs torch: "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
            + ("  FAILED" if bad else "  ok")
            + f"; routes {got['routes']}"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
