"""Which leaves of a parameter pytree are differentiated, and their flat layout.

Leaves are named by their pytree path, written as the path's keys joined by ``/``: dict keys
and attribute names as they are, sequence indices as numbers. A Flax variable dict gives
``"params/Dense_1/kernel"``; a list of ``(W, b)`` tuples gives ``"0/0"``, ``"0/1"``, ``"1/0"``...

The flat vector is :func:`jax.flatten_util.ravel_pytree` of the list of selected leaves, in the
order of :func:`jax.tree_util.tree_leaves` (dict keys *sorted*, so a Flax ``Dense`` layer gives
``bias`` before ``kernel``; Equinox fields in declaration order), each leaf in C (row-major)
order.

A model library may restrict which leaves can be chosen at all (``trainable``): an nnx
module's ``nnx.Param`` leaves, a linen variable dict's ``"params"`` collection (see
:mod:`krylov_influence_jax._libraries`); the others are always held fixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["ParameterLayout", "path_name", "split_parameters"]


def path_name(path: Sequence[Any]) -> str:
    """The ``/``-joined name of a pytree key path (``"params/Dense_0/kernel"``)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _is_float(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _matches_prefix(name: str, prefix: str) -> bool:
    """Whole-component prefix match: ``"a/b"`` matches ``"a/b"`` and ``"a/b/c"``, not ``"a/bc"``."""
    prefix = prefix.strip("/")
    return name == prefix or name.startswith(prefix + "/")


def _selector(
    parameters: Any, names: list[str], trainable: Callable[[str], bool] | None, what: str
) -> Callable[[str, Any], bool]:
    """Turn ``parameters=`` into a predicate ``(name, leaf) -> bool``, checking names.

    ``trainable(name)`` (if given) restricts every selection to the leaves that may be
    differentiated (nnx ``Param``, linen ``"params"``); ``what`` names them in errors.
    """
    allowed = (lambda name: True) if trainable is None else trainable
    if parameters is None:
        return lambda name, leaf: allowed(name) and _is_float(leaf)
    if callable(parameters):
        return lambda name, leaf: allowed(name) and bool(parameters(name, leaf))
    prefixes = [parameters] if isinstance(parameters, str) else parameters
    try:
        prefixes = list(prefixes)
    except TypeError:
        raise TypeError(
            "parameters: expected None, a predicate (path, leaf) -> bool, or path prefixes "
            f"like 'params/Dense_1', got {type(parameters).__name__}"
        ) from None
    for prefix in prefixes:
        if not isinstance(prefix, str):
            raise TypeError(f"parameters: path prefixes must be strings, got {prefix!r}")
        if not any(_matches_prefix(name, prefix) for name in names):
            shown = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"parameters: no leaf of params has the path prefix {prefix!r}; "
                f"the leaves are {shown}"
            )
        if not any(_matches_prefix(name, prefix) and allowed(name) for name in names):
            raise ValueError(
                f"parameters: the leaves under {prefix!r} are held fixed; only {what} leaves "
                "can be differentiated"
            )
    return lambda name, leaf: (
        allowed(name) and any(_matches_prefix(name, prefix) for prefix in prefixes)
    )


@dataclass(frozen=True)
class ParameterLayout:
    """The split of a parameter pytree into the flat differentiated vector and fixed leaves.

    Attributes
    ----------
    treedef : jax.tree_util.PyTreeDef
        Structure of the full parameter pytree.
    selected : tuple of int
        Positions (in ``tree_leaves`` order) of the differentiated leaves.
    fixed : tuple of int
        Positions of the leaves held fixed.
    names : tuple of str
        Path names of the selected leaves, in flat order.
    shapes : tuple of tuple of int
        Shapes of the selected leaves, in flat order.

    Layouts compare by value (structure, selection, names, shapes), so two bindings of the
    same architecture share compiled programs.
    """

    treedef: Any
    selected: tuple[int, ...]
    fixed: tuple[int, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each selected leaf in the flat vector, in flat order."""
        spans, start = [], 0
        for shape in self.shapes:
            spans.append((start, start + math.prod(shape)))
            start += math.prod(shape)
        return spans

    def unravel(self, theta: Any) -> list[Any]:
        """The selected leaves from the flat vector (the inverse of ``ravel_pytree``)."""
        return [
            theta[start:stop].reshape(shape)
            for shape, (start, stop) in zip(self.shapes, self.spans)
        ]

    def rebuild(self, theta: Any, fixed_leaves: Sequence[Any]) -> Any:
        """The full parameter pytree with the selected leaves taken from ``theta`` (p,)."""
        return self.rebuild_from_leaves(self.unravel(theta), fixed_leaves)

    def rebuild_from_leaves(self, selected: Sequence[Any], fixed_leaves: Sequence[Any]) -> Any:
        """The full parameter pytree from the selected leaves (flat order) and fixed ones."""
        leaves: list[Any] = [None] * (len(self.selected) + len(self.fixed))
        for position, leaf in zip(self.selected, selected):
            leaves[position] = leaf
        for position, leaf in zip(self.fixed, fixed_leaves):
            leaves[position] = leaf
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def split_parameters(
    params: Any,
    parameters: Any,
    dtype: Any,
    device: Any,
    trainable: Callable[[str], bool] | None = None,
    what: str = "floating-point",
) -> tuple[ParameterLayout, Any, tuple[Any, ...]]:
    """Select, cast and place the leaves of ``params``.

    Floating leaves (selected or not) are cast to ``dtype``; every leaf is placed on
    ``device``. The user's pytree is never modified.

    Parameters
    ----------
    params : pytree of arrays
    parameters : None, callable or iterable of str
        See the module docstring.
    dtype : numpy.dtype
    device : jax.Device
    trainable : callable, optional
        ``trainable(name) -> bool``: the leaves that may be differentiated at all (a Flax
        model's parameters, not its batch statistics); the others are always held fixed.
    what : str
        What the trainable leaves are, for error messages (``"nnx.Param"``).

    Returns
    -------
    layout : ParameterLayout
    theta : jax.Array, shape (p,)
        The selected leaves raveled.
    fixed_leaves : tuple of jax.Array
        The other leaves, in ``tree_leaves`` order.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("params: the pytree has no leaves")
    names = [path_name(path) for path, _ in flat]
    leaves = []
    for name, (_, leaf) in zip(names, flat):
        try:
            array = jnp.asarray(leaf)
        except TypeError:
            raise TypeError(
                f"params: leaf {name!r} is a {type(leaf).__name__}, not an array; keep only "
                "arrays in params (e.g. equinox.partition(model, equinox.is_array))"
            ) from None
        if _is_float(array):
            array = array.astype(dtype)
        leaves.append(jax.device_put(array, device))
    choose = _selector(parameters, names, trainable, what)
    selected, fixed = [], []
    for index, (name, (_, original)) in enumerate(zip(names, flat)):
        if bool(choose(name, original)):
            if not _is_float(leaves[index]):
                raise ValueError(
                    f"parameters: leaf {name!r} has dtype {jnp.result_type(original)}; only "
                    "floating-point leaves can be differentiated"
                )
            selected.append(index)
        else:
            fixed.append(index)
    if not selected:
        raise ValueError(f"parameters: the selection is empty; no {what} leaf of params was chosen")
    theta, _ = ravel_pytree([leaves[i] for i in selected])
    layout = ParameterLayout(
        treedef=treedef,
        selected=tuple(selected),
        fixed=tuple(fixed),
        names=tuple(names[i] for i in selected),
        shapes=tuple(tuple(int(s) for s in np.shape(leaves[i])) for i in selected),
    )
    return layout, jax.device_put(theta, device), tuple(leaves[i] for i in fixed)
