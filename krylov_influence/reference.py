"""The NumPy reference engine: analytic models with exact gradients, HVPs and JVPs.

No autodiff: every operator is written out by hand, so this engine is an independent oracle
for the autodiff engines. Registered as engine ``"numpy"``.

Models
------
:class:`LinearRegression`
    ``ℓ(x, y) = ½ (xᵀw + b − y)² + ½ l2 ‖θ‖²``, ``weight`` (d,), ``bias`` scalar.
:class:`SoftmaxRegression`
    ``ℓ(x, y) = −log softmax(xᵀW + b)_y + ½ l2 ‖θ‖²``, ``weight`` (d, c), ``bias`` (c,).

The L2 term covers every parameter (weight and bias) and is part of every per-example loss,
so the Hessian of a softmax regression is positive definite whenever ``l2 > 0``.

Flat parameter order: ``weight`` in C order, then ``bias``. Equivalently θ is the
(d + 1) × c matrix ``[W; b]`` flattened in C order (c = 1 for linear regression).

Batches are ``(x, y)`` tuples of NumPy arrays: ``x`` (B, d) and ``y`` (B,) (floats for linear
regression, integer class labels for softmax regression). Any re-iterable of batches (a list,
a generator function wrapped in a class, ...) is a dataset.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

import array_api_compat.numpy as np_xp
import numpy as np

from krylov_influence import _xp
from krylov_influence.engine import Engine, EngineCapabilities, InfluenceModel

__all__ = [
    "LinearRegression",
    "NumpyEngine",
    "NumpyInfluenceModel",
    "ReferenceModel",
    "SoftmaxRegression",
]


class ReferenceModel(abc.ABC):
    """A model with analytic derivatives; θ is the (d + 1) × c matrix ``[W; b]``.

    Parameters
    ----------
    weight : array_like, shape (d,) or (d, c)
    bias : array_like, shape () or (c,)
    l2 : float
        Coefficient of ``½ l2 ‖θ‖²`` in every per-example loss.
    """

    def __init__(self, weight: Any, bias: Any, l2: float = 0.0):
        weight = np.asarray(weight)
        dtype = weight.dtype if weight.dtype in (np.float32, np.float64) else np.float64
        self.weight = np.array(weight, dtype=dtype)
        self.bias = np.array(bias, dtype=dtype)
        self.l2 = float(l2)
        if self.l2 < 0 or not np.isfinite(self.l2):
            raise ValueError(f"l2={l2!r}: expected a finite number >= 0")

    @property
    def num_features(self) -> int:
        """``d``, the input dimension."""
        return int(self.weight.shape[0])

    @property
    def parameter_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[("weight", shape), ("bias", shape)]``: the flat order."""
        return [("weight", self.weight.shape), ("bias", self.bias.shape)]

    def flat_parameters(self) -> np.ndarray:
        """θ as one vector, shape (p,): ``weight`` in C order, then ``bias``."""
        return np.concatenate([self.weight.reshape(-1), self.bias.reshape(-1)])

    def theta(self, dtype: Any) -> np.ndarray:
        """θ as the (d + 1) × c matrix ``[W; b]``."""
        classes = self.bias.size
        return self.flat_parameters().astype(dtype).reshape(self.num_features + 1, classes)

    @abc.abstractmethod
    def residuals(self, z: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """``∂ℓ/∂s`` for the scores ``s = z θ``: shape (B, c), without the L2 term."""

    @abc.abstractmethod
    def data_losses(self, z: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Per-example losses without the L2 term, shape (B,)."""

    def curvature(self, z: np.ndarray, theta: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """``(∂²ℓ/∂s²) u`` for score directions ``u`` of shape (m, B, c); same shape."""
        return self.curvature_from(self.curvature_state(z, theta), directions)

    def curvature_state(self, z: np.ndarray, theta: np.ndarray) -> np.ndarray | None:
        """What :meth:`curvature` needs of the batch at θ, computed once (``None``: nothing,
        the curvature is constant)."""
        return None

    @abc.abstractmethod
    def curvature_from(self, state: np.ndarray | None, directions: np.ndarray) -> np.ndarray:
        """:meth:`curvature` from :meth:`curvature_state`'s result."""


class LinearRegression(ReferenceModel):
    """Least squares ``½ (xᵀw + b − y)² + ½ l2 ‖θ‖²``.

    Parameters
    ----------
    weight : array_like, shape (d,)
    bias : float
    l2 : float
    """

    def __init__(self, weight: Any, bias: Any = 0.0, l2: float = 0.0):
        super().__init__(np.asarray(weight).reshape(-1), np.asarray(bias).reshape(()), l2)

    def residuals(self, z: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
        return z @ theta - y.reshape(-1, 1).astype(theta.dtype)

    def data_losses(self, z: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
        return 0.5 * self.residuals(z, y, theta)[:, 0] ** 2

    def curvature_from(self, state: np.ndarray | None, directions: np.ndarray) -> np.ndarray:
        return directions


class SoftmaxRegression(ReferenceModel):
    """Multinomial logistic regression, cross-entropy ``−log softmax(xᵀW + b)_y``.

    Parameters
    ----------
    weight : array_like, shape (d, c)
    bias : array_like, shape (c,)
    l2 : float
    """

    def __init__(self, weight: Any, bias: Any, l2: float = 0.0):
        weight = np.asarray(weight)
        if weight.ndim != 2:
            raise ValueError(f"weight: expected shape (d, c), got {weight.shape}")
        bias = np.asarray(bias).reshape(-1)
        if bias.shape != (weight.shape[1],):
            raise ValueError(f"bias: expected shape ({weight.shape[1]},), got {bias.shape}")
        super().__init__(weight, bias, l2)

    @staticmethod
    def _probabilities(z: np.ndarray, theta: np.ndarray) -> np.ndarray:
        scores = z @ theta
        scores = scores - scores.max(axis=1, keepdims=True)
        e = np.exp(scores)
        return e / e.sum(axis=1, keepdims=True)

    def residuals(self, z: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
        probs = self._probabilities(z, theta)
        probs[np.arange(len(y)), y] -= 1.0
        return probs

    def data_losses(self, z: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
        scores = z @ theta
        top = scores.max(axis=1)
        log_norm = top + np.log(np.exp(scores - top[:, None]).sum(axis=1))
        return log_norm - scores[np.arange(len(y)), y]

    def curvature_state(self, z: np.ndarray, theta: np.ndarray) -> np.ndarray:
        return self._probabilities(z, theta)  # (B, c)

    def curvature_from(self, state: np.ndarray | None, directions: np.ndarray) -> np.ndarray:
        probs = state  # (diag(p) − p pᵀ) u, per example
        weighted = probs * directions
        return weighted - probs * weighted.sum(axis=-1, keepdims=True)


class NumpyInfluenceModel(InfluenceModel):
    """A :class:`ReferenceModel` bound to the NumPy engine (see :class:`InfluenceModel`)."""

    engine_name = "numpy"

    def __init__(self, model: ReferenceModel, dtype: Any = None):
        self.model = model
        name = _xp.dtype_name(dtype if dtype is not None else model.weight.dtype)
        self._dtype = np.dtype(name)
        self._theta = model.theta(self._dtype)
        self._l2 = model.l2

    @property
    def xp(self) -> Any:
        return np_xp

    @property
    def dtype(self) -> Any:
        return self._dtype

    @property
    def device(self) -> Any:
        return "cpu"

    @property
    def host_memory(self) -> bool:
        return True

    @property
    def num_parameters(self) -> int:
        return int(self._theta.size)

    @property
    def capabilities(self) -> EngineCapabilities:
        return EngineCapabilities(float64=True, vectorised_hvp=True, devices=("cpu",))

    @property
    def parameter_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, shape), ...]`` in flat order: ``weight`` (C order), then ``bias``."""
        return self.model.parameter_layout

    def _unpack(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"batch: expected an (x, y) tuple of NumPy arrays, got {type(batch).__name__}"
            )
        x = np.asarray(batch[0], dtype=self._dtype)
        y = np.asarray(batch[1])
        d = self.model.num_features
        if x.ndim != 2 or x.shape[1] != d or y.shape != (x.shape[0],):
            raise ValueError(
                f"batch: expected x of shape (B, {d}) and y of shape (B,), got x {x.shape} "
                f"and y {y.shape}"
            )
        if isinstance(self.model, SoftmaxRegression):
            if not np.issubdtype(y.dtype, np.integer):
                raise TypeError(f"batch: y must hold integer class labels, got {y.dtype}")
            y = y.astype(np.intp)
            classes = int(self._theta.shape[1])
            if y.size and (y.min() < 0 or y.max() >= classes):
                raise ValueError(
                    f"batch: y must hold class labels in [0, {classes}), got "
                    f"{y.min()}..{y.max()} (a negative label would silently wrap)"
                )
        z = np.concatenate([x, np.ones((x.shape[0], 1), dtype=self._dtype)], axis=1)
        return z, y

    def batch_size(self, batch: Any) -> int:
        return int(np.shape(batch[0])[0])

    def stage_batch(self, batch: Any) -> tuple[tuple[np.ndarray, np.ndarray], int]:
        """``((x, y), bytes)``: ``x`` as an array in the model's dtype, ``y`` as an array."""
        self._unpack(batch)  # the same checks as every operator, once
        x, y = np.asarray(batch[0], dtype=self._dtype), np.asarray(batch[1])
        return (x, y), x.nbytes + y.nbytes

    def linearize_batch(self, batch: Any, max_bytes: int) -> tuple[Any, int] | None:
        """``(batch with its curvature at θ, bytes)``: the softmax probabilities (B, c)."""
        z, _ = self._unpack(batch)
        state = self.model.curvature_state(z, self._theta)
        nbytes = z.nbytes + (0 if state is None else state.nbytes)
        if nbytes > max_bytes:
            return None
        return _LinearizedBatch(z, state), nbytes

    def losses(self, batch: Any) -> np.ndarray:
        z, y = self._unpack(batch)
        penalty = 0.5 * self._l2 * float(np.sum(self._theta.astype(np.float64) ** 2))
        return (self.model.data_losses(z, y, self._theta) + penalty).astype(self._dtype)

    def flat_parameters(self) -> np.ndarray:
        return self._theta.reshape(-1).copy()

    def per_example_grads(self, batch: Any) -> np.ndarray:
        z, y = self._unpack(batch)
        resid = self.model.residuals(z, y, self._theta)  # (B, c)
        grads = (z[:, :, None] * resid[:, None, :]).reshape(z.shape[0], -1)
        return grads + self._l2 * self._theta.reshape(1, -1)

    def hvp(self, vector: Any, batches: Iterable[Any]) -> np.ndarray:
        return self.hvps(np.asarray(vector)[None, :], batches)[0]

    def hvps(self, vectors: Any, batches: Iterable[Any]) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=self._dtype)
        mats = vectors.reshape(vectors.shape[0], *self._theta.shape)  # (m, d+1, c)
        total = np.zeros_like(mats)
        count = 0
        for batch in batches:
            if isinstance(batch, _LinearizedBatch):
                z, state = batch.z, batch.state
            else:
                z, _ = self._unpack(batch)
                state = self.model.curvature_state(z, self._theta)
            directions = np.einsum("bd,mdc->mbc", z, mats)
            total += np.einsum("bd,mbc->mdc", z, self.model.curvature_from(state, directions))
            count += z.shape[0]
        if count == 0:
            raise ValueError("batches: the Hessian data is empty")
        return (total / count + self._l2 * mats).reshape(vectors.shape)

    def project(self, projector: Any, batch: Any) -> np.ndarray:
        z, y = self._unpack(batch)
        projector = np.asarray(projector, dtype=self._dtype)
        rows = projector.reshape(projector.shape[0], *self._theta.shape)  # (k, d+1, c)
        resid = self.model.residuals(z, y, self._theta)  # (B, c)
        along = np.einsum("bd,kdc,bc->bk", z, rows, resid, optimize=True)
        return along + self._l2 * (projector @ self._theta.reshape(-1))[None, :]


class _LinearizedBatch:
    """A batch as ``z = [x, 1]`` and its curvature state at θ."""

    __slots__ = ("state", "z")

    def __init__(self, z: np.ndarray, state: np.ndarray | None):
        self.z = z
        self.state = state


class NumpyEngine(Engine):
    """The reference engine for :class:`ReferenceModel` objects (``engine="numpy"``)."""

    name = "numpy"
    framework_modules = ("krylov_influence",)

    @classmethod
    def version(cls) -> str:
        return np.__version__

    @classmethod
    def recognises(cls, model: Any, **options: Any) -> bool:
        return isinstance(model, ReferenceModel)

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
        if not isinstance(model, ReferenceModel):
            raise TypeError(
                "model: the numpy engine takes a krylov_influence.reference model "
                f"(LinearRegression, SoftmaxRegression), got {type(model).__name__}"
            )
        if loss_fn is not None:
            raise ValueError("loss_fn: reference models carry their own loss; pass none")
        if parameters is not None:
            raise ValueError("parameters: the numpy engine always uses all parameters")
        if device not in (None, "cpu"):
            raise ValueError(f"device={device!r}: the numpy engine runs on 'cpu' only")
        if options:
            raise TypeError(f"unexpected options for the numpy engine: {sorted(options)}")
        return NumpyInfluenceModel(model, dtype=dtype)

    @classmethod
    def from_neutral_spec(
        cls, spec: Any, *, dtype: Any = "float64", device: Any = None
    ) -> tuple[InfluenceModel, list[Any]]:
        """Build a spec without hidden layers as a reference model (see ``MLPSpec``)."""
        try:
            reference = spec.reference_model()
        except ValueError as error:
            raise NotImplementedError(f"numpy engine: {error}") from None
        model = cls.bind(reference, dtype=dtype, device=device)
        name = _xp.dtype_name(dtype)
        batches = []
        for x, y in spec.numpy_batches():
            target = y if spec.loss == "cross_entropy" else y[:, 0].astype(name)
            batches.append((x.astype(name), target))
        return model, batches
