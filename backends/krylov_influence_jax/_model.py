"""``JaxInfluenceModel``: a pure ``apply_fn(params, x)`` and a loss bound to the JAX engine."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from krylov_influence.engine import EngineCapabilities, InfluenceModel, LastArrayCache
from krylov_influence_jax import _batches, _kernels
from krylov_influence_jax._kernels import Kernels, Program
from krylov_influence_jax._libraries import adapt
from krylov_influence_jax._namespace import JAX_NAMESPACE
from krylov_influence_jax._params import ParameterLayout, split_parameters
from krylov_influence_jax._placement import (
    device_names,
    resolve_device,
    resolve_dtype,
    x64_enabled,
)

__all__ = ["ROUTES", "JaxInfluenceModel", "bind_jax"]

# Default bound on B × (directions vectorised at once) in a projection: the tangents of the
# forward pass take that many times the activations of one example.
_PROJECTION_BUDGET = 2**18

PROJECTIONS = ("auto", "jvp", "gradients")

# The route of each operator (model.routes, docs/layers.md). JAX differentiates and vectorises
# every standard layer on the fast route, so unlike the TensorFlow engine there is no fallback.
PER_EXAMPLE_VMAP = "vmap of grad over examples"
JVP_VMAP = "linearize, vmap over the rows"
FORWARD_OVER_REVERSE = "forward-over-reverse"
FORWARD_OVER_REVERSE_VMAP = "forward-over-reverse, vmap over the vectors"
ROUTES = {
    "per_example_grads": PER_EXAMPLE_VMAP,
    "project (jvp)": JVP_VMAP,
    "hvp": FORWARD_OVER_REVERSE,
    "hvps": FORWARD_OVER_REVERSE_VMAP,
}

# What may be differentiated, per kind of model (for error messages).
_TRAINABLE = {
    "nnx": "nnx.Param",
    "linen": "'params' collection",
    "equinox": "floating-point",
    "function": "floating-point",
}


def _projector_blocks(
    kernels: Kernels,
    theta: Any,
    l2: Any,
    dtype: Any,
    device: Any,
    on_host: bool,
    projector: Any,
) -> Any:
    """:func:`~krylov_influence_jax._kernels._projector_blocks` of a (k, p) projector (its
    shape already checked), in the model's dtype on its device; ``on_host``: split and
    transposed by NumPy, each block then put on the device."""
    G = jax.device_put(jnp.asarray(projector, dtype=dtype), device)
    if not on_host:
        return kernels.projector_blocks(G, theta, l2)
    host = np.asarray(G)
    blocks = [
        jax.device_put(np.ascontiguousarray(host[:, start:stop].T), device)
        for start, stop in kernels.program.layout.spans
    ]
    return (blocks, *kernels.projector_offsets(G, theta, l2))


class JaxInfluenceModel(InfluenceModel):
    """A JAX model bound to the ``jax`` engine (see :class:`krylov_influence.InfluenceModel`).

    Built by ``krylov_influence.InfluenceModel(apply_fn, loss_fn, params=...)``; see
    :func:`bind_jax` for the arguments. Every array it returns is a ``jax.Array`` on
    :attr:`device` in :attr:`dtype`; its namespace :attr:`xp` is ``jax.numpy``.

    Attributes
    ----------
    params : pytree
        The full parameter pytree (floating leaves cast to :attr:`dtype`, on :attr:`device`).
        For an nnx module, the pure dict of its whole state (``nnx.to_pure_dict``: parameters,
        batch statistics, RNG state); for an Equinox module, its array part
        (``eqx.partition(module, eqx.is_inexact_array)[0]``).
    """

    engine_name = "jax"

    #: Largest per-example gradient block (B × p × itemsize) that ``projection="auto"``
    #: forms; above it the projection takes the gradients of chunks of examples in turn.
    GRADIENT_PROJECTION_BYTES = 64 * 2**20

    #: Platforms on which a projector is split per parameter leaf by NumPy on the host, not
    #: by a compiled program: XLA:CPU took 1.4 s to compile the 38 slices and transposes of
    #: the benchmark transformer's G (20 × 525 828), which NumPy does in 0.03 s. Elsewhere
    #: the split stays on the device, G never crossing to the host.
    HOST_SPLIT_PLATFORMS: frozenset[str] = frozenset({"cpu"})

    def __init__(
        self,
        kernels: Kernels,
        theta: Any,
        fixed: tuple[Any, ...],
        *,
        l2: float,
        dtype: np.dtype,
        device: Any,
        batch_keys: tuple[str, str] | None,
        jvp_chunk_size: int | None,
        projection: str = "auto",
    ):
        # The compiled operators, shared with every live model bound to the same functions
        # and layout; this reference (with those models') is what keeps them compiled.
        self._kernels = kernels
        self._program: Program = kernels.program
        self._projection = projection
        self._l2 = float(l2)
        self._l2_array = jax.device_put(jnp.asarray(l2, dtype=dtype), device)
        self._theta = theta
        self._fixed = fixed
        self._dtype = dtype
        self._device = device
        self._batch_keys = batch_keys
        self._jvp_chunk_size = jvp_chunk_size
        # The last projector's blocks, kept while that projector lives (see _projected). A
        # partial of what it needs, not a method: no reference cycle through the model.
        self._split_projector = LastArrayCache(
            functools.partial(
                _projector_blocks,
                kernels,
                theta,
                self._l2_array,
                dtype,
                device,
                device.platform in self.HOST_SPLIT_PLATFORMS,
            )
        )

    # ----------------------------------------------------------------- placement and precision
    @property
    def xp(self) -> Any:
        return JAX_NAMESPACE

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def device(self) -> Any:
        return self._device

    @property
    def host_memory(self) -> bool:
        return self._device.platform == "cpu"

    @property
    def num_parameters(self) -> int:
        return int(self._theta.shape[0])

    @property
    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities(
            float64=x64_enabled(), vectorised_hvp=True, devices=device_names()
        )

    @property
    def l2(self) -> float:
        """The L2 coefficient added to every per-example loss."""
        return self._l2

    @property
    def parameter_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(path, shape), ...]`` of the differentiated leaves, in flat order.

        Paths are the pytree key paths joined by ``/`` (``"params/Dense_1/kernel"``, or
        ``"0/1"`` for the bias of the first ``(W, b)`` pair of a list). The order is that of
        ``jax.tree_util.tree_leaves(params)`` (dict keys sorted), each leaf in C order: the
        order of ``jax.flatten_util.ravel_pytree`` over the selected leaves.
        """
        layout: ParameterLayout = self._program.layout
        return list(zip(layout.names, layout.shapes))

    @property
    def routes(self) -> dict[str, str]:
        """The route each operator takes (one per operator on JAX; see ``docs/layers.md``).

        Keys: ``"per_example_grads"`` (also ``projection="gradients"``), ``"project (jvp)"``
        (``projection="jvp"``; in chunks of ``jvp_chunk_size`` rows when k exceeds it),
        ``"hvp"`` and ``"hvps"`` (blocks of vectors).
        """
        return dict(ROUTES)

    @property
    def params(self) -> Any:
        return self.unflatten(self._theta)

    def unflatten(self, vector: Any) -> Any:
        """The full parameter pytree with the differentiated leaves taken from ``vector`` (p,)."""
        return self._program.layout.rebuild(jnp.asarray(vector, dtype=self._dtype), self._fixed)

    def on_device(self, device: Any) -> JaxInfluenceModel:
        if device is None:
            return self
        target = resolve_device(device, [])
        if target == self._device:
            return self
        return JaxInfluenceModel(
            self._kernels,
            jax.device_put(self._theta, target),
            tuple(jax.device_put(leaf, target) for leaf in self._fixed),
            l2=self._l2,
            dtype=self._dtype,
            device=target,
            batch_keys=self._batch_keys,
            jvp_chunk_size=self._jvp_chunk_size,
            projection=self._projection,
        )

    # ----------------------------------------------------------------------------- the data
    def _stage(self, batch: Any) -> _batches.Staged:
        return _batches.stage(batch, self._batch_keys, self._dtype, self._device)

    def stage_batch(self, batch: Any) -> tuple[_batches.Staged, int]:
        """``(staged batch, bytes of its arrays)``: JAX arrays on the device, floats in dtype."""
        staged = self._stage(batch)
        return staged, staged.nbytes

    def batch_size(self, batch: Any) -> int:
        return _batches.batch_size(*_batches.unpack(batch, self._batch_keys))

    def losses(self, batch: Any) -> Any:
        staged = self._stage(batch)
        return self._kernels.losses(self._theta, self._fixed, staged.x, staged.y, self._l2_array)

    # ------------------------------------------------------------------------ the operators
    def flat_parameters(self) -> Any:
        return self._theta

    def _vector(self, vector: Any, ndim: int, name: str) -> Any:
        array = jax.device_put(jnp.asarray(vector, dtype=self._dtype), self._device)
        p = self.num_parameters
        if array.ndim != ndim or array.shape[-1] != p:
            expected = "(p,)" if ndim == 1 else "(m, p)"
            raise ValueError(f"{name}: expected shape {expected} with p = {p}, got {array.shape}")
        return array

    def _hessian_sum(self, kernel: Callable[..., Any], vector: Any, batches: Iterable[Any]) -> Any:
        # One compiled call per batch, staged or not. Not a lax.scan over stacked batches: on
        # XLA:CPU a convolution inside the scan's while loop ran 12x slower (a small CNN: 6.2 s
        # against 0.5 s per HVP), and the scanned program compiled for seconds.
        total, count = None, 0
        for batch in batches:
            if isinstance(batch, _LinearizedBatch):
                kernels = self._kernels
                apply = kernels.linear_apply if vector.ndim == 1 else kernels.linear_apply_many
                part, size = apply(batch.linear, vector), batch.size
            else:
                staged = self._stage(batch)
                part = kernel(self._theta, self._fixed, staged.x, staged.y, vector)
                size = staged.size
            total = part if total is None else total + part
            count += size
        if total is None or count == 0:
            raise ValueError("batches: the Hessian data is empty")
        return self._kernels.finish(total, count, vector, self._l2_array)

    def linearize_batch(self, batch: Any, max_bytes: int) -> tuple[Any, int] | None:
        """``(batch linearised, bytes of its residuals)``, or ``None`` above ``max_bytes``.

        ``jax.linearize`` of the batch's gradient: the forward and gradient passes run once
        and their residuals are kept, so each product over the batch is one compiled
        application of the linear map (the forward-over-reverse product, to rounding). The
        residuals are sized (``jax.eval_shape``) before anything is computed.
        """
        staged = self._stage(batch)
        args = (self._theta, self._fixed, staged.x, staged.y)
        shapes = jax.eval_shape(self._kernels.linearize_sum, *args)
        nbytes = sum(
            math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
            for leaf in jax.tree_util.tree_leaves(shapes)
        )
        if nbytes > max_bytes:
            return None
        return _LinearizedBatch(self._kernels.linearize_sum(*args), staged.size), nbytes

    def hvp(self, vector: Any, batches: Iterable[Any]) -> Any:
        """Hessian of the mean loss over ``batches`` times ``vector``; (p,) -> (p,)."""
        vector = self._vector(vector, 1, "vector")
        return self._hessian_sum(self._kernels.hvp_sum, vector, batches)

    def hvps(self, vectors: Any, batches: Iterable[Any]) -> Any:
        """``H @ vectors[i]`` for every row, in one vectorised pass; (m, p) -> (m, p)."""
        vectors = self._vector(vectors, 2, "vectors")
        return self._hessian_sum(self._kernels.hvps_sum, vectors, batches)

    def _chunk(self, size: int, k: int) -> int:
        if self._jvp_chunk_size is not None:
            return self._jvp_chunk_size
        return max(1, min(k, _PROJECTION_BUDGET // max(size, 1)))

    def project(self, projector: Any, batch: Any) -> Any:
        """``G @ grad loss(z_b)`` for every example: JVPs or gradients × Gᵀ (``projection``).

        Parameters
        ----------
        projector : array, shape (k, p)
        batch : a batch of B examples

        Returns
        -------
        jax.Array, shape (B, k)
            By JVPs, the k directions are vectorised in chunks of ``jvp_chunk_size``
            (default: as many as keep B × chunk ≤ 2¹⁸), bounding memory to B × chunk
            activations. ``projection="auto"`` takes per-example gradients times ``Gᵀ``
            instead: of the whole batch when the (B, p) block fits in
            :attr:`GRADIENT_PROJECTION_BYTES`, else of equal chunks of examples that do.
        """
        return self._projected(projector, batch, with_losses=False)

    def project_and_losses(self, projector: Any, batch: Any) -> tuple[Any, Any]:
        """``(project(projector, batch), losses(batch))`` from one compiled program per
        batch (or chunk of examples): the losses are the values of the per-example
        ``value_and_grad`` pass, or the primal of the JVPs' ``linearize``.

        Returns
        -------
        projected : jax.Array, shape (B, k)
        losses : jax.Array, shape (B,)
        """
        return self._projected(projector, batch, with_losses=True)

    def _projected(self, projector: Any, batch: Any, with_losses: bool) -> Any:
        """:meth:`project` (``with_losses`` False) or :meth:`project_and_losses` (True)."""
        G = self._vector(projector, 2, "projector")
        staged = self._stage(batch)
        x, y, size = staged.x, staged.y, staged.size
        row = self.num_parameters * self._dtype.itemsize
        if self._projection == "gradients" or (
            self._projection == "auto" and size * row <= self.GRADIENT_PROJECTION_BYTES
        ):
            pieces = 1
        elif self._projection == "auto":
            # Per-example gradients over chunks of examples whose (chunk, p) block fits the
            # budget: memory as bounded as the JVPs', and one gradient pass cost 4.7x less
            # CPU than k = 20 JVPs on the benchmark CNN (benchmarks/engine_floor.py).
            pieces = -(-size // max(1, self.GRADIENT_PROJECTION_BYTES // row))
        else:
            kernel = self._kernels.project_and_losses if with_losses else self._kernels.project
            chunk = self._chunk(size, int(G.shape[0]))
            return kernel(self._theta, self._fixed, x, y, G, self._l2_array, chunk=chunk)
        # A jax.Array cannot change in place, so the blocks built for it serve every batch
        # it projects (a self-influence pass); another input is converted anew at each call.
        blocks = self._split_projector(projector if isinstance(projector, jax.Array) else G)
        # Equal chunks, the last one padded with copies of the batch's last example (rows
        # dropped after): one compiled shape per batch size, where a shorter last chunk was
        # a second compilation (4.7 s for the transformer's, against 1.1 s for the whole
        # projection pass once compiled).
        step = -(-size // pieces)
        chunks = (
            [(x, y)]
            if pieces == 1
            else self._kernels.example_chunks((x, y), step=step, count=-(-size // step))
        )
        parts = [
            self._kernels.gradient_project_and_losses(self._theta, self._fixed, *chunk, *blocks)
            for chunk in chunks
        ]
        projected, losses = (
            parts[0] if pieces == 1 else self._kernels.joined_chunks(parts, size=size)
        )
        return (projected, losses) if with_losses else projected

    def project_with_norms(self, projector: Any, batch: Any) -> tuple[Any, Any]:
        """``G g`` (B, k) and ``‖g‖²`` (B,) from one compiled per-example gradient program."""
        G = self._vector(projector, 2, "projector")
        staged = self._stage(batch)
        return self._kernels.gradient_project_with_norms(
            self._theta, self._fixed, staged.x, staged.y, G, self._l2_array
        )

    def per_example_grads(self, batch: Any) -> Any:
        """Per-example gradients (including ``l2·θ``), shape (B, p), by ``vmap(grad)``."""
        staged = self._stage(batch)
        return self._kernels.per_example_grads(
            self._theta, self._fixed, staged.x, staged.y, self._l2_array
        )

    # --------------------------------------------------------------------------- conversion
    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(jax.device_get(array))

    def from_numpy(self, array: np.ndarray, dtype: Any = None) -> Any:
        dtype = self._dtype if dtype is None else dtype
        return jax.device_put(jnp.asarray(np.asarray(array), dtype=dtype), self._device)


def bind_jax(
    apply_fn: Any,
    loss_fn: Any,
    *,
    params: Any = None,
    parameters: Any = None,
    device: Any = None,
    dtype: Any = None,
    l2: float = 0.0,
    batch_keys: tuple[str, str] | None = None,
    jvp_chunk_size: int | None = None,
    projection: str = "auto",
    batched: bool | None = None,
) -> JaxInfluenceModel:
    """Bind ``apply_fn``, ``loss_fn`` and ``params`` (what ``JaxEngine.bind`` calls).

    Parameters
    ----------
    apply_fn : callable, flax.nnx.Module or equinox.Module
        Pure ``apply_fn(params, x) -> outputs`` (Flax linen ``model.apply``, plain JAX, ...);
        a linen module itself (its ``apply`` is used); or, without ``params=``, an nnx or
        Equinox module, split into such a pair (see :mod:`krylov_influence_jax._libraries`).
        nnx and Equinox modules are used in eval/inference mode.
    loss_fn : callable
        ``loss_fn(outputs, y) -> (B,)`` per-example losses (no mean).
    params : pytree of arrays
        The parameters (for linen, the whole variable dict ``{"params": ..., "batch_stats":
        ...}``, of which only ``"params"`` is differentiated). None for nnx and Equinox
        modules.
    parameters : None, callable or iterable of str
        Leaves to differentiate: ``None`` (every floating leaf; for nnx only ``nnx.Param``,
        for linen only the ``"params"`` collection), a predicate ``(path, leaf) -> bool``, or
        path prefixes (``["params/Dense_1"]``, nnx ``["head"]``); the others are held fixed.
        Paths are key paths joined by ``/`` (nnx and Equinox: attribute paths).
    device : None, str or jax.Device
        ``"cpu"``, ``"cpu:0"``, ``"gpu:0"``, a ``jax.Device``; default the device of the
        params (or JAX's default device).
    dtype : None, "float32" or "float64"
        Default the params' dtype. float64 needs ``jax_enable_x64``.
    l2 : float
        ``½·l2·‖θ‖²`` over the differentiated parameters is added to every per-example loss.
    batch_keys : (str, str), optional
        The ``(x, y)`` keys of dict batches (default ``("x", "y")`` or
        ``("inputs", "targets")``).
    jvp_chunk_size : int, optional
        Directions of a projection vectorised at once (default: B × chunk ≤ 2¹⁸).
    projection : {"auto", "jvp", "gradients"}
        How ``project`` computes ``G g`` for a batch: k JVPs vectorised over the rows of G
        (memory B × chunk × activations, never B × p), or per-example gradients times ``Gᵀ``
        (memory B × p; 1.7× faster on the digits MLP on CPU, 4.7× on the benchmark CNN).
        ``"auto"`` (default) takes gradients, over equal chunks of examples whose (chunk, p)
        block fits in :attr:`JaxInfluenceModel.GRADIENT_PROJECTION_BYTES` (64 MiB) when the
        whole (B, p) block does not.
    batched : bool, optional
        Equinox modules only: ``True`` if the module maps a whole batch. Default: it maps one
        example (the Equinox convention) and is ``jax.vmap``-ed over the batch.

    Returns
    -------
    JaxInfluenceModel
    """
    adapted = adapt(apply_fn, params, batched=batched)
    if loss_fn is None or not callable(loss_fn):
        raise TypeError(
            "loss_fn: expected a callable loss_fn(outputs, targets) -> per-example losses "
            f"(B,), got {type(loss_fn).__name__}"
        )
    l2 = float(l2)
    if not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2={l2!r}: expected a finite number >= 0")
    if batch_keys is not None and not (
        isinstance(batch_keys, (tuple, list))
        and len(batch_keys) == 2
        and all(isinstance(k, str) for k in batch_keys)
    ):
        raise TypeError(f"batch_keys={batch_keys!r}: expected a pair of strings (x_key, y_key)")
    if jvp_chunk_size is not None and (
        isinstance(jvp_chunk_size, bool)
        or not isinstance(jvp_chunk_size, int)
        or jvp_chunk_size < 1
    ):
        raise ValueError(f"jvp_chunk_size={jvp_chunk_size!r}: expected a positive integer")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection={projection!r}: expected one of {PROJECTIONS}")
    leaves = jax.tree_util.tree_leaves(adapted.params)
    target_dtype = resolve_dtype(dtype, leaves)
    target_device = resolve_device(device, leaves)
    layout, theta, fixed = split_parameters(
        adapted.params,
        parameters,
        target_dtype,
        target_device,
        trainable=adapted.trainable,
        what=_TRAINABLE[adapted.kind],
    )
    return JaxInfluenceModel(
        _kernels.kernels(Program(adapted.apply_fn, loss_fn, layout)),
        theta,
        fixed,
        l2=l2,
        dtype=target_dtype,
        device=target_device,
        batch_keys=None if batch_keys is None else tuple(batch_keys),  # type: ignore[arg-type]
        jvp_chunk_size=jvp_chunk_size,
        projection=projection,
    )


class _LinearizedBatch:
    """A staged batch as the linear map of its Hessian (``Kernels.linearize_sum``)."""

    __slots__ = ("linear", "size")

    def __init__(self, linear: Any, size: int):
        self.linear = linear
        self.size = int(size)
