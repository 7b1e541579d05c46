"""Compiled kernels that fall back to a slower, correct route when the fast one cannot compile.

TensorFlow vectorises with ``pfor`` (``tf.vectorized_map``), which has no rule for some ops
(``Conv3D`` in float64), only handles others when a given input is loop invariant (a conv
filter, when the loop runs over tangents of that filter; ``DepthwiseConv2dNative`` wants the
opposite), and forward-mode autodiff fails inside Keras's recurrent ``while_loop``. Which of
these a model meets is only known once its kernel is traced, so each kernel is a list of
routes, fastest first:

- a route is *tried* by tracing it (``get_concrete_function``) on the first call;
- if tracing raises, the next route is traced, and a :class:`RouteFallbackWarning` says once
  which route the kernel now takes and why;
- the route a kernel switched to is kept for every later shape (and retraced for the shapes
  the earlier route had seen); errors at run time (bad data, out of memory) are never a reason
  to switch and propagate unchanged;
- if every route fails, the first route's error is raised (it is usually the user's, e.g. a
  model that does not accept the batch), with the other routes' failures in its notes.

Errors the engine raises on purpose (:class:`EngineError`, e.g. a loss of the wrong shape) are
never retried.

A route may be compiled by XLA (:attr:`Route.jit_compile`). XLA compiles on the first *run*,
not at tracing, so that run is part of the try: an error that names XLA or its compilation
moves the kernel to the next route, like a failed trace (any other error propagates). A route
may also *decline* a traced graph (:attr:`Route.declines`, e.g. XLA before convolutions, which
XLA:CPU runs slower than TensorFlow's own kernels): the next route is taken without a warning,
since nothing failed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from krylov_influence_tf._dispatch import ConcreteCalls

__all__ = ["EngineError", "Kernel", "Route", "RouteFallbackWarning"]


class RouteFallbackWarning(UserWarning):
    """A compiled kernel took a slower fallback route (shown once per kernel and reason)."""


class EngineError(ValueError):
    """An error the engine raises on purpose while tracing; never a reason to fall back."""


@dataclass(frozen=True)
class Route:
    """One way to compute a kernel.

    Attributes
    ----------
    name : str
        The name :attr:`Kernel.route` reports.
    function : callable
        The Python function, compiled with ``tf.function(reduce_retracing=True)``.
    jit_compile : bool
        Compile it with XLA (``tf.function(jit_compile=True)``).
    declines : callable, optional
        ``declines(concrete_function) -> str | None``: a reason not to take this route for the
        traced graph (the next one is taken, silently), or ``None`` to take it.
    reduce_retracing : bool
        ``tf.function``'s own option (default ``True``): a second shape of an argument is
        traced with that dimension unknown. ``False`` for a route whose graph needs every
        shape known (it traces once per shape).
    """

    name: str
    function: Callable[..., Any]
    jit_compile: bool = False
    declines: Callable[[Any], str | None] | None = None
    reduce_retracing: bool = True


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What XLA's errors say when it cannot compile a graph (unsupported ops, dynamic shapes).
_XLA_FAILURE = re.compile(r"XLA|compil|jit", re.IGNORECASE)
# The line that says why a trace failed: pfor's own messages, else the exception's last line.
_REASONS = re.compile(
    r"(No pfor vectorization defined for \w+"
    r"|Input \S+ of op '\w+' expected to be (?:not )?loop invariant"
    r"|`dtype` <dtype: '\w+'> is not compatible with [^.]*)"
)


def _reason(error: BaseException) -> str:
    """Why a route failed, in one line, without TensorFlow's op dumps and trace frames."""
    text = _ANSI.sub("", str(error))
    match = _REASONS.search(text)
    if match is not None:
        return match.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:200]


def _engine_error(error: BaseException) -> EngineError | None:
    """The :class:`EngineError` behind ``error``, if any.

    Autograph re-raises errors from nested ``tf.function`` traces (``tf.vectorized_map``
    traces its body as one) as a ``StagingError`` whose message names the original, so both
    the exception chain and the message are searched.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, EngineError):
            return seen
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"EngineError: (.*)", _ANSI.sub("", str(error)))
    return EngineError(match.group(1).strip()) if match else None


def _drop(record: logging.LogRecord) -> bool:
    return False


@contextlib.contextmanager
def _quiet_tensorflow_logger(quiet: bool) -> Iterator[None]:
    """Silence TensorFlow's Python logger while a route that may fail is traced.

    pfor logs every op it cannot convert (with its whole NodeDef) before raising; when a
    fallback follows, that is noise. The last route is traced with the logger as it was. (A
    filter, not ``setLevel``: setting a level clears every logger's cache, on every call.)
    """
    if not quiet:
        yield
        return
    logger = tf.get_logger()
    logger.addFilter(_drop)
    try:
        yield
    finally:
        logger.removeFilter(_drop)


class Kernel:
    """A ``tf.function`` with fallback routes, chosen by the first successful trace.

    Parameters
    ----------
    name : str
        The operator's name in notes and :attr:`route` reports (``"hvps"``).
    routes : sequence of Route or (str, callable)
        The routes, fastest first; a ``(name, function)`` pair is a plain :class:`Route`.
    fallback : (str, callable), optional
        A last route that is called as it is, not traced here: a Python function that composes
        other kernels (e.g. per-example gradients in chunks of examples).
    """

    def __init__(
        self,
        name: str,
        routes: Sequence[Route | tuple[str, Callable[..., Any]]],
        fallback: tuple[str, Callable[..., Any]] | None = None,
    ):
        if not routes:
            raise ValueError("routes: expected at least one route")
        self.name = name
        traced = [r if isinstance(r, Route) else Route(*r) for r in routes]
        self._routes = traced + ([Route(*fallback)] if fallback is not None else [])
        self._index = 0
        self._compiled = [
            ConcreteCalls(
                tf.function(
                    r.function,
                    reduce_retracing=r.reduce_retracing,
                    jit_compile=True if r.jit_compile else None,
                )
            )
            for r in traced
        ]
        # After a call has succeeded, calls skip the tracing check (a second signature
        # lookup, ~90 us); a failing call goes through the check again.
        self._settled = False

    @property
    def route(self) -> str:
        """The name of the route this kernel takes (the first one until a trace fails)."""
        return self._routes[self._index].name

    def experimental_get_tracing_count(self) -> int:
        """Traces of every route so far (for tests of retracing)."""
        return sum(fn.experimental_get_tracing_count() for fn in self._compiled)

    def __call__(self, *args: Any) -> Any:
        if self._settled:
            try:
                return self._call_route(args)
            except Exception:
                self._settled = False  # a new signature that fails to trace takes the next route
        result = self._checked_call(args)
        self._settled = True
        return result

    def _call_route(self, args: tuple[Any, ...]) -> Any:
        if self._index == len(self._compiled):
            return self._routes[self._index].function(*args)
        return self._compiled[self._index](*args)

    def _checked_call(self, args: tuple[Any, ...]) -> Any:
        failures: list[tuple[str, BaseException]] = []
        while True:
            route = self._routes[self._index]
            if self._index == len(self._compiled):  # the Python-level fallback
                return route.function(*args)
            function = self._compiled[self._index]
            try:
                with _quiet_tensorflow_logger(self._index + 1 < len(self._routes)):
                    concrete = function.get_concrete_function(*args)  # once per signature
            except Exception as error:  # any failure to trace means "take the next route"
                own = _engine_error(error)
                if own is not None:  # the engine's own error (e.g. the loss shape): no retry
                    raise own from None
                self._next_route(failures, error)
                continue
            if route.declines is not None and route.declines(concrete) is not None:
                # A choice, not a failure: no warning. The routes after it that share the test
                # are skipped untraced (it asks about the model, e.g. its convolutions).
                while self._routes[self._index].declines is route.declines:
                    self._index += 1
                continue
            if not route.jit_compile:
                return function(*args)
            try:
                return function(*args)  # XLA compiles on the first run
            except Exception as error:
                if _engine_error(error) is not None or not _XLA_FAILURE.search(str(error)):
                    raise
                self._next_route(failures, error)

    def _next_route(self, failures: list[tuple[str, BaseException]], error: Exception) -> None:
        """Record the current route's failure and move to the next route, with a warning
        (or raise the first failure when no route is left)."""
        failures.append((self.route, error))
        if self._index + 1 == len(self._routes):
            raise self._exhausted(failures) from None
        self._index += 1
        warnings.warn(
            f"krylov_influence tensorflow engine: {self.name} cannot take the route "
            f"'{failures[-1][0]}' for this model ({_reason(error)}); it takes "
            f"'{self.route}' instead, which is correct but may be slower",
            RouteFallbackWarning,
            stacklevel=5,
        )

    def _exhausted(self, failures: list[tuple[str, BaseException]]) -> BaseException:
        first = failures[0][1]
        add_note = getattr(first, "add_note", None)
        if add_note is not None:  # Python >= 3.11
            for route, error in failures[1:]:
                add_note(f"{self.name}, route '{route}' also failed: {_reason(error)}")
        return first
