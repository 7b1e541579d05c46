"""Per-example gradients of dense layers kept as factors, for cheap inner products.

The spectral complement's scores need ``g_zᵀ g_x`` for every query ``z`` and training
example ``x``: ``B_query × B_train × p`` products when the gradients are formed. A linear
layer ``z_t = W a_t + b`` applied at positions ``t`` of one example has the per-example weight
gradient ``Σ_t δ_t a_tᵀ`` (``δ_t = ∂ℓ/∂z_t``), so

    ⟨∇_W ℓ_z, ∇_W ℓ_x⟩ = Σ_{t,s} (a_{z,t} · a_{x,s}) (δ_{z,t} · δ_{x,s})

costs ``T_z T_x (in + out)`` per pair instead of ``in × out`` (the "ghost" inner product of
per-example gradient clipping). A layer is kept as factors when that is cheaper, which holds
for dense layers on vectors (``T = 1``: 96 against 2048 numbers per pair for a 64 → 32
layer); otherwise its gradient is formed, as is every parameter outside such layers (their
per-example gradients by ``vmap(grad)`` over those parameters only).

One forward and one backward pass of the whole batch give every layer's ``a`` and ``δ``: row
``b`` of ``∂(Σ_b ℓ_b)/∂z`` is ``∂ℓ_b/∂z_b`` as long as the module treats the examples of a
batch independently (eval mode: no batch statistics). The engine checks that, and that every
use of a layer's weight went through the layer, against ``vmap`` per-example gradients on
the first batch it factors; a model that fails the check takes the formed-gradient route.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, vmap

from krylov_influence_torch._data import Batch, map_leaves
from krylov_influence_torch._ops import Functional, _batch_axis, _unsqueeze
from krylov_influence_torch._spec import NeutralDense

__all__ = ["FactoredGradients", "GradientFactoring", "linear_sites"]


@dataclass(frozen=True)
class LinearSite:
    """A dense layer whose weight is a chosen parameter: where its columns of θ are.

    ``nn.Linear`` holds its weight as (out, in); the neutral spec's ``NeutralDense`` as
    (in, out) (``transposed``).
    """

    module: torch.nn.Module
    weight: int  # index of the weight among the chosen parameters
    bias: int | None  # index of the bias, when it is chosen too
    transposed: bool


def linear_sites(module: torch.nn.Module, names: list[str]) -> list[LinearSite]:
    """The dense layers (``nn.Linear``, ``NeutralDense``) of ``module`` whose weight is among
    ``names``."""
    index = {name: i for i, name in enumerate(names)}
    sites = []
    for prefix, sub in module.named_modules():
        if not isinstance(sub, (torch.nn.Linear, NeutralDense)):
            continue
        dot = f"{prefix}." if prefix else ""
        weight = index.get(f"{dot}weight")
        if weight is not None:
            transposed = isinstance(sub, NeutralDense)
            sites.append(LinearSite(sub, weight, index.get(f"{dot}bias"), transposed))
    return sites


def formed_weight_gradients(inputs: torch.Tensor, deltas: torch.Tensor, transposed: bool) -> Any:
    """``Σ_t δ_t a_tᵀ`` per example, flattened in the weight's layout: (B, out·in)."""
    pattern = "bti,bto->bio" if transposed else "bti,bto->boi"
    return torch.einsum(pattern, inputs, deltas).reshape(inputs.shape[0], -1)


@dataclass(frozen=True)
class FactoredGradients:
    """The per-example gradients of a batch of ``B`` examples, in parts.

    Attributes
    ----------
    size : int
        ``B``.
    formed : tuple of tensor
        ``(B, p_i)`` gradient blocks: every chosen parameter not kept as factors.
    formed_index : tuple of int
        Which chosen parameter each block of ``formed`` is.
    factors : tuple of (tensor, tensor)
        Per factored layer, ``a`` (B, T, in) and ``δ`` (B, T, out).
    factor_index : tuple of int
        The chosen parameter (a weight) of each factored layer.
    theta_dot : tensor of shape (B,) or None
        ``θ · g_b`` of the data part of each gradient, for the ``l2`` terms.
    """

    size: int
    formed: tuple[torch.Tensor, ...]
    formed_index: tuple[int, ...]
    factors: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    factor_index: tuple[int, ...]
    factor_transposed: tuple[bool, ...]
    theta_dot: torch.Tensor | None


class GradientFactoring:
    """Builds :class:`FactoredGradients` of a batch and contracts two of them.

    Parameters
    ----------
    functional : Functional
        The engine's module and loss as functions of θ.
    sites : list of LinearSite
    l2 : float
        The engine's ``l2``: every per-example gradient is ``g_b + l2 θ``.
    """

    def __init__(self, functional: Functional, sites: list[LinearSite], l2: float):
        self.functional = functional
        self.sites = sites
        self.l2 = l2

    # ------------------------------------------------------------------------ building
    def factor(self, theta: torch.Tensor, batch: Batch) -> FactoredGradients:
        """The gradients of every example of ``batch`` (including ``l2 θ``), in parts."""
        f = self.functional
        size = batch.size
        chosen = f.unflatten(theta)
        names = f.names
        recorded = self._record(chosen, batch)
        factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        factor_index: list[int] = []
        transposed: list[bool] = []
        extra: dict[int, torch.Tensor] = {}
        for site, calls in zip(self.sites, recorded):
            if not calls:  # the layer did not run through its forward: form its gradient
                continue
            inputs = torch.cat([a.reshape(size, -1, a.shape[-1]) for a, _ in calls], dim=1)
            deltas = torch.cat([d.reshape(size, -1, d.shape[-1]) for _, d in calls], dim=1)
            if site.bias is not None:
                extra[site.bias] = deltas.sum(dim=1)
            if cheaper_as_factors(inputs.shape[1], inputs.shape[2], deltas.shape[2]):
                factors.append((inputs, deltas))
                factor_index.append(site.weight)
                transposed.append(site.transposed)
            else:
                extra[site.weight] = formed_weight_gradients(inputs, deltas, site.transposed)
        covered: set[int] = set()
        for site, calls in zip(self.sites, recorded):
            if calls:
                covered.update(i for i in (site.weight, site.bias) if i is not None)
        rest = [i for i in range(len(names)) if i not in covered]
        if rest:
            for i, gradient in zip(rest, self._per_example(chosen, batch, rest)):
                extra[i] = gradient.reshape(size, -1)
        formed_index = tuple(sorted(extra))
        formed = tuple(extra[i] for i in formed_index)
        theta_dot = None
        if self.l2:
            pieces = torch.split(theta, f.numels)
            theta_dot = theta.new_zeros(size)
            for i, block in zip(formed_index, formed):
                theta_dot += block @ pieces[i]
            for i, (inputs, deltas), flip in zip(factor_index, factors, transposed):
                weight = pieces[i].view(f.shapes[i])
                mapped = inputs @ (weight if flip else weight.T)  # (B, T, out): W a_t
                theta_dot += torch.einsum("bto,bto->b", deltas, mapped)
        return FactoredGradients(
            size,
            formed,
            formed_index,
            tuple(factors),
            tuple(factor_index),
            tuple(transposed),
            theta_dot,
        )

    def _record(self, chosen: dict[str, torch.Tensor], batch: Batch) -> list[list[Any]]:
        """``(a, δ)`` of every call of every site's forward on ``batch``."""
        f = self.functional
        calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.sites]
        outputs: list[list[torch.Tensor]] = [[] for _ in self.sites]
        leaves = {
            name: tensor.detach().requires_grad_(True) if self._is_site_weight(i) else tensor
            for i, (name, tensor) in enumerate(chosen.items())
        }
        with torch.enable_grad(), self._hooks(calls, outputs, batch.size):
            losses = f._checked_losses(f.forward_at(leaves, batch.x), batch.y, batch.size)
            flat = [out for outs in outputs for out in outs]
            deltas = (
                torch.autograd.grad(losses.sum(), flat, materialize_grads=True, allow_unused=True)
                if flat and losses.requires_grad
                else [torch.zeros_like(out) for out in flat]
            )
        found = iter(deltas)
        for site_calls in calls:
            for j, (inputs, _) in enumerate(site_calls):
                site_calls[j] = (inputs, next(found).detach())
        return calls

    def _is_site_weight(self, index: int) -> bool:
        return any(site.weight == index for site in self.sites)

    @contextlib.contextmanager
    def _hooks(self, calls: list[list[Any]], outputs: list[list[Any]], size: int) -> Iterator[None]:
        """Forward hooks that record each site's input and output; a call whose tensors do not
        lead with the batch axis cannot be factored, so the whole route is refused."""

        def recorder(position: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
                inputs = args[0] if args else None
                if (
                    not isinstance(inputs, torch.Tensor)
                    or inputs.ndim < 2
                    or inputs.shape[0] != size
                    or output.shape[0] != size
                ):
                    raise RuntimeError(
                        "a linear layer ran on a tensor without the batch axis first; its "
                        "per-example gradients cannot be factored"
                    )
                calls[position].append((inputs.detach(), None))
                outputs[position].append(output)

            return hook

        handles = [
            site.module.register_forward_hook(recorder(i)) for i, site in enumerate(self.sites)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _per_example(
        self, chosen: dict[str, torch.Tensor], batch: Batch, wanted: list[int]
    ) -> tuple[torch.Tensor, ...]:
        """``vmap(grad)`` per-example gradients of the chosen parameters ``wanted`` only."""
        f = self.functional
        names = f.names
        wanted_names = [names[i] for i in wanted]
        held = {name: tensor for name, tensor in chosen.items() if name not in wanted_names}

        def example_loss(part: tuple[torch.Tensor, ...], x: Any, y: Any) -> torch.Tensor:
            x = map_leaves(_unsqueeze, x)
            y = map_leaves(_unsqueeze, y)
            outputs = f.forward_at({**held, **dict(zip(wanted_names, part))}, x)
            return f._checked_losses(outputs, y, 1)[0]

        in_dims = (None, map_leaves(_batch_axis, batch.x), map_leaves(_batch_axis, batch.y))
        part = tuple(chosen[name] for name in wanted_names)
        return vmap(grad(example_loss), in_dims=in_dims)(part, batch.x, batch.y)

    # --------------------------------------------------------------------- contracting
    def inner_products(
        self, left: FactoredGradients, right: FactoredGradients, theta: torch.Tensor
    ) -> torch.Tensor:
        """``(g_a + l2 θ)ᵀ (g_b + l2 θ)`` for every pair, shape (B_left, B_right)."""
        if left.formed_index != right.formed_index or left.factor_index != right.factor_index:
            return self.flat(left, theta) @ self.flat(right, theta).T
        result = theta.new_zeros((left.size, right.size))
        for a, b in zip(left.formed, right.formed):
            result.addmm_(a, b.T)
        for (a_in, a_delta), (b_in, b_delta) in zip(left.factors, right.factors):
            if a_in.shape[1] == 1 and b_in.shape[1] == 1:
                result += (a_in[:, 0] @ b_in[:, 0].T) * (a_delta[:, 0] @ b_delta[:, 0].T)
                continue
            ta, tb = a_in.shape[1], b_in.shape[1]
            inputs = a_in.reshape(left.size * ta, -1) @ b_in.reshape(right.size * tb, -1).T
            deltas = a_delta.reshape(left.size * ta, -1) @ b_delta.reshape(right.size * tb, -1).T
            result += (inputs * deltas).view(left.size, ta, right.size, tb).sum(dim=(1, 3))
        if self.l2:
            assert left.theta_dot is not None and right.theta_dot is not None
            result += self.l2 * (left.theta_dot[:, None] + right.theta_dot[None, :])
            result += self.l2 * self.l2 * torch.dot(theta, theta)
        return result

    def flat(self, gradients: FactoredGradients, theta: torch.Tensor) -> torch.Tensor:
        """The gradients as one (B, p) block in flat order, ``l2 θ`` included."""
        f = self.functional
        size = gradients.size
        blocks: dict[int, torch.Tensor] = dict(zip(gradients.formed_index, gradients.formed))
        for i, (inputs, deltas), flip in zip(
            gradients.factor_index, gradients.factors, gradients.factor_transposed
        ):
            blocks[i] = formed_weight_gradients(inputs, deltas, flip)
        flat = torch.cat(
            [
                blocks[i] if i in blocks else theta.new_zeros((size, f.numels[i]))
                for i in range(len(f.numels))
            ],
            dim=1,
        )
        if self.l2:
            flat.add_(theta[None, :], alpha=self.l2)
        return flat

    def project(
        self, gradients: FactoredGradients, projector: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """``G (g_b + l2 θ)`` for every example, shape (B, k), without the (B, p) block."""
        blocks = torch.split(projector, self.functional.numels, dim=1)
        result = projector.new_zeros((gradients.size, projector.shape[0]))
        for i, block in zip(gradients.formed_index, gradients.formed):
            result.addmm_(block, blocks[i].T)
        for i, (inputs, deltas), flip in zip(
            gradients.factor_index, gradients.factors, gradients.factor_transposed
        ):
            # The layer's (B, out·in) block: bounded like the formed gradients of a batch.
            result.addmm_(formed_weight_gradients(inputs, deltas, flip), blocks[i].T)
        if self.l2:
            result += self.l2 * (projector @ theta)[None, :]
        return result


def cheaper_as_factors(positions: int, fan_in: int, fan_out: int) -> bool:
    """Whether a layer's factored inner product, ``T² (in + out)`` per pair, costs less than
    the formed one, ``in × out``."""
    return positions * positions * (fan_in + fan_out) < fan_in * fan_out
