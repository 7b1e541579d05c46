"""Devices and dtypes: names to ``jax.Device``, and the float64 / ``jax_enable_x64`` rule."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from krylov_influence import _xp

__all__ = ["device_names", "resolve_device", "resolve_dtype", "x64_enabled"]

# Accepted spellings of a GPU platform in device names ("gpu:0", "cuda:0", "rocm:0").
_GPU_ALIASES = ("gpu", "cuda", "rocm")


def x64_enabled() -> bool:
    """Whether ``jax_enable_x64`` is on (read now: the flag is process-global)."""
    return bool(jax.config.jax_enable_x64)


def _platform_devices(platform: str) -> list[Any]:
    try:
        return list(jax.devices(platform))
    except RuntimeError:
        return []


def device_names() -> tuple[str, ...]:
    """Names of the devices of this process: ``"cpu:0"``, ``"gpu:0"``, ..."""
    names = []
    for platform in ("cpu", "gpu", "tpu"):
        names += [f"{platform}:{i}" for i in range(len(_platform_devices(platform)))]
    return tuple(names)


def resolve_device(device: Any, leaves: list[Any]) -> Any:
    """The ``jax.Device`` for ``device``.

    Parameters
    ----------
    device : None, str or jax.Device
        ``None``: the one device holding every JAX leaf of ``leaves``, else JAX's default
        device. A string ``"<platform>[:<index>]"`` (``"cpu"``, ``"cpu:0"``, ``"gpu:1"``;
        ``cuda``/``rocm`` mean ``gpu``), the index counting devices of that platform.
    leaves : list
        Parameter leaves, to follow the placement of the user's arrays.

    Raises
    ------
    ValueError
        For an unknown platform or an index out of range; the message lists the devices.
    """
    if isinstance(device, jax.Device):
        return device
    if device is None:
        held = set()
        for leaf in leaves:
            if isinstance(leaf, jax.Array):
                held |= set(leaf.devices())
        return held.pop() if len(held) == 1 else jax.devices()[0]
    if not isinstance(device, str):
        raise TypeError(
            f"device={device!r}: expected None, a jax.Device or a name like 'cpu' or 'gpu:0'"
        )
    platform, _, index = device.strip().lower().partition(":")
    platform = "gpu" if platform in _GPU_ALIASES else platform
    if not index.isdigit() and index != "":
        raise ValueError(f"device={device!r}: expected '<platform>:<index>', e.g. 'gpu:0'")
    candidates = _platform_devices(platform) if platform in ("cpu", "gpu", "tpu") else []
    position = int(index or 0)
    if position >= len(candidates):
        raise ValueError(
            f"device={device!r}: no such JAX device; available: {', '.join(device_names())}"
        )
    return candidates[position]


def resolve_dtype(dtype: Any, leaves: list[Any]) -> np.dtype:
    """The computation dtype: ``dtype`` if given, else that of the floating leaves.

    Raises
    ------
    ValueError
        If the dtype is not float32/float64, or is float64 while ``jax_enable_x64`` is off
        (the engine never flips that process-global flag itself).
    """
    if dtype is None:
        floats = [jnp.result_type(leaf) for leaf in leaves]
        floats = [d for d in floats if jnp.issubdtype(d, jnp.floating)]
        if not floats:
            raise ValueError("params: no floating-point leaf to differentiate")
        found = jnp.result_type(*floats)
        try:
            name = _xp.dtype_name(found)
        except ValueError:
            raise ValueError(
                f"dtype: the parameters are {found}; the jax engine computes in float32 or "
                "float64, pass dtype='float32'"
            ) from None
    else:
        name = _xp.dtype_name(dtype)
    if name == "float64" and not x64_enabled():
        raise ValueError(
            "dtype='float64': JAX computes in float64 only with jax_enable_x64; run "
            "jax.config.update('jax_enable_x64', True) at start-up, or use dtype='float32'"
        )
    return np.dtype(name)
