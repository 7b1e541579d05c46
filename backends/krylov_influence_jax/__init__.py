"""The JAX engine of krylov_influence (``engine="jax"``).

Binds a pure ``apply_fn(params, x)`` (Flax linen ``model.apply``, plain JAX) and a
per-example ``loss_fn(outputs, targets) -> (B,)`` to the Arnoldi core::

    model = krylov_influence.InfluenceModel(apply_fn, loss_fn, params=params)

or a Flax nnx or Equinox module directly, ``InfluenceModel(module, loss_fn)``. The engine is
inferred from ``params=`` holding JAX arrays, or from the nnx/Equinox module. Operators are
``jax.jit``-compiled once per bound model and input shape: HVPs forward-over-reverse (``jvp``
of ``grad``), projections by ``vmap`` of the linearised per-example losses over the k
directions, per-example gradients by ``vmap(grad)``. The compiled programs are shared by the
live models bound to the same functions and freed with the last of them (see
:mod:`krylov_influence_jax._kernels`). See ``docs/quickstart-jax.md`` and
:func:`krylov_influence_jax._model.bind_jax` for the options.

Importing this package does not import JAX; binding does.
"""

from __future__ import annotations

import sys
from typing import Any

from krylov_influence.engine import Engine, InfluenceModel

__all__ = ["JaxEngine", "JaxInfluenceModel"]


class JaxEngine(Engine):
    """The ``jax`` engine: pure ``apply_fn(params, x)`` functions with a params pytree, and
    Flax nnx, Flax linen and Equinox modules.

    ``bind(apply_fn, loss_fn, *, params, parameters=None, device=None, dtype=None, l2=0.0,
    batch_keys=None, jvp_chunk_size=None, projection="auto", batched=None)``; see
    :func:`krylov_influence_jax._model.bind_jax`.
    """

    name = "jax"
    # JAX arrays' classes live in jaxlib and jax; Flax and Equinox containers of them in
    # flax and equinox. recognises() makes the real check on the leaves.
    framework_modules: tuple[str, ...] = ("jax", "jaxlib", "flax", "equinox")

    @classmethod
    def version(cls) -> str:
        import jax

        return jax.__version__

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        from krylov_influence_jax._placement import device_names

        return device_names()

    @classmethod
    def recognises(cls, model: Any, **options: Any) -> bool:
        """True for a callable ``model`` with ``params=`` holding at least one JAX array, and
        for a Flax nnx or Equinox module without ``params=``."""
        if "jax" not in sys.modules:
            return False
        if options.get("params") is None:
            from krylov_influence_jax._libraries import is_equinox_module, is_nnx_module

            return is_nnx_module(model) or is_equinox_module(model)
        if not callable(model):
            return False
        import jax

        return any(
            isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(options["params"])
        )

    @classmethod
    def bind(
        cls,
        model: Any,
        loss_fn: Any = None,
        *,
        parameters: Any = None,
        device: Any = None,
        dtype: Any = None,
        **options: Any,
    ) -> InfluenceModel:
        from krylov_influence_jax._model import bind_jax

        known = {"params", "l2", "batch_keys", "jvp_chunk_size", "projection", "batched"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unexpected options for the jax engine: {unknown}; expected some of "
                f"{sorted(known)}"
            )
        return bind_jax(
            model, loss_fn, parameters=parameters, device=device, dtype=dtype, **options
        )

    @classmethod
    def from_neutral_spec(
        cls, spec: Any, *, dtype: Any = "float64", device: Any = None
    ) -> tuple[InfluenceModel, list[Any]]:
        """The spec's MLP with params ``[(W_1, b_1), (W_2, b_2), ...]`` and JAX batches.

        Raises
        ------
        ValueError
            If ``dtype`` is float64 while ``jax_enable_x64`` is off.
        """
        from krylov_influence_jax._spec import build_spec

        return build_spec(spec, dtype, device)


def __getattr__(name: str) -> Any:
    # JaxInfluenceModel lives in a module that imports JAX: load it on first use only.
    if name == "JaxInfluenceModel":
        from krylov_influence_jax._model import JaxInfluenceModel

        return JaxInfluenceModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
