"""The loop every PyTorch-based peer runs: fit, self-influence, scores, top-k, over repeats.

A peer supplies an adapter with four callables, each already mapped to the project's
convention (``I(x, z) = g_zᵀ (H + δI)⁻¹ g_x`` with ``H`` the Hessian of the mean training
objective, no minus sign):

- ``fit(model, loaders) -> state``
- ``self_influence(state, loaders) -> (N,) array``
- ``scores(state, loaders) -> (Q, N) array``
- ``top_k(state, loaders, k) -> (Q, k) indices`` (the peer's own top-k when it has one)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench_common import TOP_K, StageRecorder, load_problem, peer_arguments, write_result
from bench_torch import load_model, tensors


def loaders(problem: dict[str, Any], which: str = "clean") -> dict[str, Any]:
    config = problem["config"]
    t = tensors(problem, which)
    train = TensorDataset(t["x_train"], t["y_train"])
    query = TensorDataset(t["x_query"], t["y_query"])
    return {
        "train": DataLoader(train, batch_size=config["batch_size"], shuffle=False),
        "query": DataLoader(query, batch_size=config["query_batch_size"], shuffle=False),
        "tensors": t,
        "config": config,
        "num_train": len(train),
        # The damping every peer applies, in units of the mean Hessian: the trained
        # objective's L2 term (its Hessian is l2·I) plus the damping of the benchmark.
        "damping_total": config["damping"] + config["l2"],
    }


def run_peer(
    name: str,
    fit: Callable[..., Any],
    self_influence: Callable[..., np.ndarray],
    scores: Callable[..., np.ndarray],
    top_k: Callable[..., np.ndarray],
    versions: dict[str, str],
    notes: list[str],
) -> None:
    args = peer_arguments(f"benchmark peer: {name}")
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = load_problem(args.problem)
    data = loaders(problem)
    model = load_model(problem)
    recorder = StageRecorder()
    si = sc = tk = None
    for _ in range(args.repeats):
        state = recorder.run("fit", lambda: fit(model, data))
        si = recorder.run("self_influence", partial(self_influence, state, data))
        sc = recorder.run("scores", partial(scores, state, data))
        tk = recorder.run("top_k", partial(top_k, state, data, TOP_K))
    flipped = None
    if not args.no_mislabel:
        fdata = loaders(problem, "flipped")
        fmodel = load_model(problem, "flipped")
        fstate = fit(fmodel, fdata)
        flipped = self_influence(fstate, fdata)
    write_result(args, name, recorder, sc, si, flipped, tk, versions, notes)
