"""Exceptions raised by krylov_influence."""

from __future__ import annotations

__all__ = ["EngineNotFoundError", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """An operator returned NaN or Inf; the message names the stage and the batch."""


class EngineNotFoundError(LookupError):
    """No engine by that name, or none recognises the model; the message lists the installed."""
