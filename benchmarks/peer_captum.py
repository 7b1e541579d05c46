"""captum's ArnoldiInfluenceFunction on the benchmark problem (run in benchmarks/.venvs/captum).

Convention mapping. captum's Hessian is the *summed* Hessian of the loss over the Hessian
data, and its ``hessian_reg`` is added to the diagonal of the Krylov-restricted summed Hessian,
so with ``hessian_reg = N δ`` its scores are ``g_zᵀ (N(H + δI))⁻¹ g_x``: ours divided by N.
We multiply by N. captum keeps only eigenvalues above ``hessian_inverse_tol`` (positive ones);
with the damping every kept eigenvalue is positive here. ``arnoldi_tol`` is lowered so that
the iteration runs all ``subspace_dim`` steps, as the others do.

Inputs. captum takes the training data as a ``DataLoader`` (or a ``Dataset`` it batches
itself): the form's ``train_loader``, i.e. ``DataLoader(list_of_batches, batch_size=None)``
when prebatched (how captum wraps a single batch itself) or the ``TensorDataset`` DataLoader.
Its ``influence`` takes the queries as one batch tuple, the same in both forms.
"""

from __future__ import annotations

from typing import Any

import captum
import numpy as np
import torch
from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

from peer_torch_common import run_peer


def fit(model: torch.nn.Module, data: dict[str, Any]) -> Any:
    config, n = data["config"], data["num_train"]
    return ArnoldiInfluenceFunction(
        model,
        data["train_loader"],
        checkpoint="in-memory",
        checkpoints_load_func=lambda net, path: 1.0,  # the model is already loaded
        loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
        sample_wise_grads_per_batch=True,  # captum's fast per-example gradients (Linear/Conv2d)
        projection_dim=config["k"],
        arnoldi_dim=config["subspace_dim"],
        arnoldi_tol=1e-300,
        hessian_reg=n * data["damping_total"],
        hessian_inverse_tol=0.0,
        seed=0,
    )


def self_influence(state: Any, data: dict[str, Any]) -> np.ndarray:
    return state.self_influence(data["train_loader"]).detach().numpy() * data["num_train"]


def query_batch(data: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    t = data["tensors"]
    return (t["x_query"], t["y_query"])


def scores(state: Any, data: dict[str, Any]) -> np.ndarray:
    return state.influence(query_batch(data)).detach().numpy() * data["num_train"]


def top_k(state: Any, data: dict[str, Any], k: int) -> np.ndarray:
    indices, _ = state.influence(query_batch(data), k=k, proponents=True)
    return indices.numpy()


if __name__ == "__main__":
    run_peer(
        "captum",
        fit,
        self_influence,
        scores,
        top_k,
        {"captum": captum.__version__, "torch": torch.__version__},
        [
            "summed Hessian: scores × N",
            "hessian_reg = N (damping + l2)",
            "per-example grads",
            "train: the form's DataLoader; queries: one (x, y) tuple in both forms",
        ],
        uses=("train_loader",),
    )
