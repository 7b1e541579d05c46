"""The loop every PyTorch-based peer runs: fit, self-influence, scores, top-k, over repeats.

A peer supplies an adapter with four callables, each already mapped to the project's
convention (``I(x, z) = g_zᵀ (H + δI)⁻¹ g_x`` with ``H`` the Hessian of the mean training
objective, no minus sign):

- ``fit(model, data) -> state``
- ``self_influence(state, data) -> (N,) array``
- ``scores(state, data) -> (Q, N) array``
- ``top_k(state, data, k) -> (Q, k) indices`` (the peer's own top-k when it has one)

``data`` holds the inputs in the run's ``--input-form`` (see :func:`inputs`); each peer takes
the variant its API accepts and its docstring says which.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bench_common import (
    TOP_K,
    StageRecorder,
    dry_run_report,
    load_problem,
    peer_arguments,
    write_result,
)
from bench_torch import load_model, tensors

#: What every torch peer states about warm-up (the JSON notes and the README say the same).
WARMUP_NOTE = (
    "eager PyTorch, no compilation and no separate warm-up: the first repeat (the 'first "
    "call' column) includes torch's lazy initialisation; medians over the later repeats"
)


def batch_list(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, ...]]:
    """``[(x[s:s+size], y[s:s+size]), ...]``: batches sliced once (views, no copies)."""
    return [(x[s : s + size], y[s : s + size]) for s in range(0, len(y), size)]


class _SlicedExamples(Dataset):
    """Examples ``(x[i], y[i])`` whose batches are fetched as slices, never collated.

    ``DataLoader`` calls ``__getitems__`` with a batch's indices when the dataset has it; a
    run of consecutive indices (what an unshuffled sampler gives) is returned as one view
    ``(x[a:b], y[a:b])``, and the identity ``collate_fn`` passes it through. The loader still
    has an example-level ``batch_size`` and ``sampler``, which dattri reads.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        # A list, as default_collate gives: dattri assigns into the batch it receives.
        start, stop = indices[0], indices[-1] + 1
        if stop - start == len(indices):
            return [self.x[start:stop], self.y[start:stop]]
        index = torch.as_tensor(indices)
        return [self.x[index], self.y[index]]


def _pass_through(batch: Any) -> Any:
    return batch


def inputs(problem: dict[str, Any], which: str, form: str) -> dict[str, Any]:
    """The training and query data in input form ``form``, in the variants peers accept.

    ``prebatched`` (batches sliced once, before any timing):

    - ``train`` / ``query``: a list of ``(x, y)`` batch tuples (pyDVL, ours);
    - ``train_loader`` / ``query_loader``: ``DataLoader(list_of_batches, batch_size=None)``,
      which hands the batches over as they are (captum, which wraps a single tuple the same
      way itself);
    - ``train_sized`` / ``query_sized``: a loader with an example-level ``batch_size`` and
      ``sampler`` whose batches are slices, not collated examples (dattri reads both).

    ``dataloader``: all three are ``DataLoader(TensorDataset(x, y), batch_size=B)``, which
    collates B single examples at every pass, for every library.
    """
    config = problem["config"]
    t = tensors(problem, which)
    sizes = {"train": config["batch_size"], "query": config["query_batch_size"]}
    data: dict[str, Any] = {
        "form": form,
        "tensors": t,
        "config": config,
        "num_train": len(t["y_train"]),
        # The damping every peer applies, in units of the mean Hessian: the trained
        # objective's L2 term (its Hessian is l2·I) plus the damping of the benchmark.
        "damping_total": config["damping"] + config["l2"],
    }
    for split, size in sizes.items():
        x, y = t[f"x_{split}"], t[f"y_{split}"]
        if form == "prebatched":
            batches = batch_list(x, y, size)
            data[split] = batches
            data[f"{split}_loader"] = DataLoader(batches, batch_size=None, shuffle=False)
            data[f"{split}_sized"] = DataLoader(
                _SlicedExamples(x, y), batch_size=size, shuffle=False, collate_fn=_pass_through
            )
        elif form == "dataloader":
            loader = DataLoader(TensorDataset(x, y), batch_size=size, shuffle=False)
            data[split] = data[f"{split}_loader"] = data[f"{split}_sized"] = loader
        else:
            raise ValueError(f"unknown input form {form!r}")
    return data


def run_peer(
    name: str,
    fit: Callable[..., Any],
    self_influence: Callable[..., np.ndarray],
    scores: Callable[..., np.ndarray],
    top_k: Callable[..., np.ndarray],
    versions: dict[str, str],
    notes: list[str],
    uses: tuple[str, ...] = ("train", "query"),
) -> None:
    """Run the stages over ``--repeats`` and write the result; ``uses``: the inputs it reads."""
    args = peer_arguments(f"benchmark peer: {name}")
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = load_problem(args.problem)
    data = inputs(problem, "clean", args.input_form)
    if args.dry_run:
        dry_run_report(args, name, {key: data[key] for key in uses})
        return
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
        fdata = inputs(problem, "flipped", args.input_form)
        fmodel = load_model(problem, "flipped")
        fstate = fit(fmodel, fdata)
        flipped = self_influence(fstate, fdata)
    notes = [*notes, f"input form {args.input_form}", WARMUP_NOTE]
    write_result(args, name, recorder, sc, si, flipped, tk, versions, notes)
