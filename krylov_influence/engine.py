"""The contract between the backend-neutral core and an engine.

An *engine* (NumPy reference, PyTorch, JAX, TensorFlow, or a third-party one) turns a user's
model and loss into an :class:`InfluenceModel`: an object that owns the flat view of the chosen
parameters (``p`` numbers, in an order the engine documents) and supplies the few operators the
Arnoldi method needs, on its own device and dtype:

=========================  ===================  =================================================
operator                   shapes               what
=========================  ===================  =================================================
``hvp(v, batches)``        (p,) -> (p,)         Hessian of the *mean* loss over ``batches`` times
                                                ``v`` (batches weighted by their size)
``hvps(V, batches)``       (m, p) -> (m, p)     the same for m vectors (vectorised where possible)
``project(G, batch)``      (k, p) -> (B, k)     per-example ``G @ grad loss(z_b)`` (JVPs or grads)
``per_example_grads(b)``   -> (B, p)            for the exact oracle on small models
``losses(batch)``          -> (B,)              per-example losses (finiteness checks)
``flat_parameters()``      -> (p,)              the chosen parameters as one vector
=========================  ===================  =================================================

The core never looks inside a batch: batches go back to the engine untouched. Every array the
core receives or hands over lives in ``model.xp`` (an array-API namespace), with the model's
``dtype`` and ``device``.

Calling ``InfluenceModel(model, loss_fn, ...)`` on this base class dispatches to the engine
named by ``engine=`` or inferred from the type of ``model`` (see :mod:`krylov_influence.registry`).
"""

from __future__ import annotations

import abc
import hashlib
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from krylov_influence import _xp

__all__ = [
    "Engine",
    "EngineCapabilities",
    "HessianOperator",
    "InfluenceModel",
    "LastArrayCache",
    "ShardedHessianData",
]


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do, declared once per engine.

    Attributes
    ----------
    float64 : bool
        Whether the engine computes in float64 (JAX needs ``jax_enable_x64``).
    vectorised_hvp : bool
        Whether ``hvps`` evaluates several Hessian-vector products in one pass over the data.
    devices : tuple of str
        Device names the engine can place a model on in this process (e.g. ``("cpu",)``).
    """

    float64: bool = True
    vectorised_hvp: bool = False
    devices: tuple[str, ...] = ("cpu",)


class HessianOperator:
    """The Hessian of the mean loss over fixed data, as a symmetric linear operator.

    Parameters
    ----------
    model : InfluenceModel
        The bound model whose ``hvp`` is applied.
    batches : iterable of batches
        The Hessian data. Must be re-iterable: it is traversed once per product.

    Attributes
    ----------
    shape : tuple of int
        ``(p, p)``.
    symmetric : bool
        Always ``True``: Hessians are symmetric, which lets Arnoldi act as Lanczos.
    """

    symmetric: ClassVar[bool] = True

    def __init__(self, model: InfluenceModel, batches: Iterable[Any]):
        self.model = model
        self.batches = batches
        p = model.num_parameters
        self.shape = (p, p)
        self.dtype = model.dtype
        self.device = model.device
        self.xp = model.xp

    def mv(self, v: Any) -> Any:
        """Return ``H @ v``; ``v`` has shape (p,) in the model's namespace."""
        return self.model.hvp(v, self.batches)

    def mm(self, vectors: Any) -> Any:
        """Return ``(H @ V.T).T`` for a stack of vectors ``V`` of shape (m, p)."""
        return self.model.hvps(vectors, self.batches)


class ShardedHessianData(abc.ABC):
    """Hessian data held elsewhere (on the actors of a cluster) that applies its own Hessian.

    Pass one as ``hessian_dataset=`` of :class:`~krylov_influence.ArnoldiInfluenceCalculator`:
    the calculator then asks it for the example count (with the finiteness check), for the
    operator of the Arnoldi iteration, and for the per-example losses that identify the data
    in checkpoints, instead of iterating batches itself. The calculator never stages it
    (the shards are staged where they live). :class:`krylov_influence.ray.RayHessianData` is
    the implementation for Ray.
    """

    @abc.abstractmethod
    def hessian_operator(self, model: InfluenceModel) -> Any:
        """The Hessian of the mean loss over all shards, with ``mv``/``mm`` in ``model``'s
        namespace, dtype and device (the attributes of :class:`HessianOperator`)."""

    @abc.abstractmethod
    def count_examples(self) -> int:
        """Number of examples over all shards, after checking every loss is finite.

        Raises
        ------
        NonFiniteError
            Naming the shard and batch with a non-finite loss.
        ValueError
            If there is no example at all.
        """

    @abc.abstractmethod
    def hessian_losses(self) -> tuple[list[int], np.ndarray]:
        """``(batch sizes, per-example losses (N,) float64)`` in shard order, then batch
        order: the data's identity, as checkpoints record it."""


class _DispatchingMeta(abc.ABCMeta):
    """Calling the abstract base ``InfluenceModel(...)`` builds the engine's subclass."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is InfluenceModel:
            from krylov_influence.registry import bind_model

            return bind_model(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class InfluenceModel(abc.ABC, metaclass=_DispatchingMeta):
    """A model bound to an engine: the flat parameters and the operators over them.

    ``InfluenceModel(model, loss_fn=None, *, parameters=None, engine=None, device=None,
    dtype=None, **engine_options)`` returns the engine's subclass: ``engine`` names the engine
    (``"numpy"``, ``"torch"``, ``"jax"``, ``"tensorflow"`` or a plugin), otherwise it is inferred
    from the type of ``model`` (or of ``params=`` for a JAX ``apply_fn``).

    Parameters
    ----------
    model : object
        The user's model: a ``torch.nn.Module``, a JAX ``apply_fn(params, x)``, a Keras model,
        or a :mod:`krylov_influence.reference` model.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> (B,)`` per-example losses. Reference models carry
        their own loss and take none.
    parameters : optional
        Which parameters to differentiate (names, a predicate, ...; see the engine's docs).
        Default: every trainable parameter.
    engine : str, optional
        Engine name; inferred from ``model`` when omitted.
    device, dtype : optional
        Placement and precision of every array the model hands out.

    Notes
    -----
    Subclasses implement the abstract members; the helpers (``to_numpy``, ``from_numpy``,
    ``fingerprint``, ``hvps``, ``stage_batch``, ``hessian_operator``) have working defaults
    that an engine may override for speed.
    """

    #: Name of the engine this model is bound to.
    engine_name: ClassVar[str] = "abstract"

    # ----------------------------------------------------------------- placement and precision
    @property
    @abc.abstractmethod
    def xp(self) -> Any:
        """The array-API namespace of every array this model hands out."""

    @property
    @abc.abstractmethod
    def dtype(self) -> Any:
        """The floating dtype of parameters and operator outputs, as a ``xp`` dtype."""

    @property
    @abc.abstractmethod
    def device(self) -> Any:
        """The device of parameters and operator outputs, as ``xp`` understands it."""

    @property
    def host_memory(self) -> bool:
        """Whether :attr:`device` keeps its arrays in host memory (a CPU device).

        The calculator then orthogonalises the Krylov basis with NumPy on the host
        (``basis_location="auto"``): the same memory, without a framework dispatch per step.
        Default ``False`` (the basis stays on the device).
        """
        return False

    @property
    @abc.abstractmethod
    def num_parameters(self) -> int:
        """``p``: the length of the flat parameter vector."""

    @property
    def capabilities(self) -> EngineCapabilities:
        """The engine's declared capabilities."""
        return EngineCapabilities()

    @property
    def dtype_name(self) -> str:
        """``"float32"`` or ``"float64"``."""
        return _xp.dtype_name(self.dtype)

    def on_device(self, device: Any) -> InfluenceModel:
        """Return this model placed on ``device`` (``self`` when it already is there).

        Engines that support several devices override this; the default accepts only the
        current device.
        """
        if device is None or str(device) == str(self.device):
            return self
        raise ValueError(
            f"device={device!r}: the {self.engine_name} engine runs this model on "
            f"{self.device!r} only"
        )

    # ----------------------------------------------------------------------------- the data
    @abc.abstractmethod
    def batch_size(self, batch: Any) -> int:
        """Number of examples in ``batch``."""

    @abc.abstractmethod
    def losses(self, batch: Any) -> Any:
        """Per-example losses of ``batch``, shape (B,)."""

    def random_order(self, dataset: Any) -> str | None:
        """Why ``dataset`` yields its examples in another order on every pass, or ``None``.

        Results that are paired with batches or global indices by position (stores of
        influence vectors, top-k indices) need the same order on every pass. Engines whose
        data loaders can shuffle (a PyTorch ``DataLoader`` with a random sampler, a
        ``tf.data`` pipeline that reshuffles each iteration) say so here; the default knows of
        no such dataset.
        """
        return None

    # ------------------------------------------------------------------------ the operators
    @abc.abstractmethod
    def flat_parameters(self) -> Any:
        """The chosen parameters as one vector, shape (p,), in the documented order."""

    @abc.abstractmethod
    def hvp(self, vector: Any, batches: Iterable[Any]) -> Any:
        """Hessian of the mean loss over ``batches`` times ``vector``.

        Parameters
        ----------
        vector : array, shape (p,)
        batches : re-iterable of batches
            Each batch is weighted by its size, so the result is the Hessian of the mean
            per-example loss over all examples, whatever the batch sizes.

        Returns
        -------
        array, shape (p,)
        """

    def hvps(self, vectors: Any, batches: Iterable[Any]) -> Any:
        """Hessian of the mean loss times each row of ``vectors``.

        Parameters
        ----------
        vectors : array, shape (m, p)
        batches : re-iterable of batches

        Returns
        -------
        array, shape (m, p)
            Row ``i`` is ``H @ vectors[i]``. The default calls :meth:`hvp` per row; engines
            that can vectorise over vectors override it (``capabilities.vectorised_hvp``).
        """
        xp = self.xp
        rows = [self.hvp(vectors[i, ...], batches) for i in range(vectors.shape[0])]
        return xp.stack(rows, axis=0)

    @abc.abstractmethod
    def project(self, projector: Any, batch: Any) -> Any:
        """Per-example projected gradients ``G @ grad loss(z_b)``.

        Parameters
        ----------
        projector : array, shape (k, p)
        batch : a batch of B examples

        Returns
        -------
        array, shape (B, k)
            Entry ``(b, i)`` is the directional derivative of example ``b``'s loss along row
            ``i`` of the projector.
        """

    @abc.abstractmethod
    def per_example_grads(self, batch: Any) -> Any:
        """Per-example gradients of the loss, shape (B, p). Meant for small models."""

    def project_with_norms(self, projector: Any, batch: Any) -> tuple[Any, Any]:
        """``(project(projector, batch), squared_gradient_norms(batch))`` from one pass.

        What self-influence with the spectral complement needs. The default forms the (B, p)
        per-example gradients once; engines with a faster projection kernel override it.

        Parameters
        ----------
        projector : array, shape (k, p)
        batch : a batch of B examples

        Returns
        -------
        projected : array, shape (B, k)
        norms : array, shape (B,)
        """
        xp = self.xp
        grads = self.per_example_grads(batch)
        projected = xp.matmul(grads, xp.permute_dims(projector, (1, 0)))
        return projected, xp.sum(grads * grads, axis=1)

    def project_and_losses(self, projector: Any, batch: Any) -> tuple[Any, Any]:
        """``(project(projector, batch), losses(batch))``, from one pass where the engine can.

        What caching or storing influence vectors needs: a store records the per-example
        losses beside the vectors, as the identity of the data (``_identity``). The default
        makes the two calls (a projection, then a forward pass); engines whose projection
        forms per-example gradients take the losses from the same pass (``value_and_grad``),
        which saves the forward pass.

        Parameters
        ----------
        projector : array, shape (k, p)
        batch : a batch of B examples

        Returns
        -------
        projected : array, shape (B, k)
            As :meth:`project`.
        losses : array, shape (B,)
            As :meth:`losses` (the L2 term included), equal to it within round-off.
        """
        return self.project(projector, batch), self.losses(batch)

    def query_gradients(self, batch: Any) -> Any:
        """Per-example gradients of a query batch, in whatever form the engine contracts
        fastest with :meth:`gradient_inner_products` (the spectral complement's ``g_zᵀ g_x``).

        The default is the (B, p) block of :meth:`per_example_grads`; an engine may keep
        parts of it factored (the torch engine keeps ``nn.Linear`` layers as activations and
        output gradients). Only :meth:`project_query_gradients` and
        :meth:`gradient_inner_products` of the same model read the result.
        """
        return self.per_example_grads(batch)

    def project_query_gradients(self, gradients: Any, projector: Any) -> Any:
        """``G g_z`` from :meth:`query_gradients`: shape (B_query, k) for ``projector`` (k, p)."""
        xp = self.xp
        return xp.matmul(gradients, xp.permute_dims(projector, (1, 0)))

    def gradient_inner_products(self, gradients: Any, batch: Any) -> Any:
        """``g_zᵀ g_x`` for every query ``z`` of :meth:`query_gradients` and example ``x`` of
        ``batch``: shape (B_query, B).

        The default projects ``batch`` onto the query gradients as if they were the rows of a
        projector (the engine's projection kernel, JVPs or gradients).
        """
        return self.xp.permute_dims(self.project(gradients, batch), (1, 0))

    def squared_gradient_norms(self, batch: Any) -> Any:
        """``‖∇ℓ_b‖²`` of every example, shape (B,) (for the spectral complement).

        The default squares :meth:`per_example_grads` (a (B, p) block); engines may compute it
        without forming the block.
        """
        grads = self.per_example_grads(batch)
        return self.xp.sum(grads * grads, axis=1)

    def stage_batch(self, batch: Any) -> tuple[Any, int] | None:
        """``batch`` converted once for repeated use, and the bytes it takes.

        The calculator stages its Hessian data with this hook when the data fits its
        ``stage_hessian_data`` budget (see :mod:`krylov_influence._staging`), so that the
        ``subspace_dim`` Hessian-vector products do not convert (or collate) every batch
        again. Engines override it to return the batch as their own arrays on :attr:`device`
        (floating leaves in :attr:`dtype`, integer leaves kept integer), in a form that every
        operator (``hvp``, ``hvps``, ``losses``, ``project``, ...) accepts as a batch at no
        further cost, together with the size of those arrays in bytes.

        Returns
        -------
        (staged_batch, nbytes) or None
            ``None`` (the default): the engine does not stage; the data is streamed.
        """
        return None

    def linearize_batch(self, batch: Any, max_bytes: int) -> tuple[Any, int] | None:
        """A staged batch whose vector-independent passes have run once, kept for products.

        A Hessian-vector product runs the forward pass and the gradient's backward pass,
        which do not depend on the vector, then a second-order pass that does. The
        calculator calls this hook on each batch staged by :meth:`stage_batch`, in order,
        while what they keep fits its ``linearize_hessian_data`` budget (see
        :mod:`krylov_influence._linearizing`); ``hvp`` and ``hvps`` must then accept the
        returned object as a batch, and compute from it the same product as from ``batch``
        with only the vector-dependent pass. No other operator is given it.

        Parameters
        ----------
        batch : a batch returned by :meth:`stage_batch`
        max_bytes : int
            What the engine may keep for this batch. An engine that cannot tell before
            running the passes runs them and returns ``None`` when they keep more.

        Returns
        -------
        (linearized_batch, nbytes) or None
            ``None`` (the default): the engine does not linearise (or not within
            ``max_bytes``); the batch is used as staged.
        """
        return None

    def hessian_operator(self, batches: Iterable[Any]) -> HessianOperator:
        """The Hessian of the mean loss over ``batches`` as an operator with ``mv``.

        ``batches`` may be the user's data or the data staged by :meth:`stage_batch`;
        engines may override this to build a faster operator over either.
        """
        return HessianOperator(self, batches)

    # --------------------------------------------------------------------------- conversion
    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy ``array`` to the host as a NumPy array."""
        return _xp.to_numpy(array, self.xp)

    def from_numpy(self, array: np.ndarray, dtype: Any = None) -> Any:
        """Place a host array on the model's device, in ``dtype`` (default: the model's)."""
        return self.xp.asarray(
            np.asarray(array), dtype=self.dtype if dtype is None else dtype, device=self.device
        )

    def fingerprint(self) -> str:
        """A digest of the parameter count and values, identical across engines.

        The flat parameters are hashed as float64 little-endian bytes, so the same neutral
        model in two engines (same flat order, same values) has the same fingerprint.
        """
        values = np.ascontiguousarray(self.to_numpy(self.flat_parameters()), dtype="<f8")
        digest = hashlib.sha256()
        digest.update(str(values.size).encode())
        digest.update(values.tobytes())
        return digest.hexdigest()[:32]


class LastArrayCache:
    """``derive(array)`` for the last array given, kept while that array lives.

    For an operator called with the same large argument many times, e.g. ``project(G, batch)``
    over every batch of a training set with one projector, whose engine first rearranges
    ``G`` (per parameter, transposed). The entry is keyed by the array's identity and dropped
    when the array is garbage-collected (a weak reference), so a new array that happens to
    reuse a freed one's ``id`` never meets its derived value. Identity is only equality for
    **immutable** arrays (``jax.Array``, TensorFlow's eager tensors): an engine must not
    pass arrays that can change in place (NumPy, torch).

    Parameters
    ----------
    derive : callable
        ``derive(array) -> value``.

    Examples
    --------
    >>> import numpy as np
    >>> calls = []
    >>> cache = LastArrayCache(lambda a: calls.append(1) or a.T.copy())
    >>> a = np.ones((2, 3))  # a NumPy array for the example only: it could change in place
    >>> cache(a).shape, cache(a).shape, len(calls)
    ((3, 2), (3, 2), 1)
    """

    def __init__(self, derive: Callable[[Any], Any]):
        self._derive = derive
        self._entry: tuple[weakref.ref[Any], Any] | None = None

    def __call__(self, array: Any) -> Any:
        entry = self._entry  # one read: another thread may replace it meanwhile
        if entry is not None and entry[0]() is array:
            return entry[1]
        value = self._derive(array)
        try:
            reference = weakref.ref(array, self._forget)
        except TypeError:  # no weak references to this type: nothing is kept
            return value
        self._entry = (reference, value)
        return value

    def _forget(self, reference: weakref.ref[Any]) -> None:
        """The array of ``reference`` is gone: drop its value (unless replaced already)."""
        entry = self._entry
        if entry is not None and entry[0] is reference:
            self._entry = None


class Engine(abc.ABC):
    """A backend, registered under the entry-point group ``krylov_influence.engines``.

    The entry point names a subclass of :class:`Engine`. Importing the module that defines it
    must **not** import the framework: the registry loads every engine to read its name and
    ``framework_modules``, and ``import krylov_influence`` must stay framework-free. Import the
    framework inside :meth:`bind`, :meth:`version` and :meth:`recognises`.

    Attributes
    ----------
    name : str
        The name users pass as ``engine=``.
    framework_modules : tuple of str
        Top-level module names whose objects this engine accepts (``("torch",)``). A model is
        only offered to the engine when one of these modules is already in ``sys.modules``,
        so inference never imports a framework.
    """

    name: ClassVar[str]
    framework_modules: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str:
        """Version string of the framework behind the engine."""

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        """Device names this engine can use in this process."""
        return ("cpu",)

    @classmethod
    @abc.abstractmethod
    def recognises(cls, model: Any, **options: Any) -> bool:
        """Whether ``model`` (with ``options`` such as ``params=``) belongs to this engine.

        Called only when one of :attr:`framework_modules` is already imported.
        """

    @classmethod
    @abc.abstractmethod
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
        """Wrap ``model`` and ``loss_fn`` as this engine's :class:`InfluenceModel`."""

    @classmethod
    def from_neutral_spec(
        cls, spec: Any, *, dtype: Any = "float64", device: Any = None
    ) -> tuple[InfluenceModel, list[Any]]:
        """Build the MLP of a :class:`krylov_influence.testing.MLPSpec` in this engine.

        The conformance suite calls this to compare engines entry by entry: the bound model
        must use the spec's weights and flat order, its loss and ``l2``; the data comes back
        as a list of batches in the engine's own format (one per ``spec.batch_slices()``).

        Returns
        -------
        model : InfluenceModel
        batches : list of batches

        Raises
        ------
        NotImplementedError
            If the engine cannot build this spec (the suite then skips it).
        """
        raise NotImplementedError(f"the {cls.name} engine does not build neutral specs")
