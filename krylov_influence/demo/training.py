"""Training the demo's classifier in each engine, then binding it as an ``InfluenceModel``.

Every trainer minimises the same objective, the mean cross-entropy over the training set plus
``½ l2 ‖θ‖²`` over all parameters, and hands the engine that same ``l2=``: the per-example
loss the engine differentiates is then exactly one term of the training objective, so the
Hessian the calculator inverts is the Hessian of what was minimised.

- ``numpy``: softmax regression (:class:`krylov_influence.reference.SoftmaxRegression`),
  full-batch L-BFGS (:func:`scipy.optimize.minimize`) on the reference engine's analytic
  losses and gradients.
- ``torch``, ``jax``, ``tensorflow``: a 64-32-10 tanh MLP, initialised from the same NumPy
  draw in every framework and trained by the framework's own full-batch Adam with the same
  cosine-decayed step size, in float64.

Each framework is imported only inside its own trainer, so importing this module (or the CLI)
never imports torch, jax or tensorflow.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from krylov_influence.demo.data import NUM_CLASSES, DigitsData
from krylov_influence.engine import InfluenceModel

# ``krylov_influence.InfluenceModel(model, loss_fn, ...)`` dispatches to ``bind_model`` through
# a metaclass that type checkers cannot follow; the demo calls the typed function directly.
from krylov_influence.registry import bind_model

__all__ = [
    "DEMO_ENGINES",
    "MLP_SIZES",
    "TrainedModel",
    "TrainingConfig",
    "engine_context",
    "glorot_mlp",
    "num_parameters",
    "train",
]

#: Engines the demo can train a model in, with the package that provides the framework.
DEMO_ENGINES: dict[str, str] = {
    "numpy": "numpy",
    "torch": "torch",
    "jax": "jax",
    "tensorflow": "tensorflow",
}

#: Layer sizes of the frameworks' MLP: 64 pixels, 32 tanh units, 10 logits.
MLP_SIZES: tuple[int, ...] = (64, 32, NUM_CLASSES)


@dataclass(frozen=True)
class TrainingConfig:
    """How the demo's model is trained.

    Attributes
    ----------
    seed : int
        Seeds the initial weights of the MLP (softmax regression starts from zero).
    l2 : float
        Coefficient of ``½ l2 ‖θ‖²`` in the training objective and in the engine's loss.
    batch_size : int
        Examples per batch handed to the calculator (training is full-batch).
    adam_steps : int
        Full-batch Adam steps for the MLP.
    learning_rate : float
        Initial Adam step size, cosine-decayed to 1 % of itself over ``adam_steps``.
    lbfgs_gtol : float
        L-BFGS stops when every gradient entry of the objective is below this.
    show_progress : bool
        tqdm bar over the optimiser's iterations.
    """

    seed: int = 0
    l2: float = 1e-2
    batch_size: int = 512
    adam_steps: int = 500
    learning_rate: float = 1e-2
    lbfgs_gtol: float = 1e-7
    show_progress: bool = True


@dataclass
class TrainedModel:
    """A trained classifier, bound to its engine, with its data in the engine's format.

    Attributes
    ----------
    model : InfluenceModel
    train_batches : list of batches
        The training set (given labels) in the engine's batch format; also the Hessian data.
    make_batch : callable ``(x, y) -> batch``
        Builds a batch in the engine's format from NumPy arrays (for query batches).
    description : str
        The model, in words.
    train_accuracy : float
        Accuracy on the *given* (partly flipped) training labels.
    test_accuracy : float
    test_predictions : numpy.ndarray, shape (M,)
        Predicted classes of the test digits.
    gradient_norm : float
        ``‖∇(objective)‖₂`` at the trained parameters: how close to stationary the model is,
        which the influence-function approximation assumes.
    framework_version : str
    """

    model: InfluenceModel
    train_batches: list[Any]
    make_batch: Callable[[np.ndarray, np.ndarray], Any]
    description: str
    train_accuracy: float
    test_accuracy: float
    test_predictions: np.ndarray
    gradient_norm: float
    framework_version: str
    extra: dict[str, Any] = field(default_factory=dict)


def num_parameters(engine: str) -> int:
    """``p`` of the demo's model in ``engine`` (known before training, for option checks)."""
    if engine == "numpy":
        return (MLP_SIZES[0] + 1) * NUM_CLASSES
    return sum((a + 1) * b for a, b in itertools.pairwise(MLP_SIZES))


def engine_context(engine: str) -> contextlib.AbstractContextManager[Any]:
    """A context that the whole demo runs in for ``engine``.

    JAX computes in float32 unless x64 is enabled; the flag is process-global, so the demo
    enables it only for its own duration (``jax.enable_x64``) instead of for the process.
    torch runs on one thread (see :func:`_torch_single_thread`).
    """
    if engine == "jax":
        import jax

        return jax.enable_x64(True)
    if engine == "torch":
        return _torch_single_thread()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _torch_single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the demo's duration, then restore the setting.

    The demo's matrices are tiny (512 × 64 by 64 × 32): splitting them across threads costs
    more than it saves, and on a busy 2-core machine a second spinning thread made a
    full-batch Adam step 13 times slower (25 ms → 320 ms, measured).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(engine: str, data: DigitsData, config: TrainingConfig) -> TrainedModel:
    """Train the demo's model in ``engine`` and bind it.

    Parameters
    ----------
    engine : {"numpy", "torch", "jax", "tensorflow"}
    data : DigitsData
    config : TrainingConfig

    Returns
    -------
    TrainedModel

    Raises
    ------
    ValueError
        For an engine the demo has no trainer for.
    NotImplementedError
        When the engine is registered but cannot bind models yet.
    """
    trainers = {
        "numpy": _train_numpy,
        "torch": _train_torch,
        "jax": _train_jax,
        "tensorflow": _train_tensorflow,
    }
    if engine not in trainers:
        raise ValueError(f"engine={engine!r}: the demo trains in {', '.join(trainers)}")
    return trainers[engine](data, config)


def _batches(x: np.ndarray, y: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive batches of at most ``size`` examples, as equal as possible.

    1437 digits in batches of at most 512 become 3 × 479 rather than 512, 512, 413: the
    compiled engines (``jax.jit``, ``tf.function``) trace one shape instead of two.
    """
    count = -(-x.shape[0] // size)
    for rows in np.array_split(np.arange(x.shape[0]), count):
        yield x[rows], y[rows]


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def glorot_mlp(sizes: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Glorot-uniform weights and zero biases, drawn on the host (same in every framework).

    Parameters
    ----------
    sizes : tuple of int
        ``(d_in, h_1, ..., d_out)``.
    seed : int

    Returns
    -------
    list of (W, b)
        ``W`` of shape ``(sizes[l], sizes[l+1])`` (``x @ W`` layout), ``b`` of shape
        ``(sizes[l+1],)``, float64.
    """
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        layers.append((rng.uniform(-limit, limit, (fan_in, fan_out)), np.zeros(fan_out)))
    return layers


def _cosine_step_size(config: TrainingConfig) -> Callable[[int], float]:
    """``lr_t = lr (0.01 + 0.99 · ½ (1 + cos(π t / T)))``, as Keras' ``CosineDecay(alpha=0.01)``."""
    lr, steps = config.learning_rate, config.adam_steps

    def step_size(step: Any) -> Any:
        return lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps)))

    return step_size


def _progress(config: TrainingConfig, total: int | None, desc: str) -> Any:
    return tqdm(total=total, desc=desc, disable=not config.show_progress, leave=False)


# ----------------------------------------------------------------------------------- numpy
def _train_numpy(data: DigitsData, config: TrainingConfig) -> TrainedModel:
    import scipy
    import scipy.optimize

    from krylov_influence.reference import SoftmaxRegression

    features, classes = data.x_train.shape[1], NUM_CLASSES
    full_batch = (data.x_train, data.y_train)

    def regression(theta: np.ndarray) -> SoftmaxRegression:
        matrix = theta.reshape(features + 1, classes)  # θ = [W; b], the flat order
        return SoftmaxRegression(matrix[:features], matrix[features], l2=config.l2)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # The per-example loss already carries ½ l2 ‖θ‖², so its mean is the objective.
        bound = bind_model(regression(theta), engine="numpy", dtype="float64")
        return float(np.mean(bound.losses(full_batch))), bound.per_example_grads(full_batch).mean(
            axis=0
        )

    with _progress(config, None, "train (L-BFGS)") as bar:
        result = scipy.optimize.minimize(
            objective,
            np.zeros((features + 1) * classes),
            jac=True,
            method="L-BFGS-B",
            callback=lambda *_: bar.update(1),
            options={"maxiter": 2000, "gtol": config.lbfgs_gtol},
        )
    regression_model = regression(result.x)
    model = bind_model(regression_model, engine="numpy", dtype="float64")

    def logits(x: np.ndarray) -> np.ndarray:
        return x @ regression_model.weight + regression_model.bias

    test_predictions = np.argmax(logits(data.x_test), axis=1)
    return TrainedModel(
        model=model,
        train_batches=list(_batches(data.x_train, data.y_train, config.batch_size)),
        make_batch=lambda x, y: (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)),
        description=(
            f"softmax regression (64 pixels + bias → 10 classes), L2 {config.l2:g}, "
            f"L-BFGS {result.nit} iterations"
        ),
        train_accuracy=_accuracy(np.argmax(logits(data.x_train), axis=1), data.y_train),
        test_accuracy=_accuracy(test_predictions, data.y_test),
        test_predictions=test_predictions,
        gradient_norm=float(np.linalg.norm(result.jac)),
        framework_version=f"numpy {np.__version__}, scipy {scipy.__version__}",
        extra={"optimizer": "scipy L-BFGS-B", "iterations": int(result.nit)},
    )


def _mlp_description(config: TrainingConfig, optimizer: str) -> str:
    sizes = "-".join(str(s) for s in MLP_SIZES)
    return (
        f"MLP {sizes} tanh, L2 {config.l2:g}, {optimizer} full-batch "
        f"{config.adam_steps} steps (lr {config.learning_rate:g}, cosine decay)"
    )


def _trained_mlp(
    model: InfluenceModel,
    make_batch: Callable[[np.ndarray, np.ndarray], Any],
    data: DigitsData,
    config: TrainingConfig,
    *,
    optimizer: str,
    predictions: tuple[np.ndarray, np.ndarray],
    gradient_norm: float,
    framework_version: str,
) -> TrainedModel:
    """The result of a framework's MLP training (torch, JAX, TensorFlow share its shape)."""
    train_predictions, test_predictions = predictions
    return TrainedModel(
        model=model,
        train_batches=[
            make_batch(xb, yb) for xb, yb in _batches(data.x_train, data.y_train, config.batch_size)
        ],
        make_batch=make_batch,
        description=_mlp_description(config, optimizer),
        train_accuracy=_accuracy(train_predictions, data.y_train),
        test_accuracy=_accuracy(test_predictions, data.y_test),
        test_predictions=test_predictions,
        gradient_norm=gradient_norm,
        framework_version=framework_version,
        extra={"optimizer": optimizer},
    )


# ----------------------------------------------------------------------------------- torch
def _train_torch(data: DigitsData, config: TrainingConfig) -> TrainedModel:
    import torch

    dtype = torch.float64
    layers = glorot_mlp(MLP_SIZES, config.seed)
    modules: list[torch.nn.Module] = []
    for index, (weight, bias) in enumerate(layers):
        linear = torch.nn.Linear(weight.shape[0], weight.shape[1], dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight.T))  # nn.Linear stores (out, in)
            linear.bias.copy_(torch.from_numpy(bias))
        modules.append(linear)
        if index < len(layers) - 1:
            modules.append(torch.nn.Tanh())
    network = torch.nn.Sequential(*modules)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    parameters = list(network.parameters())

    def objective() -> torch.Tensor:
        penalty = sum(torch.sum(p * p) for p in parameters)
        return loss_fn(network(x), y).mean() + 0.5 * config.l2 * penalty

    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _cosine_step_size(config)(step) / config.learning_rate
    )
    with _progress(config, config.adam_steps, "train (Adam)") as bar:
        for _ in range(config.adam_steps):
            optimizer.zero_grad()
            objective().backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
    gradients = torch.autograd.grad(objective(), parameters)
    gradient_norm = float(torch.sqrt(torch.stack([torch.sum(g * g) for g in gradients]).sum()))
    network.eval()
    with torch.no_grad():
        train_predictions = network(x).argmax(dim=1).numpy()
        test_predictions = network(torch.from_numpy(data.x_test)).argmax(dim=1).numpy()

    model = bind_model(network, loss_fn, engine="torch", l2=config.l2)

    def make_batch(features: np.ndarray, labels: np.ndarray) -> Any:
        return torch.as_tensor(features, dtype=dtype), torch.as_tensor(labels, dtype=torch.int64)

    return _trained_mlp(
        model,
        make_batch,
        data,
        config,
        optimizer="torch.optim.Adam",
        predictions=(train_predictions, test_predictions),
        gradient_norm=gradient_norm,
        framework_version=f"torch {torch.__version__}",
    )


# ------------------------------------------------------------------------------------- jax
def _train_jax(data: DigitsData, config: TrainingConfig) -> TrainedModel:
    import jax
    import jax.numpy as jnp
    from jax.example_libraries import optimizers

    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("the jax demo runs in float64: call it inside engine_context('jax')")

    def apply_fn(params: Any, x: Any) -> Any:
        hidden = x
        for layer in params[:-1]:
            hidden = jnp.tanh(hidden @ layer["kernel"] + layer["bias"])
        return hidden @ params[-1]["kernel"] + params[-1]["bias"]

    def loss_fn(outputs: Any, targets: Any) -> Any:
        log_probs = jax.nn.log_softmax(outputs, axis=-1)
        return -jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]

    params = [
        {"kernel": jnp.asarray(w, dtype=jnp.float64), "bias": jnp.asarray(b, dtype=jnp.float64)}
        for w, b in glorot_mlp(MLP_SIZES, config.seed)
    ]
    x = jnp.asarray(data.x_train, dtype=jnp.float64)
    y = jnp.asarray(data.y_train, dtype=jnp.int32)

    def objective(p: Any) -> Any:
        penalty = sum(jnp.sum(leaf * leaf) for leaf in jax.tree_util.tree_leaves(p))
        return jnp.mean(loss_fn(apply_fn(p, x), y)) + 0.5 * config.l2 * penalty

    lr, steps = config.learning_rate, config.adam_steps

    def traced_step_size(step: Any) -> Any:  # _cosine_step_size, traceable under jit
        fraction = jnp.minimum(step, steps) / steps
        return lr * (0.01 + 0.99 * 0.5 * (1.0 + jnp.cos(jnp.pi * fraction)))

    opt_init, opt_update, get_params = optimizers.adam(traced_step_size)

    @jax.jit
    def update(step: Any, state: Any) -> Any:
        return opt_update(step, jax.grad(objective)(get_params(state)), state)

    state = opt_init(params)
    with _progress(config, steps, "train (Adam)") as bar:
        for step in range(steps):
            state = update(step, state)
            bar.update(1)
    params = get_params(state)
    gradients = jax.grad(objective)(params)
    gradient_norm = float(
        jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(gradients)))
    )
    train_predictions = np.asarray(jnp.argmax(apply_fn(params, x), axis=1))
    test_logits = apply_fn(params, jnp.asarray(data.x_test, dtype=jnp.float64))
    test_predictions = np.asarray(jnp.argmax(test_logits, axis=1))

    model = bind_model(apply_fn, loss_fn, params=params, engine="jax", l2=config.l2)

    def make_batch(features: np.ndarray, labels: np.ndarray) -> Any:
        return jnp.asarray(features, dtype=jnp.float64), jnp.asarray(labels, dtype=jnp.int32)

    return _trained_mlp(
        model,
        make_batch,
        data,
        config,
        optimizer="jax.example_libraries.optimizers.adam",
        predictions=(train_predictions, test_predictions),
        gradient_norm=gradient_norm,
        framework_version=f"jax {jax.__version__}",
    )


# ------------------------------------------------------------------------------ tensorflow
def _train_tensorflow(data: DigitsData, config: TrainingConfig) -> TrainedModel:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    layers = glorot_mlp(MLP_SIZES, config.seed)
    dense = [
        keras.layers.Dense(
            w.shape[1], activation="tanh" if i < len(layers) - 1 else None, dtype="float64"
        )
        for i, (w, _) in enumerate(layers)
    ]
    network = keras.Sequential([keras.Input(shape=(MLP_SIZES[0],), dtype="float64"), *dense])
    for layer, (w, b) in zip(dense, layers):
        layer.set_weights([w, b])  # Keras kernels are (in, out), as the host draw
    # Keras losses compute in floatx (float32) unless told otherwise.
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype="float64"
    )
    x = tf.constant(data.x_train, dtype=tf.float64)
    y = tf.constant(data.y_train, dtype=tf.int64)
    variables = network.trainable_variables

    def objective() -> Any:
        penalty = tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
        return tf.reduce_mean(loss_fn(y, network(x, training=True))) + 0.5 * config.l2 * penalty

    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, config.adam_steps, alpha=0.01
    )
    optimizer = keras.optimizers.Adam(learning_rate=schedule)

    @tf.function
    def update() -> Any:
        with tf.GradientTape() as tape:
            value = objective()
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
        return value

    with _progress(config, config.adam_steps, "train (Adam)") as bar:
        for _ in range(config.adam_steps):
            update()
            bar.update(1)
    with tf.GradientTape() as tape:
        value = objective()
    gradients = tape.gradient(value, variables)
    gradient_norm = float(tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in gradients])))
    train_predictions = np.argmax(network(x).numpy(), axis=1)
    test_logits = network(tf.constant(data.x_test, dtype=tf.float64)).numpy()
    test_predictions = np.argmax(test_logits, axis=1)

    model = bind_model(network, loss_fn, engine="tensorflow", l2=config.l2)

    def make_batch(features: np.ndarray, labels: np.ndarray) -> Any:
        return tf.constant(features, dtype=tf.float64), tf.constant(labels, dtype=tf.int64)

    return _trained_mlp(
        model,
        make_batch,
        data,
        config,
        optimizer="keras.optimizers.Adam",
        predictions=(train_predictions, test_predictions),
        gradient_norm=gradient_norm,
        framework_version=f"tensorflow {tf.__version__}, keras {keras.__version__}",
    )
