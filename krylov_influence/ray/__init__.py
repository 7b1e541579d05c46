"""krylov_influence on a Ray cluster (the extra ``krylov-influence[ray]``).

Importing this module does not import Ray; its classes and functions do, when used. See
``docs/cluster.md``.

- :class:`RayHessianData`: Hessian data spread over Ray actors, one shard each; pass it to
  the calculator as ``hessian_dataset=`` and the fit's Hessian-vector products run on the
  actors (:class:`RayHessianOperator`, the weighted mean of their shards' products).
- :func:`split_batches`: a list of batches as consecutive shards.
- :func:`score_training_set`: self-influence and influence vectors of a training set from a
  fitted calculator, computed by actors holding a model, in order with global example ids,
  optionally written to a zarr store block by block (a rerun skips completed blocks). The
  driver reads the batches lazily and holds a bounded number of blocks.
- :func:`top_k_training_set`: the top-k proponents / opponents of a set of queries over a
  training set, per block on the actors, merged exactly on the driver (global ids).
- :func:`scores_from_store`, :func:`top_k_from_store`: scores and top-k of queries against
  the influence vectors of a finished store, read chunk by chunk (no training gradient).
- :class:`ScoreStore`: such a store, opened and checked against a calculator.
- :class:`ScorerPool`: scoring actors started once and passed instead of a model factory to
  several of the calls above (actors take seconds to start).
- :func:`score_dataset`: the same for the rows of a ``ray.data.Dataset`` (Ray Data batch
  inference with ``map_batches`` on an actor pool), keyed by an id column, lazily.
"""

from krylov_influence.ray._dataset import score_dataset
from krylov_influence.ray._from_store import scores_from_store, top_k_from_store
from krylov_influence.ray._hessian import RayHessianData, RayHessianOperator, split_batches
from krylov_influence.ray._pool import ScorerPool
from krylov_influence.ray._scoring import RayScores, score_training_set
from krylov_influence.ray._store import ScoreStore
from krylov_influence.ray._topk import RayTopK, top_k_training_set

__all__ = [
    "RayHessianData",
    "RayHessianOperator",
    "RayScores",
    "RayTopK",
    "ScoreStore",
    "ScorerPool",
    "score_dataset",
    "score_training_set",
    "scores_from_store",
    "split_batches",
    "top_k_from_store",
    "top_k_training_set",
]
