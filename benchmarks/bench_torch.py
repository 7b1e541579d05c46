"""The PyTorch models of the benchmark, rebuilt from the arrays ``prepare.py`` saved.

Imported by ``prepare.py``, the floor measurements, our harness and the torch peers; the
influenciae peer builds the equivalent Keras model from the same arrays instead.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import nn


def build_mlp(config: dict[str, Any]) -> nn.Module:
    """64-32-10 tanh MLP (``config["layer_sizes"]``), in ``config["dtype"]``."""
    sizes = config["layer_sizes"]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(getattr(torch, config["dtype"]))


def build_cnn(config: dict[str, Any]) -> nn.Module:
    """A small CNN for 1×28×28 images: two conv+ReLU+max-pool blocks and two dense layers."""
    c1, c2, hidden = config["channels"][0], config["channels"][1], config["hidden"]
    net = nn.Sequential(
        nn.Conv2d(1, c1, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 5 * 5, hidden),
        nn.ReLU(),
        nn.Linear(hidden, config["num_classes"]),
    )
    return net.to(getattr(torch, config["dtype"]))


def build_model(config: dict[str, Any]) -> nn.Module:
    return build_mlp(config) if config["kind"] == "mlp" else build_cnn(config)


def load_model(problem: dict[str, Any], which: str = "clean") -> nn.Module:
    """The trained model (``which="clean"``) or the one trained on flipped labels."""
    model = build_model(problem["config"])
    state = {
        name: torch.from_numpy(np.ascontiguousarray(problem[f"{which}/{name}"]))
        for name, _ in model.named_parameters()
    }
    model.load_state_dict(state)
    model.eval()
    return model


def tensors(problem: dict[str, Any], which: str = "clean") -> dict[str, torch.Tensor]:
    """Training inputs/labels (clean or flipped) and query inputs/labels as tensors."""
    dtype = getattr(torch, problem["config"]["dtype"])
    y_train = problem["y_train_flipped"] if which == "flipped" else problem["y_train"]
    return {
        "x_train": torch.from_numpy(problem["x_train"]).to(dtype),
        "y_train": torch.from_numpy(y_train).long(),
        "x_query": torch.from_numpy(problem["x_query"]).to(dtype),
        "y_query": torch.from_numpy(problem["y_query"]).long(),
    }


def regularised_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """The training objective: mean cross-entropy plus ``½ l2 ‖θ‖²``."""
    data = nn.functional.cross_entropy(model(x), y)
    return data + 0.5 * l2 * sum((p * p).sum() for p in model.parameters())
