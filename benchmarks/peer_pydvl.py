"""pyDVL 0.10's ArnoldiInfluence on the benchmark problem (run in benchmarks/.venvs/pydvl).

pyDVL computes the top ``rank`` eigenpairs with ARPACK (``scipy.sparse.linalg.eigsh``, an
implicitly restarted Lanczos method) with ``krylov_dimension`` Lanczos vectors: the same
``subspace_dim`` and ``k`` as the others, but ARPACK restarts until its tolerance is met, so
its HVP count is not fixed at ``subspace_dim``.

Convention mapping. The loss is the mean cross-entropy (``F.cross_entropy``), so the Hessian
is ours; ``regularization`` is added to the kept eigenvalues (``(λ + δ)⁻¹``), so it is our total
damping; ``influences`` in ``InfluenceMode.Up`` is ``⟨H⁻¹ g_test, g_train⟩``, positive for
proponents, as ours: no rescaling.

Inputs. ``fit`` reads any iterable of ``(x, y)`` batches (its Hessian operator loops
``for x, y in data``), so it gets the form's ``train`` as it is (a list of batches, or the
``TensorDataset`` DataLoader). Scores go through pyDVL's own batch-wise driver,
``SequentialInfluenceCalculator(model).influences(query, train)``, concatenated by its
``NestedTorchCatAggregator``. pyDVL has no top-k: the full score matrix, then ``torch.topk``.

Self-influence. pyDVL 0.10 has no self-influence method (``InfluenceFunctionModel`` offers
``influences``, ``influence_factors`` and ``influences_from_factors``, all pairwise or
``H⁻¹ g``), and the diagonal of ``influences(x_train, y_train)`` adds an N × N × k product.
So each training batch goes through pyDVL's own pieces: the low-rank operator's
``projections`` and ``eigen_vals`` (+ ``regularization``), the gradient provider's
``jacobian_prod`` (JVPs of the per-example losses, what ``influences`` uses), and the
diagonal ``einsum("ij,ij->j")`` of the ``einsum("ij,ik->jk")`` in its
``LowRankBilinearForm.grads_inner_prod``: the same values (to 2e-16 on digits), without the
off-diagonal work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydvl
import torch
from pydvl.influence import InfluenceMode, SequentialInfluenceCalculator
from pydvl.influence.torch import ArnoldiInfluence
from pydvl.influence.torch.util import NestedTorchCatAggregator

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


def self_influence_of_batch(state: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``g_xᵀ V diag(1/(λ + δ)) Vᵀ g_x`` per example, as pyDVL's bilinear form computes it."""
    batch = state._create_batch(x, y)
    # The parameters' dtype, not the inputs' (the transformer's inputs are token ids).
    total = torch.zeros(len(y), dtype=next(state.model.parameters()).dtype)
    for _, block in state.block_mapper.items():
        op = block.op
        if op.exact:  # Woodbury mode (not used here): pyDVL's own pairwise path, diagonal
            total += torch.diagonal(block.interactions(batch, None, InfluenceMode.Up))
            continue
        low_rank = op.low_rank_representation
        damped = low_rank.eigen_vals.clone()
        if op.regularization is not None:
            damped += op.regularization
        projected = block.gp.jacobian_prod(batch, low_rank.projections.t())  # (k, B)
        total += torch.einsum("ij,ij->j", projected, projected / damped.unsqueeze(-1))
    return total


def self_influence(state: Any, data: dict[str, Any]) -> np.ndarray:
    with torch.no_grad():
        values = [self_influence_of_batch(state, x, y) for x, y in data["train"]]
    return torch.cat(values).detach().numpy().copy()


def full_scores(state: Any, data: dict[str, Any]) -> torch.Tensor:
    lazy = SequentialInfluenceCalculator(state).influences(
        data["query"], data["train"], mode=InfluenceMode.Up
    )
    return lazy.compute(aggregator=NestedTorchCatAggregator()).detach()


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
            "fit and SequentialInfluenceCalculator read the form's train/query as they are",
            "self-influence: pyDVL's low-rank bilinear form, diagonal only (no N × N product)",
            "no top-k: full matrix + topk",
        ],
    )
