"""Save and load a fitted :class:`~krylov_influence.ArnoldiInfluenceCalculator`.

The format is an ``.npz`` archive (readable by ``numpy.load``, no pickle), written atomically
(temporary file in the same directory, then :func:`os.replace`):

========================  ==========================  ======================================
member                    shape, dtype                what
========================  ==========================  ======================================
``eigenvalues.npy``       (k,), float64               kept eigenvalues λ, undamped
``projector.npy``         (k, p), working dtype       ``G``; rows are Ritz vectors
``ritz_vectors.npy``      (n, k), float64             Ritz coordinates in the Krylov basis
``ritz_residuals.npy``    (k,), float64               ``|β y_{n,i}|`` per kept pair
``ritz_spectrum.npy``     (n,), float64               every Ritz value, by decreasing |λ|
``metadata.json``         JSON                        settings and provenance (below)
========================  ==========================  ======================================

``metadata.json`` holds ``kind`` (``"calculator"``), ``version``, the model ``fingerprint``
(:meth:`InfluenceModel.fingerprint`), ``num_parameters`` (p), the ``engine`` and model dtype it
was fitted with, the working ``dtype``, and every setting: ``subspace_dim``,
``k_largest_eig_vals``, ``force_hermitian``, ``damping``, ``seed``, ``block_size``,
``eigenvalue_selection``, ``num_hessian_examples``, plus the Arnoldi diagnostics
(``arnoldi_restarts``, ``orthogonality_loss``, ``residual_norm``).

Loading refuses a model whose parameter count or fingerprint differs. The engine may differ:
a basis fitted with PyTorch loads into JAX on the same neutral model (same flat order and
values, hence the same fingerprint).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from krylov_influence import _xp
from krylov_influence.cache import ArchiveReader, AtomicArchiveWriter, resolve_path
from krylov_influence.eigen import EigenBasis, RitzPairs
from krylov_influence.engine import InfluenceModel
from krylov_influence.errors import IncompatibleStoreError
from krylov_influence.registry import bind_model

__all__ = ["load_calculator", "save_calculator"]

KIND = "calculator"
VERSION = 1


def save_calculator(calculator: Any, path: Any) -> str:
    """Write ``calculator``'s fitted state and settings to ``path`` (see the module docs).

    Parameters
    ----------
    calculator : ArnoldiInfluenceCalculator
    path : str or os.PathLike
        A file path, or an existing directory (the file is then ``calculator.npz``).

    Returns
    -------
    str
        The file written.
    """
    target = resolve_path(path, "calculator")
    model: InfluenceModel = calculator.model
    basis: EigenBasis = calculator.eigenbasis
    metadata = {
        "kind": KIND,
        "version": VERSION,
        "fingerprint": model.fingerprint(),
        "num_parameters": int(model.num_parameters),
        "engine": model.engine_name,
        "model_dtype": model.dtype_name,
        "dtype": calculator.dtype,
        "subspace_dim": int(calculator.subspace_dim),
        "k_largest_eig_vals": int(calculator.k_largest_eig_vals),
        "force_hermitian": bool(calculator.force_hermitian),
        "damping": float(calculator.damping),
        "seed": int(calculator.seed),
        "block_size": int(calculator.block_size),
        "eigenvalue_selection": calculator.eigenvalue_selection,
        "num_hessian_examples": int(calculator.num_hessian_examples),
        "arnoldi_restarts": [int(r) for r in basis.arnoldi_restarts],
        "orthogonality_loss": basis.orthogonality_loss,
        "residual_norm": float(basis.residual_norm),
    }
    with AtomicArchiveWriter(target) as writer:
        writer.write_array("eigenvalues", np.asarray(basis.eigenvalues, dtype=np.float64))
        writer.write_array("projector", model.to_numpy(basis.projector))
        writer.write_array("ritz_vectors", np.asarray(basis.ritz.vectors, dtype=np.float64))
        writer.write_array("ritz_residuals", np.asarray(basis.ritz.residuals, dtype=np.float64))
        writer.write_array("ritz_spectrum", np.asarray(basis.ritz.spectrum, dtype=np.float64))
        writer.write_json("metadata", metadata)
    return target


def load_calculator(
    cls: Any,
    path: Any,
    model: Any,
    *,
    train_dataset: Iterable[Any] | None = None,
    hessian_dataset: Iterable[Any] | None = None,
    show_progress: bool | None = None,
) -> Any:
    """Rebuild a calculator of class ``cls`` from ``path`` on ``model`` without refitting.

    Raises
    ------
    IncompatibleStoreError
        If ``path`` is not a saved calculator, or ``model``'s parameter count or fingerprint
        differs from the fitted model's.
    """
    target = resolve_path(path, "calculator")
    reader = ArchiveReader(target, "path")
    meta = reader.metadata
    if meta.get("kind") != KIND or meta.get("version") != VERSION:
        raise IncompatibleStoreError(
            f"path={target!r}: not a saved calculator (kind {meta.get('kind')!r}, version "
            f"{meta.get('version')!r})"
        )
    bound = bind_model(model)
    p = int(bound.num_parameters)
    if p != int(meta["num_parameters"]):
        raise IncompatibleStoreError(
            f"model: has p = {p} parameters, but the calculator in {target!r} was fitted on a "
            f"model with p = {meta['num_parameters']}"
        )
    fingerprint = bound.fingerprint()
    if fingerprint != meta["fingerprint"]:
        raise IncompatibleStoreError(
            f"model: its parameter values differ from those the calculator in {target!r} was "
            f"fitted on (fingerprint {fingerprint} != {meta['fingerprint']}; fitted with the "
            f"{meta['engine']} engine in {meta['model_dtype']}); load it onto the same model"
        )
    calculator = cls.__new__(cls)
    calculator._configure(
        bound,
        train_dataset,
        hessian_dataset,
        dtype=meta["dtype"],
        force_hermitian=meta["force_hermitian"],
        k_largest_eig_vals=meta["k_largest_eig_vals"],
        subspace_dim=meta["subspace_dim"],
        damping=meta["damping"],
        seed=meta["seed"],
        block_size=int(meta.get("block_size", 1)),  # files from before block Arnoldi
        eigenvalue_selection=meta["eigenvalue_selection"],
        show_progress=show_progress,
    )
    calculator.num_hessian_examples = int(meta["num_hessian_examples"])
    eigenvalues = reader.read_array("eigenvalues")
    projector = reader.read_array("projector")
    k = int(meta["k_largest_eig_vals"])
    if eigenvalues.shape != (k,) or projector.shape != (k, p):
        raise IncompatibleStoreError(
            f"path={target!r}: malformed calculator (eigenvalues {eigenvalues.shape}, "
            f"projector {projector.shape}, expected ({k},) and ({k}, {p}))"
        )
    xp = bound.xp
    placed = bound.from_numpy(projector, dtype=getattr(xp, _xp.dtype_name(meta["dtype"])))
    ritz = RitzPairs(
        eigenvalues=eigenvalues,
        vectors=reader.read_array("ritz_vectors"),
        residuals=reader.read_array("ritz_residuals"),
        spectrum=reader.read_array("ritz_spectrum"),
    )
    calculator._set_eigenbasis(
        EigenBasis(
            eigenvalues=eigenvalues,
            damping=float(meta["damping"]),
            projector=placed,
            ritz=ritz,
            arnoldi_restarts=tuple(meta["arnoldi_restarts"]),
            orthogonality_loss=meta["orthogonality_loss"],
            residual_norm=float(meta["residual_norm"]),
        )
    )
    return calculator
