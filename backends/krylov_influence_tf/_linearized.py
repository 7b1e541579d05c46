"""Linearised Hessian batches: the Hessian-vector product's graph cut where the vector enters.

A Hessian-vector product over a batch runs the forward pass and the gradient's backward pass,
neither of which depends on the vector, then the pass that does. TensorFlow keeps no tape
between calls, so this module splits the traced graph of one product instead
(:class:`LinearMap`): every op that the vector reaches is the *product*; the tensors that
those ops read from the rest of the graph are the *residuals*. Both halves are pruned from
the one graph (``tf.compat.v1.wrap_function`` and its ``prune``), so the residuals, computed
once per batch, feed the same ops on the same values as the whole graph would: the products
equal the engine's own to rounding (Grappler may fuse the halves differently).

Two kinds of residual are recomputed in the product rather than kept: tensors made by cheap
ops from inputs that are kept anyway (``Fill``, ``Reshape``, ...: keeping them would cost
memory and save nothing), and pooling outputs (``MaxPool``): oneDNN runs a ``MaxPoolGrad``
whose ``MaxPool`` is in the same graph 20x faster (the benchmark CNN's product took 1.28x the
whole one's time with the pooling output kept, 0.94x with it recomputed).

A graph is not split (:attr:`LinearMap.declined` says why) where its vector-independent part
has stateful ops (random numbers, I/O: a kept value would freeze them), or where the product
does not depend on the vector (its Hessian is zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

__all__ = ["LinearMap", "LinearizedBatch"]

# Ops whose output is rebuilt in the product from their inputs rather than kept (see above).
_RECOMPUTED = frozenset(
    {
        "Fill", "ZerosLike", "OnesLike", "BroadcastTo", "Reshape", "ExpandDims", "Squeeze",
        "Identity", "MaxPool", "MaxPoolV2", "MaxPool3D",
    }
)  # fmt: skip
# Stateful ops that read state without changing it: safe in the vector-independent part.
_READS = frozenset({"ReadVariableOp", "VarHandleOp", "Placeholder"})
# A tensor this small is kept as it is, whatever makes it (shapes, scalars).
_SMALL = 64


def _spec(value: Any) -> Any:
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), value)


def _stateful(op: Any) -> bool:
    """Whether ``op`` may change or produce state (an op without a definition here counts)."""
    if op.type in _READS:
        return False
    try:
        return bool(op.op_def.is_stateful)
    except (KeyError, ValueError, AttributeError):
        return True


def _nbytes(tensors: list[tf.Tensor]) -> int | None:
    """Bytes of ``tensors`` from their static shapes; ``None`` when a shape is not known."""
    total = 0
    for tensor in tensors:
        if not tensor.shape.is_fully_defined():
            return None
        total += int(tensor.shape.num_elements()) * tensor.dtype.size
    return total


class LinearMap:
    """The product ``v -> H_b v`` of one batch signature, split at the vector.

    Parameters
    ----------
    product : callable
        ``product(vector, x, y) -> (p,)``, the engine's single Hessian-vector product (a
        Python function; it is traced here, once).
    vector, x, y : tensors
        Examples of the arguments: their shapes and dtypes are those of the split graph.

    Attributes
    ----------
    declined : str or None
        Why the graph was not split (then nothing else is set), or ``None``.
    nbytes : int or None
        Bytes of one batch's residuals, from the traced shapes (``None`` if not all known).
    """

    def __init__(self, product: Callable[..., Any], vector: tf.Tensor, x: Any, y: Any):
        self.declined: str | None = None
        self.nbytes: int | None = None
        wrapped = tf.compat.v1.wrap_function(product, [_spec(vector), _spec(x), _spec(y)])
        graph = wrapped.graph
        n_data = len(tf.nest.flatten((x, y)))
        vector_input, data_inputs = wrapped.inputs[0], wrapped.inputs[1 : 1 + n_data]
        output = wrapped.outputs[0]
        reached = self._reached_by(graph, vector_input)
        if output.op not in reached:
            self.declined = "the product does not depend on the vector"
            return
        stateful = sorted(
            {op.type for op in graph.get_operations() if op not in reached and _stateful(op)}
        )
        if stateful:
            self.declined = f"stateful ops before the vector enters ({', '.join(stateful)})"
            return
        residuals = self._residuals(graph, reached)
        self.nbytes = _nbytes(residuals)
        with graph.as_default():  # prune needs the graph's own tensors
            compute = wrapped.prune(feeds=list(data_inputs), fetches=residuals)
            apply = wrapped.prune(feeds=[vector_input, *residuals], fetches=output)
        # Called through a tf.function so that Grappler optimises each half (a pruned function
        # called directly ran the digits product 2.6x slower).
        specs = [tf.TensorSpec(r.shape, r.dtype) for r in residuals]
        self._compute = tf.function(lambda *data: compute(*data)).get_concrete_function(
            *[tf.TensorSpec(t.shape, t.dtype) for t in data_inputs]
        )
        self._apply = tf.function(lambda v, *kept: apply(v, *kept)).get_concrete_function(
            tf.TensorSpec(vector_input.shape, vector_input.dtype), *specs
        )

    @staticmethod
    def _reached_by(graph: tf.Graph, source: tf.Tensor) -> set[Any]:
        """The ops that ``source`` reaches, through data or control edges."""
        reached: set[Any] = {source.op}
        # A graph's ops are listed in the order they were made: every input before its use.
        for op in graph.get_operations():
            if op in reached:
                continue
            if any(t.op in reached for t in op.inputs) or any(
                c in reached for c in op.control_inputs
            ):
                reached.add(op)
        return reached

    @staticmethod
    def _residuals(graph: tf.Graph, reached: set[Any]) -> list[tf.Tensor]:
        """The tensors the product's ops read from the vector-independent part, less those
        rebuilt from their own inputs (``_RECOMPUTED``) and the graph's captured constants."""
        captured = {t.ref() for t in getattr(graph, "internal_captures", ())}
        residuals: list[tf.Tensor] = []
        seen: set[Any] = set()
        stack = [t for op in graph.get_operations() if op in reached for t in op.inputs]
        while stack:
            tensor = stack.pop()
            if (
                tensor.ref() in seen
                or tensor.op in reached
                or tensor.ref() in captured
                or tensor.op.type == "Const"
            ):
                continue
            seen.add(tensor.ref())
            size = tensor.shape.num_elements() if tensor.shape.is_fully_defined() else None
            if tensor.op.type in _RECOMPUTED and (size is None or size > _SMALL):
                stack.extend(tensor.op.inputs)
            else:
                residuals.append(tensor)
        return residuals

    def residuals(self, x: Any, y: Any) -> list[tf.Tensor]:
        """The forward and gradient passes of one batch: what its products read."""
        return list(self._compute(*tf.nest.flatten((x, y))))

    def apply(self, vector: tf.Tensor, residuals: list[tf.Tensor]) -> tf.Tensor:
        """``H_b v`` (summed over the batch) from the batch's residuals."""
        return self._apply(vector, *residuals)


class LinearizedBatch:
    """A staged batch with the map of its single products; the residuals are computed on the
    first single product (a block's products take the block route on ``x``, ``y``, which
    shares the forward and gradient passes within the block already).

    Attributes
    ----------
    x, y : tensors
        The staged batch.
    size : int
        Its examples (they count towards the mean).
    """

    __slots__ = ("__weakref__", "_kept", "map", "size", "x", "y")

    def __init__(self, linear_map: LinearMap, x: Any, y: Any, size: int):
        self.map, self.x, self.y, self.size = linear_map, x, y, int(size)
        self._kept: list[tf.Tensor] | None = None

    def keep(self) -> int:
        """Run the forward and gradient passes now (once) and keep their residuals; returns
        their bytes."""
        if self._kept is None:
            self._kept = self.map.residuals(self.x, self.y)
        return _nbytes(self._kept) or 0  # computed tensors: every shape is known

    def product(self, vector: tf.Tensor) -> tf.Tensor:
        """``H_b v`` summed over the batch, from the kept residuals."""
        self.keep()
        assert self._kept is not None
        return self.map.apply(vector, self._kept)
