"""The compiled operators: losses, HVPs, JVP projections, per-example gradients.

A bound model's static part is a :class:`Program`: the user's ``apply_fn`` and ``loss_fn`` and
the parameter layout. Programs compare by the identity of the two functions and the value of
the layout. Each program has one :class:`Kernels`, its operators as ``jax.jit`` closures over
the program (never the program as a static argument of module-level functions: JAX keeps the
static arguments of a module-level ``jax.jit`` in its cache for the life of the process, and
with them the user's functions, whatever they close over and one compiled executable per
shape, so a process binding many models grew without bound).

:func:`kernels` hands out the :class:`Kernels` of a program from a weak cache: the models
bound to the program hold it, the cache does not. So

- rebinding the same functions while a model bound to them is alive (another dtype or device,
  ``on_device``, a perturbed copy of the parameters, other ``l2``) reuses what was compiled
  (a program is traced once per distinct input shape and dtype);
- when the last such model is garbage-collected, its compiled executables go, and with them
  the references to ``apply_fn``, ``loss_fn`` and the layout. Binding the functions again
  afterwards compiles again.

The parameters, fixed leaves, data and ``l2`` are arguments, never closed over, so large
arrays are not baked into the compiled programs as constants.

The L2 term is added analytically: ``+l2·v`` to HVPs, ``+l2·θ`` to gradients, ``+l2·(Gθ)`` to
projections. Matrix products are traced under ``jax.default_matmul_precision("highest")`` so
float32 is not computed in TF32/bfloat16 passes on GPUs and TPUs.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from krylov_influence_jax._params import ParameterLayout

__all__ = ["Kernels", "Program", "kernels"]

_HIGHEST = "highest"


def _identity(function: Callable[..., Any]) -> Any:
    """What makes two callables the same for sharing compiled programs.

    The object itself, except a bound method: ``module.apply`` is a new object on every
    attribute access, so two of them are the same callable when they bind the same function
    to the same object (both held by the program, so the ids stay theirs).
    """
    if isinstance(function, types.MethodType):
        return ("method", id(function.__self__), id(function.__func__))
    return id(function)


class Program:
    """The static part of a bound model: ``loss_fn(apply_fn(params, x), y)`` and the layout.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x) -> outputs``, pure.
    loss_fn : callable
        ``loss_fn(outputs, y) -> (B,)`` per-example losses.
    layout : ParameterLayout

    Two programs are equal when their functions are the same objects (a bound method: the
    same function bound to the same object) and their layouts are equal.
    """

    __slots__ = ("apply_fn", "layout", "loss_fn")

    def __init__(self, apply_fn: Callable[..., Any], loss_fn: Callable[..., Any], layout: Any):
        self.apply_fn = apply_fn
        self.loss_fn = loss_fn
        self.layout: ParameterLayout = layout

    def __eq__(self, other: object) -> bool:
        # Functions by identity: equal code in two closures may capture different constants.
        return (
            isinstance(other, Program)
            and _identity(self.apply_fn) == _identity(other.apply_fn)
            and _identity(self.loss_fn) == _identity(other.loss_fn)
            and self.layout == other.layout
        )

    def __hash__(self) -> int:
        return hash((_identity(self.apply_fn), _identity(self.loss_fn), self.layout))

    def data_losses(self, theta: Any, fixed: Any, x: Any, y: Any) -> Any:
        """Per-example losses without the L2 term, shape (B,); checks the loss's shape."""
        return self.leaf_losses(self.layout.unravel(theta), fixed, x, y).astype(theta.dtype)

    def leaf_losses(self, leaves: Any, fixed: Any, x: Any, y: Any) -> Any:
        """:meth:`data_losses` of the selected leaves (flat order) rather than of θ."""
        with jax.default_matmul_precision(_HIGHEST):
            params = self.layout.rebuild_from_leaves(leaves, fixed)
            values = self.loss_fn(self.apply_fn(params, x), y)
        size = jax.tree_util.tree_leaves(x)[0].shape[0]
        shape = getattr(values, "shape", None)
        if shape == ():
            raise ValueError(
                "loss_fn: returned a scalar; the jax engine needs per-example losses of shape "
                "(B,), e.g. optax.softmax_cross_entropy_with_integer_labels(logits, y) "
                "without the mean"
            )
        if shape != (size,):
            raise ValueError(
                f"loss_fn: expected per-example losses of shape ({size},) for a batch of "
                f"{size}, got shape {shape}"
            )
        return values.astype(leaves[0].dtype)


def _penalty(theta: Any, l2: Any) -> Any:
    with jax.default_matmul_precision(_HIGHEST):
        return 0.5 * l2 * jnp.vdot(theta, theta)


def _losses(program: Program, theta: Any, fixed: Any, x: Any, y: Any, l2: Any) -> Any:
    """Per-example losses including ``½·l2·‖θ‖²``, shape (B,)."""
    return program.data_losses(theta, fixed, x, y) + _penalty(theta, l2)


def _hvp_sum(program: Program, theta: Any, fixed: Any, x: Any, y: Any, v: Any) -> Any:
    """``Σ_b ∇²ℓ_b v`` over the batch (no L2), forward-over-reverse.

    Differentiated with respect to the leaves, not the flat θ, as :func:`_leaf_grads_and_losses`
    is: through the flat θ, the gradient of an embedding lookup was scattered into the (p,)
    vector and its tangent with it (the benchmark transformer's HVP: 1.20x the same HVP over
    the leaves, in one process, one CPU thread).
    """
    layout = program.layout

    def total_loss(leaves: Any) -> Any:
        return jnp.sum(program.leaf_losses(leaves, fixed, x, y))

    product = jax.jvp(jax.grad(total_loss), (layout.unravel(theta),), (layout.unravel(v),))[1]
    return jnp.concatenate([leaf.reshape(-1) for leaf in product])


def _hvps_sum(program: Program, theta: Any, fixed: Any, x: Any, y: Any, vectors: Any) -> Any:
    """``_hvp_sum`` for each row of ``vectors`` (m, p), vectorised."""
    one = functools.partial(_hvp_sum, program, theta, fixed, x, y)
    return jax.vmap(one)(vectors)


def _linearize_sum(program: Program, theta: Any, fixed: Any, x: Any, y: Any) -> Any:
    """The linear map ``v ↦ Σ_b ∇²ℓ_b v`` over the batch, as ``jax.linearize`` of the
    gradient leaves it: a ``jax.tree_util.Partial`` holding the residuals of the forward and
    gradient passes, applied by :func:`_linear_apply`. Its function is part of the output's
    tree structure, which ``jax.jit`` traces once per shape, so every batch of that shape
    returns the same function and the application compiles once."""
    layout = program.layout

    def total_loss(leaves: Any) -> Any:
        return jnp.sum(program.leaf_losses(leaves, fixed, x, y))

    return jax.linearize(jax.grad(total_loss), layout.unravel(theta))[1]


def _linear_apply(program: Program, linear: Any, v: Any) -> Any:
    """``linear`` of :func:`_linearize_sum` applied to ``v`` (p,): ``_hvp_sum`` of its batch."""
    with jax.default_matmul_precision(_HIGHEST):  # as the passes it continues
        product = linear(program.layout.unravel(v))
    return jnp.concatenate([leaf.reshape(-1) for leaf in product])


def _linear_apply_many(program: Program, linear: Any, vectors: Any) -> Any:
    """:func:`_linear_apply` of each row of ``vectors`` (m, p), vectorised."""
    return jax.vmap(functools.partial(_linear_apply, program, linear))(vectors)


def _finish(total: Any, count: Any, v: Any, l2: Any) -> Any:
    """The mean Hessian product from the sum over ``count`` examples, plus ``l2·v``."""
    return total / count + l2 * v


def _project_and_losses(
    program: Program, theta: Any, fixed: Any, x: Any, y: Any, G: Any, l2: Any, *, chunk: int
) -> tuple[Any, Any]:
    """``(B, k)`` directional derivatives of each example's loss along the rows of ``G``, and
    the ``(B,)`` losses (L2 included) of the same forward pass."""
    # linearize evaluates the forward pass once; only the tangent map is vectorised over k.
    values, tangent = jax.linearize(lambda t: program.data_losses(t, fixed, x, y), theta)
    if chunk >= G.shape[0]:
        along = jax.vmap(tangent, out_axes=1)(G)  # (B, k) directly, no transpose
    else:
        along = lax.map(tangent, G, batch_size=chunk).T
    with jax.default_matmul_precision(_HIGHEST):
        return along + l2 * (G @ theta)[None, :], values + _penalty(theta, l2)


def _project(
    program: Program, theta: Any, fixed: Any, x: Any, y: Any, G: Any, l2: Any, *, chunk: int
) -> Any:
    """The projections of :func:`_project_and_losses` (XLA drops the unused losses)."""
    return _project_and_losses(program, theta, fixed, x, y, G, l2, chunk=chunk)[0]


def _projector_blocks(program: Program, G: Any, theta: Any, l2: Any) -> tuple[list[Any], Any, Any]:
    """What :func:`_gradient_project_and_losses` needs of a projector, built once for all
    the batches it projects:
    ``G``'s columns of each parameter leaf, transposed ([(p_l, k)]), ``l2·Gθ`` (k,) and the
    losses' L2 term ``½·l2·‖θ‖²``.

    Sliced here, not inside the projection: XLA:CPU copies a slice of ``G`` at every call, and
    on the benchmark transformer (k = 20, p = 525 828, 38 leaves) the products of the sliced
    ``G`` took 0.52 s a training pass against 0.14 s for these blocks (one CPU thread).
    """
    blocks = [G[:, start:stop].T for start, stop in program.layout.spans]
    return (blocks, *_projector_offsets(G, theta, l2))


def _projector_offsets(G: Any, theta: Any, l2: Any) -> tuple[Any, Any]:
    """The L2 terms of :func:`_projector_blocks`: ``l2·Gθ`` (k,) and ``½·l2·‖θ‖²``."""
    with jax.default_matmul_precision(_HIGHEST):
        return l2 * (G @ theta), _penalty(theta, l2)


def _example_chunks(tree: Any, *, step: int, count: int) -> list[Any]:
    """``count`` chunks of ``step`` examples (axis 0 of every leaf), the last one padded with
    copies of the last example, so that every chunk has one shape.

    One program for the whole split: sliced and padded by eager operations, each operation
    was compiled on its own (a dozen small programs, 0.5 s of the benchmark transformer's
    first self-influence, one CPU thread).
    """

    def padded(leaf: Any) -> Any:
        extra = step * count - leaf.shape[0]
        if extra:
            leaf = jnp.concatenate([leaf, jnp.repeat(leaf[-1:], extra, axis=0)], axis=0)
        return leaf.reshape(count, step, *leaf.shape[1:])

    whole = jax.tree_util.tree_map(padded, tree)
    return [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], whole) for i in range(count)]


def _joined_chunks(parts: list[Any], *, size: int) -> Any:
    """The chunks' outputs (each a tree of arrays with examples on axis 0) joined, the padded
    examples past ``size`` dropped: the inverse of :func:`_example_chunks`."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves, axis=0)[:size], *parts)


def _gradient_project_and_losses(
    program: Program,
    theta: Any,
    fixed: Any,
    x: Any,
    y: Any,
    blocks: list[Any],
    offset: Any,
    penalty: Any,
) -> tuple[Any, Any]:
    """``(B, k)`` projections and ``(B,)`` losses (L2 included) of one pass of per-example
    gradients, one array per parameter leaf (:func:`_leaf_grads_and_losses`), with a
    projector's :func:`_projector_blocks`: ``Σ_l g_l (B, p_l) @ block_l + l2·Gθ``, no flat
    (B, p) block.

    The gradients pass an optimisation barrier before the products: without it XLA:CPU ran
    the benchmark digits MLP's training projection at 18.9 ms against 6.3 ms, the transformer's
    alike (0.74 s both), the CNN's at 2.09 s against 1.99 s (one CPU thread).
    """
    gradients, values = jax.lax.optimization_barrier(
        _leaf_grads_and_losses(program, theta, fixed, x, y)
    )
    size = gradients[0].shape[0]
    with jax.default_matmul_precision(_HIGHEST):
        projected = offset[None, :]
        for gradient, block in zip(gradients, blocks):
            projected = projected + gradient.reshape(size, -1) @ block
    return projected, values + penalty


def _gradient_project_with_norms(
    program: Program, theta: Any, fixed: Any, x: Any, y: Any, G: Any, l2: Any
) -> tuple[Any, Any]:
    """``(B, k)`` projections and ``(B,)`` squared gradient norms, in one program."""
    gradients = _per_example_grads(program, theta, fixed, x, y, l2)
    with jax.default_matmul_precision(_HIGHEST):
        return gradients @ G.T, jnp.sum(gradients * gradients, axis=1)


def _leaf_grads_and_losses(
    program: Program, theta: Any, fixed: Any, x: Any, y: Any
) -> tuple[list[Any], Any]:
    """Per-example gradients (no L2), one (B, *shape) array per selected leaf, and the (B,)
    losses (no L2) they are the gradients of, by ``vmap(value_and_grad)``.

    Differentiated with respect to the leaves, not the flat θ: with an embedding table the
    gradient with respect to θ scattered every example's rows into a (B, p) buffer, 6x
    slower than these per-leaf gradients on the benchmark transformer (one CPU thread).
    """
    leaves = program.layout.unravel(theta)

    def one(xi: Any, yi: Any) -> Any:
        # The model sees a batch of one: apply_fn and loss_fn keep their batched contract.
        xb = jax.tree_util.tree_map(lambda leaf: leaf[None], xi)
        yb = jax.tree_util.tree_map(lambda leaf: leaf[None], yi)
        return jax.value_and_grad(lambda ls: program.leaf_losses(ls, fixed, xb, yb)[0])(leaves)

    values, gradients = jax.vmap(one)(x, y)
    return list(gradients), values


def _leaf_grads(program: Program, theta: Any, fixed: Any, x: Any, y: Any) -> list[Any]:
    """The gradients of :func:`_leaf_grads_and_losses`."""
    return _leaf_grads_and_losses(program, theta, fixed, x, y)[0]


def _per_example_grads(program: Program, theta: Any, fixed: Any, x: Any, y: Any, l2: Any) -> Any:
    """Per-example gradients including ``l2·θ``, shape (B, p), by ``vmap(grad)``."""
    grads = _leaf_grads(program, theta, fixed, x, y)
    size = grads[0].shape[0]
    flat = jnp.concatenate([g.reshape(size, -1) for g in grads], axis=1)
    return flat + l2 * theta[None, :]


class Kernels:
    """The compiled operators of one :class:`Program`; get it from :func:`kernels`.

    Each operator is ``jax.jit`` of the module's function with the program bound by
    ``functools.partial``, so the compiled executables live in the jitted callable's own cache
    and go when this object does (JAX's global caches hold jitted functions weakly). The
    callables close over the program and never over this object, so no reference cycle keeps
    it alive past its last model.

    Attributes
    ----------
    program : Program
    losses : ``(θ (p,), fixed, x, y, l2) -> (B,)``
        Per-example losses including ``½·l2·‖θ‖²``.
    hvp_sum : ``(θ, fixed, x, y, v (p,)) -> (p,)``
        ``Σ_b ∇²ℓ_b v`` over the batch, without L2 (see ``finish``).
    hvps_sum : ``(θ, fixed, x, y, vectors (m, p)) -> (m, p)``
        ``hvp_sum`` of each row, vectorised.
    linearize_sum : ``(θ, fixed, x, y) -> linear``
        The batch's ``v ↦ Σ_b ∇²ℓ_b v`` with its residuals (a ``jax.tree_util.Partial``).
    linear_apply : ``(linear, v (p,)) -> (p,)``
        ``hvp_sum`` of that batch from its residuals alone.
    linear_apply_many : ``(linear, vectors (m, p)) -> (m, p)``
        ``linear_apply`` of each row, vectorised.
    finish : ``(total (p,) or (m, p), count, v, l2) -> same shape``
        The mean Hessian product from the sum over ``count`` examples, plus ``l2·v``.
    project : ``(θ, fixed, x, y, G (k, p), l2, *, chunk) -> (B, k)``
        ``G ∇ℓ_b`` by JVPs, ``chunk`` rows of ``G`` vectorised at once (static).
    project_and_losses : ``(θ, fixed, x, y, G (k, p), l2, *, chunk) -> ((B, k), (B,))``
        The same and the losses (L2 included) of its forward pass.
    projector_blocks : ``(G (k, p), θ, l2) -> ([(p_l, k)], (k,), ())``
        ``G`` split per parameter leaf and transposed, ``l2·Gθ`` and ``½·l2·‖θ‖²``.
    projector_offsets : ``(G (k, p), θ, l2) -> ((k,), ())``
        ``l2·Gθ`` and ``½·l2·‖θ‖²`` alone (the blocks split on the host).
    example_chunks : ``(tree, *, step, count) -> [tree]``
        ``count`` chunks of ``step`` examples, the last padded with the last example.
    joined_chunks : ``([tree], *, size) -> tree``
        The chunks' outputs joined, cut to ``size`` examples.
    gradient_project_and_losses : ``(θ, fixed, x, y, blocks, l2·Gθ, ½·l2·‖θ‖²) -> ((B, k), (B,))``
        ``G ∇ℓ_b`` by per-example gradients times ``Gᵀ`` (one projector's blocks), and the
        losses (L2 included) of the same pass.
    gradient_project_with_norms : ``(θ, fixed, x, y, G (k, p), l2) -> ((B, k), (B,))``
        The projections and the squared gradient norms.
    per_example_grads : ``(θ, fixed, x, y, l2) -> (B, p)``
        Per-example gradients including ``l2·θ``.
    """

    __slots__ = (
        "__weakref__",
        "example_chunks",
        "finish",
        "gradient_project_and_losses",
        "gradient_project_with_norms",
        "hvp_sum",
        "hvps_sum",
        "joined_chunks",
        "linear_apply",
        "linear_apply_many",
        "linearize_sum",
        "losses",
        "per_example_grads",
        "program",
        "project",
        "project_and_losses",
        "projector_blocks",
        "projector_offsets",
    )

    def __init__(self, program: Program):
        self.program = program
        bound = functools.partial
        self.losses = jax.jit(bound(_losses, program))
        self.hvp_sum = jax.jit(bound(_hvp_sum, program))
        self.hvps_sum = jax.jit(bound(_hvps_sum, program))
        self.linearize_sum = jax.jit(bound(_linearize_sum, program))
        self.linear_apply = jax.jit(bound(_linear_apply, program))
        self.linear_apply_many = jax.jit(bound(_linear_apply_many, program))
        # No program in it, but compiled per shape of θ, which the program fixes: a module-level
        # jitted function would keep an executable per p for the life of the process. A partial
        # of its own, since JAX's tracing caches are keyed (weakly) by the function object.
        self.finish = jax.jit(bound(_finish))
        self.projector_offsets = jax.jit(bound(_projector_offsets))
        self.example_chunks = jax.jit(bound(_example_chunks), static_argnames=("step", "count"))
        self.joined_chunks = jax.jit(bound(_joined_chunks), static_argnames=("size",))
        self.project = jax.jit(bound(_project, program), static_argnames=("chunk",))
        self.project_and_losses = jax.jit(
            bound(_project_and_losses, program), static_argnames=("chunk",)
        )
        self.gradient_project_and_losses = jax.jit(bound(_gradient_project_and_losses, program))
        self.projector_blocks = jax.jit(bound(_projector_blocks, program))
        self.gradient_project_with_norms = jax.jit(bound(_gradient_project_with_norms, program))
        self.per_example_grads = jax.jit(bound(_per_example_grads, program))


# Program -> its Kernels, held weakly: the models bound to a program keep its Kernels alive,
# and when the last one goes the entry (and the key's strong references to the user's
# functions) goes with it. A key is a Program compared by the identity of its functions,
# which stay alive as long as the entry does, so an id is never reused while it is a key.
_KERNELS: weakref.WeakValueDictionary[Program, Kernels] = weakref.WeakValueDictionary()
_KERNELS_LOCK = threading.Lock()


def kernels(program: Program) -> Kernels:
    """The :class:`Kernels` of ``program``: the live one of an equal program, else a new one.

    Parameters
    ----------
    program : Program

    Returns
    -------
    Kernels
        Shared by every model bound to an equal program while one of them is alive; the
        caller must hold it (the cache does not).
    """
    with _KERNELS_LOCK:  # two threads binding the same functions get one Kernels
        found = _KERNELS.get(program)
        if found is None:
            found = Kernels(program)
            _KERNELS[program] = found
        return found
