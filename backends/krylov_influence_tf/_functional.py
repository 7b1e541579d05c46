"""The user's model and loss as pure functions of explicit tensors.

Keras 3 variables are ``keras.Variable`` objects, which ``tf.GradientTape.watch`` and
``tf.autodiff.ForwardAccumulator`` reject, and the engine must never write into the user's
variables. So every model becomes ``forward(thetas, x) -> outputs`` where ``thetas`` is the list
of chosen parameter tensors:

- a Keras model runs through ``model.stateless_call(trainable_values, non_trainable_values,
  x, training=False)`` with the chosen entries of ``trainable_values`` replaced by ``thetas``
  and every other variable frozen at a copy of its value;
- an ``apply_fn(params, x)`` callable (with ``params=``, a dict/list/tuple nest of tensors,
  variables or arrays) is called on ``params`` with its chosen leaves replaced.

Keras computes the statistics of ``LayerNormalization`` and ``GroupNormalization`` with
``tf.nn.moments``, whose variance stops the gradient through the mean. The first derivative
is unaffected (that term is zero) but the second is not: Hessian-vector products through a
layer norm come out wrong by about 1 % per parameter. Every Keras forward of the engine
therefore runs under :func:`exact_moments`, which gives Keras the same moments without the
stop (the same values, bit for bit; exact second derivatives).

Per-example losses come from ``loss_fn(y_true, y_pred)`` (Keras's argument order). For Keras
``Loss`` objects the unreduced ``loss_fn.call`` is used, because ``Loss.__call__`` casts
predictions to the loss's own dtype (float32 by default), which would silently drop float64.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

__all__ = ["Functional", "from_apply_fn", "from_keras", "per_example_loss"]


@dataclass
class Functional:
    """A model as a pure function of its chosen parameters.

    Attributes
    ----------
    forward : callable
        ``forward(thetas, x) -> outputs``; ``thetas`` is a list of tensors in flat order.
    thetas : list of tf.Tensor
        The chosen parameters (copies, in the bound dtype, on the bound device).
    names : list of str
        Name of each chosen parameter (Keras variable paths, or nest paths).
    rebuild : callable
        ``rebuild(device) -> Functional``: the same model with every tensor copied to
        another device.
    """

    forward: Callable[[list[tf.Tensor], Any], Any]
    thetas: list[tf.Tensor]
    names: list[str]
    rebuild: Callable[[str], Functional]


# ----------------------------------------------------------------------------------- Keras
def _moments(x: Any, axes: Any, keepdims: bool) -> tuple[Any, Any]:
    """``tf.nn.moments`` without its ``stop_gradient`` on the mean inside the variance."""
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


@functools.cache
def _warn_inexact_moments() -> None:  # pragma: no cover - see exact_moments
    warnings.warn(
        "krylov_influence TensorFlow engine: this Keras version does not compute moments "
        "where the engine can make their second derivative exact; Hessian-vector products "
        "through LayerNormalization or GroupNormalization may be off by about 1 %",
        RuntimeWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def exact_moments() -> Iterator[None]:
    """Keras's TensorFlow moments (its normalisation layers) with exact second derivatives,
    while the context lasts (tracing included: a traced graph keeps them)."""
    try:
        from keras.src.backend.tensorflow import nn as keras_nn
    except ImportError:  # pragma: no cover - another Keras layout
        keras_nn = None
    original = getattr(keras_nn, "_compute_moments", None)
    if original is None:  # pragma: no cover - tested with the Keras that CI installs
        _warn_inexact_moments()
        yield
        return
    keras_nn._compute_moments = _moments
    try:
        yield
    finally:
        keras_nn._compute_moments = original


def _keras_dtype(model: Any) -> str | None:
    floats = [v.dtype for v in model.trainable_variables if "float" in str(v.dtype)]
    return str(floats[0]) if floats else None


def _cast_clone(model: Any, dtype: str) -> Any:
    """A copy of ``model`` whose layers compute in ``dtype`` (the user's model is untouched)."""
    import keras

    def clone_layer(layer: Any) -> Any:
        config = layer.get_config()
        config["dtype"] = dtype
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer)
    except Exception as error:
        raise ValueError(
            f"dtype={dtype!r}: the model computes in {_keras_dtype(model)} and could not be "
            f"cloned in {dtype} ({type(error).__name__}: {error}); build the model with "
            f"dtype={dtype!r} (e.g. keras.config.set_floatx({dtype!r}) before building it)"
        ) from None
    clone_vars = clone.trainable_variables + clone.non_trainable_variables
    user_vars = model.trainable_variables + model.non_trainable_variables
    if [tuple(v.shape) for v in clone_vars] != [tuple(v.shape) for v in user_vars]:
        raise ValueError(
            f"dtype={dtype!r}: cloning the model in {dtype} changed its variables; build the "
            f"model with dtype={dtype!r} instead"
        )
    return clone


def _copy(value: Any, dtype: str, device: str) -> tf.Tensor:
    with tf.device(device):
        tensor = tf.convert_to_tensor(value)
        if tensor.dtype.is_floating:
            tensor = tf.cast(tensor, dtype)
        return tf.identity(tensor)


def _select_keras(model: Any, parameters: Any) -> list[int]:
    """Indices into ``model.trainable_variables`` chosen by ``parameters`` (see engine docs)."""
    trainable = list(model.trainable_variables)
    ids = {id(v): i for i, v in enumerate(trainable)}
    layers = list(getattr(model, "layers", []))

    def of_layers(chosen_layers: Sequence[Any]) -> set[int]:
        return {ids[id(v)] for layer in chosen_layers for v in layer.trainable_variables}

    if parameters is None:
        chosen = set(range(len(trainable)))
    elif isinstance(parameters, dict):
        unknown = set(parameters) - {"start_layer", "last_layer"}
        if unknown:
            raise ValueError(
                f"parameters: unknown keys {sorted(unknown)}; expected 'start_layer' and/or "
                "'last_layer' (layer indices, inclusive, negative from the end)"
            )
        n = len(layers)
        start, last = parameters.get("start_layer", 0), parameters.get("last_layer", -1)
        for key, value in (("start_layer", start), ("last_layer", last)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"parameters[{key!r}]={value!r}: expected a layer index")
            if not -n <= value < n:
                raise ValueError(
                    f"parameters[{key!r}]={value}: the model has {n} layers (indices -{n}..{n - 1})"
                )
        chosen = of_layers(layers[start % n : last % n + 1])
    elif isinstance(parameters, slice):
        chosen = of_layers(layers[parameters])
    elif callable(parameters):
        chosen = {i for i, v in enumerate(trainable) if parameters(v)}
    else:
        items = [parameters] if isinstance(parameters, str) else list(parameters)
        by_layer = {layer.name: layer for layer in layers}
        by_path = {v.path: i for i, v in enumerate(trainable)}
        chosen = set()
        for item in items:
            if isinstance(item, str) and item in by_layer:
                chosen |= of_layers([by_layer[item]])
            elif isinstance(item, str) and item in by_path:
                chosen.add(by_path[item])
            elif not isinstance(item, str) and id(item) in ids:
                chosen.add(ids[id(item)])
            else:
                raise ValueError(
                    f"parameters: {item!r} is neither a layer name ({sorted(by_layer)}) nor a "
                    f"trainable variable path ({sorted(by_path)})"
                )
    if not chosen:
        raise ValueError(f"parameters={parameters!r}: selects no trainable variable")
    return sorted(chosen)


def from_keras(model: Any, parameters: Any, dtype: str | None, device: str) -> Functional:
    """A Keras 3 model (TensorFlow backend) as a :class:`Functional`."""
    own = _keras_dtype(model)
    if own is None:
        raise ValueError("model: the Keras model has no floating trainable variable (built?)")
    dtype = dtype or own
    runner = model if dtype == own else _cast_clone(model, dtype)
    chosen = _select_keras(model, parameters)
    trainable = list(model.trainable_variables)
    names = [trainable[i].path for i in chosen]

    def build(place: str) -> Functional:
        frozen = [_copy(v.value, dtype, place) for v in trainable]
        fixed = [_copy(v.value, dtype, place) for v in model.non_trainable_variables]
        thetas = [frozen[i] for i in chosen]

        def forward(values: list[tf.Tensor], x: Any) -> Any:
            full = list(frozen)
            for index, value in zip(chosen, values):
                full[index] = value
            with exact_moments():
                outputs, _ = runner.stateless_call(full, fixed, x, training=False)
            return outputs

        return Functional(forward, thetas, names, build)

    return build(device)


# --------------------------------------------------------------------------- apply_fn form
def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [
            leaf for key in sorted(tree, key=str) for leaf in _leaves(tree[key], f"{prefix}{key}/")
        ]
    if isinstance(tree, (list, tuple)):
        return [leaf for i, item in enumerate(tree) for leaf in _leaves(item, f"{prefix}{i}/")]
    return [(prefix[:-1] or "params", tree)]


def _rebuild_tree(tree: Any, values: dict[str, Any], prefix: str = "") -> Any:
    if isinstance(tree, dict):
        return {key: _rebuild_tree(tree[key], values, f"{prefix}{key}/") for key in tree}
    if isinstance(tree, (list, tuple)):
        items = [_rebuild_tree(item, values, f"{prefix}{i}/") for i, item in enumerate(tree)]
        return type(tree)(items) if not hasattr(tree, "_fields") else type(tree)(*items)
    return values[prefix[:-1] or "params"]


def from_apply_fn(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    parameters: Any,
    dtype: str | None,
    device: str,
) -> Functional:
    """``apply_fn(params, x)`` with explicit ``params`` as a :class:`Functional`.

    Leaves are ordered by their path (dict keys sorted, sequences in order); ``parameters``
    is None (every floating leaf), a path or list of paths (``"dense/kernel"``), or a
    predicate ``(path, value) -> bool``.
    """
    leaves = _leaves(params)
    floating = [
        (path, leaf)
        for path, leaf in leaves
        if tf.as_dtype(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype).is_floating
    ]
    if not floating:
        raise ValueError("params: expected a nest of floating tensors, variables or arrays")
    paths = [path for path, _ in floating]
    if parameters is None:
        names = paths
    elif callable(parameters) and not isinstance(parameters, str):
        names = [path for path, leaf in floating if parameters(path, leaf)]
    else:
        names = [parameters] if isinstance(parameters, str) else list(parameters)
        unknown = [n for n in names if n not in paths]
        if unknown:
            raise ValueError(f"parameters: unknown parameter paths {unknown}; known: {paths}")
        names = [p for p in paths if p in names]
    if not names:
        raise ValueError(f"parameters={parameters!r}: selects no parameter")
    own = str(tf.convert_to_tensor(floating[0][1]).dtype.name)
    dtype = dtype or own

    def build(place: str) -> Functional:
        frozen = {path: _copy(leaf, dtype, place) for path, leaf in leaves}
        thetas = [frozen[name] for name in names]

        def forward(values: list[tf.Tensor], x: Any) -> Any:
            current = dict(frozen)
            current.update(zip(names, values))
            return apply_fn(_rebuild_tree(params, current), x)

        return Functional(forward, thetas, list(names), build)

    return build(device)


# ------------------------------------------------------------------------------------ loss
def per_example_loss(loss_fn: Any) -> Callable[[Any, Any], Any]:
    """``loss_fn`` as ``(y_true, y_pred) -> (B,)``; reducing Keras losses are rejected.

    Raises
    ------
    ValueError
        If ``loss_fn`` is a Keras ``Loss`` whose ``reduction`` is not None/"none".
    TypeError
        If ``loss_fn`` is not callable.
    """
    if loss_fn is None or not callable(loss_fn):
        raise TypeError(
            "loss_fn: expected a per-example loss (y_true, y_pred) -> (B,), e.g. "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)"
        )
    try:
        import keras
    except ImportError:  # pragma: no cover - keras ships with tensorflow
        keras = None
    if keras is not None and isinstance(loss_fn, keras.losses.Loss):
        reduction = getattr(loss_fn, "reduction", None)
        if reduction not in (None, "none"):
            raise ValueError(
                f"loss_fn: {type(loss_fn).__name__} reduces over the batch "
                f"(reduction={reduction!r}); influence needs per-example losses: pass "
                f"reduction=None, e.g. {type(loss_fn).__name__}(..., reduction=None)"
            )
        return loss_fn.call
    return loss_fn
