"""pyDVL 0.10's ArnoldiInfluence on the benchmark problem (run in benchmarks/.venvs/pydvl).

pyDVL computes the top ``rank`` eigenpairs with ARPACK (``scipy.sparse.linalg.eigsh``, an
implicitly restarted Lanczos method) with ``krylov_dimension`` Lanczos vectors: the same
``subspace_dim`` and ``k`` as the others, but ARPACK restarts until its tolerance is met, so
its HVP count is not fixed at ``subspace_dim``.

Convention mapping. The loss is the mean cross-entropy (``F.cross_entropy``), so the Hessian
is ours; ``regularization`` is added to the kept eigenvalues (``(λ + δ)⁻¹``), so it is our total
damping; ``influences`` in ``InfluenceMode.Up`` is ``⟨H⁻¹ g_test, g_train⟩``, positive for
proponents, as ours: no rescaling. pyDVL has no self-influence method: it is the diagonal of
``influences(x_train, y_train)`` (the train × train matrix), and no top-k: the full score
matrix, then ``torch.topk``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydvl
import torch
from pydvl.influence import InfluenceMode
from pydvl.influence.torch import ArnoldiInfluence

from peer_torch_common import run_peer


def fit(model: torch.nn.Module, data: dict[str, Any]) -> Any:
    config = data["config"]
    influence = ArnoldiInfluence(
        model,
        torch.nn.functional.cross_entropy,
        regularization=data["damping_total"],
        rank=config["k"],
        krylov_dimension=config["subspace_dim"],
    )
    return influence.fit(data["train"])


def self_influence(state: Any, data: dict[str, Any]) -> np.ndarray:
    t = data["tensors"]
    with torch.no_grad():
        matrix = state.influences(t["x_train"], t["y_train"], mode=InfluenceMode.Up)
    return torch.diagonal(matrix).detach().numpy().copy()


def full_scores(state: Any, data: dict[str, Any]) -> torch.Tensor:
    t = data["tensors"]
    return state.influences(
        t["x_query"], t["y_query"], t["x_train"], t["y_train"], mode=InfluenceMode.Up
    ).detach()


def scores(state: Any, data: dict[str, Any]) -> np.ndarray:
    return full_scores(state, data).numpy()


def top_k(state: Any, data: dict[str, Any], k: int) -> np.ndarray:
    return torch.topk(full_scores(state, data), k, dim=1).indices.numpy()


if __name__ == "__main__":
    run_peer(
        "pydvl",
        fit,
        self_influence,
        scores,
        top_k,
        {"pydvl": pydvl.__version__, "torch": torch.__version__},
        [
            "ARPACK (restarted Lanczos), krylov_dimension = subspace_dim",
            "self-influence = diag of train × train",
            "no top-k: full matrix + topk",
        ],
    )
