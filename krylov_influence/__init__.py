"""krylov_influence: influence functions at scale with the Arnoldi method.

The public API::

    import krylov_influence as ki

    model = ki.InfluenceModel(net, loss_fn)          # engine inferred from the model's type
    calc = ki.ArnoldiInfluenceCalculator(model, train, subspace_dim=200,
                                         force_hermitian=True, k_largest_eig_vals=50)
    for batch, values in calc.compute_influence_values(train):      # values: (B,)
        ...
    for queries, values, indices in calc.top_k(test, train, k=10):  # (B_query, 10) each
        ...
    calc.save("basis.npz")     # later, checked against the model's Hessian:
    # ki.ArnoldiInfluenceCalculator.load("basis.npz", model, train_dataset=train)

Scores follow ``I(x, z) = ∇L(z)ᵀ H⁻¹ ∇L(x)`` with ``H`` the Hessian of the *mean* training
loss; a positive score means that up-weighting ``x`` lowers the loss on ``z`` (a proponent).
"""

from krylov_influence.arnoldi import ArnoldiResult, MatrixOperator, arnoldi_iteration
from krylov_influence.cache import CACHE
from krylov_influence.calculator import ArnoldiInfluenceCalculator
from krylov_influence.eigen import EigenBasis, RitzPairs, build_eigenbasis, ritz_pairs
from krylov_influence.engine import (
    Engine,
    EngineCapabilities,
    HessianOperator,
    InfluenceModel,
    ShardedHessianData,
)
from krylov_influence.errors import (
    EngineNotFoundError,
    IncompatibleStoreError,
    NegativeEigenvalueWarning,
    NonFiniteError,
)
from krylov_influence.registry import available_engines, get_engine, infer_engine
from krylov_influence.topk import (
    ORDER,
    BaseNearestNeighbors,
    LinearNearestNeighbors,
    TopKBatch,
    TrainingTopK,
)

__version__ = "0.1.0"

__all__ = [
    "CACHE",
    "ORDER",
    "ArnoldiInfluenceCalculator",
    "ArnoldiResult",
    "BaseNearestNeighbors",
    "EigenBasis",
    "Engine",
    "EngineCapabilities",
    "EngineNotFoundError",
    "HessianOperator",
    "IncompatibleStoreError",
    "InfluenceModel",
    "LinearNearestNeighbors",
    "MatrixOperator",
    "NegativeEigenvalueWarning",
    "NonFiniteError",
    "RitzPairs",
    "ShardedHessianData",
    "TopKBatch",
    "TrainingTopK",
    "__version__",
    "arnoldi_iteration",
    "available_engines",
    "build_eigenbasis",
    "get_engine",
    "infer_engine",
    "ritz_pairs",
]
