"""Operators that fall back to a slower, exact route when the fast one fails for a model.

``torch.func`` vectorises with ``vmap`` and differentiates forward with ``jvp``; some standard
layers meet kernels that cannot take one of them:

- recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) run fused ``_VF`` kernels that have no
  ``vmap`` batching rule, so per-example gradients cannot be vectorised over examples;
- in float32 on CPU, ``nn.LSTM`` runs oneDNN's ``mkldnn_rnn_layer``, which has no forward-mode
  derivative (and ``vmap`` runs it in a slow Python-level loop);
- ``nn.MultiheadAttention`` in eval mode takes a fused fast path
  (``_native_multi_head_attention``) with no forward-mode derivative, and scaled dot-product
  attention dispatches to flash-attention kernels with neither a forward-mode nor a second
  derivative (no Hessian at all) nor a batching rule;
- on GPUs, cuDNN's recurrent kernels have no second derivative.

Which of these a model meets is only known when an operator first runs, so each operator is a
list of routes, fastest first:

- on the first call, routes are *tried* in order; a route that raises, or that makes ``vmap``
  warn that it runs a kernel in a loop ("performance drop ... batching rule"), is passed over;
- the first route that succeeds is kept for every later call on this bound model, and one
  :class:`RouteFallbackWarning` says which route the operator takes instead of the first, and
  why; after that, errors propagate unchanged (bad data is never a reason to switch);
- if every route fails, the first route's error is raised (it is usually the user's, e.g. a
  module that does not accept the batch), with the other routes' failures in its notes.

Errors the engine raises on purpose (:class:`EngineError`, e.g. a loss of the wrong shape) and
running out of memory are never retried.

Most fallbacks run under :func:`composite_kernels`: the same layers computed by PyTorch's
reference (composite) kernels, which every autodiff transform supports.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "EngineError",
    "Operator",
    "RouteFallbackWarning",
    "composite_kernels",
    "never_retried",
]


class RouteFallbackWarning(UserWarning):
    """An operator took a slower fallback route for this model (shown once per operator)."""


class EngineError(Exception):
    """Mixed into the errors the engine raises on purpose; never a reason to fall back."""


class EngineValueError(EngineError, ValueError):
    """A ``ValueError`` of the engine's own (e.g. per-example losses of the wrong shape)."""


class EngineTypeError(EngineError, TypeError):
    """A ``TypeError`` of the engine's own (e.g. a loss that returns no tensor)."""


_SLOW_VMAP = re.compile(r"performance drop because we have not yet implemented the batching rule")
_KERNEL = re.compile(r"(aten::\w+(?:\.\w+)?)")


class _NoBatchingRule(RuntimeError):
    """``vmap`` ran a kernel in a Python-level loop: a slow route, passed over for the next."""


def _reason(error: BaseException) -> str:
    """Why a route failed, in one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


@contextlib.contextmanager
def composite_kernels() -> Iterator[None]:
    """Run layers with PyTorch's composite kernels, which every autodiff transform supports.

    Turns off oneDNN (``mkldnn``) and cuDNN, the fused fast path of
    ``nn.MultiheadAttention``, and every scaled-dot-product-attention backend but the math
    one; restores each setting afterwards. (The private setters: the public ``flags``
    context managers also reset TF32 settings and warn about them on every call.)
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mkldnn = torch._C._get_mkldnn_enabled()
    cudnn = torch._C._get_cudnn_enabled()
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    torch._C._set_mkldnn_enabled(False)
    torch._C._set_cudnn_enabled(False)
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
        torch._C._set_cudnn_enabled(cudnn)
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def never_retried(error: BaseException) -> bool:
    """Errors that no other route would avoid (out of memory, an interrupt, the engine's own
    refusals): raised at once, not taken as a reason to fall back."""
    return isinstance(error, (EngineError, torch.OutOfMemoryError, MemoryError, KeyboardInterrupt))


class Operator:
    """An operator with fallback routes, chosen by the first call that succeeds.

    Parameters
    ----------
    name : str
        The operator's name in notes and in ``model.routes`` (``"hvps"``).
    routes : sequence of (str, callable)
        ``(route name, function)`` pairs, fastest first; each takes the operator's arguments.
    """

    def __init__(self, name: str, routes: Sequence[tuple[str, Callable[..., Any]]]):
        if not routes:
            raise ValueError("routes: expected at least one route")
        self.name = name
        self._routes = list(routes)
        self._index = 0
        self._settled = False

    @property
    def route(self) -> str:
        """The name of the route this operator takes (the first one until it fails)."""
        return self._routes[self._index][0]

    @property
    def is_fallback(self) -> bool:
        """Whether a call has made this operator leave its first route."""
        return self._index > 0

    def __call__(self, *args: Any) -> Any:
        if self._settled:
            return self._routes[self._index][1](*args)
        failures: list[tuple[str, BaseException]] = []
        while True:
            last = self._index + 1 == len(self._routes)
            try:
                result, passed_on = self._try(self._routes[self._index][1], args, not last)
            except Exception as error:  # any failure on the first call: take the next route
                if never_retried(error):
                    raise
                failures.append((self.route, error))
                if last:
                    raise self._exhausted(failures) from None
                self._index += 1
                continue
            self._settled = True
            for warning in passed_on:  # the route is kept: its other warnings are the user's
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
            if failures:
                warnings.warn(
                    f"krylov_influence torch engine: {self.name} cannot take the route "
                    f"'{failures[0][0]}' for this model ({_reason(failures[0][1])}); it takes "
                    f"'{self.route}' instead, which is exact but may be slower",
                    RouteFallbackWarning,
                    stacklevel=4,
                )
            return result

    @staticmethod
    def _try(
        function: Callable[..., Any], args: tuple[Any, ...], strict: bool
    ) -> tuple[Any, list[warnings.WarningMessage]]:
        """Call ``function``; with ``strict``, a ``vmap`` loop over a kernel is a failure.

        Returns the result and the warnings to pass on once the route is kept.
        """
        if not strict:
            return function(*args), []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = function(*args)
        for warning in caught:
            text = str(warning.message)
            if _SLOW_VMAP.search(text):
                kernel = _KERNEL.search(text)
                raise _NoBatchingRule(
                    f"vmap has no batching rule for {kernel.group(1) if kernel else 'a kernel'}"
                )
        unique = {(w.category, str(w.message)): w for w in caught}  # "always" repeats them
        return result, list(unique.values())

    def _exhausted(self, failures: list[tuple[str, BaseException]]) -> BaseException:
        first = failures[0][1]
        add_note = getattr(first, "add_note", None)
        if add_note is not None:  # Python >= 3.11
            for route, error in failures[1:]:
                add_note(f"{self.name}, route '{route}' also failed: {_reason(error)}")
        return first
