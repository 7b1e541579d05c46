"""Flax (nnx and linen) and Equinox models as the engine's ``(apply_fn, params)`` pair.

The kernels only know a pure ``apply_fn(params, x)`` and a parameter pytree. Each library's
model is turned into that pair here, with the set of leaves that may be differentiated:

- **Flax nnx** (``InfluenceModel(module, loss_fn)``): a clone of the module is put in eval mode
  (``module.eval()``: ``Dropout`` deterministic, ``BatchNorm`` on its running statistics) and
  split by ``nnx.split``; ``params`` is the whole state as a pure dict, named by nnx paths
  (``"linear1/kernel"``, ``"layers/0/bias"``), and only ``nnx.Param`` leaves may be
  differentiated. Batch statistics, RNG keys and counters are held fixed.
  ``apply_fn(params, x) = nnx.merge(graphdef, params)(x)``: the module maps a batch.
- **Flax linen** (``InfluenceModel(module.apply, loss_fn, params=variables)``, or the module
  itself): only the ``"params"`` collection may be differentiated; ``"batch_stats"`` and any
  other collection are held fixed and passed to ``apply``.
- **Equinox** (``InfluenceModel(module, loss_fn)``): a copy in inference mode
  (``eqx.nn.inference_mode``) is split by ``eqx.partition(module, eqx.is_inexact_array)``;
  ``params`` is the array part, named by attribute paths (``"layers/0/weight"``). An Equinox
  module maps *one* example, so ``apply_fn`` is ``jax.vmap(eqx.combine(params, static))(x)``;
  ``batched=True`` says the module already takes a batch.

``apply_fn`` is built once per architecture (nnx graphdef, Equinox static part) and reused
while a model bound to it is alive, so two live bindings of the same architecture share compiled
programs (see :mod:`~._kernels`). The cache holds the functions weakly, like the compiled
programs: once no model holds an architecture's ``apply_fn``, it and the graphdef or static
part it closes over (with any function the module keeps) are freed.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax

from krylov_influence_jax._params import path_name

__all__ = ["Adapted", "adapt", "is_equinox_module", "is_nnx_module"]


@dataclass(frozen=True)
class Adapted:
    """A model as the engine binds it.

    Attributes
    ----------
    apply_fn : callable
        Pure ``apply_fn(params, x) -> outputs`` for a batch ``x``.
    params : pytree of arrays
        Every leaf ``apply_fn`` reads, differentiated or held fixed.
    trainable : callable or None
        ``trainable(name) -> bool``: whether the leaf at that path may be differentiated
        (``None``: every floating-point leaf may).
    kind : str
        ``"nnx"``, ``"linen"``, ``"equinox"`` or ``"function"``; used in error messages.
    """

    apply_fn: Callable[[Any, Any], Any]
    params: Any
    trainable: Callable[[str], bool] | None
    kind: str


def is_nnx_module(model: Any) -> bool:
    """True for a ``flax.nnx.Module`` instance (without importing Flax)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def is_equinox_module(model: Any) -> bool:
    """True for an ``equinox.Module`` instance (without importing Equinox)."""
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(model, eqx.Module)


def _linen_module(model: Any) -> Any:
    """The linen module behind ``model`` (a module, its ``apply``, a partial of that), or None."""
    linen = sys.modules.get("flax.linen")
    if linen is None:
        return None
    while isinstance(model, functools.partial):
        model = model.func
    if isinstance(model, linen.Module):
        return model
    owner = getattr(model, "__self__", None)
    if isinstance(owner, linen.Module) and getattr(model, "__name__", None) == "apply":
        return owner
    return None


def _under(collection: str) -> Callable[[str], bool]:
    return lambda name: name == collection or name.startswith(collection + "/")


# Architecture (nnx graphdef, or Equinox static part and batched) -> its apply_fn, held weakly:
# the bound models' programs hold the apply_fn, which closes over the key. Not an LRU cache:
# that would keep up to its size of graphdefs and static parts (and the functions they hold)
# for the life of the process, after every model using them is gone.
_APPLY_FNS: weakref.WeakValueDictionary[Any, Callable[[Any, Any], Any]] = (
    weakref.WeakValueDictionary()
)
_APPLY_FNS_LOCK = threading.Lock()


def _shared_apply(
    key: Any, build: Callable[[], Callable[[Any, Any], Any]]
) -> Callable[[Any, Any], Any]:
    """The live ``apply_fn`` built for an equal ``key``, else ``build()`` (cached weakly)."""
    with _APPLY_FNS_LOCK:
        try:
            found = _APPLY_FNS.get(key)
        except TypeError:  # a key that cannot be hashed: no sharing of compiled programs
            return build()
        if found is None:
            found = build()
            _APPLY_FNS[key] = found
        return found


# ------------------------------------------------------------------------------------ nnx
def _nnx_apply_uncached(graphdef: Any) -> Callable[[Any, Any], Any]:
    from flax import nnx

    def apply_fn(params: Any, x: Any) -> Any:
        # The pure dict of the whole state: merge rebuilds the module's variables from it.
        return nnx.merge(graphdef, params)(x)

    return apply_fn


def _nnx_apply(graphdef: Any) -> Callable[[Any, Any], Any]:
    return _shared_apply(("nnx", graphdef), lambda: _nnx_apply_uncached(graphdef))


def _pure(state: Any) -> Any:
    from flax import nnx

    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def _leaf_names(tree: Any) -> list[str]:
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _adapt_nnx(module: Any) -> Adapted:
    from flax import nnx

    # A clone, so the user's module keeps its train/eval flags.
    copy = nnx.clone(module)
    copy.eval()
    graphdef, state = nnx.split(copy)
    _, param_state, _ = nnx.split(copy, nnx.Param, ...)
    param_names = frozenset(_leaf_names(_pure(param_state)))
    if not param_names:
        raise ValueError(
            f"model: the nnx module {type(module).__name__} has no nnx.Param to differentiate"
        )
    return Adapted(_nnx_apply(graphdef), _pure(state), param_names.__contains__, "nnx")


# -------------------------------------------------------------------------------- Equinox
def _equinox_apply_uncached(static: Any, batched: bool) -> Callable[[Any, Any], Any]:
    import equinox as eqx

    def apply_fn(params: Any, x: Any) -> Any:
        module = eqx.combine(params, static)
        return module(x) if batched else jax.vmap(module)(x)

    return apply_fn


def _equinox_apply(static: Any, batched: bool) -> Callable[[Any, Any], Any]:
    return _shared_apply(
        ("equinox", static, batched), lambda: _equinox_apply_uncached(static, batched)
    )


def _adapt_equinox(module: Any, batched: bool) -> Adapted:
    import equinox as eqx

    module = eqx.nn.inference_mode(module, True)
    params, static = eqx.partition(module, eqx.is_inexact_array)
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(
            f"model: the Equinox module {type(module).__name__} has no floating-point array "
            "to differentiate"
        )
    return Adapted(_equinox_apply(static, batched), params, None, "equinox")


# ------------------------------------------------------------------------------ dispatch
def adapt(model: Any, params: Any, *, batched: bool | None = None) -> Adapted:
    """The ``(apply_fn, params)`` pair and the trainable leaves of ``model``.

    Parameters
    ----------
    model : nnx.Module, equinox.Module, linen module or its ``apply``, or a pure function
    params : pytree or None
        Required for linen and pure functions; must be None for nnx and Equinox modules
        (their parameters are inside the module).
    batched : bool, optional
        Equinox only: the module takes a batch (default False: ``jax.vmap`` over examples).

    Raises
    ------
    TypeError
        For ``params=`` with an nnx module, no ``params=`` with a function, or ``batched=``
        with anything but an Equinox module.
    """
    if is_nnx_module(model):
        if params is not None:
            raise TypeError(
                "params: an nnx module holds its parameters; pass the module alone, "
                "InfluenceModel(module, loss_fn)"
            )
        _no_batched(batched, "an nnx module, which maps a batch")
        return _adapt_nnx(model)
    if params is None and is_equinox_module(model):
        return _adapt_equinox(model, bool(batched))
    _no_batched(batched, "a function of (params, x), which maps a batch")
    linen = _linen_module(model)
    if linen is not None and linen is model:  # the module itself: its apply
        model = model.apply
    if not callable(model):
        raise TypeError(
            f"model: the jax engine takes a pure apply_fn(params, x), an nnx or Equinox module, "
            f"or a linen module, got {type(model).__name__}"
        )
    if params is None:
        raise TypeError(
            "params: the jax engine needs the parameter pytree, e.g. "
            "InfluenceModel(apply_fn, loss_fn, params=variables)"
        )
    if linen is not None and isinstance(params, Mapping) and "params" in params:
        # Only the "params" collection is trained; batch_stats etc. are held fixed.
        return Adapted(model, params, _under("params"), "linen")
    return Adapted(model, params, None, "function")


def _no_batched(batched: bool | None, what: str) -> None:
    if batched is not None:
        raise TypeError(
            f"batched={batched!r}: only Equinox modules take batched=, and the model is {what}"
        )
