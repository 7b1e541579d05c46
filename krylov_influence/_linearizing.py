"""Linearising the staged Hessian data: the passes that do not depend on the vector, run once.

A Hessian-vector product over a batch runs the forward pass, the gradient's backward pass,
and a second-order pass that carries the vector. The Arnoldi iteration applies the *same*
Hessian ``subspace_dim`` times, so the first two passes give the same intermediate values on
every product. Where the engine can keep them (PyTorch: the autograd graph of the gradient,
each product one ``autograd.grad`` through it; JAX: the residuals of ``jax.linearize`` of the
gradient, each product one compiled application of the linear map; TensorFlow: the graph of
one product split where the vector enters, each product the second half fed the tensors the
first half computed), the calculator has the
engine linearise each staged batch once before the iteration
(:meth:`krylov_influence.InfluenceModel.linearize_batch`), and the products cost only their
vector-dependent part: 0.5-0.85 of a full product on the benchmark CNN and transformer
(``docs/benchmarks.md``). The numbers are those of the engine's own reverse-over-reverse
(PyTorch: bit for bit) or forward-over-reverse (JAX: to rounding) product.

What is kept is about what one training step holds (activations and the gradient's
intermediates), per batch, for as long as the fit runs; so it is bounded by a budget
(``linearize_hessian_data=`` of the calculator, the same forms as ``stage_hessian_data``).
Batches are linearised in order while they fit; the batches after the first that does not
are used as staged, recomputing their passes on every product. Data that is not staged (the
engine does not stage, or it is above the staging budget) is not linearised either: its
batches are not kept, so there is nothing fixed to linearise around.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from krylov_influence._staging import (
    HeldBatches,
    StagedBatches,
    format_bytes,
    resolve_stage_budget,
)

__all__ = [
    "DEFAULT_LINEARIZE_BYTES",
    "LinearizedBatches",
    "linearize_hessian_data",
    "resolve_linearize_budget",
]

logger = logging.getLogger("krylov_influence")

#: The default budget of linearised Hessian data, in bytes (1 GiB).
DEFAULT_LINEARIZE_BYTES = 2**30


def resolve_linearize_budget(value: Any, name: str = "linearize_hessian_data") -> int:
    """The budget in bytes (0: never linearise), in the forms of ``stage_hessian_data``
    (``True``: :data:`DEFAULT_LINEARIZE_BYTES`)."""
    return resolve_stage_budget(value, name, DEFAULT_LINEARIZE_BYTES)


class LinearizedBatches(HeldBatches):
    """What the Hessian operator iterates: linearised batches first, then staged ones.

    Only the engine's ``hvp`` / ``hvps`` accept a linearised batch; every other use of the
    Hessian data (losses, identity checks, counts) keeps the :class:`StagedBatches`.

    Attributes
    ----------
    batches : tuple
        ``linearized`` engine objects for the first batches, the staged batches after them.
    linearized : int
        How many of ``batches`` are linearised.
    nbytes : int
        What the linearised batches keep, as the engine reported it.
    """

    __slots__ = ("linearized",)

    def __init__(self, batches: Iterable[Any], linearized: int, nbytes: int):
        super().__init__(batches, nbytes)
        self.linearized = int(linearized)

    def __repr__(self) -> str:
        return (
            f"LinearizedBatches({self.linearized} of {len(self.batches)} batches linearised, "
            f"{format_bytes(self.nbytes)})"
        )


def linearize_hessian_data(model: Any, data: Iterable[Any], budget: int) -> tuple[Any, str]:
    """Linearise the staged batches of ``data`` in order while they fit ``budget`` bytes.

    Parameters
    ----------
    model : InfluenceModel
        Its ``linearize_batch(batch, max_bytes)`` returns ``(linearized, nbytes)``, or
        ``None`` when the engine does not linearise or the batch would keep more than
        ``max_bytes``.
    data : StagedBatches or the user's batches
        What :func:`krylov_influence._staging.stage_hessian_data` returned.
    budget : int
        Bytes, from :func:`krylov_influence._staging.resolve_stage_budget`; 0 never
        linearises.

    Returns
    -------
    batches : LinearizedBatches or ``data`` itself
        What the Hessian operator should iterate (``data`` when nothing was linearised).
    note : str
        For progress output: ``""``, or ``"linearised 460.0 MiB"`` (``", 3 of 4 batches"``
        when the budget stopped it).
    """
    if budget <= 0 or not isinstance(data, StagedBatches) or len(data) == 0:
        return data, ""
    kept: list[Any] = []
    total = 0
    for batch in data:
        result = model.linearize_batch(batch, budget - total)
        if result is None:
            break
        item, size = result
        kept.append(item)
        total += int(size)
    if not kept:
        logger.info(
            "Hessian data not linearised: the %s engine does not linearise, or its first "
            "batch keeps more than linearize_hessian_data=%s",
            model.engine_name,
            format_bytes(budget),
        )
        return data, ""
    rest = data.batches[len(kept) :]
    result_batches = LinearizedBatches([*kept, *rest], len(kept), total)
    note = f"linearised {format_bytes(total)}"
    if rest:
        note += f", {len(kept)} of {len(data)} batches"
    logger.info("Hessian data %s (%d of %d batches)", note, len(kept), len(data))
    return result_batches, note
