"""Blocks of a training set streamed through a pool of Ray actors, in bounded memory.

What every map over a training set on the cluster shares (:func:`score_training_set`,
:func:`top_k_training_set`): the batches are read **lazily** on the driver and cut into
*blocks* of consecutive batches (:func:`iter_blocks`); a block is shipped to an actor (one
``ray.put``) only when the pool has room for it (:func:`run_blocks`: at most
``in_flight_per_actor`` blocks per actor at once, so an actor always has its next block queued
while the driver reads ahead no further). The driver thus holds a bounded number of blocks
whatever the size of the training set, and the results come back as they complete, each
tagged with its block, for an exact reduction on the driver.

Example ``i`` of the training set (counting across batches from 0) is its *global id*; a block
knows the id of its first example.

Faults: actors are created with Ray's ``max_restarts`` and ``max_task_retries`` (a dead actor is
rebuilt by running its constructor again, and the block in flight on it is resubmitted by
Ray); a block whose task still fails because its actor is unavailable is resubmitted here to
the least busy actor, up to ``max_task_retries`` more times. Blocks are pure functions of their
batches and the fitted state, so a resubmitted block gives the same numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence._streaming import Placement
from krylov_influence.ray._hessian import ActorGroup, import_ray
from krylov_influence.registry import bind_model

__all__ = ["Block", "ScorerPool", "actors_for", "iter_blocks", "run_blocks"]


@dataclass(frozen=True)
class Block:
    """Consecutive batches of the training set: the unit of work of an actor.

    Attributes
    ----------
    index : int
        The block's number, from 0.
    start : int
        Global id of its first example.
    batches : list of batches
    sizes : tuple of int
        Examples per batch.
    last : bool
        Whether no batch follows it.
    """

    index: int
    start: int
    batches: list[Any]
    sizes: tuple[int, ...]
    last: bool

    @property
    def rows(self) -> int:
        """Examples in the block."""
        return sum(self.sizes)


def iter_blocks(
    batches: Iterable[Any], batches_per_block: int, batch_size: Callable[[Any], int]
) -> Iterator[Block]:
    """Cut ``batches`` into blocks of ``batches_per_block`` batches, lazily.

    Reads one batch ahead of the block it yields (so that a block knows whether it is the
    last); never more.

    Raises
    ------
    ValueError
        If ``batches`` yields nothing, or a batch is empty.
    """
    iterator = iter(batches)
    sentinel = object()
    ahead = next(iterator, sentinel)
    if ahead is sentinel:
        raise ValueError("batches: the dataset is empty")
    start = 0
    for index in itertools.count():
        chunk = [ahead]
        chunk.extend(itertools.islice(iterator, batches_per_block - 1))
        ahead = next(iterator, sentinel)
        sizes = tuple(int(batch_size(batch)) for batch in chunk)
        if 0 in sizes:
            where = index * batches_per_block + sizes.index(0)
            raise ValueError(f"batches: batch {where} is empty")
        yield Block(index, start, chunk, sizes, ahead is sentinel)
        start += sum(sizes)
        if ahead is sentinel:
            return


class _Scorer:
    """A Ray actor: a model built by the factory and the fitted state placed on it.

    The scoring methods live in the modules that use them (they take the actor's
    ``placement`` and a block); the actor class only builds and holds the state, so that one
    pool serves every kind of map.
    """

    def __init__(
        self,
        model_factory: Callable[[], Any],
        projector: np.ndarray,
        inverse: np.ndarray,
        complement_weight: float | None,
    ):
        model = bind_model(model_factory())
        self.placement = Placement(
            model, model.from_numpy(projector), model.from_numpy(inverse), False, complement_weight
        )
        self.pid = os.getpid()

    def fingerprint(self) -> str:
        return str(self.placement.model.fingerprint())

    def run(self, task: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """``task(placement, *args)``, with this process's id added to its result."""
        result = task(self.placement, *args)
        result["pid"] = self.pid
        return result


class ScorerPool(ActorGroup):
    """Actors holding the calculator's fitted state; a context manager that kills them.

    Starting actors takes seconds (each imports its framework and builds the model), so a pool
    can be started once and passed instead of a model factory to every map over the training
    set (:func:`~krylov_influence.ray.score_training_set`,
    :func:`~krylov_influence.ray.top_k_training_set`), which then leave it running::

        with ScorerPool(calc, make_model, num_actors=8) as actors:
            scores = score_training_set(calc, actors, train, store_path="scores.zarr")
            top = top_k_training_set(calc, actors, queries, train, k=10)

    A pool serves only the calculator it was started for (the same fit and parameters);
    another is refused.

    Parameters
    ----------
    calculator : ArnoldiInfluenceCalculator
        A fitted calculator: ``G`` (k × p) and ``1/(λ+δ)`` are shipped to each actor once as
        host arrays, with the spectral complement's weight when it has one.
    model_factory : callable
        Picklable, zero-argument, builds the calculator's model (fingerprints compared).
    num_actors : int
    num_cpus, max_restarts, max_task_retries, actor_options :
        As for :class:`~krylov_influence.ray.RayHessianData`.
    """

    def __init__(
        self,
        calculator: Any,
        model_factory: Callable[[], Any],
        num_actors: int,
        *,
        num_cpus: float | None = None,
        max_restarts: int = 3,
        max_task_retries: int = 3,
        actor_options: dict[str, Any] | None = None,
    ):
        ray = import_ray()
        if not callable(model_factory):
            raise TypeError(
                f"model_factory: expected a zero-argument callable that builds the model, got "
                f"{type(model_factory).__name__}"
            )
        if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
            raise ValueError(f"num_actors={num_actors!r}: expected a positive integer")
        model = calculator.model
        self.placement = calculator._placed(None)
        self.identity = _identity(calculator)
        self.num_cpus = num_cpus
        self.max_task_retries = int(max_task_retries)
        options: dict[str, Any] = {
            "max_restarts": int(max_restarts),
            "max_task_retries": int(max_task_retries),
            **({} if num_cpus is None else {"num_cpus": num_cpus}),
            **(actor_options or {}),
        }
        actor_class: Any = ray.remote(_Scorer).options(**options)
        projector = np.asarray(model.to_numpy(self.placement.projector))
        inverse = np.asarray(calculator.eigenbasis.inverse_eigenvalues, np.float64)
        # Held for the pool's lifetime: a restarted actor is rebuilt from these objects.
        self._state = [ray.put(a) for a in (model_factory, projector, inverse)]
        weight = self.placement.complement_weight
        self.actors = [actor_class.remote(*self._state, weight) for _ in range(num_actors)]
        try:
            fingerprints = ray.get([actor.fingerprint.remote() for actor in self.actors])
        except BaseException:
            self.shutdown()
            raise
        if any(found != model.fingerprint() for found in fingerprints):
            self.shutdown()
            raise ValueError(
                "model_factory: builds a model whose parameters differ from the calculator's"
            )

    def check(self, calculator: Any) -> None:
        """Refuse to serve another calculator than the one the actors were started for."""
        if not self.actors:
            raise ValueError("model_factory: this ScorerPool is shut down; start another")
        if _identity(calculator) != self.identity:
            raise ValueError(
                "model_factory: this ScorerPool holds the fitted state of another calculator "
                "(another fit, parameters, dtype or spectral complement); start one for this "
                "calculator"
            )


def _identity(calculator: Any) -> tuple[Any, ...]:
    """What the actors' state depends on: the fit, the parameters, the dtype, the weight."""
    placement = calculator._placed(None)
    return (
        calculator.eigenbasis_digest,
        calculator.model.fingerprint(),
        calculator.model.dtype_name,
        placement.complement_weight,
    )


@contextlib.contextmanager
def actors_for(
    calculator: Any, model_factory: Any, num_actors: int, **options: Any
) -> Iterator[ScorerPool]:
    """A running :class:`ScorerPool` passed as ``model_factory`` (checked, left running), or
    a new pool started from the factory and shut down on exit."""
    if isinstance(model_factory, ScorerPool):
        model_factory.check(calculator)
        yield model_factory
        return
    with ScorerPool(calculator, model_factory, num_actors, **options) as pool:
        yield pool


def run_blocks(
    pool: ScorerPool,
    blocks: Iterable[Block],
    task: Callable[[Block], tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]],
    *,
    in_flight_per_actor: int = 2,
) -> Iterator[tuple[Block, dict[str, Any]]]:
    """Run ``task`` for every block on the pool; yield ``(block, result)`` as they complete.

    Parameters
    ----------
    pool : ScorerPool
    blocks : iterable of Block
        Drawn lazily: a block is read from it only when an actor has room.
    task : callable
        ``task(block) -> (function, args)``: the actor runs ``function(placement, *args)``
        (a picklable module-level function) and returns its dict. Large arguments (the
        block's batches) should be ``ray.put`` refs, made here per block and dropped with it.
    in_flight_per_actor : int, default 2
        Blocks submitted to one actor and not yet returned: with 2, an actor's next block is
        already queued when it finishes one; the driver holds at most
        ``in_flight_per_actor × num_actors`` blocks.

    Yields
    ------
    (Block, dict)
        In completion order (not block order).
    """
    ray = import_ray()
    from ray.exceptions import RayActorError

    actors = pool.actors
    load = [0] * len(actors)
    pending: dict[Any, tuple[int, Block, tuple[Any, ...], int]] = {}
    source = iter(blocks)
    exhausted = False

    def submit(block: Block, call: tuple[Any, ...], attempt: int) -> None:
        slot = min(range(len(actors)), key=load.__getitem__)
        ref = actors[slot].run.remote(*call)
        pending[ref] = (slot, block, call, attempt)
        load[slot] += 1

    while True:
        while not exhausted and min(load) < in_flight_per_actor:
            block = next(source, None)
            if block is None:
                exhausted = True
                break
            function, args = task(block)
            submit(block, (function, *args), 0)
        if not pending:
            return
        [ref], _ = ray.wait(list(pending), num_returns=1)
        slot, block, call, attempt = pending.pop(ref)
        load[slot] -= 1
        try:
            result = ray.get(ref)
        except RayActorError:
            # Dead (or unreachable) beyond Ray's own retries: the same block on the least
            # busy actor gives the same numbers.
            if attempt >= pool.max_task_retries:
                raise
            time.sleep(0.5 * (attempt + 1))
            submit(block, call, attempt + 1)
            continue
        yield block, result
