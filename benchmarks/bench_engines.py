"""The ``cnn`` and ``transformer`` models in JAX and Keras, from the arrays ``prepare.py`` saved.

The PyTorch modules (``bench_torch.py``) are trained once; the same weights are loaded here
into the JAX and Keras/TensorFlow versions of the same architecture, so every engine scores
the same parameters:

- **JAX**: plain functions ``apply(params, x)`` over a dict of arrays named and shaped as
  the PyTorch ``state_dict`` (``x @ W.T + b``, convolutions in ``NCHW``/``OIHW``), so the
  weights need no mapping and gradients compare name by name. The same kernels as a Flax nnx
  model (``nnx.Linear``, ``nnx.Conv``, ``nnx.Embed`` are thin wrappers over these calls), with
  nothing to map.
- **Keras 3 on TensorFlow**: the standard layers (``Conv2D`` in ``NHWC`` as TensorFlow runs
  it on CPU, ``MaxPooling2D``, ``Dense``, ``Embedding``, ``LayerNormalization``, and
  ``MultiHeadAttention``, which takes every fast route of the TensorFlow engine, see
  docs/layers.md); :func:`keras_weights` maps the PyTorch arrays to the Keras layout and
  :func:`torch_layout` maps a Keras gradient back.

The attention is the same arithmetic everywhere: per-head ``softmax(q kᵀ / √d_h) v`` with
separate query, key, value and output projections written with matmuls and a softmax in all
three: what most PyTorch and JAX code does, and the form every engine route differentiates
without falling back (docs/layers.md: torch's fused attention kernels lack forward-mode and
second derivatives).

Inputs: images are ``(B, 1, 28, 28)`` for PyTorch and JAX and ``(B, 28, 28, 1)`` for Keras
(:func:`engine_inputs`); tokens are ``(B, T)`` int64 everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def torch_state(problem: dict[str, Any], which: str = "clean") -> dict[str, np.ndarray]:
    """The trained parameters by their PyTorch names, as saved by ``prepare.py``."""
    prefix = f"{which}/"
    return {k[len(prefix) :]: problem[k] for k in problem if k.startswith(prefix)}


def engine_inputs(problem: dict[str, Any], engine: str, split: str) -> np.ndarray:
    """``x_<split>`` in the layout ``engine`` expects (NHWC images for TensorFlow)."""
    config = problem["config"]
    x = problem[f"x_{split}"]
    if config["kind"] == "transformer":
        return x.astype(np.int64)
    x = x.astype(config["dtype"])
    if config["kind"] == "cnn" and engine == "tensorflow":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


# ------------------------------------------------------------------------------------ JAX
def jax_model(problem: dict[str, Any], which: str = "clean") -> tuple[Any, dict[str, Any]]:
    """``(apply_fn, params)``: the problem's model as a pure JAX function of a dict of arrays."""
    import jax.numpy as jnp

    config = problem["config"]
    params = {k: jnp.asarray(v) for k, v in torch_state(problem, which).items()}
    if config["kind"] == "cnn":
        return cnn_apply, params
    if config["kind"] == "transformer":
        return _transformer_apply(config["heads"], config["layers"]), params
    raise ValueError(f"no JAX model for kind {config['kind']!r}")


def _dense(params: dict[str, Any], name: str, h: Any) -> Any:
    return h @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def cnn_apply(params: dict[str, Any], x: Any) -> Any:
    """Two conv-ReLU-pool blocks, dense-ReLU, dense; (B, 1, 28, 28) -> (B, 10)."""
    import jax
    from jax import lax

    def conv(h: Any, name: str) -> Any:
        out = lax.conv_general_dilated(
            h, params[f"{name}.weight"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return jax.nn.relu(out + params[f"{name}.bias"][None, :, None, None])

    def pool(h: Any) -> Any:
        return lax.reduce_window(h, -np.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    h = pool(conv(pool(conv(x, "0")), "3"))
    h = jax.nn.relu(_dense(params, "7", h.reshape(h.shape[0], -1)))
    return _dense(params, "9", h)


def _layer_norm(params: dict[str, Any], name: str, h: Any, eps: float = 1e-5) -> Any:
    import jax.numpy as jnp

    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean((h - mean) ** 2, axis=-1, keepdims=True)
    return (h - mean) / jnp.sqrt(var + eps) * params[f"{name}.weight"] + params[f"{name}.bias"]


def _transformer_apply(heads: int, layers: int) -> Any:
    import jax
    import jax.numpy as jnp

    def attention(params: dict[str, Any], name: str, h: Any) -> Any:
        b, t, d = h.shape

        def split(z: Any) -> Any:  # (B, T, D) -> (B, H, T, D/H)
            return z.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)

        q, k, v = (split(_dense(params, f"{name}.{w}", h)) for w in ("query", "key", "value"))
        weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), axis=-1)
        return _dense(params, f"{name}.out", (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, d))

    def apply(params: dict[str, Any], x: Any) -> Any:
        """Token ids (B, T) -> logits (B, classes), as ``bench_torch.TextTransformer``."""
        h = params["token.weight"][x] + params["position"]
        for i in range(layers):
            block = f"blocks.{i}"
            h = h + attention(
                params, f"{block}.attention", _layer_norm(params, f"{block}.norm1", h)
            )
            inner = jax.nn.gelu(
                _dense(params, f"{block}.mlp1", _layer_norm(params, f"{block}.norm2", h)),
                approximate=False,
            )
            h = h + _dense(params, f"{block}.mlp2", inner)
        return _dense(params, "head", jnp.mean(_layer_norm(params, "norm", h), axis=1))

    return apply


def jax_loss(logits: Any, y: Any) -> Any:
    """Per-example cross-entropy, (B, C), (B,) -> (B,)."""
    import jax

    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jax.numpy.take_along_axis(logp, y[:, None].astype("int32"), axis=1)[:, 0]


# ---------------------------------------------------------------------------------- Keras
def _attention_layer(heads: int, width: int, dtype: str, name: str) -> Any:
    import keras
    import tensorflow as tf

    class SelfAttention(keras.layers.Layer):
        """Multi-head self-attention with Dense projections and ``tf.matmul``; (B, T, D).

        Not ``keras.layers.MultiHeadAttention``: with TensorFlow 2.21's oneDNN kernels (on by
        default on x86), the vectorised per-example gradients of a model holding it crash the
        process (segmentation fault) once a batch has 512 tokens or more (16 sequences of 32
        here); this layer is the same arithmetic and takes every fast route.
        """

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.heads = heads
            self.query, self.key, self.value, self.out = (
                keras.layers.Dense(width, dtype=dtype, name=n)
                for n in ("query", "key", "value", "out")
            )

        def call(self, h: Any) -> Any:
            b, t, d = tf.shape(h)[0], h.shape[1], h.shape[2]
            head = d // self.heads

            def split(z: Any) -> Any:  # (B, T, D) -> (B, H, T, D/H)
                return tf.transpose(tf.reshape(z, [b, t, self.heads, head]), [0, 2, 1, 3])

            q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
            weights = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / head**0.5, axis=-1)
            z = tf.reshape(tf.transpose(weights @ v, [0, 2, 1, 3]), [b, t, d])
            return self.out(z)

    return SelfAttention(dtype=dtype, name=name)


def _layer_norm_layer(width: int, dtype: str, name: str) -> Any:
    import keras
    import tensorflow as tf

    class LayerNorm(keras.layers.Layer):
        """Layer normalisation over the last axis (ε = 1e-5, as PyTorch), exact to all orders.

        Not ``keras.layers.LayerNormalization``: on TensorFlow it computes the variance with
        ``tf.nn.moments``, which stops the gradient through the mean inside the variance. The
        gradient is still exact (the derivative of the variance with respect to the mean is
        zero), but second derivatives are not: Hessian-vector products through it were off by
        0.4–2 % on this model against PyTorch and JAX. (The engine now runs Keras's layer with
        exact moments, ``krylov_influence_tf._functional.exact_moments``; this layer predates
        that and keeps the benchmark's weights and figures unchanged.)
        """

        def build(self, input_shape: Any) -> None:
            self.gamma = self.add_weight(shape=(width,), name="gamma", initializer="ones")
            self.beta = self.add_weight(shape=(width,), name="beta", initializer="zeros")

        def call(self, h: Any) -> Any:
            mean = tf.reduce_mean(h, axis=-1, keepdims=True)
            var = tf.reduce_mean(tf.square(h - mean), axis=-1, keepdims=True)
            return (h - mean) * tf.math.rsqrt(var + 1e-5) * self.gamma + self.beta

    return LayerNorm(dtype=dtype, name=name)


def _position_layer(seq_len: int, width: int) -> Any:
    import keras

    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned (T, D) position table to the token embeddings."""

        def build(self, input_shape: Any) -> None:
            self.position = self.add_weight(shape=(seq_len, width), name="position")

        def call(self, h: Any) -> Any:
            return h + self.position

    return PositionEmbedding(name="position")


def keras_model(problem: dict[str, Any], which: str = "clean") -> Any:
    """The problem's model in Keras 3 (TensorFlow backend), with the trained weights loaded."""
    import keras

    config = problem["config"]
    dtype = config["dtype"]
    L = keras.layers
    if config["kind"] == "cnn":
        c1, c2 = config["channels"]
        inputs = keras.Input((28, 28, 1), dtype=dtype)
        h = L.MaxPooling2D(2)(L.Conv2D(c1, 3, activation="relu", dtype=dtype, name="c0")(inputs))
        h = L.MaxPooling2D(2)(L.Conv2D(c2, 3, activation="relu", dtype=dtype, name="c3")(h))
        h = L.Flatten()(h)
        h = L.Dense(config["hidden"], activation="relu", dtype=dtype, name="d7")(h)
        outputs = L.Dense(config["num_classes"], dtype=dtype, name="d9")(h)
    elif config["kind"] == "transformer":
        width, heads = config["width"], config["heads"]
        inputs = keras.Input((config["seq_len"],), dtype="int64")
        h = L.Embedding(config["vocab"], width, dtype=dtype, name="token")(inputs)
        h = _position_layer(config["seq_len"], width)(h)
        for i in range(config["layers"]):
            a = _layer_norm_layer(width, dtype, f"b{i}_norm1")(h)
            a = _attention_layer(heads, width, dtype, f"b{i}_attention")(a)
            h = L.Add()([h, a])
            m = _layer_norm_layer(width, dtype, f"b{i}_norm2")(h)
            m = L.Dense(config["mlp"], dtype=dtype, name=f"b{i}_mlp1")(m)
            m = L.Activation(lambda z: keras.activations.gelu(z, approximate=False))(m)
            h = L.Add()([h, L.Dense(width, dtype=dtype, name=f"b{i}_mlp2")(m)])
        h = _layer_norm_layer(width, dtype, "norm")(h)
        h = L.GlobalAveragePooling1D()(h)
        outputs = L.Dense(config["num_classes"], dtype=dtype, name="head")(h)
    else:
        raise ValueError(f"no Keras model for kind {config['kind']!r}")
    model = keras.Model(inputs, outputs)
    weights = keras_weights(config, torch_state(problem, which))
    for var in model.trainable_variables:
        var.assign(weights[var.path].astype(dtype))
    return model


def _keras_map(config: dict[str, Any]) -> dict[str, tuple[str, Any, Any]]:
    """Keras variable path -> (torch name, torch->keras map, keras->torch map)."""

    def same(a: np.ndarray) -> np.ndarray:
        return a

    def transposed(a: np.ndarray) -> np.ndarray:
        return a.T

    out: dict[str, tuple[str, Any, Any]] = {}
    if config["kind"] == "cnn":
        c2 = config["channels"][1]
        conv = (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
        for name in ("0", "3"):
            out[f"c{name}/kernel"] = (f"{name}.weight", *conv)
            out[f"c{name}/bias"] = (f"{name}.bias", same, same)
        hidden = config["hidden"]
        # torch flattens (C, H, W), Keras (H, W, C): permute the rows of the first dense.
        out["d7/kernel"] = (
            "7.weight",
            lambda a: a.reshape(hidden, c2, 5, 5).transpose(2, 3, 1, 0).reshape(-1, hidden),
            lambda a: a.reshape(5, 5, c2, hidden).transpose(3, 2, 0, 1).reshape(hidden, -1),
        )
        out["d9/kernel"] = ("9.weight", transposed, transposed)
        for name in ("7", "9"):
            out[f"d{name}/bias"] = (f"{name}.bias", same, same)
        return out
    out["token/embeddings"] = ("token.weight", same, same)
    out["position/position"] = ("position", same, same)
    for i in range(config["layers"]):
        b, t = f"b{i}_", f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            out[f"{b}{norm}/gamma"] = (f"{t}{norm}.weight", same, same)
            out[f"{b}{norm}/beta"] = (f"{t}{norm}.bias", same, same)
        for proj in ("query", "key", "value", "out"):
            out[f"{b}attention/{proj}/kernel"] = (
                f"{t}attention.{proj}.weight",
                transposed,
                transposed,
            )
            out[f"{b}attention/{proj}/bias"] = (f"{t}attention.{proj}.bias", same, same)
        for mlp in ("mlp1", "mlp2"):
            out[f"{b}{mlp}/kernel"] = (f"{t}{mlp}.weight", transposed, transposed)
            out[f"{b}{mlp}/bias"] = (f"{t}{mlp}.bias", same, same)
    out["norm/gamma"] = ("norm.weight", same, same)
    out["norm/beta"] = ("norm.bias", same, same)
    out["head/kernel"] = ("head.weight", transposed, transposed)
    out["head/bias"] = ("head.bias", same, same)
    return out


def keras_weights(config: dict[str, Any], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PyTorch arrays in the Keras layout, by Keras variable path."""
    return {path: to_keras(state[name]) for path, (name, to_keras, _) in _keras_map(config).items()}


def torch_layout(config: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keras arrays (by variable path) mapped to the PyTorch names and shapes."""
    return {
        name: back(np.asarray(arrays[path])) for path, (name, _, back) in _keras_map(config).items()
    }


# ------------------------------------------------------------------------------- binding
def bind(problem: dict[str, Any], engine: str, which: str = "clean", **options: Any) -> Any:
    """The problem's model bound to our ``engine`` (``l2=0``, per-example cross-entropy);
    ``options`` go to ``InfluenceModel`` (``projection="jvp"``...)."""
    import krylov_influence as ki

    if engine == "torch":
        import torch

        from bench_torch import load_model

        module = load_model(problem, which)
        loss = torch.nn.CrossEntropyLoss(reduction="none")
        return ki.InfluenceModel(module, loss, l2=0.0, **options)
    if engine == "jax":
        apply_fn, params = jax_model(problem, which)
        return ki.InfluenceModel(apply_fn, jax_loss, params=params, l2=0.0, **options)
    if engine == "tensorflow":
        import keras

        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        return ki.InfluenceModel(keras_model(problem, which), loss, l2=0.0, **options)
    raise ValueError(f"engine={engine!r}: expected torch, jax or tensorflow")


def batches(
    problem: dict[str, Any], engine: str, split: str, which: str = "clean"
) -> list[tuple[Any, Any]]:
    """``x_<split>``, ``y_<split>`` as a list of the engine's ``(x, y)`` arrays, sliced once."""
    config = problem["config"]
    x = engine_inputs(problem, engine, split)
    y = (
        problem["y_train_flipped"]
        if (split, which) == ("train", "flipped")
        else problem[f"y_{split}"]
    )
    y = y.astype(np.int64)
    size = config["batch_size"] if split == "train" else config["query_batch_size"]
    if engine == "torch":
        import torch

        xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    elif engine == "jax":
        import jax.numpy as jnp

        xs, ys = jnp.asarray(x), jnp.asarray(y.astype(np.int32))
    else:
        import tensorflow as tf

        xs, ys = tf.constant(x), tf.constant(y)
    return [(xs[s : s + size], ys[s : s + size]) for s in range(0, len(y), size)]


def flat_to_torch(problem: dict[str, Any], model: Any, flat: np.ndarray) -> dict[str, np.ndarray]:
    """A vector in ``model``'s flat parameter order, as arrays by PyTorch name and shape."""
    arrays, start = {}, 0
    for name, shape in model.parameter_layout:
        size = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.asarray(flat[start : start + size]).reshape(shape)
        start += size
    if model.engine_name == "tensorflow":
        return torch_layout(problem["config"], arrays)
    return arrays


def torch_to_flat(problem: dict[str, Any], model: Any, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Arrays by PyTorch name, as a vector in ``model``'s flat parameter order."""
    if model.engine_name == "tensorflow":
        arrays = keras_weights(problem["config"], arrays)
    return np.concatenate([np.ravel(arrays[name]) for name, _ in model.parameter_layout])
