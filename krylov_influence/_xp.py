"""The small part of the Python array API the core uses, and host conversion.

The core (Arnoldi, eigen-reduction, calculator, top-k) runs in the namespace of the engine's
arrays. NumPy, PyTorch and JAX get theirs from ``array_api_compat``; an engine whose framework
has no compatible namespace (TensorFlow) supplies an object with exactly these names:

- creation: ``asarray(x, dtype=, device=)``, ``zeros(shape, dtype=, device=)``,
  ``ones(shape, dtype=, device=)``, ``arange(start, stop, dtype=, device=)`` (also
  ``arange(n, ...)``)
- shape: ``stack(arrays, axis=)``, ``concat(arrays, axis=)``, ``reshape(x, shape)``,
  ``expand_dims(x, axis=)``, ``permute_dims(x, axes)`` (the core's transpose: TensorFlow
  tensors have no ``.T``)
- arithmetic: operators ``+ - *`` and ``/`` and unary ``-`` on arrays (and with Python floats),
  ``matmul`` (1-D operands allowed; the ``@`` operator is not used), ``sum(x, axis=)``,
  ``sqrt``, ``abs``, ``linalg.vector_norm(x)``, ``vecdot(a, b)``
- reductions and search: ``max(x)``, ``all(x)``, ``isfinite(x)``, ``argsort(x, axis=,
  descending=, stable=)``, ``take_along_axis(x, indices, axis=)``, ``take(x, indices, axis=)``
- dtype: ``astype(x, dtype)``, ``float32``, ``float64``, ``int64``, ``finfo(dtype).eps``;
  optionally ``__array_namespace_info__()`` (for the default index dtype, else ``int64``)
- indexing: basic slicing ``x[a:b]``, ``x[:, a:b]`` and ``x[i, ...]`` (never ``x.T``)
- attributes: ``x.shape`` (ints) and ``x.dtype`` (comparable with ``==`` to the namespace's
  dtypes)
- selection: ``where(condition, x1, x2)``, comparison operators ``<=`` on arrays
- optional hooks: ``to_numpy(x)`` (host copy), ``set_row(matrix, i, row) -> matrix``
  (row assignment, in place where the framework allows it) and
  ``stable_smallest_k(keys, k)`` (the first ``k`` positions of a stable ascending sort of
  every row; see :func:`krylov_influence.topk.stable_smallest_k`) and
  ``compile_function(fn, donate_argnums=())`` (a tracing compiler for pure functions of
  arrays, such as ``jax.jit``, applied to the Arnoldi step; see
  :func:`krylov_influence._gram_schmidt.fused_step_for`).

Small dense algebra (the Hessenberg matrix and its eigen-decomposition) happens on the host in
float64 NumPy, never in the engine's namespace.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "array_namespace",
    "device_of",
    "dtype_name",
    "eps",
    "index_dtype",
    "set_row",
    "to_numpy",
]


def array_namespace(*arrays: Any) -> Any:
    """The array-API namespace of ``arrays`` (via ``array_api_compat``)."""
    return array_api_compat.array_namespace(*arrays)


def device_of(array: Any) -> Any:
    """The device of ``array`` (``array_api_compat.device``, else its ``.device``)."""
    try:
        return array_api_compat.device(array)
    except (TypeError, AttributeError, ValueError):
        return getattr(array, "device", None)


def dtype_name(dtype: Any) -> str:
    """Canonical name (``"float32"``/``"float64"``) of a dtype of any framework, or a string.

    Accepts ``"float32"``, ``np.float64``, ``torch.float32``, ``jnp.float64``, ``tf.float32``.

    Raises
    ------
    ValueError
        If ``dtype`` is not a 32- or 64-bit float type.
    """
    attribute = getattr(dtype, "name", None)  # tf.DType, np.dtype
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(attribute, str):
        name = attribute
    else:
        try:
            name = np.dtype(dtype).name  # numpy scalar types, jnp.float32
        except TypeError:
            name = str(dtype).rsplit(".", 1)[-1]  # torch.float64 -> "float64"
    name = name.strip().lower()
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r}: expected float32 or float64")
    return name


def eps(xp: Any, dtype: Any) -> float:
    """Machine epsilon of ``dtype`` (float32 or float64)."""
    return float(np.finfo(dtype_name(dtype)).eps)


def index_dtype(xp: Any, device: Any = None) -> Any:
    """The namespace's default integer dtype for indices (``int64`` where it has none).

    ``__array_namespace_info__().default_dtypes()["indexing"]`` when the namespace has it:
    int64 in NumPy and PyTorch, int32 in JAX without ``jax_enable_x64`` (where asking for
    int64 would warn and give int32 anyway).
    """
    info = getattr(xp, "__array_namespace_info__", None)
    if info is not None:
        try:
            return info().default_dtypes(device=device)["indexing"]
        except Exception:  # a namespace whose info does not know this device
            pass
    return xp.int64


def to_numpy(array: Any, xp: Any = None) -> np.ndarray:
    """Copy ``array`` to the host as a NumPy array (detaching and leaving the device).

    A namespace may supply its own ``to_numpy``; otherwise DLPack is tried, then a move to the
    CPU with ``array_api_compat.to_device``, then ``np.asarray``.
    """
    if isinstance(array, np.ndarray):
        return array
    hook = getattr(xp, "to_numpy", None)
    if hook is not None:
        return np.asarray(hook(array))
    if hasattr(array, "detach"):  # autograd tensors refuse DLPack while requiring grad
        array = array.detach()
    try:
        return np.from_dlpack(array)
    except (BufferError, TypeError, RuntimeError, AttributeError):
        pass
    try:
        return np.from_dlpack(array_api_compat.to_device(array, "cpu"))
    except Exception:
        return np.asarray(array)


def set_row(xp: Any, matrix: Any, index: int, row: Any) -> Any:
    """Return ``matrix`` with row ``index`` replaced by ``row``.

    In place for writeable arrays (NumPy, PyTorch); a functional update for JAX; a namespace
    hook ``set_row`` for anything else.
    """
    hook = getattr(xp, "set_row", None)
    if hook is not None:
        return hook(matrix, index, row)
    if array_api_compat.is_writeable_array(matrix):
        matrix[index, ...] = row
        return matrix
    if hasattr(matrix, "at"):  # JAX
        return matrix.at[index].set(row)
    raise TypeError(
        f"cannot assign a row into {type(matrix).__name__}; give the namespace a set_row"
    )
