"""The CNN fit from a list of batches and from a DataLoader, staged, alternating (torch).

``python benchmarks/cnn_input_forms.py --subspace-dim 20 --repeats 3`` pins itself to one
thread and prints the median fit time of each form and their ratio: the staged DataLoader
should cost what the list costs (one collating pass more, then the same HVPs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import krylov_influence as ki
from bench_common import load_problem
from bench_torch import load_model, tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subspace-dim", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = load_problem("cnn")
    config = problem["config"]
    t = tensors(problem, "clean")
    b = config["batch_size"]
    forms = {
        "list": [(t["x_train"][s : s + b], t["y_train"][s : s + b]) for s in range(0, 2000, b)],
        "DataLoader(TensorDataset)": DataLoader(
            TensorDataset(t["x_train"], t["y_train"]), batch_size=b
        ),
    }
    model = ki.InfluenceModel(load_model(problem), torch.nn.CrossEntropyLoss(reduction="none"))
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, data in forms.items():
            start = time.perf_counter()
            ki.ArnoldiInfluenceCalculator(
                model, data, args.subspace_dim, True, 10, damping=0.011, show_progress=False
            )
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: {value:.2f} s (runs: {', '.join(f'{v:.2f}' for v in times[name])})")
    print(f"ratio: {medians['DataLoader(TensorDataset)'] / medians['list']:.3f}")


if __name__ == "__main__":
    main()
