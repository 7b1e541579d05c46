"""Train the benchmark models once and save them, with their data, to ``results/<problem>.npz``.

Run with the main environment (torch and scikit-learn)::

    python benchmarks/prepare.py            # both problems
    python benchmarks/prepare.py digits

Problems:

- ``digits``: scikit-learn's digits scaled to [0, 1], 1437 training and 200 query digits, a
  64-32-10 tanh MLP (p = 2410) in float64 trained to convergence by L-BFGS on the mean
  cross-entropy plus ``½ l2 ‖θ‖²`` (l2 = 1e-3); a second copy trained on labels of which 10 %
  are flipped (to another class) serves the mislabel-detection AUC.
- ``cnn``: synthetic 28×28 single-channel images of 10 classes (a smooth random template per
  class plus noise), a two-conv CNN (p ≈ 109k) in float32 trained by Adam with the same L2.

Every peer loads the same arrays, so everyone scores the same trained parameters.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch

from bench_common import RESULTS
from bench_torch import build_model, regularised_loss

PROBLEMS: dict[str, dict[str, Any]] = {
    "digits": {
        "kind": "mlp",
        "layer_sizes": [64, 32, 10],
        "dtype": "float64",
        "num_train": 1437,
        "num_query": 200,
        "l2": 1e-3,
        "damping": 1e-2,
        "subspace_dim": 200,
        "k": 50,
        "batch_size": 1437,
        "query_batch_size": 200,
        "flip_fraction": 0.1,
        "seed": 0,
    },
    "cnn": {
        "kind": "cnn",
        "channels": [16, 32],
        "hidden": 128,
        "num_classes": 10,
        "dtype": "float32",
        "num_train": 2000,
        "num_query": 100,
        "l2": 1e-3,
        "damping": 1e-2,
        "subspace_dim": 100,
        "k": 20,
        "batch_size": 500,
        "query_batch_size": 100,
        "flip_fraction": 0.1,
        "seed": 0,
    },
}


def digits_data(config: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = rng.permutation(len(y))
    x, y = x[order] / 16.0, y[order]
    n, q = config["num_train"], config["num_query"]
    return {"x_train": x[:n], "y_train": y[:n], "x_query": x[n : n + q], "y_query": y[n : n + q]}


def synthetic_images(config: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    classes, n, q = config["num_classes"], config["num_train"], config["num_query"]
    coarse = rng.normal(size=(classes, 7, 7))
    templates = np.kron(coarse, np.ones((4, 4)))  # (classes, 28, 28), smooth blocks
    labels = rng.integers(0, classes, size=n + q)
    images = templates[labels] + 1.5 * rng.normal(size=(n + q, 28, 28))
    images = images[:, None].astype(np.float32)
    return {
        "x_train": images[:n],
        "y_train": labels[:n],
        "x_query": images[n:],
        "y_query": labels[n:],
    }


def train(config: dict[str, Any], x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(config["seed"])
    model = build_model(config)
    dtype = getattr(torch, config["dtype"])
    xt, yt = torch.from_numpy(x).to(dtype), torch.from_numpy(y).long()
    if config["kind"] == "mlp":
        opt = torch.optim.LBFGS(
            model.parameters(),
            lr=1.0,
            max_iter=2000,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = regularised_loss(model, xt, yt, config["l2"])
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(config["seed"])
        for _ in range(8):
            for idx in torch.randperm(len(yt), generator=gen).split(100):
                opt.zero_grad()
                regularised_loss(model, xt[idx], yt[idx], config["l2"]).backward()
                opt.step()
    model.eval()
    return model


def report(name: str, model: torch.nn.Module, config: dict[str, Any], data: dict) -> str:
    dtype = getattr(torch, config["dtype"])
    with torch.no_grad():
        acc = {}
        for split in ("train", "query"):
            x = torch.from_numpy(data[f"x_{split}"]).to(dtype)
            acc[split] = float((model(x).argmax(1).numpy() == data[f"y_{split}"]).mean())
    xt = torch.from_numpy(data["x_train"]).to(dtype)
    yt = torch.from_numpy(data["y_train"]).long()
    loss = regularised_loss(model, xt, yt, config["l2"])
    grad = torch.autograd.grad(loss, list(model.parameters()))
    gnorm = float(torch.sqrt(sum((g * g).sum() for g in grad)))
    return (
        f"{name}: train acc {acc['train']:.3f}, query acc {acc['query']:.3f}, "
        f"objective {float(loss.detach()):.4f}, |grad| {gnorm:.1e}"
    )


def prepare(name: str) -> None:
    config = dict(PROBLEMS[name])
    rng = np.random.default_rng(config["seed"])
    data = (digits_data if name == "digits" else synthetic_images)(config, rng)
    n = len(data["y_train"])
    flipped = rng.choice(n, size=round(config["flip_fraction"] * n), replace=False)
    y_flipped = data["y_train"].copy()
    y_flipped[flipped] = (y_flipped[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    arrays: dict[str, np.ndarray] = {
        **{k: np.ascontiguousarray(v) for k, v in data.items()},
        "y_train_flipped": y_flipped,
        "flip_mask": np.isin(np.arange(n), flipped),
    }
    for which, labels in (("clean", data["y_train"]), ("flipped", y_flipped)):
        model = train(config, data["x_train"], labels)
        print(report(f"{name}/{which}", model, config, {**data, "y_train": labels}))
        for pname, param in model.named_parameters():
            arrays[f"{which}/{pname}"] = param.detach().numpy().copy()
    config["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    arrays["config_json"] = np.array(json.dumps(config))
    RESULTS.mkdir(exist_ok=True)
    np.savez(RESULTS / f"{name}.npz", **arrays)
    print(f"{name}: p = {config['num_parameters']}, saved {RESULTS / (name + '.npz')}")


if __name__ == "__main__":
    for problem in sys.argv[1:] or list(PROBLEMS):
        prepare(problem)
