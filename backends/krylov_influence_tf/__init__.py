"""The TensorFlow engine of krylov_influence (engine name ``"tensorflow"``).

Supported models
----------------
- a Keras 3 model (``keras.Model``, ``Sequential``, functional or subclassed) on the TensorFlow
  backend, evaluated functionally through ``model.stateless_call`` (the user's variables are
  never written);
- a callable ``apply_fn(params, x)`` with ``params=`` a dict/list/tuple nest of ``tf.Tensor``,
  ``tf.Variable`` or NumPy arrays (wrap a plain ``tf.Module`` this way).

``loss_fn(y_true, y_pred) -> (B,)`` returns per-example losses (Keras's argument order), e.g.
``keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)``.

This module does not import TensorFlow: the registry imports it to read the engine's name.
"""

from __future__ import annotations

import sys
from typing import Any

from krylov_influence.engine import Engine, InfluenceModel

__all__ = ["RouteFallbackWarning", "TensorFlowEngine"]


def __getattr__(name: str) -> Any:
    # Lazily, so that importing this module (the registry does) never imports TensorFlow.
    if name == "RouteFallbackWarning":
        from krylov_influence_tf._routes import RouteFallbackWarning

        return RouteFallbackWarning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_keras(model: Any) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.layers.Layer)


def _is_tf_leaf(value: Any) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(value, (tf.Tensor, tf.Variable))


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, (list, tuple)):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


class TensorFlowEngine(Engine):
    """Keras 3 models (TensorFlow backend) and ``apply_fn(params, x)`` callables.

    Options of :meth:`bind` beyond the common ones: ``l2`` (float, default 0), ``params``
    (the parameter nest of an ``apply_fn``), ``chunk_size`` (projector rows per vectorised
    JVP call, default 128), ``projection`` (``"auto"``, ``"jvp"`` or ``"gradients"``),
    ``hvp_mode`` (``"reverse-over-reverse"``, the default, or ``"forward-over-reverse"``) and
    ``jit_compile`` (``False``, the default, ``"auto"`` or ``True``: XLA for the single HVP).
    """

    name = "tensorflow"
    framework_modules: tuple[str, ...] = ("keras", "tensorflow")

    @classmethod
    def version(cls) -> str:
        import keras
        import tensorflow as tf

        return f"tensorflow {tf.__version__}, keras {keras.__version__}"

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        import tensorflow as tf

        return tuple(d.name.split("device:")[-1] for d in tf.config.list_logical_devices())

    @classmethod
    def recognises(cls, model: Any, **options: Any) -> bool:
        if "params" in options:
            leaves = _leaves(options["params"])
            return callable(model) and bool(leaves) and any(_is_tf_leaf(v) for v in leaves)
        if _is_keras(model):
            import keras

            backend = keras.backend.backend()
            if backend != "tensorflow":
                raise ValueError(
                    f"model: a Keras model on the {backend!r} backend; the tensorflow engine "
                    "needs KERAS_BACKEND=tensorflow (set it before importing keras)"
                )
            return True
        tf = sys.modules.get("tensorflow")
        return tf is not None and isinstance(model, tf.Module)

    @classmethod
    def bind(
        cls,
        model: Any,
        loss_fn: Any = None,
        *,
        parameters: Any = None,
        device: Any = None,
        dtype: Any = None,
        l2: float = 0.0,
        params: Any = None,
        chunk_size: int = 128,
        projection: str = "auto",
        hvp_mode: str = "reverse-over-reverse",
        jit_compile: bool | str = False,
        **options: Any,
    ) -> InfluenceModel:
        """Bind ``model`` and ``loss_fn``; see ``docs/quickstart-tensorflow.md``.

        Parameters
        ----------
        model : keras.Model or callable
            A Keras 3 model on the TensorFlow backend, or ``apply_fn(params, x)``.
        loss_fn : callable
            ``loss_fn(y_true, y_pred) -> (B,)``; a reducing Keras loss is an error.
        parameters : optional
            Keras: ``{"start_layer": i, "last_layer": j}`` (layer indices, inclusive), a
            ``slice`` of ``model.layers``, layer names or variable paths (a str or a list),
            ``keras.Variable`` objects, or a predicate ``(variable) -> bool``. ``apply_fn``:
            leaf paths or a predicate ``(path, value) -> bool``. Default: every trainable
            variable.
        device : str, optional
            ``"/CPU:0"``, ``"/GPU:0"``, ``"cpu"``, ``"gpu:0"``; default the first GPU if any.
        dtype : {"float32", "float64"} or tf.DType, optional
            Default: the model's. A different dtype computes on a cast copy (Keras models
            are cloned with that dtype; the user's model is untouched).
        l2 : float
            ``½ l2 ‖θ‖²`` added to every per-example loss.
        params : nest, optional
            The parameters of an ``apply_fn`` model.
        chunk_size : int
            Projector rows per vectorised JVP call.
        projection : {"auto", "jvp", "gradients"}
            ``project`` by vectorised JVPs or by per-example gradients times ``Gᵀ``;
            ``"auto"`` takes gradients when the (B, p) block fits 64 MiB.
        hvp_mode : {"reverse-over-reverse", "forward-over-reverse"}
            The mode of Hessian-vector products tried first, for one vector and for blocks
            (the other is its fallback); see
            :class:`~krylov_influence_tf._model.TensorFlowInfluenceModel`.
        jit_compile : {False, "auto", True}
            Compile the single HVP with XLA (``"auto"``: on a CPU unless the model has
            convolutions, which XLA:CPU runs slower). It pays after its compilation only for
            many products; see ``TensorFlowInfluenceModel``.

        Returns
        -------
        TensorFlowInfluenceModel
        """
        from krylov_influence import _xp
        from krylov_influence_tf._functional import from_apply_fn, from_keras, per_example_loss
        from krylov_influence_tf._model import TensorFlowInfluenceModel
        from krylov_influence_tf._namespace import canonical_device

        if options:
            raise TypeError(f"unexpected options for the tensorflow engine: {sorted(options)}")
        l2 = float(l2)
        if not (l2 >= 0 and l2 != float("inf")):
            raise ValueError(f"l2={l2!r}: expected a finite number >= 0")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r}: expected a positive integer")
        name = None if dtype is None else _xp.dtype_name(dtype)
        place = canonical_device(device)
        loss = per_example_loss(loss_fn)
        if params is not None:
            if not callable(model):
                raise TypeError(f"model: with params=, expected apply_fn(params, x), got {model!r}")
            functional = from_apply_fn(model, params, parameters, name, place)
        elif _is_keras(model):
            cls.recognises(model)  # raises on a non-TensorFlow Keras backend
            if not model.built:
                raise ValueError("model: the Keras model is not built; call it on data first")
            functional = from_keras(model, parameters, name, place)
        else:
            raise TypeError(
                f"model: expected a Keras 3 model or apply_fn(params, x) with params=, got "
                f"{type(model).__name__}; wrap a plain tf.Module as "
                "apply_fn(params, x) with explicit parameter tensors"
            )
        dtype_name = functional.thetas[0].dtype.name
        return TensorFlowInfluenceModel(
            functional,
            loss,
            dtype=dtype_name,
            device=place,
            l2=l2,
            chunk_size=chunk_size,
            projection=projection,
            hvp_mode=hvp_mode,
            jit_compile=jit_compile,
        )

    @classmethod
    def from_neutral_spec(
        cls, spec: Any, *, dtype: Any = "float64", device: Any = None
    ) -> tuple[InfluenceModel, list[Any]]:
        """The spec's MLP as a Keras ``Sequential`` of ``Dense`` layers, and its batches.

        Returns
        -------
        model : TensorFlowInfluenceModel
        batches : list of (x, y) tf.Tensor pairs, one per ``spec.batch_slices()``
        """
        from krylov_influence_tf._spec import build_spec

        return build_spec(cls, spec, dtype=dtype, device=device)
