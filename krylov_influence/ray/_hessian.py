"""The Hessian of data spread over Ray actors, as a symmetric operator.

Each actor builds its own bound model once, by calling the user's picklable zero-argument
``model_factory`` (framework models are not all picklable, and a model built in place lands on
the actor's device), and holds one shard: a re-iterable of batches, staged once with the
engine's ``stage_batch`` under the ``stage_hessian_data`` budget (as the calculator stages its
data, :mod:`krylov_influence._staging`). A product fans the vectors out as host NumPy arrays
(one ``ray.put``), and actor ``s`` returns ``n_s · H_s V`` (float64, (m, p)): its shard's
mean-loss Hessian times the vectors, scaled back to the *sum* over its ``n_s`` examples, with
``n_s``. The driver returns ``Σ_s n_s H_s V / Σ_s n_s``, which is the Hessian of the mean loss
over all examples (what ``model.hessian_operator(all batches)`` applies), in the driver
model's namespace, dtype and device.

The ``l2`` term ``½ l2 ‖θ‖²`` of the engines is part of every per-example loss, so each
``H_s`` contains ``l2 · I`` once, and the size-weighted mean of the shards keeps it exactly
once (its weights sum to one): it is neither lost nor counted per shard.

Fault tolerance: actors are created with ``max_restarts`` (Ray rebuilds a dead actor by running
its constructor again: the same factory and shard) and ``max_task_retries`` (Ray resubmits a
product that was in flight on it); a product that still fails because the actor was
unavailable is resubmitted here, up to ``max_task_retries`` more times. Products are pure
functions of the shard and the vectors, so a retried product gives identical numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from krylov_influence._data import require_reiterable
from krylov_influence._linearizing import linearize_hessian_data, resolve_linearize_budget
from krylov_influence._staging import resolve_stage_budget, stage_hessian_data
from krylov_influence.engine import InfluenceModel, ShardedHessianData
from krylov_influence.errors import NonFiniteError
from krylov_influence.registry import bind_model

__all__ = ["RayHessianData", "RayHessianOperator", "split_batches"]


def import_ray() -> Any:
    """``ray``, or an ImportError that says how to install it (a bare import would not)."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "krylov_influence.ray needs Ray: from the root of the checkout, "
            '`.venv/bin/pip install -e ".[ray]"`'
        ) from error
    return ray


def split_batches(batches: Iterable[Any], num_shards: int) -> list[list[Any]]:
    """Split a list of batches into ``num_shards`` runs of consecutive batches.

    The run lengths differ by at most one batch (the first runs take the extra ones), so the
    shards' order, concatenated, is the order of ``batches``.

    Parameters
    ----------
    batches : iterable of batches
        Iterated once, here, on the driver.
    num_shards : int
        ``1 ≤ num_shards ≤`` the number of batches.

    Returns
    -------
    list of lists of batches
    """
    items = list(batches)
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)):
        raise TypeError(f"num_shards={num_shards!r}: expected an integer")
    if not 1 <= num_shards <= len(items):
        raise ValueError(
            f"num_shards={num_shards}: expected 1 <= num_shards <= {len(items)} (the number "
            "of batches)"
        )
    size, extra = divmod(len(items), int(num_shards))
    shards, start = [], 0
    for index in range(int(num_shards)):
        stop = start + size + (1 if index < extra else 0)
        shards.append(items[start:stop])
        start = stop
    return shards


class _HessianShard:
    """A Ray actor: one model built by the factory, one shard of the Hessian data."""

    def __init__(
        self,
        model_factory: Callable[[], Any],
        batches: Iterable[Any],
        budget: int,
        linearize_budget: int = 0,
    ):
        self.model = bind_model(model_factory())
        data = require_reiterable(batches, "shards[i]")
        self.data, self.staging = stage_hessian_data(self.model, data, budget)
        # The operator alone gets the linearised batches (the losses read the staged data).
        linearized, note = linearize_hessian_data(self.model, self.data, linearize_budget)
        self.staging = f"{self.staging}, {note}" if note else self.staging
        self.operator = self.model.hessian_operator(linearized)
        self.sizes = [int(self.model.batch_size(batch)) for batch in self.data]
        self.count = sum(self.sizes)

    def describe(self) -> dict[str, Any]:
        """What the driver checks: the shard's size and the model the factory built."""
        model = self.model
        return {
            "count": self.count,
            "batches": len(self.sizes),
            "num_parameters": int(model.num_parameters),
            "dtype": model.dtype_name,
            "fingerprint": model.fingerprint(),
            "engine": model.engine_name,
            "staging": self.staging,
            "pid": os.getpid(),
        }

    def losses(self) -> tuple[list[int], np.ndarray]:
        """``(batch sizes, per-example losses float64)`` of the shard, one forward pass."""
        model = self.model
        flat = [np.asarray(model.to_numpy(model.losses(b)), np.float64) for b in self.data]
        return self.sizes, np.concatenate(flat) if flat else np.zeros(0, np.float64)

    def hvp_sum(self, vector: np.ndarray) -> tuple[np.ndarray, int]:
        """``(n_s H_s v, n_s)``: the sum over the shard's examples, float64 (p,)."""
        if self.count == 0:
            return np.zeros(vector.shape, np.float64), 0
        product = self.operator.mv(self.model.from_numpy(vector))
        return np.asarray(self.model.to_numpy(product), np.float64) * self.count, self.count

    def hvps_sum(self, vectors: np.ndarray) -> tuple[np.ndarray, int]:
        """``(n_s (H_s Vᵀ)ᵀ, n_s)`` for vectors of shape (m, p), float64."""
        if self.count == 0:
            return np.zeros(vectors.shape, np.float64), 0
        product = self.operator.mm(self.model.from_numpy(vectors))
        return np.asarray(self.model.to_numpy(product), np.float64) * self.count, self.count

    def pid(self) -> int:
        return os.getpid()


_Group = TypeVar("_Group", bound="ActorGroup")


class ActorGroup:
    """Ray actors in ``self.actors``, killed by :meth:`shutdown` or on leaving a ``with``."""

    actors: list[Any]

    def shutdown(self) -> None:
        """Kill the actors (no restart); the object cannot be used afterwards."""
        ray = import_ray()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self: _Group) -> _Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class RayHessianData(ActorGroup, ShardedHessianData):
    """Hessian data held by Ray actors, one shard each; pass it as ``hessian_dataset=``.

    Parameters
    ----------
    model_factory : callable
        A picklable zero-argument callable returning the model (an ``InfluenceModel``, or a
        model an engine recognises by itself such as a :mod:`krylov_influence.reference`
        model). Each actor calls it once (and again after a restart); it must build the same
        model as the driver's (the parameter fingerprints are compared).
    shards : sequence of re-iterables of batches
        One per actor, pickled to it once (see :func:`split_batches`). Their concatenation,
        in order, is the Hessian data.
    stage_hessian_data : bool, int or str, default True
        Each actor's staging budget (as the calculator's option of that name).
    linearize_hessian_data : bool, int or str, default True
        Each actor's budget for linearising its staged shard (as the calculator's option of
        that name): kept for the actor's life, so every fit over these actors gets products
        at their vector-dependent cost.
    max_restarts, max_task_retries : int, default 3
        Ray's actor options: how often a dead actor is rebuilt, and how often a product in
        flight on it is resubmitted; a product that still fails is resubmitted here up to
        ``max_task_retries`` more times.
    num_cpus : float, optional
        CPUs each actor reserves while it lives. Default: Ray's default for actors (one CPU
        to be placed, none held), so any number of actors share the cluster; with
        ``num_cpus=1`` on a cluster of c CPUs, at most c actors exist at once (more wait,
        and the constructor waits with them), and Ray gives each one intra-op thread.
        ``num_gpus=`` and the like go in ``actor_options``.
    actor_options : dict, optional
        More options for ``ActorClass.options`` (``num_gpus``, ``resources``,
        ``runtime_env``, ``scheduling_strategy``, ...).

    Attributes
    ----------
    actors : list of Ray actor handles
    shard_sizes : list of int
        Examples per shard.
    num_examples : int
        Their sum.

    Notes
    -----
    Needs ``ray`` (the extra ``krylov-influence[ray]``); ``ray.init()`` is Ray's own
    (automatic when not called). Call :meth:`shutdown` (or use ``with``) to free the actors.
    """

    def __init__(
        self,
        model_factory: Callable[[], Any],
        shards: Sequence[Iterable[Any]],
        *,
        stage_hessian_data: bool | int | str = True,
        linearize_hessian_data: bool | int | str = True,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        num_cpus: float | None = None,
        actor_options: dict[str, Any] | None = None,
    ):
        ray = import_ray()

        if not callable(model_factory):
            raise TypeError(
                f"model_factory: expected a zero-argument callable that builds the model, got "
                f"{type(model_factory).__name__}"
            )
        shards = list(shards)
        if not shards:
            raise ValueError("shards: expected at least one shard of batches")
        for index, shard in enumerate(shards):
            require_reiterable(shard, f"shards[{index}]")
        budget = resolve_stage_budget(stage_hessian_data)
        linearize_budget = resolve_linearize_budget(linearize_hessian_data)
        self.max_task_retries = int(max_task_retries)
        options: dict[str, Any] = {
            "max_restarts": int(max_restarts),
            "max_task_retries": int(max_task_retries),
            **({} if num_cpus is None else {"num_cpus": num_cpus}),
            **(actor_options or {}),
        }
        actor_class: Any = ray.remote(_HessianShard).options(**options)
        # Put once and held here: Ray rebuilds a dead actor from these same objects, which
        # must stay in scope for as long as the actors may restart.
        self._factory = ray.put(model_factory)
        self._shards = [ray.put(shard) for shard in shards]
        self.actors = [
            actor_class.remote(self._factory, ref, budget, linearize_budget) for ref in self._shards
        ]
        self._described = self._call_all("describe")
        self.shard_sizes = [int(info["count"]) for info in self._described]
        self.num_examples = sum(self.shard_sizes)
        first = self._described[0]
        for index, info in enumerate(self._described):
            for key in ("num_parameters", "dtype", "fingerprint"):
                if info[key] != first[key]:
                    raise ValueError(
                        f"model_factory: built models that differ between actors ({key} "
                        f"{first[key]!r} on actor 0, {info[key]!r} on actor {index}); it must "
                        "build the same model on every call"
                    )

    # ------------------------------------------------------------------ ShardedHessianData
    def hessian_operator(self, model: InfluenceModel) -> RayHessianOperator:
        """The operator over all shards, answering in ``model``'s namespace and device."""
        return RayHessianOperator(self, model)

    def count_examples(self) -> int:
        """Examples over all shards, after checking every loss is finite (one forward pass)."""
        for index, (_, losses) in enumerate(self._call_all("losses")):
            if not np.isfinite(losses).all():
                raise NonFiniteError(
                    f"hessian_dataset: shard {index} has non-finite losses (NaN or Inf), first "
                    f"at its example {int(np.argmin(np.isfinite(losses)))}"
                )
        if self.num_examples == 0:
            raise ValueError("hessian_dataset: the shards hold no example")
        return self.num_examples

    def hessian_losses(self) -> tuple[list[int], np.ndarray]:
        """``(batch sizes, losses (N,) float64)``, shard after shard."""
        sizes: list[int] = []
        losses = []
        for shard_sizes, shard_losses in self._call_all("losses"):
            sizes.extend(int(s) for s in shard_sizes)
            losses.append(np.asarray(shard_losses, np.float64))
        return sizes, np.concatenate(losses)

    # ------------------------------------------------------------------------ the actors
    @property
    def description(self) -> list[dict[str, Any]]:
        """Per actor: examples, batches, parameters, dtype, engine, staging note (with what
        linearising kept), pid."""
        return [dict(info) for info in self._described]

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """``actor.method(*args)`` on every actor, in parallel; resubmitted on actor loss."""
        ray = import_ray()
        from ray.exceptions import RayActorError

        refs = [ray.put(arg) for arg in args]  # shipped once, shared by every actor
        pending = {
            index: getattr(actor, method).remote(*refs) for index, actor in enumerate(self.actors)
        }
        results: dict[int, Any] = {}
        for index in range(len(self.actors)):
            attempt = 0
            while True:
                try:
                    results[index] = ray.get(pending[index])
                    break
                except RayActorError:
                    # Died (or unreachable) beyond Ray's own retries: the restarted actor,
                    # rebuilt from the same factory and shard, computes the same numbers.
                    attempt += 1
                    if attempt > self.max_task_retries:
                        raise
                    time.sleep(0.5 * attempt)
                    actor = self.actors[index]
                    pending[index] = getattr(actor, method).remote(*refs)
        return [results[index] for index in range(len(self.actors))]


class RayHessianOperator:
    """The Hessian of the mean loss over a :class:`RayHessianData`'s shards.

    Parameters
    ----------
    data : RayHessianData
    model : InfluenceModel
        The driver's model: the same parameters as the actors' (fingerprint checked); its
        namespace, dtype and device are those of every vector in and out.

    Attributes
    ----------
    shape : tuple of int
        ``(p, p)``.
    symmetric : bool
        ``True``.
    products : int
        Hessian-vector products applied so far (``mm`` counts one per row).
    """

    symmetric: ClassVar[bool] = True

    def __init__(self, data: RayHessianData, model: InfluenceModel):
        model = bind_model(model)
        found = data.description[0]
        if found["num_parameters"] != model.num_parameters or found["dtype"] != model.dtype_name:
            raise ValueError(
                f"model: has p = {model.num_parameters} in {model.dtype_name}, but the actors' "
                f"model_factory built p = {found['num_parameters']} in {found['dtype']}"
            )
        if found["fingerprint"] != model.fingerprint():
            raise ValueError(
                "model: its parameter values differ from those of the model the actors' "
                "model_factory built; the factory must build the driver's model"
            )
        self.data = data
        self.model = model
        p = model.num_parameters
        self.shape = (p, p)
        self.dtype = model.dtype
        self.device = model.device
        self.xp = model.xp
        self.products = 0

    def mv(self, vector: Any) -> Any:
        """``H @ v``; ``v`` of shape (p,) in the model's namespace."""
        host = np.asarray(self.model.to_numpy(vector))
        self.products += 1
        return self._mean("hvp_sum", host)

    def mm(self, vectors: Any) -> Any:
        """``(H @ V.T).T`` for ``V`` of shape (m, p) in the model's namespace."""
        host = np.asarray(self.model.to_numpy(vectors))
        self.products += int(host.shape[0])
        return self._mean("hvps_sum", host)

    def _mean(self, method: str, host: np.ndarray) -> Any:
        answers = self.data._call_all(method, host)
        total = sum(count for _, count in answers)
        summed = np.sum([np.asarray(part, np.float64) for part, _ in answers], axis=0)
        return self.model.from_numpy(summed / total)
