"""Exceptions raised by krylov_influence."""

from __future__ import annotations

__all__ = [
    "EngineNotFoundError",
    "IncompatibleStoreError",
    "NegativeEigenvalueWarning",
    "NonFiniteError",
]


class NonFiniteError(FloatingPointError):
    """An operator returned NaN or Inf; the message names the stage and the batch."""


class EngineNotFoundError(LookupError):
    """No engine by that name, or none recognises the model; the message lists the installed."""


class IncompatibleStoreError(ValueError):
    """A saved file (influence vectors, results, a fitted calculator) does not match the model,
    the eigenbasis or the dtype it is used with, or is not a krylov_influence archive at all.
    The message names the argument, the path and what differs."""


class NegativeEigenvalueWarning(UserWarning):
    """Kept eigenvalues plus damping are negative: the Hessian is indefinite on the kept
    subspace (a model not at a minimum, or a saddle), so influence along those directions has
    the opposite sign. The message gives the damping that makes the kept spectrum positive."""
