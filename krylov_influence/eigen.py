"""Eigen-reduction of the Arnoldi Hessenberg matrix: Ritz pairs, selection, projector, damping.

The Hessenberg matrix ``H_n = Q A Qᵀ`` (n × n, float64, on the host) is diagonalised, ``k``
Ritz pairs ``(λ_i, y_i)`` are kept, and the projector ``G = Yᵀ Q`` (k × p) is formed in the
operator's namespace. Its rows are Ritz vectors: orthonormal approximate eigenvectors of
``A``, so that ``A⁻¹ ≈ Gᵀ diag(1/(λ+δ)) G`` on the kept subspace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from krylov_influence._host_basis import HostBasis, HostProjector, RowFile
from krylov_influence.arnoldi import ArnoldiResult

__all__ = [
    "EIGENVALUE_SELECTIONS",
    "EigenBasis",
    "RitzPairs",
    "build_eigenbasis",
    "ritz_pairs",
    "select_eigenpairs",
]

EigenvalueSelection = Literal["magnitude", "positive", "algebraic"]
#: ``magnitude``: largest |λ| (the paper, default); ``positive``: largest λ > 0 only;
#: ``algebraic``: largest λ.
EIGENVALUE_SELECTIONS: tuple[str, ...] = ("magnitude", "positive", "algebraic")


@dataclass(frozen=True)
class RitzPairs:
    """Kept Ritz pairs of a Hessenberg matrix.

    Attributes
    ----------
    eigenvalues : numpy.ndarray, shape (k,), float64
        Kept Ritz values (undamped), in selection order (largest key first).
    vectors : numpy.ndarray, shape (n, k), float64
        Unit-norm coordinates of the kept Ritz vectors in the Krylov basis; the entry of
        largest magnitude of each column is positive (deterministic signs).
    residuals : numpy.ndarray, shape (k,), float64
        ``|β · y_{n,i}|``: the norm of ``A v_i − λ_i v_i`` for each Ritz pair.
    spectrum : numpy.ndarray, shape (n,), float64
        Every Ritz value of ``H_n``, sorted by decreasing magnitude (for spectrum plots).
    """

    eigenvalues: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    spectrum: np.ndarray


@dataclass(frozen=True)
class EigenBasis:
    """The fitted low-rank inverse Hessian ``Gᵀ diag(1/(λ+δ)) G``.

    Attributes
    ----------
    eigenvalues : numpy.ndarray, shape (k,), float64
        Kept eigenvalues of the Hessian, undamped.
    damping : float
        δ, added to every kept eigenvalue.
    projector : array, shape (k, p)
        ``G``, in the model's namespace, dtype and device; rows are Ritz vectors.
    ritz : RitzPairs
        The kept pairs with residuals, and the whole Ritz spectrum.
    arnoldi_restarts : tuple of int
        Iterations at which the Arnoldi iteration restarted after a breakdown.
    orthogonality_loss : float or None
        ``max |Q Qᵀ − I|`` of the Krylov basis.
    residual_norm : float
        ``β``, the final Arnoldi residual norm.
    complement : SpectralComplement or None
        The value given to the discarded spectrum (:mod:`krylov_influence.complement`), or
        ``None`` for plain truncation.
    """

    eigenvalues: np.ndarray
    damping: float
    projector: Any
    ritz: RitzPairs
    arnoldi_restarts: tuple[int, ...] = ()
    orthogonality_loss: float | None = None
    residual_norm: float = 0.0
    complement: Any = None

    @property
    def damped_eigenvalues(self) -> np.ndarray:
        """``λ + δ``, shape (k,): the eigenvalues the influence formula inverts."""
        return self.eigenvalues + self.damping

    @property
    def negative_count(self) -> int:
        """How many kept ``λ + δ`` are negative (an indefinite Hessian on the kept subspace)."""
        return int(np.count_nonzero(self.damped_eigenvalues < 0))

    @property
    def positive_damping(self) -> float:
        """The smallest damping that makes every kept ``λ + δ`` positive: ``max(0, −min λ)``.

        Any damping above it (e.g. twice it) removes the negative weights; ``0.0`` when the
        kept spectrum is already positive.
        """
        return float(max(0.0, -float(np.min(self.eigenvalues)))) if self.rank else 0.0

    @property
    def inverse_eigenvalues(self) -> np.ndarray:
        """``1 / (λ + δ)``, shape (k,), float64."""
        return 1.0 / self.damped_eigenvalues

    @property
    def rank(self) -> int:
        """``k``, the number of kept eigenpairs."""
        return int(self.eigenvalues.shape[0])


def ritz_pairs(
    hessenberg: np.ndarray,
    residual_norm: float,
    k: int,
    *,
    force_hermitian: bool,
    selection: EigenvalueSelection = "magnitude",
    complex_rtol: float = 1e-6,
    residual_gram: np.ndarray | None = None,
    residual_columns: tuple[int, ...] = (),
) -> RitzPairs:
    """Diagonalise ``hessenberg`` and keep ``k`` Ritz pairs.

    Parameters
    ----------
    hessenberg : numpy.ndarray, shape (n, n)
    residual_norm : float
        ``β`` from the Arnoldi iteration (for the per-pair residuals).
    k : int
        Number of pairs to keep, ``1 ≤ k ≤ n``.
    force_hermitian : bool
        Symmetrise ``(H + Hᵀ)/2`` and use ``eigh`` (recommended: the Hessian is symmetric).
        Otherwise use the general ``eig``.
    selection : {"magnitude", "positive", "algebraic"}
        Which pairs to keep; see :data:`EIGENVALUE_SELECTIONS`.
    complex_rtol : float
        With ``force_hermitian=False``: imaginary parts above ``complex_rtol · max|λ|`` are
        an error (the matrix is not numerically symmetric); smaller ones are round-off and
        the symmetric part is used instead.
    residual_gram : numpy.ndarray, shape (r, r), optional
    residual_columns : tuple of int, length r
        Block Arnoldi's residual rows
        (:attr:`~krylov_influence.arnoldi.ArnoldiResult.residual_gram`): the residual of the
        pair with coordinates ``s`` is then ``sqrt(s_Cᵀ R Rᵀ s_C)`` over those columns,
        instead of ``β |s_n|``.

    Returns
    -------
    RitzPairs

    Raises
    ------
    ValueError
        On a bad ``k`` or ``selection``, a genuinely complex spectrum, or when
        ``selection="positive"`` finds fewer than ``k`` positive Ritz values.
    """
    n = int(hessenberg.shape[0])
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(
            f"k_largest_eig_vals={k!r}: expected an integer with 1 <= k_largest_eig_vals <= "
            f"subspace_dim = {n}"
        )
    if selection not in EIGENVALUE_SELECTIONS:
        raise ValueError(
            f"eigenvalue_selection={selection!r}: expected one of {EIGENVALUE_SELECTIONS}"
        )
    h = np.asarray(hessenberg, dtype=np.float64)
    if force_hermitian:
        values, vectors = np.linalg.eigh(0.5 * (h + h.T))
    else:
        values, vectors = _real_eig(h, complex_rtol)

    keep = select_eigenpairs(values, k, selection)
    kept_vectors = vectors[:, keep]
    kept_vectors = kept_vectors / np.linalg.norm(kept_vectors, axis=0, keepdims=True)
    pivots = np.argmax(np.abs(kept_vectors), axis=0)
    signs = np.sign(kept_vectors[pivots, np.arange(kept_vectors.shape[1])])
    kept_vectors = kept_vectors * np.where(signs == 0, 1.0, signs)
    if residual_gram is None:
        residuals = np.abs(residual_norm * kept_vectors[-1, :])
    else:
        rows = kept_vectors[list(residual_columns), :]
        squares = np.einsum("ik,ij,jk->k", rows, residual_gram, rows)
        residuals = np.sqrt(np.maximum(squares, 0.0))
    spectrum = values[np.argsort(-np.abs(values), kind="stable")]
    return RitzPairs(values[keep], kept_vectors, residuals, spectrum)


def select_eigenpairs(values: np.ndarray, k: int, selection: EigenvalueSelection) -> np.ndarray:
    """Indices of the ``k`` eigenvalues to keep, best first.

    Parameters
    ----------
    values : numpy.ndarray, shape (n,)
    k : int
    selection : {"magnitude", "positive", "algebraic"}

    Returns
    -------
    numpy.ndarray of int, shape (k,)
    """
    if selection == "magnitude":
        order = np.argsort(-np.abs(values), kind="stable")
    elif selection == "algebraic":
        order = np.argsort(-values, kind="stable")
    else:
        order = np.argsort(-values, kind="stable")
        positives = int(np.count_nonzero(values > 0))
        if positives < k:
            raise ValueError(
                f"k_largest_eig_vals={k}: eigenvalue_selection='positive' found only "
                f"{positives} positive Ritz values; lower k_largest_eig_vals or use "
                "'magnitude'"
            )
    return order[:k]


def _real_eig(h: np.ndarray, complex_rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """General ``eig`` of a real matrix whose spectrum must be real."""
    values, vectors = np.linalg.eig(h)
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    largest_imag = float(np.max(np.abs(values.imag))) if values.size else 0.0
    if largest_imag > complex_rtol * scale:
        raise ValueError(
            f"force_hermitian=False: the Hessenberg matrix has complex eigenvalues (largest "
            f"imaginary part {largest_imag:.3g}, relative {largest_imag / scale:.3g}); the "
            "operator is not symmetric to working precision. Use force_hermitian=True."
        )
    if largest_imag > 0.0:
        # Round-off pairs: their real parts are a double eigenvalue, whose conjugate
        # eigenvectors have no real orthonormal basis. The symmetric part gives one.
        return np.linalg.eigh(0.5 * (h + h.T))
    return values.real, vectors.real


def build_eigenbasis(
    result: ArnoldiResult,
    k: int,
    *,
    force_hermitian: bool,
    selection: EigenvalueSelection = "magnitude",
    damping: float = 0.0,
    xp: Any,
    device: Any = None,
) -> EigenBasis:
    """Keep ``k`` Ritz pairs of an Arnoldi result and form ``G = Yᵀ Q``.

    Parameters
    ----------
    result : ArnoldiResult
    k : int
        Number of eigenpairs (``k_largest_eig_vals``).
    force_hermitian, selection
        As in :func:`ritz_pairs`.
    damping : float
        δ ≥ 0 added to the kept eigenvalues.
    xp, device
        Namespace and device of the projector (those of ``result.basis``).

    Returns
    -------
    EigenBasis

    Raises
    ------
    ValueError
        If ``damping`` is negative or not finite, or a kept ``λ + δ`` is zero to working
        precision (the inverse does not exist: add damping).
    """
    if not (isinstance(damping, (int, float, np.floating)) and math.isfinite(damping)):
        raise ValueError(f"damping={damping!r}: expected a finite number >= 0")
    if damping < 0:
        raise ValueError(f"damping={damping!r}: expected a finite number >= 0")
    pairs = ritz_pairs(
        result.hessenberg,
        result.residual_norm,
        k,
        force_hermitian=force_hermitian,
        selection=selection,
        residual_gram=result.residual_gram,
        residual_columns=result.residual_columns,
    )
    damped = pairs.eigenvalues + float(damping)
    scale = max(float(np.max(np.abs(pairs.spectrum))), float(damping))
    tiny = 1e3 * float(np.finfo(np.float64).eps) * scale
    if scale == 0.0 or np.any(np.abs(damped) <= tiny):
        raise ValueError(
            f"k_largest_eig_vals={k}: a kept eigenvalue plus damping ({damping}) is zero, so "
            "the Hessian is singular on the kept subspace; pass damping > 0 or keep fewer "
            "eigenvalues"
        )
    basis = result.basis
    projector: Any
    if isinstance(basis, HostBasis):  # off the device: G = Yᵀ Q over column blocks on the host
        # G stays where the basis is: in host memory, or in a file beside the basis file.
        k_rows = pairs.vectors.shape[1]
        target: Any = None
        if basis.path is not None:
            target = RowFile(
                basis.path + ".G.npy", (k_rows, basis.shape[1]), basis.dtype, create=True
            )
        projector = HostProjector(
            basis.left_multiply(pairs.vectors.T, out=target),
            None if target is None else target.path,
        )
    else:
        coords = xp.asarray(pairs.vectors.T.copy(), dtype=basis.dtype, device=device)
        projector = xp.matmul(coords, basis)
    return EigenBasis(
        eigenvalues=pairs.eigenvalues,
        damping=float(damping),
        projector=projector,
        ritz=pairs,
        arnoldi_restarts=result.restarts,
        orthogonality_loss=result.orthogonality_loss,
        residual_norm=result.residual_norm,
    )
