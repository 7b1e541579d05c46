"""Train the benchmark models once and save them, with their data, to ``results/<problem>.npz``.

Run with the main environment (torch and scikit-learn)::

    python benchmarks/prepare.py            # every problem
    python benchmarks/prepare.py digits

Problems:

- ``digits``: scikit-learn's digits scaled to [0, 1], 1437 training and 200 query digits, a
  64-32-10 tanh MLP (p = 2410) in float64 trained to convergence by L-BFGS on the mean
  cross-entropy plus ``½ l2 ‖θ‖²`` (l2 = 1e-3); a second copy trained on labels of which 10 %
  are flipped (to another class) serves the mislabel-detection AUC.
- ``cnn``: synthetic 28×28 single-channel images of 10 classes (a smooth random template per
  class plus noise), a two-conv CNN (p ≈ 109k) in float32 trained by Adam with the same L2.
- ``transformer``: synthetic token sequences (vocabulary 2000, length 32) of 4 topics, each
  topic marking ~15 % of the positions with its own tokens; a 2-layer pre-norm encoder
  (width 128, 4 heads, MLP 256, mean-pooled, p = 525,828) in float32 trained by Adam
  (6 epochs); 256 training and 64 query sequences in batches of 64 (one HVP over them costs
  about what one over the CNN's 2000 images does).

Every peer loads the same arrays, so everyone scores the same trained parameters.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch

from bench_common import RESULTS
from bench_torch import build_model, input_dtype, regularised_loss

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
    "transformer": {
        "kind": "transformer",
        "vocab": 2000,
        "seq_len": 32,
        "width": 128,
        "heads": 4,
        "mlp": 256,
        "layers": 2,
        "num_classes": 4,
        "dtype": "float32",
        "num_train": 256,
        "num_query": 64,
        "l2": 1e-3,
        "damping": 1e-2,
        "subspace_dim": 100,
        "k": 20,
        "batch_size": 64,
        "query_batch_size": 64,
        "epochs": 6,
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


def synthetic_tokens(config: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Token sequences of ``num_classes`` topics: each topic owns 16 marker tokens, and each
    position of a sequence is one of its topic's markers with probability 0.15, otherwise a
    token drawn uniformly from the vocabulary (which also holds every topic's markers)."""
    classes, vocab, seq = config["num_classes"], config["vocab"], config["seq_len"]
    n, q = config["num_train"], config["num_query"]
    markers = rng.choice(vocab, size=(classes, 16), replace=False)
    labels = rng.integers(0, classes, size=n + q)
    tokens = rng.integers(0, vocab, size=(n + q, seq))
    marked = rng.random((n + q, seq)) < 0.15
    picks = markers[labels[:, None], rng.integers(0, 16, size=(n + q, seq))]
    tokens = np.where(marked, picks, tokens).astype(np.int64)
    return {
        "x_train": tokens[:n],
        "y_train": labels[:n],
        "x_query": tokens[n:],
        "y_query": labels[n:],
    }


DATA = {"mlp": digits_data, "cnn": synthetic_images, "transformer": synthetic_tokens}


def train(config: dict[str, Any], x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(config["seed"])
    model = build_model(config)
    xt, yt = torch.from_numpy(x).to(input_dtype(config)), torch.from_numpy(y).long()
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
        for _ in range(config.get("epochs", 8)):
            for idx in torch.randperm(len(yt), generator=gen).split(100):
                opt.zero_grad()
                regularised_loss(model, xt[idx], yt[idx], config["l2"]).backward()
                opt.step()
    model.eval()
    return model


def report(name: str, model: torch.nn.Module, config: dict[str, Any], data: dict) -> str:
    dtype = input_dtype(config)
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
    with torch.no_grad():
        data_loss = float(torch.nn.functional.cross_entropy(model(xt), yt))
    chance = float(np.log(config.get("num_classes", 10)))
    return (
        f"{name}: train acc {acc['train']:.3f}, query acc {acc['query']:.3f}, "
        f"objective {float(loss.detach()):.4f} (cross-entropy {data_loss:.4f}, chance "
        f"{chance:.4f}), |grad| {gnorm:.1e}"
    )


def prepare(name: str) -> None:
    config = dict(PROBLEMS[name])
    rng = np.random.default_rng(config["seed"])
    data = DATA[config["kind"]](config, rng)
    n = len(data["y_train"])
    classes = config.get("num_classes", 10)
    flipped = rng.choice(n, size=round(config["flip_fraction"] * n), replace=False)
    y_flipped = data["y_train"].copy()
    y_flipped[flipped] = (
        y_flipped[flipped] + rng.integers(1, classes, size=len(flipped))
    ) % classes
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
