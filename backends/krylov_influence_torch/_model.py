"""``TorchInfluenceModel``: a ``torch.nn.Module`` and a per-example loss, bound to the engine."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import array_api_compat.torch as torch_xp
import numpy as np
import torch

from krylov_influence.engine import EngineCapabilities, InfluenceModel
from krylov_influence_torch._data import Batch, batch_size, map_leaves, prepare_batch
from krylov_influence_torch._factors import FactoredGradients, GradientFactoring, linear_sites
from krylov_influence_torch._linearized import LinearizedBatch, linearize
from krylov_influence_torch._ops import Functional
from krylov_influence_torch._order import random_sampler
from krylov_influence_torch._params import select_parameters
from krylov_influence_torch._routes import Operator, composite_kernels, never_retried

__all__ = ["TorchInfluenceModel", "available_devices", "torch_dtype"]

logger = logging.getLogger("krylov_influence")

# Route names, as ``model.routes`` reports them (and docs/layers.md lists them).
VECTORISED = "vectorised"
COMPOSITE = "composite kernels"
LOOP_OVER_EXAMPLES = "loop over examples"
JVP_VECTORISED = "jvp, vectorised over the rows"
GRADIENTS_IN_CHUNKS = "per-example gradients x G^T, in chunks of examples"
FORWARD_OVER_REVERSE = "forward-over-reverse"
REVERSE_OVER_REVERSE = "reverse-over-reverse"
LOOP_OVER_VECTORS = "loop over the vectors"
FACTORED_LINEAR = "dense layers factored, other gradients vectorised"
FORMED_GRADIENTS = "per-example gradients"
# The per-example gradient route that is not vectorised: "auto" then projects by JVPs.
PER_EXAMPLE_LOOP = f"{LOOP_OVER_EXAMPLES}, {COMPOSITE}"

# Rows of a projector (or vectors of an ``hvps``) per vectorised pass default to this many
# example-directions: memory grows as rows × B × (activations per example).
_DEFAULT_VECTORISED_BUDGET = 2**17

#: The ways ``hvp`` and ``hvps`` can differentiate twice.
HVP_MODES = ("reverse-over-reverse", "forward-over-reverse")
PROJECTIONS = ("auto", "jvp", "gradients")


def available_devices() -> tuple[str, ...]:
    """``"cpu"``, then ``"cuda:i"`` for every visible GPU, then ``"mps"`` when available."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return tuple(devices)


class TorchInfluenceModel(InfluenceModel):
    """A ``torch.nn.Module`` with a per-example loss, as an :class:`InfluenceModel`.

    Build it with ``krylov_influence.InfluenceModel(module, loss_fn, ...)`` (the engine is
    inferred) or ``TorchEngine.bind``.

    Parameters
    ----------
    module : torch.nn.Module
        The network. It is never modified: the chosen parameters are copied into θ at bind
        time (rebind after further training), the other parameters and the buffers are read
        (and copied only to change device or dtype), and every computation runs the module in
        eval mode through ``torch.func.functional_call``, restoring its mode afterwards.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> (B,)``: per-example losses, e.g.
        ``torch.nn.CrossEntropyLoss(reduction="none")``.
    parameters : optional
        ``None`` (every parameter with ``requires_grad``), an iterable of parameter names
        (``"fc2.weight"``), submodule names (``"fc2"``) or parameter objects, or a predicate
        ``(name, param) -> bool``.
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda:0"``, ``"mps"``...; default the device of the chosen parameters.
    dtype : {"float32", "float64"} or torch dtype, optional
        Default the dtype of the chosen parameters.
    l2 : float, default 0.0
        Adds ``½ l2 ‖θ‖²`` (chosen parameters only) to every per-example loss.
    chunk_size : int, optional
        Rows of a projector (or vectors of ``hvps``) per vectorised pass; default
        ``max(1, 2**17 // B)``. Lower it if a projection runs out of memory.
    hvp_mode : {"reverse-over-reverse", "forward-over-reverse"}
        How Hessian-vector products are differentiated: reverse-over-reverse
        (``torch.autograd.grad`` twice, the default) or forward-over-reverse
        (``torch.func.jvp`` of ``torch.func.grad``). Both are exact; in PyTorch 2.13 on CPU
        reverse-over-reverse is 2–3× faster for the usual losses (4.4 against 13.0 ms per HVP
        on the digits MLP, ``benchmarks/floor.py``), because forward-mode AD through the
        backward of cross-entropy runs Python decompositions.
    projection : {"auto", "jvp", "gradients"}
        How ``project`` computes ``G ∇ℓ``: k JVPs vectorised over the rows of ``G`` (memory
        B × k × activations, never B × p), or per-example gradients times ``Gᵀ`` (memory
        B × p; 4–14× faster than k = 20 JVPs on CPU for the MLP, CNN and transformer of
        ``benchmarks/``). ``"auto"`` (default) takes gradients, over chunks of examples whose
        (chunk, p) block fits in :attr:`GRADIENT_PROJECTION_BYTES` when the whole (B, p) block
        does not; JVPs once per-example gradients loop over the examples (recurrent layers).

    Notes
    -----
    Routes: each operator has exact fallback routes for layers whose kernels a fast route
    cannot take (recurrent layers under ``vmap``, fused attention in forward mode...); the
    first call chooses, a :class:`~krylov_influence_torch.RouteFallbackWarning` notes a
    switch once, and :attr:`routes` reports the choice (``docs/layers.md``).

    Flat order: the chosen parameters in ``module.named_parameters()`` order (a shared
    parameter once, under its first name), each flattened in C order (row-major, as
    ``tensor.reshape(-1)``). :attr:`parameter_layout` lists it.
    """

    engine_name = "torch"
    #: Largest per-example gradient block (B × p × itemsize) that ``projection="auto"``
    #: forms; above it the projection takes the gradients of chunks of examples in turn.
    GRADIENT_PROJECTION_BYTES = 64 * 2**20

    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[[Any, Any], Any],
        *,
        parameters: Any = None,
        device: Any = None,
        dtype: Any = None,
        l2: float = 0.0,
        chunk_size: int | None = None,
        hvp_mode: str = "reverse-over-reverse",
        projection: str = "auto",
    ):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(module).__name__}")
        _check_loss(loss_fn)
        names = select_parameters(module, parameters)
        named = dict(module.named_parameters())
        chosen = [named[name] for name in names]
        torch_dtype = _resolve_dtype(dtype, chosen)
        torch_device = _resolve_device(device, chosen)
        if torch_device.type == "mps" and torch_dtype == torch.float64:
            raise ValueError(
                "dtype='float64': the MPS device has no float64; pass dtype='float32' "
                "or device='cpu'"
            )
        self._module = module
        self._loss_fn = loss_fn
        self._names = names
        self._shapes = [tuple(param.shape) for param in chosen]
        self._dtype = torch_dtype
        self._device = torch_device
        self._l2 = _check_l2(l2)
        self._chunk_size = _check_chunk_size(chunk_size)
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r}: expected one of {HVP_MODES}")
        self._hvp_mode = hvp_mode
        if projection not in PROJECTIONS:
            raise ValueError(f"projection={projection!r}: expected one of {PROJECTIONS}")
        self._projection = projection
        # Each piece moves first, so a module spread over several devices binds too.
        self._theta = torch.cat(
            [p.detach().reshape(-1).to(device=torch_device, dtype=torch_dtype) for p in chosen]
        )
        chosen_names = set(names)
        fixed = {
            name: tensor for name, tensor in module.named_parameters() if name not in chosen_names
        }
        fixed.update(module.named_buffers())
        self._fixed = {name: self._place(tensor) for name, tensor in fixed.items()}
        self._submodules = list(module.modules())
        self._functional = Functional(module, loss_fn, names, self._shapes, self._fixed)
        self._factoring = GradientFactoring(self._functional, linear_sites(module, names), self._l2)
        self._operators = self._build_operators()
        self._operators_linear = self._build_linear_operators()
        self._linearizable = True
        if module.training:
            warnings.warn(
                "the module is in training mode; influence computations run it in eval mode "
                "(no dropout, batch-norm running statistics) and restore its mode afterwards. "
                "Call module.eval() before binding to silence this warning.",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.is_floating_point():
            return tensor.to(device=self._device, dtype=self._dtype)
        return tensor.to(device=self._device)

    # ----------------------------------------------------------------- placement and precision
    @property
    def xp(self) -> Any:
        """``array_api_compat.torch``."""
        return torch_xp

    @property
    def dtype(self) -> torch.dtype:
        """``torch.float32`` or ``torch.float64``."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The ``torch.device`` of θ and of every output."""
        return self._device

    @property
    def host_memory(self) -> bool:
        return self._device.type == "cpu"

    @property
    def num_parameters(self) -> int:
        """``p``: the number of chosen scalars."""
        return int(self._theta.numel())

    @property
    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities(
            float64=self._device.type != "mps", vectorised_hvp=True, devices=available_devices()
        )

    @property
    def parameter_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, shape), ...]`` in flat order (each flattened in C order)."""
        return list(zip(self._names, self._shapes))

    @property
    def module(self) -> torch.nn.Module:
        """The user's module (read only by the engine)."""
        return self._module

    def on_device(self, device: Any) -> TorchInfluenceModel:
        """This model with θ, the fixed tensors and all outputs on ``device``.

        Parameters
        ----------
        device : str or torch.device

        Returns
        -------
        TorchInfluenceModel
            ``self`` when already there, otherwise a copy (the module itself is shared).
        """
        if device is None:
            return self
        target = _resolve_device(device, [self._theta])
        if target == self._device:
            return self
        if target.type == "mps" and self._dtype == torch.float64:
            raise ValueError("device='mps': the MPS device has no float64; bind in float32")
        moved = object.__new__(type(self))
        moved.__dict__.update(self.__dict__)
        moved._device = target
        moved._theta = self._theta.to(target)
        moved._fixed = {name: tensor.to(target) for name, tensor in self._fixed.items()}
        moved._functional = Functional(
            self._module, self._loss_fn, self._names, self._shapes, moved._fixed
        )
        moved._operators = moved._build_operators()  # a new device may need other routes
        return moved

    # ------------------------------------------------------------------------------- the data
    def prepare(self, batch: Any) -> Batch:
        """Convert a batch to tensors on this model's device and dtype (see ``_data``)."""
        return prepare_batch(batch, self._device, self._dtype)

    def batch_size(self, batch: Any) -> int:
        return batch_size(batch)

    def random_order(self, dataset: Any) -> str | None:
        """A ``DataLoader`` whose sampler draws a new order on every pass, named; else None."""
        return random_sampler(dataset)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode and no autograd graph for the duration; the module's modes restored."""
        modes = [sub.training for sub in self._submodules]
        training = any(modes)
        if training:
            self._module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if training:
                for sub, mode in zip(self._submodules, modes):
                    sub.training = mode

    def _penalty(self) -> torch.Tensor:
        return 0.5 * self._l2 * torch.dot(self._theta, self._theta)

    def losses(self, batch: Any) -> torch.Tensor:
        """Per-example losses (including the L2 term), shape (B,)."""
        prepared = self.prepare(batch)
        with self._evaluating():
            values = self._functional.losses(self._theta, prepared.x, prepared.y, prepared.size)
            if self._l2:
                values = values + self._penalty()
        return values.to(self._dtype)

    # ---------------------------------------------------------------------------- operators
    def flat_parameters(self) -> torch.Tensor:
        """θ, shape (p,): a copy, in the order of :attr:`parameter_layout`."""
        return self._theta.clone()

    def _chunk(self, rows: int, size: int) -> int | None:
        chunk = self._chunk_size or max(1, _DEFAULT_VECTORISED_BUDGET // max(size, 1))
        return None if chunk >= rows else chunk

    def _prepared(self, batches: Iterable[Any]) -> Iterator[Batch]:
        if isinstance(batches, (torch.Tensor, np.ndarray, dict)) or (
            isinstance(batches, tuple)
            and len(batches) == 2
            and isinstance(batches[0], (torch.Tensor, np.ndarray))
        ):
            raise TypeError(
                "batches: got a single batch; expected an iterable of batches such as "
                "[(x, y)] or a DataLoader"
            )
        for batch in batches:
            yield batch if isinstance(batch, LinearizedBatch) else self.prepare(batch)

    def hvp(self, vector: Any, batches: Iterable[Any]) -> torch.Tensor:
        """Hessian of the mean loss over ``batches`` times ``vector``.

        Parameters
        ----------
        vector : tensor, shape (p,)
        batches : re-iterable of batches

        Returns
        -------
        tensor, shape (p,)
        """
        vector = self._as_matrix(vector, 1, "vector")
        total = torch.zeros_like(self._theta)
        count = 0
        with self._evaluating():
            for batch in self._prepared(batches):
                if isinstance(batch, LinearizedBatch):
                    total += batch.products(vector, None, False)
                else:
                    total += self._operators["hvp"](self._theta, vector, batch)
                count += batch.size
        return self._mean(total, count).add_(vector, alpha=self._l2)

    def hvps(self, vectors: Any, batches: Iterable[Any]) -> torch.Tensor:
        """Hessian of the mean loss times each row of ``vectors`` (m, p), vectorised.

        One row takes the route of :meth:`hvp`.

        Returns
        -------
        tensor, shape (m, p)
        """
        vectors = self._as_matrix(vectors, 2, "vectors")
        total = torch.zeros_like(vectors)
        count = 0
        with self._evaluating():
            for batch in self._prepared(batches):
                if isinstance(batch, LinearizedBatch):
                    chunk = self._chunk(vectors.shape[0], batch.size)
                    total += self._linearized_products(batch, vectors, chunk)
                elif vectors.shape[0] == 1:
                    total[0] += self._operators["hvp"](self._theta, vectors[0], batch)
                else:
                    chunk = self._chunk(vectors.shape[0], batch.size)
                    total += self._operators["hvps"](self._theta, vectors, batch, chunk)
                count += batch.size
        return self._mean(total, count).add_(vectors, alpha=self._l2)

    def linearize_batch(self, batch: Any, max_bytes: int) -> tuple[LinearizedBatch, int] | None:
        """``(batch with its gradient's autograd graph, bytes the graph keeps)``, or ``None``
        when that is more than ``max_bytes`` or the graph cannot be differentiated again.

        Every product over the returned batch is one backward pass of the kept graph, the
        engine's reverse-over-reverse product bit for bit
        (:mod:`krylov_influence_torch._linearized`). The first batch a model linearises is
        checked by one product through its graph; a model whose graph fails it, with and
        without composite kernels, is not linearised (its products take their usual route).
        """
        if not self._linearizable:
            return None
        prepared = self.prepare(batch)
        try:
            with self._evaluating():
                item = self._operators_linear["linearize"](self._theta, prepared)
        except Exception as error:
            if never_retried(error):
                raise
            self._linearizable = False
            logger.info("torch engine: the Hessian data is not linearised (%s)", error)
            return None
        if item.nbytes > max_bytes:
            return None
        return item, item.nbytes

    def _linearized_products(
        self, batch: LinearizedBatch, vectors: torch.Tensor, chunk: int | None
    ) -> torch.Tensor:
        if vectors.shape[0] == 1:
            return batch.products(vectors[0], None, False)[None, :]
        return self._operators_linear["hvps"](batch, vectors, chunk)

    def _build_linear_operators(self) -> dict[str, Operator]:
        """Building a linearised batch (its graph checked once by a product through it) and
        products of blocks through it (vectorised by ``is_grads_batched``, else a loop)."""
        checked = False

        def build(kernels: Callable[[], Any] | None) -> Callable[..., LinearizedBatch]:
            def linearized(theta: torch.Tensor, batch: Batch) -> LinearizedBatch:
                nonlocal checked
                item = linearize(self._functional, theta, batch, kernels and kernels())
                if not checked:  # the second backward fails here, not in the iteration
                    item.products(torch.zeros_like(theta), None, False)
                    checked = True
                return item

            return linearized

        return {
            "linearize": Operator(
                "linearize",
                [
                    (REVERSE_OVER_REVERSE, build(None)),
                    (f"{REVERSE_OVER_REVERSE}, {COMPOSITE}", build(composite_kernels)),
                ],
            ),
            "hvps": Operator(
                "hvps (linearised)",
                [
                    (f"{REVERSE_OVER_REVERSE}, batched", _linearized_block(loop=False)),
                    (f"{REVERSE_OVER_REVERSE}, {LOOP_OVER_VECTORS}", _linearized_block(loop=True)),
                ],
            ),
        }

    @staticmethod
    def _mean(total: torch.Tensor, count: int) -> torch.Tensor:
        if count == 0:
            raise ValueError("batches: the Hessian data is empty")
        return total.div_(count)

    def project(self, projector: Any, batch: Any) -> torch.Tensor:
        """Per-example ``G ∇ℓ_b``: JVPs vectorised over the rows of ``G``, or gradients × Gᵀ.

        See ``projection`` in the class docstring for which route is taken.

        Parameters
        ----------
        projector : tensor, shape (k, p)
        batch : a batch of B examples

        Returns
        -------
        tensor, shape (B, k)
        """
        return self._projected(projector, batch, with_losses=False)[0]

    def project_and_losses(self, projector: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(project(projector, batch), losses(batch))``; on the gradient routes the losses
        come from the same ``vmap(grad_and_value)`` pass, with no second forward pass.

        Returns
        -------
        projected : tensor, shape (B, k)
        losses : tensor, shape (B,)
        """
        projected, losses = self._projected(projector, batch, with_losses=True)
        if losses is None:  # the JVP route: its losses take a forward pass
            losses = self.losses(batch)
        return projected, losses

    def _projected(
        self, projector: Any, batch: Any, with_losses: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`project`, and the per-example losses (L2 term included) where the route
        computed them anyway (``None`` on the JVP route)."""
        projector = self._as_matrix(projector, 2, "projector")
        prepared = self.prepare(batch)
        block = prepared.size * self.num_parameters * self._theta.element_size()
        per_example = self._operators["per_example_grads"]
        losses = None
        with self._evaluating():
            if self._projection == "gradients" or (
                self._projection == "auto" and block <= self.GRADIENT_PROJECTION_BYTES
            ):
                grads, losses = per_example(self._theta, prepared)
                projected = self._functional.project_gradients(grads, projector, prepared.size)
            elif self._projection == "auto" and per_example.route != PER_EXAMPLE_LOOP:
                # Per-example gradients in chunks of examples whose (chunk, p) block fits
                # GRADIENT_PROJECTION_BYTES: memory as bounded as the JVPs', and on every
                # model measured one gradient pass costs 4-14x less than k = 20 JVPs
                # (benchmarks/engine_floor.py; docs/benchmarks.md). Once per-example
                # gradients loop over the examples, JVPs are faster.
                projected, losses = self._in_chunks_of_examples(self._theta, projector, prepared)
            else:
                chunk = self._chunk(projector.shape[0], prepared.size)
                projected = self._operators["project (jvp)"](
                    self._theta, projector, prepared, chunk
                )
            if self._l2:
                projected.add_((projector @ self._theta)[None, :], alpha=self._l2)
                if losses is not None:
                    losses = losses + self._penalty()
        return projected, None if losses is None else losses.to(self._dtype)

    def _in_chunks_of_examples(
        self, theta: torch.Tensor, projector: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradients × Gᵀ over chunks of examples whose (chunk, p) gradient block
        fits :attr:`GRADIENT_PROJECTION_BYTES`: (B, k), and the (B,) data losses."""
        per_example = self._operators["per_example_grads"]
        pieces, losses = [], []
        for part in self._example_chunks(batch):
            grads, part_losses = per_example(theta, part)
            pieces.append(self._functional.project_gradients(grads, projector, part.size))
            losses.append(part_losses)
        if len(pieces) == 1:
            return pieces[0], losses[0]
        return torch.cat(pieces), torch.cat(losses)

    def _example_chunks(self, batch: Batch) -> list[Batch]:
        """``batch`` in equal chunks of examples whose (chunk, p) gradient block fits
        :attr:`GRADIENT_PROJECTION_BYTES` (64 = 22 + 21 + 21, not 31 + 31 + 2)."""
        row = self.num_parameters * self._theta.element_size()
        most = max(1, self.GRADIENT_PROJECTION_BYTES // row)
        if batch.size <= most:
            return [batch]
        step = -(-batch.size // -(-batch.size // most))
        return [_slice(batch, start, start + step) for start in range(0, batch.size, step)]

    def project_with_norms(self, projector: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``G g`` (B, k) and ``‖g‖²`` (B,) from one per-example gradient pass, per parameter
        (no flat (B, p) copy), over chunks of examples within :attr:`GRADIENT_PROJECTION_BYTES`.
        With ``l2``, ``‖g + l2 θ‖² = ‖g‖² + 2 l2 θ·g + l2² ‖θ‖²``, ``θ·g`` being one more row of
        the same projection."""
        projector = self._as_matrix(projector, 2, "projector")
        prepared = self.prepare(batch)
        rows = torch.cat([projector, self._theta[None, :]]) if self._l2 else projector
        projections, squares = [], []
        with self._evaluating():
            for part in self._example_chunks(prepared):
                grads, _ = self._operators["per_example_grads"](self._theta, part)
                projections.append(self._functional.project_gradients(grads, rows, part.size))
                squares.append(sum(g.reshape(part.size, -1).square().sum(dim=1) for g in grads))
            projected = torch.cat(projections)
            norms = torch.cat(squares)
            if self._l2:
                theta_dot, projected = projected[:, -1], projected[:, :-1]
                l2 = self._l2
                norms = norms + 2 * l2 * theta_dot + l2 * l2 * self._theta.square().sum()
                projected = projected + l2 * (projector @ self._theta)[None, :]
        return projected, norms

    def per_example_grads(self, batch: Any) -> torch.Tensor:
        """Per-example gradients (including ``l2·θ``), shape (B, p), by ``vmap(grad)``
        (or a fallback route, see :attr:`routes`)."""
        prepared = self.prepare(batch)
        with self._evaluating():
            grads, _ = self._operators["per_example_grads"](self._theta, prepared)
            flat = self._functional.flat_gradients(grads, prepared.size)
            if self._l2:
                flat.add_(self._theta[None, :], alpha=self._l2)
        return flat

    def query_gradients(self, batch: Any) -> Any:
        """Per-example gradients of a query batch for the spectral complement's ``g_zᵀ g_x``:
        ``nn.Linear`` layers kept as activations and output gradients (``_factors``), every
        other parameter's gradient formed; or the (B, p) block (see :attr:`routes`,
        ``"query gradients"``)."""
        prepared = self.prepare(batch)
        with self._evaluating():
            return self._operators["query gradients"](self._theta, prepared)

    def project_query_gradients(self, gradients: Any, projector: Any) -> torch.Tensor:
        """``G g_z`` (B_query, k) from :meth:`query_gradients`."""
        projector = self._as_matrix(projector, 2, "projector")
        if isinstance(gradients, FactoredGradients):
            return self._factoring.project(gradients, projector, self._theta)
        return gradients @ projector.T

    def gradient_inner_products(self, gradients: Any, batch: Any) -> torch.Tensor:
        """``g_zᵀ g_x`` (B_query, B) of :meth:`query_gradients` and the examples of ``batch``;
        with factored query gradients, the batch is factored the same way (one forward and
        backward pass, plus ``vmap`` gradients of the parameters outside linear layers)."""
        if not isinstance(gradients, FactoredGradients):
            return super().gradient_inner_products(gradients, batch)
        prepared = self.prepare(batch)
        # In chunks of examples whose formed gradients stay within the projection budget.
        row = self.num_parameters * self._theta.element_size()
        step = max(1, self.GRADIENT_PROJECTION_BYTES // row)
        pieces = []
        with self._evaluating():
            for start in range(0, prepared.size, step):
                part = _slice(prepared, start, start + step) if step < prepared.size else prepared
                factors = self._factoring.factor(self._theta, part)
                pieces.append(self._factoring.inner_products(gradients, factors, self._theta))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    # --------------------------------------------------------------------------------- routes
    @property
    def routes(self) -> dict[str, str]:
        """The route each operator takes: ``per_example_grads`` (also ``projection=
        "gradients"``), ``project (jvp)``, ``hvp`` (one vector) and ``hvps`` (a block).

        The first route of each until a call finds that it fails for this model; then the
        fallback it keeps (noted once by a :class:`RouteFallbackWarning`). See
        ``krylov_influence_torch._routes`` and ``docs/layers.md``.
        """
        return {name: operator.route for name, operator in self._operators.items()}

    def _build_operators(self) -> dict[str, Operator]:
        """The operators of this bound model, each with its routes, fastest first."""
        f = self._functional

        per_example = Operator(
            "per_example_grads",
            [
                (VECTORISED, f.per_parameter_grads),
                (f"{VECTORISED}, {COMPOSITE}", _composite(f.per_parameter_grads)),
                (
                    f"{LOOP_OVER_EXAMPLES}, {COMPOSITE}",
                    _composite(f.per_parameter_grads_by_example),
                ),
            ],
        )

        def in_chunks_of_examples(
            theta: torch.Tensor, projector: torch.Tensor, batch: Batch, chunk: int | None
        ) -> torch.Tensor:
            return self._in_chunks_of_examples(theta, projector, batch)[0]

        project = Operator(
            "project (jvp)",
            [
                (JVP_VECTORISED, f.directional),
                (f"{JVP_VECTORISED}, {COMPOSITE}", _composite(f.directional)),
                (GRADIENTS_IN_CHUNKS, in_chunks_of_examples),
            ],
        )

        def reverse(theta: Any, vectors: Any, batch: Batch, chunk: Any = None) -> Any:
            return f.hvps_sum_reverse(theta, vectors, batch, chunk)

        def reverse_loop(theta: Any, vectors: Any, batch: Batch, chunk: Any = None) -> Any:
            return f.hvps_sum_reverse(theta, vectors, batch, chunk, loop=True)

        hvp_reverse = [
            (REVERSE_OVER_REVERSE, reverse),
            (f"{REVERSE_OVER_REVERSE}, {COMPOSITE}", _composite(reverse)),
        ]
        hvps_reverse = [
            (f"{REVERSE_OVER_REVERSE}, batched", reverse),
            (f"{REVERSE_OVER_REVERSE}, batched, {COMPOSITE}", _composite(reverse)),
            (f"{REVERSE_OVER_REVERSE}, {LOOP_OVER_VECTORS}, {COMPOSITE}", _composite(reverse_loop)),
        ]
        if self._hvp_mode == "reverse-over-reverse":
            hvp_routes, hvps_routes = hvp_reverse, hvps_reverse
        else:
            hvp_routes = [
                (FORWARD_OVER_REVERSE, f.hvp_sum),
                (f"{FORWARD_OVER_REVERSE}, {COMPOSITE}", _composite(f.hvp_sum)),
                *hvp_reverse[1:],
            ]
            hvps_routes = [
                (f"{FORWARD_OVER_REVERSE}, {VECTORISED}", f.hvps_sum),
                (f"{FORWARD_OVER_REVERSE}, {VECTORISED}, {COMPOSITE}", _composite(f.hvps_sum)),
                *hvps_reverse[1:],
            ]

        def formed(theta: torch.Tensor, batch: Batch) -> torch.Tensor:
            flat = f.flat_gradients(per_example(theta, batch)[0], batch.size)
            return flat.add_(theta[None, :], alpha=self._l2) if self._l2 else flat

        query = [(FORMED_GRADIENTS, formed)]
        if self._factoring.sites:
            query.insert(0, (FACTORED_LINEAR, self._checked_factors(formed, per_example)))
        return {
            "per_example_grads": per_example,
            "project (jvp)": project,
            "query gradients": Operator("query gradients", query),
            "hvp": Operator("hvp", hvp_routes),
            "hvps": Operator("hvps", hvps_routes),
        }

    def _checked_factors(
        self,
        formed: Callable[[torch.Tensor, Batch], torch.Tensor],
        per_example: Operator,
    ) -> Callable[[torch.Tensor, Batch], FactoredGradients]:
        """The factored route, checked on its first batch against formed gradients of a few
        of its examples; a mismatch (examples that interact, a weight used outside its layer)
        raises, so the operator takes the formed route for this model. The gradients outside
        dense layers are vectorised as ``per_example_grads`` is (composite kernels where it
        needs them); where it loops over examples, so does the formed route, and this one is
        refused."""
        checked = False

        def factored(theta: torch.Tensor, batch: Batch) -> FactoredGradients:
            nonlocal checked
            few = min(batch.size, 3)
            expected = None if checked else formed(theta, _slice(batch, 0, few))
            if per_example.route == PER_EXAMPLE_LOOP:
                raise RuntimeError("per-example gradients loop over the examples")
            kernels = composite_kernels() if COMPOSITE in per_example.route else None
            with kernels or contextlib.nullcontext():
                factors = self._factoring.factor(theta, batch)
            if expected is not None:
                found = self._factoring.flat(factors, theta)[:few]
                tolerance = 1e3 * torch.finfo(theta.dtype).eps * (1 + expected.abs().max())
                if not bool(((found - expected).abs() <= tolerance).all()):
                    raise RuntimeError(
                        "the per-example gradients of its dense layers are not the factored "
                        "ones (examples of a batch interact, or a weight is used outside its "
                        "layer)"
                    )
                checked = True
            return factors

        return factored

    def stage_batch(self, batch: Any) -> tuple[Batch, int]:
        """``(prepared batch, bytes of its tensors)``: the batch on the device, in the dtype."""
        prepared = self.prepare(batch)
        return prepared, prepared.nbytes

    # ----------------------------------------------------------------------------- conversion
    def to_numpy(self, array: Any) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            return array.detach().cpu().numpy()
        return np.asarray(array)

    def _as_matrix(self, value: Any, ndim: int, name: str) -> torch.Tensor:
        tensor = torch.as_tensor(value)
        p = self.num_parameters
        if tensor.ndim != ndim or tensor.shape[-1] != p or tensor.shape[0] == 0:
            rows = "m" if name == "vectors" else "k"
            expected = "(p,)" if ndim == 1 else f"({rows}, p) with {rows} >= 1"
            raise ValueError(
                f"{name}: expected shape {expected} with p = {p}, got {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor, got {tensor.dtype}")
        return tensor.to(device=self._device, dtype=self._dtype)


# -------------------------------------------------------------------------------- routes
def _linearized_block(*, loop: bool) -> Callable[..., torch.Tensor]:
    def products(batch: LinearizedBatch, vectors: torch.Tensor, chunk: int | None) -> Any:
        return batch.products(vectors, chunk, loop)

    return products


def _composite(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` run under :func:`composite_kernels`."""

    @functools.wraps(function)
    def run(*args: Any) -> Any:
        with composite_kernels():
            return function(*args)

    return run


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of a prepared batch."""

    def cut(leaf: torch.Tensor | None) -> torch.Tensor | None:
        return None if leaf is None else leaf[start:stop]

    size = min(stop, batch.size) - start
    return Batch(
        map_leaves(cut, batch.x), map_leaves(cut, batch.y), size, batch.device, batch.dtype
    )


# ---------------------------------------------------------------------------- validation
def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside krylov_influence."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("krylov_influence"):
        frame = frame.f_back
        level += 1
    return level


def _check_loss(loss_fn: Any) -> None:
    if loss_fn is None or not callable(loss_fn):
        raise TypeError(
            "loss_fn: expected a callable loss_fn(outputs, targets) -> (B,) per-example "
            f"losses, e.g. torch.nn.CrossEntropyLoss(reduction='none'); got {loss_fn!r}"
        )
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, torch.nn.Module) and reduction not in (None, "none"):
        raise ValueError(
            f"loss_fn: {type(loss_fn).__name__}(reduction={reduction!r}) reduces the batch to "
            f"one number; pass reduction='none' for per-example losses"
        )


def _check_l2(l2: Any) -> float:
    try:
        value = float(l2)
    except (TypeError, ValueError):
        raise TypeError(f"l2={l2!r}: expected a finite number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"l2={l2!r}: expected a finite number >= 0")
    return value


def _check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive integer or None")
    return chunk_size


def torch_dtype(dtype: Any) -> torch.dtype:
    """``torch.float32`` or ``torch.float64`` from a name, a torch dtype or a NumPy dtype.

    Raises
    ------
    ValueError
        For anything else (half precision, integers, unknown names).
    """
    if isinstance(dtype, torch.dtype):
        found = dtype
    else:
        try:
            name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype.strip().lower()
        except TypeError:
            name = str(dtype)
        found = {"float32": torch.float32, "float64": torch.float64}.get(name)
    if found not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype!r}: expected float32 or float64")
    return found


def _resolve_dtype(dtype: Any, chosen: list[torch.Tensor]) -> torch.dtype:
    if dtype is not None:
        return torch_dtype(dtype)
    found = {param.dtype for param in chosen}
    if len(found) != 1:
        raise ValueError(
            f"dtype=None: the chosen parameters mix dtypes {sorted(map(str, found))}; pass "
            "dtype='float32' or 'float64'"
        )
    (only,) = found
    if only not in (torch.float32, torch.float64):
        raise ValueError(
            f"dtype=None: the chosen parameters are {only}; pass dtype='float32' or 'float64' "
            "(the engine computes in one of those)"
        )
    return only


def _resolve_device(device: Any, chosen: list[torch.Tensor]) -> torch.device:
    target = _find_device(device, chosen)
    if target.type == "meta":
        raise ValueError(
            f"device={device!r}: the model's parameters would be meta tensors, which hold no "
            "values to differentiate; materialise the module (e.g. module.to_empty(device="
            "'cpu') and load its weights) first"
        )
    return target


def _find_device(device: Any, chosen: list[torch.Tensor]) -> torch.device:
    if device is None:
        found = {param.device for param in chosen}
        if len(found) != 1:
            raise ValueError(
                f"device=None: the chosen parameters live on several devices "
                f"{sorted(map(str, found))}; pass device=..."
            )
        (target,) = found
        return target
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device={device!r}: not a torch device (expected e.g. 'cpu', 'cuda:0')"
        ) from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available in this process")
        index = torch.cuda.current_device() if target.index is None else target.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return torch.device("cuda", index)
    if target.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device={device!r}: MPS is not available in this process")
    elif target.type != "cpu":
        try:
            torch.empty(0, device=target)
        except (RuntimeError, AssertionError):
            raise ValueError(
                f"device={device!r}: not usable in this process; available here: "
                f"{', '.join(available_devices())}"
            ) from None
    return target
