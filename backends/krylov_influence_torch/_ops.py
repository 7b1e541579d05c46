"""The operators as pure functions of the flat parameters θ, built on ``torch.func``.

The Hessian products differentiate with respect to one flat tensor θ (shape (p,)), split into
the chosen parameters inside the function, so they come out flat with no concatenation in
Python; per-example gradients are taken per parameter tensor (see below). The module runs
through ``torch.func.functional_call`` with *every* parameter and buffer supplied (θ for the
chosen ones, fixed copies for the rest), so the user's tensors are never read or written
during a computation.

- Hessian-vector products: forward-over-reverse, ``jvp(grad(Σ_b ℓ_b))``; several vectors at
  once with ``vmap`` over the tangents (the primal pass is shared). Or reverse-over-reverse
  with ``torch.autograd`` (``hvp_mode="reverse-over-reverse"``): in PyTorch 2.13 on CPU it is
  2–3× faster, because forward-mode AD through the backward of common losses (cross-entropy,
  log-softmax, batch norm) runs TorchScript decompositions and functorch adds a fixed cost
  per call.
- Projections ``G g_b``: the JVP of the per-example loss vector (B,) along a row of G *is*
  the column of directional derivatives, so ``vmap`` over the rows of G of one JVP gives
  (k, B) with no per-example gradient ever formed.
- Per-example gradients: ``vmap(grad(ℓ))`` over the examples, each seen as a batch of one,
  differentiated per chosen parameter tensor (flattened only when a (B, p) block is asked
  for; projections contract each parameter's block with its columns of G).

Where a model's kernels cannot take one of these (no ``vmap`` batching rule, no forward-mode
or second derivative), the caller falls back (``_routes``): the same function under composite
kernels, per-example gradients one example at a time
(:meth:`Functional.per_parameter_grads_by_example`), or HVPs by a loop over the vectors.

The L2 term ``½ l2 ‖θ‖²`` is added analytically by the caller (``+l2·v``, ``+l2·θ``,
``+l2·Gθ``): exact, and no derivative work for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad, grad_and_value, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from krylov_influence_torch._data import Batch, map_leaves
from krylov_influence_torch._routes import EngineTypeError, EngineValueError

__all__ = ["Functional"]


class Functional:
    """A module and loss as functions of the flat chosen parameters.

    Parameters
    ----------
    module : torch.nn.Module
        Called in whatever mode it is in; the caller switches it to eval mode.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> (B,)``.
    names : list of str
        The chosen parameters, in flat order.
    shapes : list of tuple of int
        Their shapes.
    fixed : dict of str to tensor
        Every other parameter and every buffer, already on the device and in the dtype.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[[Any, Any], Any],
        names: list[str],
        shapes: list[tuple[int, ...]],
        fixed: dict[str, torch.Tensor],
    ):
        self.module = module
        self.loss_fn = loss_fn
        self.names = names
        self.shapes = shapes
        self.numels = [int(torch.Size(shape).numel()) for shape in shapes]
        self.fixed = fixed

    # ------------------------------------------------------------------ building blocks
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split θ (p,) into the chosen parameters, by name."""
        pieces = torch.split(theta, self.numels)
        return {
            name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)
        }

    def forward(self, theta: torch.Tensor, x: Any) -> Any:
        """The module's outputs at θ for inputs ``x`` (tensor, tuple, or dict)."""
        return self.forward_at(self.unflatten(theta), x)

    def forward_at(self, chosen: dict[str, torch.Tensor], x: Any) -> Any:
        """The module's outputs with the chosen parameters given by name."""
        tensors = (chosen, self.fixed)
        if isinstance(x, dict):
            return functional_call(self.module, tensors, (), x)
        if isinstance(x, (tuple, list)):
            return functional_call(self.module, tensors, tuple(x))
        return functional_call(self.module, tensors, (x,))

    def losses(self, theta: torch.Tensor, x: Any, y: Any, size: int) -> torch.Tensor:
        """Per-example data losses (no L2 term), shape (size,)."""
        return self._checked_losses(self.forward(theta, x), y, size)

    def _checked_losses(self, outputs: Any, y: Any, size: int) -> torch.Tensor:
        values = self.loss_fn(outputs, y)
        if not isinstance(values, torch.Tensor):
            raise EngineTypeError(
                f"loss_fn: expected a tensor of per-example losses, got {type(values).__name__}"
            )
        if tuple(values.shape) != (size,):
            hint = (
                " It looks reduced to a scalar: use reduction='none'."
                if values.ndim == 0
                else " Sum or average the other axes inside loss_fn."
            )
            raise EngineValueError(
                f"loss_fn: expected per-example losses of shape ({size},) for a batch of "
                f"{size}, got shape {tuple(values.shape)}.{hint}"
            )
        return values

    def _loss_sum(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.losses(theta, batch.x, batch.y, batch.size).sum()

    def _example_loss(self, chosen: tuple[torch.Tensor, ...], x: Any, y: Any) -> torch.Tensor:
        # Inside vmap each example arrives without its batch axis; the module and the loss
        # see a batch of one, as they would outside.
        x = map_leaves(_unsqueeze, x)
        y = map_leaves(_unsqueeze, y)
        outputs = self.forward_at(dict(zip(self.names, chosen)), x)
        return self._checked_losses(outputs, y, 1)[0]

    # ------------------------------------------------------------------------ operators
    def hvp_sum(self, theta: torch.Tensor, vector: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``∇²(Σ_b ℓ_b) v`` over one batch, shape (p,)."""

        def gradient(th: torch.Tensor) -> torch.Tensor:
            return grad(self._loss_sum)(th, batch)

        return jvp(gradient, (theta,), (vector,))[1]

    def hvps_sum(
        self, theta: torch.Tensor, vectors: torch.Tensor, batch: Batch, chunk: int | None
    ) -> torch.Tensor:
        """``∇²(Σ_b ℓ_b) V_i`` for every row of ``vectors`` (m, p), shape (m, p)."""

        def gradient(th: torch.Tensor) -> torch.Tensor:
            return grad(self._loss_sum)(th, batch)

        def one(vector: torch.Tensor) -> torch.Tensor:
            return jvp(gradient, (theta,), (vector,))[1]

        return vmap(one, chunk_size=chunk)(vectors)

    def hvps_sum_reverse(
        self,
        theta: torch.Tensor,
        vectors: torch.Tensor,
        batch: Batch,
        chunk: int | None,
        loop: bool = False,
    ) -> torch.Tensor:
        """Like :meth:`hvps_sum` (or :meth:`hvp_sum` for ``vectors`` of shape (p,)), by
        reverse-over-reverse: one backward pass that keeps its graph, then one backward pass
        of that graph per chunk of vectors (``is_grads_batched``), or per vector with
        ``loop`` (no ``vmap`` at all)."""
        graph = self.gradient_graph(theta, batch)
        if graph is None:
            return torch.zeros_like(vectors)
        return products_through(*graph, vectors, chunk, loop=loop)

    def gradient_graph(
        self, theta: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(leaf, ∇_θ Σ_b ℓ_b)`` with the gradient's autograd graph, for
        :func:`products_through`; ``None`` when the loss is constant or linear in θ (its
        Hessian is zero)."""
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            loss = self._loss_sum(leaf, batch)
            if not loss.requires_grad:  # the loss does not depend on θ at all
                return None
            (gradient,) = torch.autograd.grad(loss, leaf, create_graph=True)
            if not gradient.requires_grad:  # the loss is linear in θ
                return None
        return leaf, gradient

    def directional(
        self, theta: torch.Tensor, projector: torch.Tensor, batch: Batch, chunk: int | None
    ) -> torch.Tensor:
        """``(G ∇ℓ_b)`` for every example and row of ``projector`` (k, p), shape (B, k)."""

        def batch_losses(th: torch.Tensor) -> torch.Tensor:
            return self.losses(th, batch.x, batch.y, batch.size)

        def one(row: torch.Tensor) -> torch.Tensor:
            return jvp(batch_losses, (theta,), (row,))[1]

        return vmap(one, chunk_size=chunk)(projector).T.contiguous()

    def project_gradients(
        self, grads: tuple[torch.Tensor, ...], projector: torch.Tensor, size: int
    ) -> torch.Tensor:
        """``(G ∇ℓ_b)`` for every example, shape (B, k), from per-example gradients kept per
        parameter: ``Σ_l grads_l (B, p_l) @ G[:, block l]ᵀ``.

        The same products as ``per_example_grads(...) @ Gᵀ`` without the flat (B, p) copy
        (it was a third of the time on the digits MLP).
        """
        blocks = torch.split(projector, self.numels, dim=1)
        projected = grads[0].reshape(size, -1) @ blocks[0].T
        for gradient, block in zip(grads[1:], blocks[1:]):
            projected.addmm_(gradient.reshape(size, -1), block.T)
        return projected

    @staticmethod
    def flat_gradients(grads: tuple[torch.Tensor, ...], size: int) -> torch.Tensor:
        """The per-parameter gradients as one (B, p) block, in flat order."""
        return torch.cat([g.reshape(size, -1) for g in grads], dim=1)

    def per_parameter_grads(
        self, theta: torch.Tensor, batch: Batch
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``vmap(grad_and_value)`` over the examples: one (B, *shape) tensor per chosen
        parameter, and the (B,) data losses of the same pass (no second forward pass for
        the losses a store records)."""
        chosen = tuple(self.unflatten(theta).values())
        in_dims = (None, map_leaves(_batch_axis, batch.x), map_leaves(_batch_axis, batch.y))
        return vmap(grad_and_value(self._example_loss), in_dims=in_dims)(chosen, batch.x, batch.y)

    def per_parameter_grads_by_example(
        self, theta: torch.Tensor, batch: Batch
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Like :meth:`per_parameter_grads`, without ``vmap``: one example at a time.

        The loss is evaluated once, on the outputs of the whole batch (so it sees the batch as
        in :meth:`losses`, e.g. ``F.one_hot(y)`` without ``num_classes``), and differentiated
        with respect to those outputs: as each per-example loss reads only its own example's
        outputs, row b of ``∂(Σ ℓ)/∂outputs`` is ``∂ℓ_b/∂outputs_b``. Then each example runs
        through the module alone, and one backward pass carries its row to the parameters.
        Cost: B forward and backward passes of one example (no graph of the whole batch).
        """
        size = batch.size
        chosen = self.unflatten(theta)
        outputs, spec = tree_flatten(self.forward_at(chosen, batch.x))
        with torch.enable_grad():
            inputs = [
                leaf.detach().requires_grad_(True) if _differentiable(leaf) else leaf
                for leaf in outputs
            ]
            losses = self._checked_losses(tree_unflatten(inputs, spec), batch.y, size)
            wanted = [i for i, leaf in enumerate(inputs) if _differentiable(leaf)]
            leaves = [piece.detach().requires_grad_(True) for piece in chosen.values()]
            parts: list[list[torch.Tensor]] = [[] for _ in leaves]
            if losses.requires_grad:
                cotangents = torch.autograd.grad(
                    losses.sum(), [inputs[i] for i in wanted], materialize_grads=True
                )
                named = dict(zip(self.names, leaves))
                for b in range(size):
                    example = map_leaves(functools.partial(_take, b), batch.x)
                    found = tree_flatten(self.forward_at(named, example))[0]
                    pairs = [
                        (found[i], cotangent[b : b + 1])
                        for i, cotangent in zip(wanted, cotangents)
                        if found[i].requires_grad
                    ]
                    if pairs:
                        grads = torch.autograd.grad(
                            [out for out, _ in pairs],
                            leaves,
                            [cotangent for _, cotangent in pairs],
                            materialize_grads=True,
                        )
                    else:  # this example's outputs do not depend on θ
                        grads = tuple(torch.zeros_like(leaf) for leaf in leaves)
                    for part, gradient in zip(parts, grads):
                        part.append(gradient.detach())
        losses = losses.detach()
        if not parts[0]:  # the losses do not depend on the outputs
            return tuple(leaf.new_zeros((size, *leaf.shape)) for leaf in leaves), losses
        return tuple(torch.stack(part) for part in parts), losses


def _differentiable(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.is_floating_point()


def _take(index: int, leaf: torch.Tensor | None) -> torch.Tensor | None:
    return None if leaf is None else leaf[index : index + 1]


def _unsqueeze(leaf: torch.Tensor | None) -> torch.Tensor | None:
    return None if leaf is None else leaf.unsqueeze(0)


def _batch_axis(leaf: torch.Tensor | None) -> int | None:
    return None if leaf is None else 0


def products_through(
    leaf: torch.Tensor,
    gradient: torch.Tensor,
    vectors: torch.Tensor,
    chunk: int | None,
    *,
    loop: bool = False,
    keep_graph: bool = False,
) -> torch.Tensor:
    """``H v`` for ``vectors`` (p,) or each row of (m, p), by backward passes of the
    gradient's graph (:meth:`Functional.gradient_graph`): one per chunk of rows
    (``is_grads_batched``), or per row with ``loop``. The graph is freed after the last
    pass unless ``keep_graph`` (a linearised batch keeps it for the next products)."""
    if vectors.ndim == 1:
        pieces = [vectors]
    elif loop:
        pieces = list(vectors)
    else:
        step = vectors.shape[0] if chunk is None else chunk
        pieces = list(torch.split(vectors, step))
    products = []
    for index, piece in enumerate(pieces):
        (product,) = torch.autograd.grad(
            gradient,
            leaf,
            piece,
            retain_graph=keep_graph or index < len(pieces) - 1,
            is_grads_batched=piece.ndim == 2,
            materialize_grads=True,
        )
        products.append(product.detach())
    if vectors.ndim == 1:
        return products[0]
    if loop:
        return torch.stack(products)
    return products[0] if len(products) == 1 else torch.cat(products)
