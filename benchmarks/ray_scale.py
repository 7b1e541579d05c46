"""Scoring a large synthetic training set end to end: Ray with 2 actors, 1 actor, one process.

A small PyTorch MLP (float32, random weights: the scoring cost does not depend on training),
``--examples`` synthetic examples (default 1,000,000) drawn batch by batch from a seeded
generator, and a calculator fitted on the first few batches (``k = 50``). The job: the
self-influence of every example and its influence vector (N × k) written to a store, with the
per-example losses that identify the data.

- **single process**: the calculator's one-pass way, ``cache_training_vectors(train)`` (one
  projection pass, vectors and losses kept), ``self_influence(train)`` (from the kept
  vectors) and ``compute_influence_vector(train, save_influence_vector_ds_path=...)`` (the
  kept vectors written to a store);
- **Ray, 1 and 2 actors**: :func:`krylov_influence.ray.score_training_set` on a local cluster
  (``ray.init(num_cpus=2)``, ``num_cpus=1`` per actor) writing the zarr store; the wall time
  includes starting the actors (each imports torch and builds its model).

One intra-op thread everywhere (what Ray gives a 1-CPU actor). Printed per setting: wall
time, examples per second, the driver's peak RSS during the run (``VmHWM``, reset before each
run through ``/proc/self/clear_refs``) and its rise over the RSS at the start; then the ratios
(2 actors against 1, 1 actor against one process), the time to start the actors alone
(measured apart, before each Ray run) and the largest difference of the Ray
self-influence from the single process's (float32).

    PYTHONPATH=.:backends python benchmarks/ray_scale.py --examples 20000
    PYTHONPATH=.:backends nice python benchmarks/ray_scale.py   # 1,000,000 examples
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MLPFactory:
    """The benchmark's model: what the driver and each actor build (same seed, same weights)."""

    features: int
    hidden: int
    classes: int
    seed: int = 0

    def __call__(self) -> Any:
        import torch

        import krylov_influence as ki

        torch.set_num_threads(1)
        torch.manual_seed(self.seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(self.features, self.hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(self.hidden, self.classes),
        )
        loss = torch.nn.CrossEntropyLoss(reduction="none")
        return ki.InfluenceModel(net.eval(), loss, l2=1e-3, dtype="float32")


@dataclass(frozen=True)
class SyntheticBatches:
    """``num_examples`` examples in batches of ``batch_size``, drawn per batch from a seed.

    Re-iterable and deterministic; nothing is held between batches.
    """

    num_examples: int
    batch_size: int
    features: int
    classes: int

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Any:
        import torch

        for index in range(len(self)):
            size = min(self.batch_size, self.num_examples - index * self.batch_size)
            rng = np.random.default_rng([11, index])
            x = rng.standard_normal((size, self.features), dtype=np.float32)
            y = rng.integers(0, self.classes, size)
            yield torch.from_numpy(x), torch.from_numpy(y)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measured(run: Any) -> tuple[dict[str, float], Any]:
    """Wall time, driver peak RSS and its rise during ``run()``."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS
    start_rss = rss_mb()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_rise_mb": peak - start_rss}, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batches-per-block", type=int, default=32)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--subspace", type=int, default=100)
    parser.add_argument("--fit-batches", type=int, default=4)
    parser.add_argument("--settings", default="single,ray1,ray2", help="comma-separated")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray
    import torch

    import krylov_influence as ki
    from krylov_influence.ray import score_training_set
    from krylov_influence.ray._pool import ScorerPool

    torch.set_num_threads(1)
    factory = MLPFactory(args.features, args.hidden, args.classes)
    model = factory()
    train = SyntheticBatches(args.examples, args.batch_size, args.features, args.classes)
    fit_data = SyntheticBatches(
        args.fit_batches * args.batch_size, args.batch_size, args.features, args.classes
    )
    fit_start = time.perf_counter()
    calc = ki.ArnoldiInfluenceCalculator(model, fit_data, args.subspace, True, args.k)
    fit_seconds = time.perf_counter() - fit_start
    settings = args.settings.split(",")
    scratch = tempfile.mkdtemp(prefix="ray_scale_")
    rows: list[dict[str, Any]] = []
    values: dict[str, np.ndarray] = {}
    try:
        if "single" in settings:

            def single() -> np.ndarray:
                calc.cache_training_vectors(train)
                found = calc.self_influence(train)
                path = os.path.join(scratch, "single.npz")
                calc.compute_influence_vector(train, save_influence_vector_ds_path=path)
                calc.clear_training_vectors()
                return found

            figures, values["single"] = measured(single)
            rows.append({"setting": "single process", **figures})
        ray_settings = [s for s in settings if s.startswith("ray")]
        if ray_settings:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for setting in ray_settings:
            actors = int(setting[3:])
            store = os.path.join(scratch, f"{setting}.zarr")
            # Starting the actors alone (torch imported, model built, fingerprint checked):
            # the part of the wall time below that does not grow with N.
            start = time.perf_counter()
            ScorerPool(calc, factory, actors, num_cpus=1).shutdown()
            startup = time.perf_counter() - start

            def on_ray(actors: int = actors, store: str = store) -> np.ndarray:
                scores = score_training_set(
                    calc,
                    factory,
                    train,
                    batches_per_block=args.batches_per_block,
                    num_actors=actors,
                    store_path=store,
                    num_cpus=1,
                )
                return scores.self_influence

            figures, values[setting] = measured(on_ray)
            rows.append({"setting": f"Ray, {actors} actor(s)", **figures, "startup_s": startup})
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    p = model.num_parameters
    print(
        f"MLP {args.features}-{args.hidden}-{args.classes} (p = {p}), float32, torch, k = "
        f"{args.k}; N = {args.examples} in batches of {args.batch_size}, "
        f"{args.batches_per_block} batches per block; fit {fit_seconds:.1f} s; "
        f"load average {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} (1 / 5 min)"
    )
    print(
        f"{'setting':<16} {'wall (s)':>9} {'examples/s':>11} {'peak RSS':>9} {'rise':>7} "
        f"{'actor start-up (s)':>19}"
    )
    for row in rows:
        row["examples_per_second"] = args.examples / row["seconds"]
        startup = f"{row['startup_s']:19.1f}" if "startup_s" in row else f"{'':>19}"
        print(
            f"{row['setting']:<16} {row['seconds']:9.1f} {row['examples_per_second']:11.0f} "
            f"{row['peak_rss_mb']:7.0f}MB {row['rss_rise_mb']:5.0f}MB {startup}"
        )
    by_name = {row["setting"]: row["seconds"] for row in rows}
    if "Ray, 1 actor(s)" in by_name and "Ray, 2 actor(s)" in by_name:
        speedup = by_name["Ray, 1 actor(s)"] / by_name["Ray, 2 actor(s)"]
        print(f"2 actors against 1: {speedup:.2f}x faster (aim >= 1.7 on 2 free cores)")
    if "single process" in by_name and "Ray, 1 actor(s)" in by_name:
        overhead = by_name["Ray, 1 actor(s)"] / by_name["single process"]
        print(f"Ray, 1 actor against one process: {overhead:.2f}x the time (aim <= 1.2)")
    if "single" in values:
        for name, found in values.items():
            if name != "single":
                scale = np.max(np.abs(values["single"]))
                gap = np.max(np.abs(found - values["single"])) / scale
                print(f"self-influence, {name} against one process: {gap:.1e} relative (float32)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"arguments": vars(args), "fit_seconds": fit_seconds, "rows": rows}, handle)


if __name__ == "__main__":
    main()
