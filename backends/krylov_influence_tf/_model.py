"""``TensorFlowInfluenceModel``: the operators of the Arnoldi method in compiled TensorFlow.

All hot paths are ``tf.function(reduce_retracing=True)`` closures created once per bound model,
so a new batch size or a new number of vectors retraces at most once more (to a shape with
``None`` dimensions), never once per batch (the one exception, the unrolled block route below,
traces once per block size and batch shape, since it writes out one product per vector):

- ``hvp``: reverse-over-reverse, nested ``tf.GradientTape``s of the summed batch loss;
  ``hvps``: the same, the forward pass and the gradient once per batch for the whole block
  (see the routes below); batches are weighted by their size (the sum over a batch is
  divided by the total count at the end);
- ``project``, gradient route (``projection="auto"``, the default, and ``"gradients"``):
  ``tf.vectorized_map`` over examples of a one-example gradient, one tensor per parameter,
  each multiplied by its block of ``Gᵀ`` (``G`` split and transposed once per projector); an
  ``Embedding``'s gradient stays its gathered rows where gathering the projector's rows at the
  example's tokens moves fewer numbers than the dense table gradient;
- ``project``, JVP route: JVPs of the per-example losses along each row of the projector,
  vectorised over the rows with ``tf.vectorized_map`` (never a loop over examples or rows),
  chunked over rows;
- ``per_example_grads``: ``tf.vectorized_map`` over examples of a one-example gradient.

Each of these is a :class:`~krylov_influence_tf._routes.Kernel`: when its fast route cannot be
traced for a model's ops (``pfor`` has no rule for ``Conv3D``, wants a loop-invariant conv
filter, or forward mode meets Keras's recurrent ``while_loop``), it takes the next route, which
is exact but slower, and says so once (see docs/layers.md for which layer takes which route):

- ``per_example_grads``: ``pfor`` with a ``while_loop`` for the ops it cannot convert, then a
  ``while_loop`` over examples; ``project (gradients)`` the same two ``pfor`` routes, then
  ``per_example_grads`` (on whichever route it takes) times ``Gᵀ``;
- ``project`` (JVP route): per-example gradients times ``Gᵀ`` over chunks of examples whose
  (chunk, p) block fits :attr:`TensorFlowInfluenceModel.GRADIENT_PROJECTION_BYTES`;
- ``hvp`` (one vector): reverse-over-reverse (the VJP of the gradient along v), then
  forward-over-reverse (the order reversed by ``hvp_mode="forward-over-reverse"``); with
  ``jit_compile``, both are first tried compiled by XLA;
- ``hvps`` (a block): reverse-over-reverse vectorised by ``pfor`` over the block (the forward
  pass and the gradient once, then the gradient's VJP along each vector), forward-over-reverse
  vectorised, then reverse-over-reverse unrolled (the forward pass and the gradient once, the
  VJPs one after another in the graph; a ``while_loop`` of whole products for a block above
  ``UNROLLED_BLOCK``) and forward-over-reverse in a ``while_loop`` over the vectors (the mode
  order reversed by ``hvp_mode="forward-over-reverse"``, as for one vector).

``linearize_batch`` (the calculator's ``linearize_hessian_data``) splits the single product's
graph where the vector enters (:mod:`krylov_influence_tf._linearized`): the forward and
gradient passes of a staged batch run once, and each single product over it is the rest of
the graph (blocks keep their routes above).

``Embedding`` gradients (``IndexedSlices``) are made dense before the forward accumulator and
everywhere but the gradient projection.

The L2 term ``½ l2 ‖θ‖²`` is part of every per-example loss; its exact contributions (``l2 v``,
``l2 θ``, ``l2 G θ``) are added outside the autodiff.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from krylov_influence.engine import EngineCapabilities, InfluenceModel, LastArrayCache
from krylov_influence_tf._datasets import reshuffling_stage
from krylov_influence_tf._dispatch import ConcreteCalls, signature_key
from krylov_influence_tf._functional import Functional
from krylov_influence_tf._linearized import LinearizedBatch, LinearMap
from krylov_influence_tf._namespace import canonical_device, namespace, same_device
from krylov_influence_tf._routes import EngineError, Kernel, Route

__all__ = ["TensorFlowInfluenceModel"]

logger = logging.getLogger("krylov_influence")

_ZERO = tf.UnconnectedGradients.ZERO

PROJECTIONS = ("auto", "jvp", "gradients")

# Route names (see ``TensorFlowInfluenceModel.routes`` and docs/layers.md).
VECTORISED = "vectorised"
VECTORISED_LOOP_FALLBACK = "vectorised, while_loop for ops without a rule"
LOOP = "while_loop"
UNROLLED = "unrolled"
JVP_VECTORISED = "jvp, vectorised over the rows"
GRADIENTS_IN_CHUNKS = "per-example gradients x G^T, in chunks of examples"
FLAT_GRADIENTS = "the per_example_grads route, (B, p) x G^T"
FORWARD_OVER_REVERSE = "forward-over-reverse"
REVERSE_OVER_REVERSE = "reverse-over-reverse"
HVP_MODES = (REVERSE_OVER_REVERSE, FORWARD_OVER_REVERSE)
XLA = "XLA"
# TensorFlow's convolution ops (forward and gradients; Conv1D runs as Conv2D), which XLA:CPU
# runs slower than TensorFlow's own kernels (the benchmark CNN's HVP: 2.18x).
_CONVOLUTION_OPS = re.compile(r"^(?:Conv(?:\d+D|$)|DepthwiseConv)")


def _convolves(concrete: Any) -> str | None:
    """Why ``jit_compile="auto"`` leaves XLA out for this traced graph, or ``None``."""
    graph = concrete.graph
    types = {op.type for op in graph.get_operations()}
    types |= {node.op for fn in graph.as_graph_def().library.function for node in fn.node_def}
    found = sorted(t for t in types if _CONVOLUTION_OPS.match(t))
    return f"convolutions ({', '.join(found)})" if found else None


class TensorFlowInfluenceModel(InfluenceModel):
    """A Keras model (or ``apply_fn(params, x)``) bound to the TensorFlow engine.

    Build it with ``krylov_influence.InfluenceModel(model, loss_fn, ...)``; see
    ``docs/quickstart-tensorflow.md``.

    Parameters
    ----------
    functional : Functional
        The model as a pure function of the chosen parameter tensors.
    loss : callable
        ``loss(y_true, y_pred) -> (B,)`` per-example losses.
    dtype : str
        ``"float32"`` or ``"float64"``.
    device : str
        Canonical device name (see ``canonical_device``).
    l2 : float
        Coefficient of ``½ l2 ‖θ‖²`` added to every per-example loss.
    chunk_size : int
        Projector rows per vectorised JVP call (bounds memory to chunk × B × activations).
    projection : {"auto", "jvp", "gradients"}
        How ``project`` computes ``G g``: vectorised JVPs along the rows of G, or per-example
        gradients times ``Gᵀ`` (1.6× faster on the digits MLP); ``"auto"`` takes gradients,
        over equal chunks of examples whose (chunk, p) block fits in
        :attr:`GRADIENT_PROJECTION_BYTES` when the whole (B, p) block does not, and JVPs once
        per-example gradients take the ``while_loop`` route.
    hvp_mode : {"reverse-over-reverse", "forward-over-reverse"}
        The mode a Hessian-vector product tries first, for one vector (``block_size=1``) and
        for blocks; the other is its fallback. Reverse-over-reverse (the gradient's VJP, the
        default) took 0.81×, 0.88× and 1.01× the CPU time of forward-over-reverse on the
        benchmark digits MLP, CNN and transformer (TensorFlow 2.21, one CPU, alternating in
        one process), and needs no forward mode (Keras's recurrent layers). Blocks take the
        same order: reverse-over-reverse vectorised over the block took 0.46–0.68× and
        0.85–0.89× the time of single HVPs per vector on the digits MLP and the transformer
        (blocks of 8), forward-over-reverse 0.48–0.72× and 0.91–0.94×; on the CNN, whose
        filter tangents ``pfor`` cannot vectorise, reverse-over-reverse unrolled over blocks
        of 4 took 0.83–0.92×, forward-over-reverse in a ``while_loop`` 1.08–1.22×.
    jit_compile : {False, "auto", True}
        Compile the single Hessian-vector product with XLA: ``True`` on any device and
        graph; ``"auto"`` on a CPU unless the graph has convolutions; ``False`` (default)
        never. Steady state, XLA took 0.71x the graph's time per HVP on the benchmark digits
        MLP, 0.99x on the transformer and 2.18x on the CNN (TensorFlow 2.21, one CPU), but it
        compiles on the first call of each batch shape (about 1 s on digits, 6 s on the
        transformer, beyond the graph's trace), so it pays only for many products on one
        bound model. A graph XLA cannot compile takes the uncompiled routes, with a
        ``RouteFallbackWarning``.
    """

    #: Largest per-example gradient block (B × p × itemsize) that ``projection="auto"``
    #: forms; above it the projection takes the gradients of chunks of examples in turn.
    GRADIENT_PROJECTION_BYTES = 64 * 2**20
    #: Largest block whose products the unrolled reverse-over-reverse route writes out one
    #: after another in one graph (the route of blocks that ``pfor`` cannot vectorise, such
    #: as convolutions'); larger blocks take whole products in a ``while_loop``. The graph,
    #: and its tracing, grow with the block: the benchmark CNN's blocks of 4 traced in 2 s,
    #: of 16 in 4 s (the transformer's, 18 s for 8 and 41 s for 16).
    UNROLLED_BLOCK = 16

    engine_name = "tensorflow"

    def __init__(
        self,
        functional: Functional,
        loss: Any,
        *,
        dtype: str,
        device: str,
        l2: float = 0.0,
        chunk_size: int = 128,
        projection: str = "auto",
        hvp_mode: str = REVERSE_OVER_REVERSE,
        jit_compile: bool | str = False,
    ):
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r}: expected one of {HVP_MODES}")
        if not (isinstance(jit_compile, bool) or jit_compile == "auto"):
            raise ValueError(f"jit_compile={jit_compile!r}: expected True, False or 'auto'")
        self._hvp_mode = hvp_mode
        self._jit_compile = jit_compile
        self._functional = functional
        self._loss = loss
        self._dtype = tf.as_dtype(dtype)
        self._device = device
        self._l2 = float(l2)
        self._chunk = int(chunk_size)
        if projection not in PROJECTIONS:
            raise ValueError(f"projection={projection!r}: expected one of {PROJECTIONS}")
        self._projection = projection
        self._thetas = list(functional.thetas)
        self._shapes = [tuple(int(d) for d in t.shape) for t in self._thetas]
        self._sizes = [int(np.prod(s, dtype=np.int64)) for s in self._shapes]
        with tf.device(device):
            self._flat = tf.concat([tf.reshape(t, [-1]) for t in self._thetas], axis=0)
        self._compile()

    # --------------------------------------------------------------------- compiled kernels
    def _unflatten(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """Split a (..., p) tensor into per-parameter tensors of shape (..., *shape)."""
        lead = tf.shape(flat)[:-1]
        parts = tf.split(flat, self._sizes, axis=-1)
        return [
            tf.reshape(part, tf.concat([lead, tf.constant(shape, tf.int32)], axis=0))
            for part, shape in zip(parts, self._shapes)
        ]

    def _data_losses(self, thetas: list[tf.Tensor], x: Any, y: Any) -> tf.Tensor:
        losses = self._loss(y, self._functional.forward(thetas, x))
        rank = losses.shape.rank
        if rank == 0:
            raise EngineError(
                "loss_fn: returned a scalar; influence needs per-example losses of shape (B,) "
                "(for a Keras loss pass reduction=None)"
            )
        if rank != 1:
            raise EngineError(
                f"loss_fn: returned shape {losses.shape}; expected per-example losses of shape (B,)"
            )
        return tf.cast(losses, self._dtype)

    def _xla_routes(self, graph_routes: list[Route]) -> list[Route]:
        """The single HVP's routes compiled by XLA, tried before ``graph_routes``: with
        ``jit_compile=True``, or ``"auto"`` on a CPU for graphs without convolutions (XLA:CPU
        runs them slower than TensorFlow's kernels; no GPU was measured, so ``"auto"`` keeps
        the graph there).
        """
        if self._jit_compile is False:
            return []
        if self._jit_compile == "auto" and not self.host_memory:
            return []
        declines = _convolves if self._jit_compile == "auto" else None
        return [
            Route(f"{route.name}, {XLA}", route.function, jit_compile=True, declines=declines)
            for route in graph_routes
        ]

    def _flatten(self, parts: Iterable[Any]) -> tf.Tensor:
        """Concatenate per-parameter tensors into one (p,) vector.

        ``IndexedSlices`` (the gradient of an ``Embedding`` table) are made dense first: the
        forward accumulator and ``tf.reshape`` only take dense tensors.
        """
        return tf.concat([tf.reshape(tf.convert_to_tensor(part), [-1]) for part in parts], axis=0)

    def _compile(self) -> None:
        # The parameters are fixed tensors captured by the closures, not traced arguments.
        thetas = self._thetas
        p, dtype = self.num_parameters, self._dtype

        def loss_sum(x: Any, y: Any) -> tf.Tensor:
            return tf.reduce_sum(self._data_losses(thetas, x, y))

        def hvp_forward(vector: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
            """Forward-over-reverse: the JVP of the gradient along ``vector``."""
            with tf.autodiff.ForwardAccumulator(thetas, self._unflatten(vector)) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(thetas)
                    total = loss_sum(x, y)
                grads = tape.gradient(total, thetas, unconnected_gradients=_ZERO)
                grads = [tf.convert_to_tensor(g) for g in grads]  # Embedding: IndexedSlices
            return self._flatten(acc.jvp(grads, unconnected_gradients=_ZERO))

        def taped_gradient(
            x: Any, y: Any, persistent: bool = False
        ) -> tuple[tf.GradientTape, list[tf.Tensor]]:
            """The gradient (dense), and the tape that recorded it for a second reverse pass."""
            with tf.GradientTape(persistent=persistent) as outer:
                outer.watch(thetas)
                with tf.GradientTape() as inner:
                    inner.watch(thetas)
                    total = loss_sum(x, y)
                grads = inner.gradient(total, thetas, unconnected_gradients=_ZERO)
                grads = [tf.convert_to_tensor(g) for g in grads]  # Embedding: IndexedSlices
            return outer, grads

        def gradient_vjp(outer: Any, grads: list[tf.Tensor], vector: tf.Tensor) -> tf.Tensor:
            """The VJP of the gradient along ``vector``: Hv (the Hessian is symmetric)."""
            cotangents = self._unflatten(vector)
            return self._flatten(
                outer.gradient(
                    grads, thetas, output_gradients=cotangents, unconnected_gradients=_ZERO
                )
            )

        def hvp_reverse(vector: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
            """Reverse-over-reverse: the gradient's VJP, no forward mode (Keras's recurrent
            layers run a ``while_loop`` that forward mode cannot enter)."""
            outer, grads = taped_gradient(x, y)
            return gradient_vjp(outer, grads, vector)

        def hvps_reverse(vectors: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
            """Reverse-over-reverse for a block (b, p): the forward pass and the gradient once,
            then the gradient's VJP along each vector, vectorised over the block."""
            outer, grads = taped_gradient(x, y)
            return tf.vectorized_map(
                lambda vector: gradient_vjp(outer, grads, vector),
                vectors,
                fallback_to_while_loop=False,
            )

        def hvps_reverse_unrolled(vectors: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
            """Reverse-over-reverse for a block (b, p): the forward pass and the gradient once,
            then the gradient's VJP along each vector, one after another in the same graph. A
            block above :attr:`UNROLLED_BLOCK` (or of a size unknown when traced) takes whole
            products in a ``while_loop``."""
            b = vectors.shape[0]
            if b is None or b > self.UNROLLED_BLOCK:
                return over_vectors(hvp_reverse, "loop")(vectors, x, y)
            outer, grads = taped_gradient(x, y, persistent=True)  # one VJP per vector
            return tf.stack([gradient_vjp(outer, grads, vectors[i]) for i in range(b)])

        def jvp_losses(row: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
            with tf.autodiff.ForwardAccumulator(thetas, self._unflatten(row)) as acc:
                losses = self._data_losses(thetas, x, y)
            return acc.jvp(losses, unconnected_gradients=_ZERO)

        def example_leaf_grads(example: Any, k: int | None = None) -> tuple[list[Any], tf.Tensor]:
            """One example's gradient, one tensor per parameter, and its loss (): both from one
            tape.

            With ``k`` (the rows of a projector), the gradient of a gather (an ``Embedding``'s
            ``IndexedSlices``: N rows of the table) stays ``(values, indices)``, (N, *row) and
            (N,), where gathering those N rows of the projector's k columns moves fewer numbers
            than the dense (rows, *row) gradient would (N k ≤ rows); every other gradient is
            dense.
            """
            xi, yi = tf.nest.map_structure(lambda t: t[tf.newaxis, ...], example)
            with tf.GradientTape() as tape:
                tape.watch(thetas)
                loss = loss_sum(xi, yi)
            grads = tape.gradient(loss, thetas, unconnected_gradients=_ZERO)
            leaves: list[Any] = []
            for grad, shape in zip(grads, self._shapes):
                gathered = grad.values.shape[0] if isinstance(grad, tf.IndexedSlices) else None
                if k is not None and gathered is not None and gathered * k <= shape[0]:
                    leaves.append((grad.values, grad.indices))
                else:
                    leaves.append(tf.convert_to_tensor(grad))
            return leaves, loss

        def example_grad(example: Any) -> tuple[tf.Tensor, tf.Tensor]:
            """One example's flat gradient (p,) and its loss ()."""
            leaves, loss = example_leaf_grads(example)
            return self._flatten(leaves), loss

        vector_spec = tf.TensorSpec([p], dtype)

        def over_vectors(one: Any, how: str) -> Any:
            """``one(vector, x, y)`` mapped over the rows of ``vectors``: ``"pfor"`` vectorised
            (failing to trace where an op has no ``pfor`` rule), ``"loop"`` a ``while_loop``."""

            def mapped(vectors: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
                def fn(vector: tf.Tensor) -> tf.Tensor:
                    return one(vector, x, y)

                if how == "loop":
                    return tf.map_fn(fn, vectors, fn_output_signature=vector_spec)
                return tf.vectorized_map(fn, vectors, fallback_to_while_loop=False)

            return mapped

        def over_examples(how: str) -> Any:
            """Per-example gradients (B, p) and losses (B,), the exact L2 term in both (the
            losses cost nothing more: a store records them, see ``project_and_losses``)."""

            # vectorized_map over examples of a one-example gradient: pfor turns it into
            # batched kernels. (tape.jacobian with pfor is 40x slower here: it differentiates
            # through the batch loss and falls back to a while_loop for some ops.)
            def grads(x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
                if how == "loop":
                    signature = (vector_spec, tf.TensorSpec([], dtype))
                    out, values = tf.map_fn(example_grad, (x, y), fn_output_signature=signature)
                else:
                    out, values = tf.vectorized_map(
                        example_grad, (x, y), fallback_to_while_loop=how == "pfor+loop"
                    )
                if self._l2:
                    out = out + self._l2 * self._flat[tf.newaxis, :]
                return out, penalised(values)

            return grads

        def penalised(values: tf.Tensor) -> tf.Tensor:
            """Per-example data losses plus the L2 term ``½ l2 ‖θ‖²``."""
            if not self._l2:
                return values
            return values + 0.5 * self._l2 * tf.reduce_sum(tf.square(self._flat))

        def project_leaves(how: str) -> Any:
            """``(B, k)`` projections and ``(B,)`` losses from one pass of per-example
            gradients, one (B, *shape) tensor per parameter, each times its block of ``Gᵀ``
            (``blocks``, from :meth:`_split_projector`): no (B, p) block is assembled, which
            took 0.63 s against 0.52 s for the benchmark transformer's 256 examples (one CPU
            thread). ``rows`` (G itself) is for the fallback route only."""

            def projected(
                x: Any, y: Any, rows: tf.Tensor, blocks: list[tf.Tensor], offset: tf.Tensor
            ) -> tuple[tf.Tensor, tf.Tensor]:
                k = rows.shape[0]  # None once traced for several k: every gradient dense

                def example(pair: Any) -> tuple[list[Any], tf.Tensor]:
                    return example_leaf_grads(pair, k)

                leaves, values = tf.vectorized_map(
                    example, (x, y), fallback_to_while_loop=how == "pfor+loop"
                )
                total = offset[tf.newaxis, :]
                for leaf, block, shape in zip(leaves, blocks, self._shapes):
                    if isinstance(leaf, tuple):  # gathered rows (B, N, *row), indices (B, N)
                        gathered, indices = leaf
                        table = tf.reshape(block, [shape[0], -1, tf.shape(block)[1]])
                        picked = tf.gather(table, indices)  # (B, N, row, k)
                        weights = tf.reshape(gathered, tf.concat([tf.shape(indices), [-1, 1]], 0))
                        total = total + tf.reduce_sum(picked * weights, axis=[1, 2])
                    else:
                        total = total + tf.matmul(tf.reshape(leaf, [tf.shape(leaf)[0], -1]), block)
                return total, penalised(values)

            return projected

        def project_flat(
            x: Any, y: Any, rows: tf.Tensor, blocks: list[tf.Tensor], offset: tf.Tensor
        ) -> tuple[tf.Tensor, tf.Tensor]:
            """The fallback: the per-example kernel's flat (B, p) gradients (with ``l2 θ``,
            on whichever route that kernel takes) times ``Gᵀ``."""
            grads, values = self._per_example(x, y)
            return tf.matmul(grads, rows, transpose_b=True), values

        def split_projector(rows: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
            blocks = [tf.transpose(block) for block in tf.split(rows, self._sizes, axis=1)]
            if self._l2:
                return blocks, self._l2 * tf.linalg.matvec(rows, self._flat)
            return blocks, tf.zeros(tf.shape(rows)[:1], dtype)

        def project_jvp(rows: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
            along = tf.transpose(over_vectors(jvp_losses, "pfor")(rows, x, y))
            if self._l2:
                along = along + self._l2 * tf.linalg.matvec(rows, self._flat)[tf.newaxis, :]
            return along

        def losses(x: Any, y: Any) -> tf.Tensor:
            return penalised(self._data_losses(thetas, x, y))

        example_routes = [
            (VECTORISED, over_examples("pfor")),
            (VECTORISED_LOOP_FALLBACK, over_examples("pfor+loop")),
            (LOOP, over_examples("loop")),
        ]
        self._per_example = Kernel("per_example_grads", example_routes)
        self._gradient_projection = Kernel(
            "project (gradients)",
            [
                (VECTORISED, project_leaves("pfor")),
                (VECTORISED_LOOP_FALLBACK, project_leaves("pfor+loop")),
            ],
            fallback=(FLAT_GRADIENTS, project_flat),
        )
        # G split per parameter and transposed once per projector, not once per batch (12 ms
        # a batch for the transformer's G, 20 x 525 828).
        self._split_projector = LastArrayCache(
            ConcreteCalls(tf.function(split_projector, reduce_retracing=True))
        )
        self._project = Kernel(
            "project (jvp)",
            [(JVP_VECTORISED, project_jvp)],
            fallback=(GRADIENTS_IN_CHUNKS, self._project_by_gradient_chunks),
        )
        # One vector (p,) in and out: no batch axis added and removed around the kernel
        # (each an eager op of 20-200 us, next to a 2 ms HVP on small models).
        single_routes = {FORWARD_OVER_REVERSE: hvp_forward, REVERSE_OVER_REVERSE: hvp_reverse}
        order = (self._hvp_mode, *(mode for mode in HVP_MODES if mode != self._hvp_mode))
        graph_routes = [Route(mode, single_routes[mode]) for mode in order]
        l2 = self._l2

        def finish(total: tf.Tensor, count: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
            return total / count + l2 * vectors if l2 else total / count

        self._finish = ConcreteCalls(tf.function(finish, reduce_retracing=True))
        self._hvp_one = Kernel("hvp", [*self._xla_routes(graph_routes), *graph_routes])
        # The single products in the order they are tried, for linearize_batch to split.
        self._single_products = [single_routes[mode] for mode in order]
        self._linear_maps: dict[Any, LinearMap | None] = {}
        # A block: the forward pass and the gradient once, then the gradient's VJP along each
        # vector, vectorised by pfor; where pfor has no rule (a convolution's filter tangent,
        # a recurrent while_loop) the same VJPs unrolled in the graph. Per vector against a
        # single HVP (benchmarks/tf_block_routes.py, one process): CNN, blocks of 4, unrolled
        # 0.83-0.92x, a while_loop of whole products 1.06x, pfor with rules of our own for the
        # filter tangents 1.43x (MaxPoolGrad in the vectorised graph, as in a loop's body,
        # misses oneDNN's kernel); transformer, blocks of 8, pfor 0.86x, unrolled 0.75x but
        # traced in 18 s against 10 s; digits, blocks of 8, pfor 0.43x, unrolled 0.52x. The
        # unrolled route traces once per block size (a fit's blocks and its last, smaller
        # one), never with the size unknown. Forward-over-reverse: vectorised, else a
        # while_loop; each mode's vectorised route before either's slower one.
        block_routes = {
            REVERSE_OVER_REVERSE: (
                Route(f"{REVERSE_OVER_REVERSE}, {VECTORISED}", hvps_reverse),
                Route(
                    f"{REVERSE_OVER_REVERSE}, {UNROLLED}",
                    hvps_reverse_unrolled,
                    reduce_retracing=False,
                ),
            ),
            FORWARD_OVER_REVERSE: (
                Route(f"{FORWARD_OVER_REVERSE}, {VECTORISED}", over_vectors(hvp_forward, "pfor")),
                Route(f"{FORWARD_OVER_REVERSE}, {LOOP}", over_vectors(hvp_forward, "loop")),
            ),
        }
        self._hvp_block = Kernel("hvps", [block_routes[mode][i] for i in (0, 1) for mode in order])
        self._losses = Kernel("losses", [("forward", losses)])

    def _gradient_project(self, rows: tf.Tensor, x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-example gradients times ``rowsᵀ`` (B, k), and the losses (B,) of the pass."""
        blocks, offset = self._split_projector(rows)
        return self._per_example_call(self._gradient_projection, x, y, rows, blocks, offset)

    def _example_grads(self, x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """The per-example kernel: gradients (B, p) and losses (B,)."""
        return self._per_example_call(self._per_example, x, y)

    def _per_example_call(self, kernel: Kernel, x: Any, y: Any, *rest: Any) -> Any:
        """``kernel(x, y, *rest)``, a kernel of per-example outputs (a tuple of (B, ...)).

        A batch of one runs as two copies of its example: once the kernel has been traced
        for other batch sizes, ``pfor`` fails at run time on a batch of one through Keras's
        recurrent layers ("Tried to append a tensor with incompatible shape to a list"), and
        a training set of ``64 m + 1`` examples ends with one.
        """
        if self._count(x) != 1:
            return kernel(x, y, *rest)
        doubled = tf.nest.map_structure(lambda t: tf.concat([t, t], axis=0), (x, y))
        return tuple(out[:1] for out in kernel(*doubled, *rest))

    def _project_by_gradient_chunks(self, rows: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
        """``project`` where JVPs cannot be vectorised: per-example gradients times ``Gᵀ``,
        over chunks of examples whose (chunk, p) block fits ``GRADIENT_PROJECTION_BYTES``."""
        return self._gradient_chunks(rows, x, y)[0]

    def _gradient_chunks(self, rows: tf.Tensor, x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """:meth:`_gradient_project` over chunks of examples whose (chunk, p) block fits
        ``GRADIENT_PROJECTION_BYTES``: (B, k) projections and (B,) losses."""
        count = self._count(x)
        chunk = max(1, self.GRADIENT_PROJECTION_BYTES // (self.num_parameters * self._dtype.size))
        if count <= chunk:
            return self._gradient_project(rows, x, y)
        pieces = -(-count // chunk)
        chunk = -(-count // pieces)
        # Equal chunks, the last one padded with copies of the last example (rows dropped
        # after): one traced shape per batch size. A shorter last chunk was a second, relaxed
        # trace: the benchmark transformer's first self-influence took 5.1 s with it, 2.1 s
        # without, 0.27 s once traced (one CPU thread).
        extra = pieces * chunk - count
        if extra:
            x, y = tf.nest.map_structure(
                lambda t: tf.concat([t, tf.repeat(t[-1:], extra, axis=0)], axis=0), (x, y)
            )
        parts, losses = [], []
        for start in range(0, pieces * chunk, chunk):
            part_x, part_y = tf.nest.map_structure(lambda t, s=start: t[s : s + chunk], (x, y))
            projected, part_losses = self._gradient_project(rows, part_x, part_y)
            parts.append(projected)
            losses.append(part_losses)
        return tf.concat(parts, axis=0)[:count], tf.concat(losses, axis=0)[:count]

    @property
    def routes(self) -> dict[str, str]:
        """The route each compiled operator takes (the fastest until a trace of it fails).

        Keys: ``"per_example_grads"``, ``"project (gradients)"`` (``projection="gradients"``
        and ``"auto"``), ``"project (jvp)"``, ``"hvp"`` (one vector) and ``"hvps"`` (a block of
        vectors).
        """
        kernels = (
            self._per_example,
            self._gradient_projection,
            self._project,
            self._hvp_one,
            self._hvp_block,
        )
        return {kernel.name: kernel.route for kernel in kernels}

    # ------------------------------------------------------------------------ properties
    @property
    def xp(self) -> Any:
        return namespace

    @property
    def dtype(self) -> Any:
        return self._dtype

    @property
    def device(self) -> str:
        """Full TensorFlow device name, ``"/job:localhost/replica:0/task:0/device:CPU:0"``."""
        return self._device

    @property
    def host_memory(self) -> bool:
        return tf.DeviceSpec.from_string(self._device).device_type == "CPU"

    @property
    def num_parameters(self) -> int:
        return int(sum(self._sizes))

    @property
    def capabilities(self) -> EngineCapabilities:
        devices = tuple(
            d.name.split("device:")[-1].lower() for d in tf.config.list_logical_devices()
        )
        return EngineCapabilities(float64=True, vectorised_hvp=True, devices=devices)

    @property
    def parameter_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, shape), ...]`` in flat order.

        Keras models: the chosen variables in the order of ``model.trainable_variables``,
        named by their ``variable.path`` (``"sequential/dense/kernel"``), each flattened in C
        order (a ``Dense`` kernel is (in, out)). ``apply_fn`` form: the chosen leaves of
        ``params`` by path (dict keys sorted, sequences in order).
        """
        return list(zip(self._functional.names, self._shapes))

    def on_device(self, device: Any) -> TensorFlowInfluenceModel:
        if device is None:
            return self
        place = canonical_device(device)
        if place == self._device:
            return self
        return TensorFlowInfluenceModel(
            self._functional.rebuild(place),
            self._loss,
            dtype=self._dtype.name,
            device=place,
            l2=self._l2,
            chunk_size=self._chunk,
            projection=self._projection,
            hvp_mode=self._hvp_mode,
            jit_compile=self._jit_compile,
        )

    # ----------------------------------------------------------------------------- data
    def _stage(self, batch: Any) -> tuple[Any, Any]:
        """``(x, y)`` as tensors on the device; floating inputs and targets in the dtype."""
        if isinstance(batch, _Staged) and batch.key == (self._device, self._dtype):
            return batch.x, batch.y
        if isinstance(batch, dict) or not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                "batch: expected an (x, y) pair of tensors or NumPy arrays (a tf.data.Dataset "
                f"element or a tuple), got {type(batch).__name__}"
            )

        def place(value: Any) -> Any:
            if isinstance(value, (dict, list, tuple)):
                return tf.nest.map_structure(place, value)
            tensor = value if isinstance(value, tf.Tensor) else None
            if tensor is None:
                array = np.asarray(value)
                with tf.device(self._device):
                    tensor = tf.constant(array)
            if tensor.dtype.is_floating and tensor.dtype != self._dtype:
                tensor = tf.cast(tensor, self._dtype)
            if not same_device(tensor, self._device):
                with tf.device(self._device):
                    tensor = tf.identity(tensor)
            return tensor

        x, y = place(batch[0]), place(batch[1])
        count = self._count(x)
        y_count = self._count(y)
        if y_count != count:
            raise ValueError(f"batch: x has {count} examples but y has {y_count}")
        return x, y

    @staticmethod
    def _count(value: Any) -> int:
        first = tf.nest.flatten(value)[0]
        if isinstance(first, tf.Tensor):
            shape = first.shape
            if shape.rank == 0:
                raise ValueError("batch: expected x and y with a leading batch dimension")
            return int(shape[0]) if shape[0] is not None else int(tf.shape(first)[0])
        shape = np.shape(first)
        if not shape:
            raise ValueError("batch: expected x and y with a leading batch dimension")
        return int(shape[0])

    def batch_size(self, batch: Any) -> int:
        if isinstance(batch, _Staged):
            return batch.size
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"batch: expected an (x, y) pair, got {type(batch).__name__}")
        return self._count(batch[0])

    def random_order(self, dataset: Any) -> str | None:
        """A ``tf.data`` pipeline that reshuffles on every pass, named; else None."""
        return reshuffling_stage(dataset)

    def losses(self, batch: Any) -> tf.Tensor:
        x, y = self._stage(batch)
        with tf.device(self._device):
            return self._losses(x, y)

    # ------------------------------------------------------------------------ operators
    def flat_parameters(self) -> tf.Tensor:
        return tf.identity(self._flat)

    def _vectors(self, vectors: Any, name: str, rank: int) -> tf.Tensor:
        tensor = namespace.asarray(vectors, dtype=self._dtype, device=self._device)
        p = self.num_parameters
        expected = "(p,)" if rank == 1 else f"({'m' if name == 'vectors' else 'k'}, p)"
        if tensor.shape.rank != rank or int(tensor.shape[-1]) != p:
            raise ValueError(
                f"{name}: expected shape {expected} with p = {p}, got {tuple(tensor.shape)}"
            )
        if rank == 2 and int(tensor.shape[0]) == 0:
            raise ValueError(f"{name}: expected shape {expected} with at least one row, got none")
        return tensor

    def tracing_counts(self) -> dict[str, int]:
        """How many times each compiled kernel was traced (for tests of retracing)."""
        kernels = {
            "hvp": self._hvp_one,
            "hvps": self._hvp_block,
            "project": self._project,
            "per_example_grads": self._per_example,
            "losses": self._losses,
        }
        return {name: fn.experimental_get_tracing_count() for name, fn in kernels.items()}

    def hvp(self, vector: Any, batches: Iterable[Any]) -> tf.Tensor:
        vector = self._vectors(vector, "vector", 1)
        return self._hessian_mean(self._hvp_one, vector, batches)

    def hvps(self, vectors: Any, batches: Iterable[Any]) -> tf.Tensor:
        vectors = self._vectors(vectors, "vectors", 2)
        if int(vectors.shape[0]) == 1:
            return tf.expand_dims(self._hessian_mean(self._hvp_one, vectors[0], batches), 0)
        return self._hessian_mean(self._hvp_block, vectors, batches)

    def _hessian_mean(self, kernel: Kernel, vectors: tf.Tensor, batches: Iterable[Any]) -> Any:
        """The sum of ``kernel`` over the batches, divided by their examples, plus ``l2 v``:
        the division and the L2 term in one compiled call (eager, they were three ops)."""
        total, count = None, 0
        with tf.device(self._device):
            for batch in batches:
                if isinstance(batch, LinearizedBatch):
                    # A block takes its own route, which shares the passes within the block.
                    single = kernel is self._hvp_one
                    part = batch.product(vectors) if single else kernel(vectors, batch.x, batch.y)
                    size = batch.size
                else:
                    x, y = self._stage(batch)
                    part, size = kernel(vectors, x, y), self._count(x)
                total = part if total is None else total + part
                count += size
            if count == 0:
                raise ValueError("batches: the Hessian data is empty")
            return self._finish(total, tf.constant(count, self._dtype), vectors)

    def linearize_batch(self, batch: Any, max_bytes: int) -> tuple[Any, int] | None:
        """``(batch linearised, bytes of its residuals)``, or ``None`` (not split, or above
        ``max_bytes``).

        The single product's graph is split where the vector enters
        (:class:`~krylov_influence_tf._linearized.LinearMap`, once per batch shape): the
        forward and gradient passes run once per batch and each product is the rest of the
        graph. The residuals are sized from the traced shapes and computed on the first single
        product; blocks take their own routes on the batch. Not with ``jit_compile`` (XLA
        fuses the passes of the whole product itself).
        """
        if self._jit_compile is not False:
            return None
        x, y = self._stage(batch)
        with tf.device(self._device):
            linear_map = self._linear_map(x, y)
            if linear_map is None:
                return None
            linearized = LinearizedBatch(linear_map, x, y, self._count(x))
            # Shapes not all known when traced: the residuals are computed now and measured.
            nbytes = linearized.keep() if linear_map.nbytes is None else linear_map.nbytes
        return None if nbytes > max_bytes else (linearized, nbytes)

    def _linear_map(self, x: Any, y: Any) -> LinearMap | None:
        """The split single product for the signature of ``(x, y)`` (``None``: declined or
        not traceable; the batch then takes the engine's routes)."""
        key = signature_key((x, y))
        if key is not None and key in self._linear_maps:
            return self._linear_maps[key]
        vector = tf.zeros([self.num_parameters], self._dtype)
        linear_map = None
        for product in self._single_products:
            try:
                linear_map = LinearMap(product, vector, x, y)
            except EngineError:
                raise
            except Exception as error:  # a mode that does not trace here: try the next
                logger.debug("linearize_batch: %s did not trace: %s", product.__name__, error)
                continue
            break
        if linear_map is not None and linear_map.declined is not None:
            logger.debug("linearize_batch: not split: %s", linear_map.declined)
            linear_map = None
        if key is not None:
            self._linear_maps[key] = linear_map
        return linear_map

    def project(self, projector: Any, batch: Any) -> tf.Tensor:
        return self._projected(projector, batch)[0]

    def project_and_losses(self, projector: Any, batch: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """``(project(projector, batch), losses(batch))``; on the gradient routes the losses
        come from the same per-example gradient pass, with no second forward pass."""
        projected, losses = self._projected(projector, batch)
        return projected, self.losses(batch) if losses is None else losses

    def _projected(self, projector: Any, batch: Any) -> tuple[tf.Tensor, tf.Tensor | None]:
        """:meth:`project`, and the losses where the route computed them (``None``: JVPs)."""
        projector = self._vectors(projector, "projector", 2)
        x, y = self._stage(batch)
        k = int(projector.shape[0])
        block = self.batch_size(batch) * self.num_parameters * self._dtype.size
        if self._projection == "gradients" or (
            self._projection == "auto" and block <= self.GRADIENT_PROJECTION_BYTES
        ):
            with tf.device(self._device):
                return self._gradient_project(projector, x, y)
        looping = self._gradient_projection.route == FLAT_GRADIENTS and (
            self._per_example.route == LOOP
        )
        if self._projection == "auto" and not looping:
            # Per-example gradients over chunks of examples whose (chunk, p) block fits the
            # budget: memory as bounded as the JVPs', and cheaper than k JVPs on every model
            # measured (benchmarks/engine_floor.py); JVPs once the gradients loop.
            with tf.device(self._device):
                return self._gradient_chunks(projector, x, y)
        parts = []
        with tf.device(self._device):
            for start in range(0, k, self._chunk):
                if self._project.route == GRADIENTS_IN_CHUNKS:  # every remaining row at once
                    parts.append(self._project_by_gradient_chunks(projector[start:], x, y))
                    break
                parts.append(self._project(projector[start : start + self._chunk], x, y))
            return (parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)), None

    def per_example_grads(self, batch: Any) -> tf.Tensor:
        x, y = self._stage(batch)
        with tf.device(self._device):
            return self._example_grads(x, y)[0]

    def stage_batch(self, batch: Any) -> tuple[Any, int]:
        """``(staged batch, bytes of its tensors)``: tensors on the device, floats in dtype."""
        x, y = self._stage(batch)
        staged = _Staged(x, y, self._count(x), (self._device, self._dtype))
        return staged, staged.nbytes

    def to_numpy(self, array: Any) -> np.ndarray:
        return namespace.to_numpy(array)


class _Staged:
    """A batch staged by ``stage_batch``: ``x`` and ``y`` as tensors for the model ``key``."""

    __slots__ = ("key", "size", "x", "y")

    def __init__(self, x: Any, y: Any, size: int, key: tuple[str, Any]):
        self.x, self.y, self.size, self.key = x, y, size, key

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors of ``x`` and ``y``."""
        return sum(
            int(leaf.shape.num_elements()) * leaf.dtype.size
            for leaf in tf.nest.flatten((self.x, self.y))
            if isinstance(leaf, tf.Tensor)
        )
