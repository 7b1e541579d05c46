"""Linearised Hessian batches: the gradient's autograd graph, kept for every product.

A reverse-over-reverse product over a batch runs the forward pass and the backward pass
with ``create_graph=True`` (neither depends on the vector), then one backward pass of that
graph with the vector. A :class:`LinearizedBatch` runs the first two once and keeps the
graph, so each product of the Arnoldi iteration is the last pass alone, the same kernels on
the same saved tensors: the products are those of the engine's reverse-over-reverse route bit
for bit.

What the graph keeps is counted by a saved-tensor hook while it is built: every tensor
autograd saves for the backward passes, once per storage, less the storages that exist
anyway (θ, the batch), plus the gradient itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from krylov_influence_torch._data import Batch, map_leaves
from krylov_influence_torch._ops import Functional, products_through

__all__ = ["LinearizedBatch", "linearize"]


class LinearizedBatch:
    """A staged batch with the autograd graph of its gradient at θ.

    Attributes
    ----------
    batch : Batch
        The staged batch (its ``size`` counts towards the mean).
    leaf : tensor, shape (p,), or None
        The θ the graph was built at; ``None`` when the Hessian of the batch is zero.
    gradient : tensor, shape (p,), or None
        ``∇_θ Σ_b ℓ_b`` with its graph.
    nbytes : int
        What the graph keeps beyond θ and the batch.
    """

    __slots__ = ("batch", "gradient", "leaf", "nbytes")

    def __init__(self, batch: Batch, graph: tuple[torch.Tensor, torch.Tensor] | None, nbytes: int):
        self.batch = batch
        self.leaf, self.gradient = graph if graph is not None else (None, None)
        self.nbytes = int(nbytes)

    @property
    def size(self) -> int:
        return self.batch.size

    def products(self, vectors: torch.Tensor, chunk: int | None, loop: bool) -> torch.Tensor:
        """``H_b v`` for ``vectors`` (p,) or each row of (m, p), through the kept graph."""
        if self.leaf is None or self.gradient is None:
            return torch.zeros_like(vectors)
        return products_through(
            self.leaf, self.gradient, vectors, chunk, loop=loop, keep_graph=True
        )


@contextlib.contextmanager
def _counting_saved_tensors(known: set[int]) -> Iterator[Callable[[], int]]:
    """Count the bytes of the storages autograd saves inside the block (each once), less
    those in ``known`` (their data pointers)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in known:
            seen[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield lambda: sum(seen.values())


def _pointers(theta: torch.Tensor, batch: Batch) -> set[int]:
    pointers = {theta.untyped_storage().data_ptr()}

    def add(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            pointers.add(leaf.untyped_storage().data_ptr())
        return leaf

    map_leaves(add, batch.x)
    map_leaves(add, batch.y)
    return pointers


def linearize(
    functional: Functional,
    theta: torch.Tensor,
    batch: Batch,
    kernels: contextlib.AbstractContextManager[Any] | None = None,
) -> LinearizedBatch:
    """Run the forward and gradient passes of ``batch`` once and keep the gradient's graph.

    ``kernels`` is the context the graph is recorded under (the composite kernels when the
    engine's HVP route needs them: the products replay what the graph recorded).
    """
    counting = _counting_saved_tensors(_pointers(theta, batch))
    with counting as saved, kernels or contextlib.nullcontext():
        graph = functional.gradient_graph(theta, batch)
    kept = 0 if graph is None else saved() + graph[1].nbytes
    return LinearizedBatch(batch, graph, kept)
