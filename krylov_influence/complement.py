"""The spectral complement: one value for the discarded spectrum instead of none.

Truncation keeps k Ritz pairs and drops everything else: ``H⁻¹ ≈ Gᵀ diag(1/(λ+δ)) G``. The
dropped directions are where the method loses most of its accuracy (REFERENCE.md §1). The
complement gives them a single eigenvalue ``c``, an isotropic remainder:

    H⁻¹ ≈ Gᵀ diag(1/(λ+δ)) G + (I − GᵀG) / (c + δ)

so a score gains the term ``(g_zᵀ g_x − (G g_z)ᵀ (G g_x)) / (c + δ)``: self-influence needs
``‖g_x‖²``, pairwise scores the inner products of query and training gradients.

``c`` is the **mean discarded eigenvalue**, from the trace: ``tr H = Σ_all λ``, so
``c = (tr H − Σ_kept λ) / (p − k)``. The trace is split along the Krylov basis ``Q`` (n × p)
of the fit, Hutch++-style: ``tr H = tr(Q H Qᵀ) + tr(P H P)`` with ``P = I − QᵀQ``. The first
term is exactly the trace of the Hessenberg matrix (the sum of all n Ritz values); the second
is estimated by Hutchinson's method on Rademacher probes deflated by ``Q``
(``m`` Hessian-vector products, one vectorised pass where the engine has one), whose sample
standard deviation gives the standard error of ``c``. When ``n = p`` the deflated part is
empty and ``c`` is exact; when ``k = p`` there is no complement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence import _xp
from krylov_influence._host_basis import HostBasis

__all__ = ["COMPLEMENTS", "SpectralComplement", "estimate_mean_discarded", "resolve_complement"]

#: Accepted strings for ``complement=``; a number ``c ≥ 0`` is accepted too.
COMPLEMENTS: tuple[str, ...] = ("none", "mean")


@dataclass(frozen=True)
class SpectralComplement:
    """The value given to the discarded spectrum, and how it was found.

    Attributes
    ----------
    value : float
        ``c``, undamped: the discarded directions are inverted as ``1 / (c + δ)``.
    method : {"mean", "given"}
        Estimated as the mean discarded eigenvalue, or given by the user.
    trace : float or None
        The estimate of ``tr H`` (``"mean"`` only).
    stderr : float or None
        Standard error of ``c`` from the Hutchinson samples (0 when the Krylov basis spans
        the whole space; ``"mean"`` only).
    probes : int
        Hessian-vector products spent on the estimate.
    """

    value: float
    method: str
    trace: float | None = None
    stderr: float | None = None
    probes: int = 0

    def weight(self, damping: float) -> float:
        """``1 / (c + δ)``, the inverse the discarded directions get."""
        return 1.0 / (self.value + damping)


def resolve_complement(value: Any) -> str | float:
    """``"none"``, ``"mean"`` or a finite ``c ≥ 0``; ``ValueError`` naming ``complement``."""
    if isinstance(value, str):
        if value not in COMPLEMENTS:
            raise ValueError(
                f"complement={value!r}: expected one of {COMPLEMENTS} or a number c >= 0"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"complement={value!r}: expected one of {COMPLEMENTS} or a number c >= 0")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"complement={value!r}: expected one of {COMPLEMENTS} or a number c >= 0")
    return number


def estimate_mean_discarded(
    operator: Any,
    basis: Any,
    spectrum: np.ndarray,
    kept: np.ndarray,
    *,
    probes: int,
    seed: int,
    xp: Any,
    device: Any,
    to_numpy: Any,
) -> SpectralComplement:
    """Estimate ``c``, the mean eigenvalue of the Hessian outside the kept Ritz pairs.

    Parameters
    ----------
    operator : HessianOperator
        ``mm(V)`` applies the Hessian to the rows of ``V``.
    basis : array, shape (n, p), or HostBasis
        The orthonormal Krylov basis of the fit, in the working dtype (on the device, or on
        the host / on disk).
    spectrum : numpy.ndarray, shape (n,)
        Every Ritz value (their sum is ``tr(Q H Qᵀ)``).
    kept : numpy.ndarray, shape (k,)
        The kept eigenvalues.
    probes : int
        ``m``, Rademacher probes of the deflated trace (``m ≥ 2`` for a standard error).
    seed : int
        Seed of the probes' host generator (the same probes in every engine).
    xp, device, to_numpy
        The model's namespace, device and host conversion.

    Returns
    -------
    SpectralComplement
    """
    n, p = int(basis.shape[0]), int(basis.shape[1])
    k = int(kept.shape[0])
    if k >= p:
        return SpectralComplement(0.0, "mean", float(np.sum(spectrum)), 0.0, 0)
    krylov_trace = float(np.sum(spectrum))
    samples = np.zeros(0)
    if n < p:
        rng = np.random.default_rng([seed, 0x636F6D70])  # its own stream: not the start vector
        signs = rng.integers(0, 2, size=(probes, p)).astype(np.float64) * 2.0 - 1.0
        if isinstance(basis, HostBasis):  # deflate on the host, over column blocks
            z_host = signs.astype(basis.dtype)
            deflated = z_host - basis.left_multiply(basis.right_multiply(z_host))
            w = xp.asarray(deflated, dtype=getattr(xp, _xp.dtype_name(basis.dtype)), device=device)
        else:
            z = xp.asarray(signs, dtype=basis.dtype, device=device)
            coefficients = xp.matmul(z, xp.permute_dims(basis, (1, 0)))  # (m, n)
            w = z - xp.matmul(coefficients, basis)  # deflated probes, (m, p)
        hw = operator.mm(w)
        samples = np.asarray(to_numpy(xp.sum(w * hw, axis=1)), dtype=np.float64)
        if not np.isfinite(samples).all():
            raise FloatingPointError("complement: the trace probes gave non-finite values")
    rest = float(np.mean(samples)) if samples.size else 0.0
    spread = float(np.std(samples, ddof=1) / math.sqrt(samples.size)) if samples.size > 1 else 0.0
    trace = krylov_trace + rest
    value = (trace - float(np.sum(kept))) / (p - k)
    return SpectralComplement(value, "mean", trace, spread / (p - k), int(samples.size))
