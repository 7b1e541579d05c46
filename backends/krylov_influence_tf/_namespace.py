"""The array namespace the core runs in when the engine is TensorFlow, and device names.

TensorFlow has no array-api-compat wrapper and ``tf.experimental.numpy`` lacks much of the
standard, so this module supplies exactly the names listed in :mod:`krylov_influence._xp`
(plus ``matrix_transpose`` and ``permute_dims``, the standard spellings of ``x.T``), with
array-API semantics where TensorFlow's differ:

- ``matmul`` and ``@`` promote 1-D operands as NumPy does (``tf.matmul`` wants rank >= 2);
- ``argsort`` returns int64 indices and honours ``descending=`` and ``stable=``;
- every creation function takes ``device=`` and places the result with ``tf.device``.

Vectors never leave the device except through the explicit ``to_numpy`` hook.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from krylov_influence_tf._dispatch import ConcreteCalls

__all__ = ["TensorFlowNamespace", "canonical_device", "namespace", "same_device"]

_DEVICE = re.compile(r"^/?(?:device:)?(cpu|gpu|tpu)(?::(\d+))?$", re.IGNORECASE)


def canonical_device(device: Any) -> str:
    """The full name TensorFlow gives tensors on ``device``.

    That is ``"/job:localhost/replica:0/task:0/device:CPU:0"`` in a local process: the string
    ``tensor.device`` reports, so a model's ``device`` compares equal to its outputs' devices.

    Parameters
    ----------
    device : str or tf.config.LogicalDevice or None
        ``"/CPU:0"``, ``"/GPU:1"``, ``"cpu"``, ``"gpu:0"``, ``"/device:GPU:0"``, a full name
        such as ``"/job:localhost/replica:0/task:0/device:CPU:0"``, or None (the default
        device: the first GPU when there is one, else the CPU).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If the name is not a device name, or no such device exists in this process.
    """
    if device is None:
        gpus = tf.config.list_logical_devices("GPU")
        return _canonical_name("/device:GPU:0" if gpus else "/device:CPU:0")
    name = getattr(device, "name", device)
    if isinstance(name, str):
        return _canonical_name(name)
    raise ValueError(f"device={device!r}: expected a device name such as '/CPU:0' or 'gpu:0'")


@functools.lru_cache(maxsize=64)
def _canonical_name(name: str) -> str:
    device = name
    text = name.strip()
    match = _DEVICE.match(text)
    if match is None:
        try:
            spec = tf.DeviceSpec.from_string(text)
        except (ValueError, TypeError):
            spec = None
        if spec is None or spec.device_type is None:
            raise ValueError(
                f"device={device!r}: expected a device name such as '/CPU:0', '/GPU:0', "
                "'cpu' or 'gpu:0'"
            )
        kind, index = spec.device_type.upper(), spec.device_index or 0
    else:
        kind, index = match.group(1).upper(), int(match.group(2) or 0)
    available = [d.name for d in tf.config.list_logical_devices(kind)]
    canonical = f"/device:{kind}:{index}"
    if not any(d.endswith(canonical) for d in available):
        listed = ", ".join(d.name.split("/device:")[-1] for d in tf.config.list_logical_devices())
        raise ValueError(f"device={device!r}: no such TensorFlow device here (have: {listed})")
    with tf.device(canonical):
        return tf.constant(0.0).device


def same_device(array: Any, device: str) -> bool:
    """Whether tensor ``array`` lives on ``device`` (a :func:`canonical_device` name)."""
    return getattr(array, "device", None) == device


def _as_dtype(dtype: Any) -> tf.DType | None:
    return None if dtype is None else tf.as_dtype(dtype)


class _Linalg:
    """``xp.linalg``: the one linear-algebra name the core uses."""

    @staticmethod
    def vector_norm(x: Any, axis: Any = None, keepdims: bool = False, ord: Any = 2) -> tf.Tensor:
        """Euclidean norm over ``axis`` (all entries by default); only ``ord=2``."""
        if ord != 2:
            raise NotImplementedError(f"vector_norm(ord={ord!r}): only ord=2 is supported")
        return tf.norm(x, ord="euclidean", axis=axis, keepdims=keepdims)

    @staticmethod
    def matrix_transpose(x: Any) -> tf.Tensor:
        return TensorFlowNamespace.matrix_transpose(x)


class TensorFlowNamespace:
    """The subset of the array API the core needs, on TensorFlow tensors.

    Every function takes and returns ``tf.Tensor``; shapes follow the array API standard.
    The class is used through its singleton :data:`namespace`.
    """

    float32 = tf.float32
    float64 = tf.float64
    int64 = tf.int64
    int32 = tf.int32
    bool = tf.bool
    linalg = _Linalg()
    __name__ = "krylov_influence_tf.namespace"

    # ------------------------------------------------------------------------- creation
    @staticmethod
    def asarray(x: Any, dtype: Any = None, device: Any = None, copy: Any = None) -> tf.Tensor:
        """``x`` (tensor, NumPy array, scalar or nested list) as a tensor on ``device``."""
        dtype = _as_dtype(dtype)
        place = canonical_device(device) if device is not None else None
        if isinstance(x, (tf.Tensor, tf.Variable)):
            tensor = x if dtype is None or x.dtype == dtype else tf.cast(x, dtype)
            if place is None or same_device(tensor, place):
                return tf.identity(tensor) if copy else tensor
            with tf.device(place):
                return tf.identity(tensor)
        array = np.asarray(x)
        if dtype is not None:
            array = array.astype(dtype.as_numpy_dtype, copy=False)
        with tf.device(place or canonical_device(None)):
            return tf.constant(array)

    @staticmethod
    def zeros(shape: Any, dtype: Any = None, device: Any = None) -> tf.Tensor:
        with tf.device(canonical_device(device)):
            return tf.zeros(shape, dtype=_as_dtype(dtype) or tf.float64)

    @staticmethod
    def ones(shape: Any, dtype: Any = None, device: Any = None) -> tf.Tensor:
        with tf.device(canonical_device(device)):
            return tf.ones(shape, dtype=_as_dtype(dtype) or tf.float64)

    @staticmethod
    def arange(
        start: Any, stop: Any = None, step: Any = 1, *, dtype: Any = None, device: Any = None
    ) -> tf.Tensor:
        if stop is None:
            start, stop = 0, start
        with tf.device(canonical_device(device)):
            return tf.range(start, stop, step, dtype=_as_dtype(dtype) or tf.int64)

    # ---------------------------------------------------------------------------- shape
    @staticmethod
    def stack(arrays: Sequence[Any], axis: int = 0) -> tf.Tensor:
        return tf.stack(list(arrays), axis=axis)

    @staticmethod
    def concat(arrays: Sequence[Any], axis: int | None = 0) -> tf.Tensor:
        if axis is None:
            return tf.concat([tf.reshape(a, [-1]) for a in arrays], axis=0)
        return tf.concat(list(arrays), axis=axis)

    @staticmethod
    def reshape(x: Any, shape: Any, copy: Any = None) -> tf.Tensor:
        return tf.reshape(x, shape)

    @staticmethod
    def expand_dims(x: Any, axis: int = 0) -> tf.Tensor:
        return tf.expand_dims(x, axis)

    @staticmethod
    def matrix_transpose(x: Any) -> tf.Tensor:
        """Swap the last two axes (the standard's ``x.mT``; ``x.T`` for 2-D arrays)."""
        rank = len(x.shape)
        if rank < 2:
            raise ValueError(f"matrix_transpose: expected at least 2 dimensions, got {rank}")
        return tf.linalg.matrix_transpose(x)

    @staticmethod
    def permute_dims(x: Any, axes: Sequence[int]) -> tf.Tensor:
        return tf.transpose(x, perm=list(axes))

    # ----------------------------------------------------------------------- arithmetic
    @staticmethod
    def matmul(a: Any, b: Any) -> tf.Tensor:
        """Matrix product with NumPy's rules for 1-D operands (vector · matrix, ...)."""
        a_vec, b_vec = len(a.shape) == 1, len(b.shape) == 1
        if a_vec and b_vec:
            return tf.reduce_sum(a * b)
        if b_vec:
            return tf.linalg.matvec(a, b)
        if a_vec:
            return tf.linalg.matvec(b, a, transpose_a=True)
        return tf.linalg.matmul(a, b)

    @staticmethod
    def vecdot(a: Any, b: Any, axis: int = -1) -> tf.Tensor:
        return tf.reduce_sum(a * b, axis=axis)

    @staticmethod
    def sum(x: Any, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> tf.Tensor:
        if dtype is not None:
            x = tf.cast(x, dtype)
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def sqrt(x: Any) -> tf.Tensor:
        return tf.sqrt(x)

    @staticmethod
    def abs(x: Any) -> tf.Tensor:
        return tf.abs(x)

    # ------------------------------------------------------------- reductions and search
    @staticmethod
    def max(x: Any, axis: Any = None, keepdims: bool = False) -> tf.Tensor:
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def all(x: Any, axis: Any = None, keepdims: bool = False) -> tf.Tensor:
        return tf.reduce_all(tf.cast(x, tf.bool), axis=axis, keepdims=keepdims)

    @staticmethod
    def isfinite(x: Any) -> tf.Tensor:
        if not x.dtype.is_floating:
            return tf.ones_like(x, dtype=tf.bool)
        return tf.math.is_finite(x)

    @staticmethod
    def argsort(x: Any, axis: int = -1, descending: bool = False, stable: bool = True) -> tf.Tensor:
        """Indices that sort ``x`` along ``axis``, as int64.

        ``tf.argsort`` is stable when asked; a stable descending sort keeps equal values in
        their original order, as the standard requires.
        """
        direction = "DESCENDING" if descending else "ASCENDING"
        order = tf.argsort(x, axis=axis, direction=direction, stable=True)
        return tf.cast(order, tf.int64)

    @staticmethod
    def compile_function(function: Any, donate_argnums: tuple[int, ...] = ()) -> Any:
        """The core's ``compile_function`` hook: a ``tf.function`` (one graph per shape).

        ``donate_argnums`` is accepted and ignored: TensorFlow has no buffer donation (a
        donated argument is simply not reused by the core). Called through its concrete
        functions (:class:`~krylov_influence_tf._dispatch.ConcreteCalls`): an Arnoldi step
        on a small model costs less than ``tf.function``'s own dispatch.
        """
        return ConcreteCalls(tf.function(function, reduce_retracing=False))

    @staticmethod
    def stable_smallest_k(keys: Any, k: int) -> tf.Tensor:
        """Positions (int64) of the ``k`` smallest keys per row, smallest first.

        The core's top-k hook: ``tf.math.top_k`` puts the lower index first among equal
        values, so this is ``argsort(keys, stable=True)[:, :k]`` without sorting whole rows.
        """
        return tf.cast(tf.math.top_k(-keys, k=int(k)).indices, tf.int64)

    @staticmethod
    def where(condition: Any, x1: Any, x2: Any) -> tf.Tensor:
        return tf.where(condition, x1, x2)

    @staticmethod
    def take(x: Any, indices: Any, axis: int | None = None) -> tf.Tensor:
        if axis is None:
            if len(x.shape) != 1:
                raise ValueError("take: axis is required for arrays of more than 1 dimension")
            axis = 0
        return tf.gather(x, indices, axis=axis)

    @staticmethod
    def take_along_axis(x: Any, indices: Any, axis: int = -1) -> tf.Tensor:
        """``out[..., j, ...] = x[..., indices[..., j, ...], ...]`` along ``axis``."""
        rank = len(x.shape)
        axis = axis % rank
        if axis == rank - 1:
            return tf.gather(x, indices, axis=axis, batch_dims=axis)
        perm = [*range(axis), *range(axis + 1, rank), axis]
        inverse = np.argsort(perm).tolist()
        moved = tf.gather(
            tf.transpose(x, perm), tf.transpose(indices, perm), axis=rank - 1, batch_dims=rank - 1
        )
        return tf.transpose(moved, inverse)

    # ---------------------------------------------------------------------------- dtypes
    @staticmethod
    def astype(x: Any, dtype: Any, copy: bool = True) -> tf.Tensor:
        return tf.cast(x, _as_dtype(dtype))

    @staticmethod
    def finfo(dtype: Any) -> Any:
        return np.finfo(_as_dtype(dtype).as_numpy_dtype)

    # --------------------------------------------------------------------------- hooks
    @staticmethod
    def to_numpy(x: Any) -> np.ndarray:
        """Host copy of ``x``."""
        return x.numpy() if hasattr(x, "numpy") else np.asarray(x)

    @staticmethod
    def set_row(matrix: Any, index: Any, row: Any) -> tf.Tensor:
        """``matrix`` with row ``index`` (an int or a scalar tensor, also inside a
        ``tf.function``) replaced by ``row`` (functional update)."""
        row = tf.cast(row, matrix.dtype)
        position = tf.reshape(tf.cast(index, tf.int64), (1, 1))
        return tf.tensor_scatter_nd_update(matrix, position, tf.expand_dims(row, 0))


#: The namespace object the TensorFlow engine hands to the core as ``model.xp``.
namespace = TensorFlowNamespace()
