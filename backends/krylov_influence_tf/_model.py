"""``TensorFlowInfluenceModel``: the operators of the Arnoldi method in compiled TensorFlow.

All hot paths are ``tf.function(reduce_retracing=True)`` closures created once per bound model,
so a new batch size or a new number of vectors retraces at most once more (to a shape with
``None`` dimensions), never once per batch:

- ``hvps``: forward-over-reverse, a ``tf.autodiff.ForwardAccumulator`` around a
  ``tf.GradientTape`` of the summed batch loss, vectorised over the vectors with
  ``tf.vectorized_map``; batches are weighted by their size (the sum over a batch is divided
  by the total count at the end);
- ``project``: JVPs of the per-example losses along each row of the projector, vectorised over
  the rows with ``tf.vectorized_map`` (never a loop over examples or rows), chunked over rows;
- ``per_example_grads``: ``tf.vectorized_map`` over examples of a one-example gradient.

The L2 term ``½ l2 ‖θ‖²`` is part of every per-example loss; its exact contributions (``l2 v``,
``l2 θ``, ``l2 G θ``) are added outside the autodiff.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf

from krylov_influence.engine import EngineCapabilities, InfluenceModel
from krylov_influence_tf._functional import Functional
from krylov_influence_tf._namespace import canonical_device, namespace, same_device

__all__ = ["TensorFlowInfluenceModel"]

_ZERO = tf.UnconnectedGradients.ZERO

PROJECTIONS = ("auto", "jvp", "gradients")


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
        gradients times ``Gᵀ`` (1.6× faster on the digits MLP); ``"auto"`` takes gradients
        when the (B, p) block fits in :attr:`GRADIENT_PROJECTION_BYTES`.
    """

    #: Largest per-example gradient block (B × p × itemsize) that ``projection="auto"``
    #: forms; above it the projection uses JVPs, whose memory does not grow with p.
    GRADIENT_PROJECTION_BYTES = 64 * 2**20

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
    ):
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
            raise ValueError(
                "loss_fn: returned a scalar; influence needs per-example losses of shape (B,) "
                "(for a Keras loss pass reduction=None)"
            )
        if rank != 1:
            raise ValueError(
                f"loss_fn: returned shape {losses.shape}; expected per-example losses of shape (B,)"
            )
        return tf.cast(losses, self._dtype)

    def _compile(self) -> None:
        # The parameters are fixed tensors captured by the closures, not traced arguments.
        def hvp_sum(vectors: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
            thetas = self._thetas

            def one(vector: tf.Tensor) -> tf.Tensor:
                with tf.autodiff.ForwardAccumulator(thetas, self._unflatten(vector)) as acc:
                    with tf.GradientTape() as tape:
                        tape.watch(thetas)
                        total = tf.reduce_sum(self._data_losses(thetas, x, y))
                    grads = tape.gradient(total, thetas, unconnected_gradients=_ZERO)
                hv = acc.jvp(grads, unconnected_gradients=_ZERO)
                return tf.concat([tf.reshape(h, [-1]) for h in hv], axis=0)

            if vectors.shape[0] == 1:
                return tf.expand_dims(one(vectors[0]), 0)
            return tf.vectorized_map(one, vectors, fallback_to_while_loop=False)

        def project(rows: tf.Tensor, x: Any, y: Any) -> tf.Tensor:
            thetas = self._thetas

            def one(row: tf.Tensor) -> tf.Tensor:
                with tf.autodiff.ForwardAccumulator(thetas, self._unflatten(row)) as acc:
                    losses = self._data_losses(thetas, x, y)
                return acc.jvp(losses, unconnected_gradients=_ZERO)

            along = tf.transpose(tf.vectorized_map(one, rows, fallback_to_while_loop=False))
            if self._l2:
                along = along + self._l2 * tf.linalg.matvec(rows, self._flat)[tf.newaxis, :]
            return along

        def per_example(x: Any, y: Any) -> tf.Tensor:
            thetas = self._thetas

            # vectorized_map over examples of a one-example gradient: pfor turns it into
            # batched kernels. (tape.jacobian with pfor is 40x slower here: it differentiates
            # through the batch loss and falls back to a while_loop for some ops.)
            def one(example: Any) -> tf.Tensor:
                xi, yi = tf.nest.map_structure(lambda t: t[tf.newaxis, ...], example)
                with tf.GradientTape() as tape:
                    tape.watch(thetas)
                    loss = tf.reduce_sum(self._data_losses(thetas, xi, yi))
                grads = tape.gradient(loss, thetas, unconnected_gradients=_ZERO)
                return tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)

            grads = tf.vectorized_map(one, (x, y), fallback_to_while_loop=False)
            if self._l2:
                grads = grads + self._l2 * self._flat[tf.newaxis, :]
            return grads

        def losses(x: Any, y: Any) -> tf.Tensor:
            data = self._data_losses(self._thetas, x, y)
            if self._l2:
                data = data + 0.5 * self._l2 * tf.reduce_sum(tf.square(self._flat))
            return data

        self._hvp_sum = tf.function(hvp_sum, reduce_retracing=True)
        self._project = tf.function(project, reduce_retracing=True)
        self._per_example = tf.function(per_example, reduce_retracing=True)
        self._gradient_project = tf.function(
            lambda rows, x, y: tf.matmul(per_example(x, y), rows, transpose_b=True),
            reduce_retracing=True,
        )
        self._losses = tf.function(losses, reduce_retracing=True)

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
            "hvps": self._hvp_sum,
            "project": self._project,
            "per_example_grads": self._per_example,
            "losses": self._losses,
        }
        return {name: fn.experimental_get_tracing_count() for name, fn in kernels.items()}

    def hvp(self, vector: Any, batches: Iterable[Any]) -> tf.Tensor:
        vector = self._vectors(vector, "vector", 1)
        return self.hvps(tf.expand_dims(vector, 0), batches)[0]

    def hvps(self, vectors: Any, batches: Iterable[Any]) -> tf.Tensor:
        vectors = self._vectors(vectors, "vectors", 2)
        total, count = None, 0
        with tf.device(self._device):
            for batch in batches:
                x, y = self._stage(batch)
                part = self._hvp_sum(vectors, x, y)
                total = part if total is None else total + part
                count += self._count(x)
            if count == 0:
                raise ValueError("batches: the Hessian data is empty")
            result = total / tf.cast(count, self._dtype)
            if self._l2:
                result = result + self._l2 * vectors
        return result

    def project(self, projector: Any, batch: Any) -> tf.Tensor:
        projector = self._vectors(projector, "projector", 2)
        x, y = self._stage(batch)
        k = int(projector.shape[0])
        block = self.batch_size(batch) * self.num_parameters * self._dtype.size
        if self._projection == "gradients" or (
            self._projection == "auto" and block <= self.GRADIENT_PROJECTION_BYTES
        ):
            with tf.device(self._device):
                return self._gradient_project(projector, x, y)
        with tf.device(self._device):
            parts = [
                self._project(projector[start : start + self._chunk], x, y)
                for start in range(0, k, self._chunk)
            ]
            return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

    def per_example_grads(self, batch: Any) -> tf.Tensor:
        x, y = self._stage(batch)
        with tf.device(self._device):
            return self._per_example(x, y)

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
