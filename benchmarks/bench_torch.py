"""The PyTorch models of the benchmark, rebuilt from the arrays ``prepare.py`` saved.

Imported by ``prepare.py``, the floor measurements, our harness and the torch peers; the
influenciae peer builds the equivalent Keras model from the same arrays instead.
"""

from __future__ import annotations

import itertools
import math
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


class SelfAttention(nn.Module):
    """Multi-head self-attention written with matmuls and a softmax, as most PyTorch code does.

    Not ``nn.MultiheadAttention`` / ``F.scaled_dot_product_attention``: on CPU those dispatch
    to fused kernels without forward-mode or second derivatives, so every engine route would
    fall back to composite kernels (docs/layers.md); the explicit form is the same arithmetic
    and takes the fast route of every operator. Shapes: (B, T, D) -> (B, T, D).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        head = d // self.heads

        def split(z: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return z.reshape(b, t, self.heads, head).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: ``h + attn(ln(h))``, then ``h + mlp(ln(h))``."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp1 = nn.Linear(width, mlp)
        self.mlp2 = nn.Linear(mlp, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.norm1(h))
        return h + self.mlp2(nn.functional.gelu(self.mlp1(self.norm2(h))))


class TextTransformer(nn.Module):
    """Token + learned position embeddings, encoder blocks, final layer norm, mean over the
    sequence, linear head. Input (B, T) int64 tokens; output (B, classes) logits."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        width, seq = config["width"], config["seq_len"]
        self.token = nn.Embedding(config["vocab"], width)
        nn.init.normal_(self.token.weight, std=0.02)  # GPT-style; N(0, 1) would dominate the L2
        self.position = nn.Parameter(0.02 * torch.randn(seq, width))
        self.blocks = nn.ModuleList(
            EncoderBlock(width, config["heads"], config["mlp"]) for _ in range(config["layers"])
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.token(x) + self.position
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


def build_transformer(config: dict[str, Any]) -> nn.Module:
    """The ``transformer`` problem's text classifier (:class:`TextTransformer`)."""
    return TextTransformer(config).to(getattr(torch, config["dtype"]))


def build_model(config: dict[str, Any]) -> nn.Module:
    builders = {"mlp": build_mlp, "cnn": build_cnn, "transformer": build_transformer}
    return builders[config["kind"]](config)


def input_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype of the model's inputs: token ids for the transformer, else the model's."""
    return torch.long if config["kind"] == "transformer" else getattr(torch, config["dtype"])


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
    dtype = input_dtype(problem["config"])
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
