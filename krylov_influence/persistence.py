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
was fitted with, the working ``dtype``, ``hessian_data`` (``"train_dataset"`` or
``"hessian_dataset"``: which data the Hessian was fitted on), the spectral complement
(``complement_setting``, ``complement_probes`` and ``complement``: the fitted ``c`` with its
method, trace estimate, standard error and probes, or ``null``), and every setting:
``subspace_dim``, ``k_largest_eig_vals``, ``force_hermitian``, ``damping``, ``seed``,
``block_size``, ``eigenvalue_selection``, ``num_hessian_examples``, plus the Arnoldi
diagnostics (``arnoldi_restarts``, ``orthogonality_loss``, ``residual_norm``).

Loading validates every field and member (types, ranges, shapes and dtypes against the
metadata, finiteness) and refuses a model whose parameter count, fingerprint or precision
differs, or whose Hessian the kept Ritz pairs do not fit (the check of
:func:`krylov_influence._identity.check_hessian_agreement`, on the Hessian data). The engine
may differ: a basis fitted with PyTorch loads into JAX on the same neutral model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import numpy as np

from krylov_influence import _xp
from krylov_influence._archive import ArchiveReader, AtomicArchiveWriter
from krylov_influence._host_basis import HostProjector, RowFile
from krylov_influence._identity import check_hessian_agreement
from krylov_influence.cache import finite_number, resolve_path
from krylov_influence.complement import SpectralComplement, resolve_complement
from krylov_influence.eigen import EIGENVALUE_SELECTIONS, EigenBasis, RitzPairs
from krylov_influence.engine import InfluenceModel
from krylov_influence.errors import IncompatibleStoreError
from krylov_influence.registry import bind_model

__all__ = ["load_calculator", "save_calculator"]

KIND = "calculator"
# 2: hessian_data says which data the Hessian check at load needs.
# 3: the spectral complement (complement_setting, complement_probes, complement).
VERSION = 3


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
        "hessian_data": calculator.hessian_argument,
        "complement_setting": calculator.complement,
        "complement_probes": int(calculator.complement_probes),
        "complement": None if basis.complement is None else asdict(basis.complement),
        "arnoldi_restarts": [int(r) for r in basis.arnoldi_restarts],
        "orthogonality_loss": basis.orthogonality_loss,
        "residual_norm": float(basis.residual_norm),
    }
    with AtomicArchiveWriter(target) as writer:
        writer.write_array("eigenvalues", np.asarray(basis.eigenvalues, dtype=np.float64))
        projector = basis.projector
        host = projector.to_numpy() if isinstance(projector, HostProjector) else projector
        writer.write_array("projector", model.to_numpy(host))
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
    check_model: bool = True,
    show_progress: bool | None = None,
    projector_location: str = "device",
) -> Any:
    """Rebuild a calculator of class ``cls`` from ``path`` on ``model`` without refitting.

    ``projector_location="disk"`` leaves ``G`` in the file and reads its rows in place when
    projecting (one checking pass over it at load, in 64 MiB chunks), instead of reading
    ``k × p`` numbers into memory and onto the device.

    Raises
    ------
    IncompatibleStoreError
        If ``path`` is not a valid saved calculator, or ``model`` is not the fitted model:
        another parameter count, parameter values, precision, or Hessian (the check needs the
        Hessian data; see :func:`krylov_influence._identity.check_hessian_agreement`).
    ValueError
        If ``check_model`` and no Hessian data is given.
    """
    target = resolve_path(path, "calculator")
    reader = ArchiveReader(target, "path")
    try:
        meta = _validated_metadata(reader.metadata)
    except (KeyError, TypeError, ValueError) as error:
        raise reader.error(f"not a valid saved calculator ({error})") from None
    bound = bind_model(model)
    p = int(bound.num_parameters)
    if p != meta["num_parameters"]:
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
    if bound.dtype_name != meta["model_dtype"]:
        raise IncompatibleStoreError(
            f"model: computes in {bound.dtype_name}, but the calculator in {target!r} was "
            f"fitted on a {meta['model_dtype']} model; bind the model in {meta['model_dtype']}"
        )
    k, dtype = meta["k_largest_eig_vals"], meta["dtype"]
    eigenvalues = reader.read_array("eigenvalues", shape=(k,), dtypes=("float64",))
    if projector_location not in ("device", "disk"):
        raise ValueError(f"projector_location={projector_location!r}: expected 'device' or 'disk'")
    projector: Any
    if projector_location == "disk":
        offset, found = reader.locate_array("projector", shape=(k, p), dtypes=(dtype,))
        projector = HostProjector(RowFile.in_place(target, offset, (k, p), found))
    else:
        projector = reader.read_array("projector", shape=(k, p), dtypes=(dtype,))
    residuals = reader.read_array("ritz_residuals", shape=(k,), dtypes=("float64",))
    vectors = reader.read_array("ritz_vectors", dtypes=("float64",))
    spectrum = reader.read_array("ritz_spectrum", dtypes=("float64",))
    n = spectrum.shape[0] if spectrum.ndim == 1 else -1
    if not k <= n <= meta["subspace_dim"] or vectors.shape != (n, k):
        raise reader.error(
            f"malformed calculator (Ritz spectrum {spectrum.shape}, Ritz vectors "
            f"{vectors.shape}, k = {k}, subspace_dim = {meta['subspace_dim']})"
        )
    checked = [("projector", projector)] if projector_location == "device" else []
    for name, array in (
        ("eigenvalues", eigenvalues),
        *checked,
        ("ritz_residuals", residuals),
        ("ritz_vectors", vectors),
        ("ritz_spectrum", spectrum),
    ):
        if not np.isfinite(array).all():
            raise reader.error(f"member {name!r} holds non-finite values")
    if (residuals < 0).any():
        raise reader.error("member 'ritz_residuals' holds negative residuals")
    damped = eigenvalues + meta["damping"]
    if (damped == 0).any():
        raise reader.error("a kept eigenvalue plus the damping is zero (influence undefined)")

    calculator = cls.__new__(cls)
    calculator._configure(
        bound,
        train_dataset,
        hessian_dataset,
        dtype=dtype,
        force_hermitian=meta["force_hermitian"],
        k_largest_eig_vals=k,
        subspace_dim=meta["subspace_dim"],
        damping=meta["damping"],
        seed=meta["seed"],
        block_size=meta["block_size"],
        eigenvalue_selection=meta["eigenvalue_selection"],
        show_progress=show_progress,
        complement=meta["complement_setting"],
        complement_probes=meta["complement_probes"],
    )
    calculator.num_hessian_examples = meta["num_hessian_examples"]
    placed = (
        projector
        if isinstance(projector, HostProjector)
        else bound.from_numpy(projector, dtype=getattr(bound.xp, _xp.dtype_name(dtype)))
    )
    if check_model:
        _check_model(calculator, meta, target, eigenvalues, placed, residuals, hessian_dataset)
    calculator.hessian_argument = meta["hessian_data"]
    calculator._set_eigenbasis(
        EigenBasis(
            eigenvalues=eigenvalues,
            damping=meta["damping"],
            projector=placed,
            ritz=RitzPairs(eigenvalues, vectors, residuals, spectrum),
            arnoldi_restarts=tuple(meta["arnoldi_restarts"]),
            orthogonality_loss=meta["orthogonality_loss"],
            residual_norm=meta["residual_norm"],
            complement=meta["complement"],
        )
    )
    return calculator


def _check_model(
    calculator: Any,
    meta: dict[str, Any],
    target: str,
    eigenvalues: np.ndarray,
    projector: Any,
    residuals: np.ndarray,
    hessian_dataset: Iterable[Any] | None,
) -> None:
    """The Hessian check of :mod:`krylov_influence._identity` on the data the fit used."""
    fitted_on_train = meta["hessian_data"] == "train_dataset"
    data, argument = calculator.hessian_dataset, "hessian_dataset"
    if hessian_dataset is None and fitted_on_train:
        argument = "train_dataset"
    if data is None or (hessian_dataset is None and not fitted_on_train):
        raise ValueError(
            f"load: the calculator in {target!r} can only be checked against this model with "
            "the data its Hessian was fitted on: pass "
            + ("train_dataset=" if fitted_on_train else "hessian_dataset=")
            + " (one pass of Hessian-vector products), or check_model=False to trust the "
            "parameter fingerprint alone (it cannot tell models that share parameter values "
            "but differ in architecture, activation, loss or l2)"
        )
    count = calculator._validate_data(data, argument)
    if count != meta["num_hessian_examples"]:
        raise IncompatibleStoreError(
            f"{argument}: has {count} examples, but the calculator in {target!r} was fitted on "
            f"a Hessian of {meta['num_hessian_examples']}; pass the data it was fitted on"
        )
    check_hessian_agreement(
        calculator.model,
        data,
        eigenvalues,
        projector,
        residuals,
        where=f"path={target!r}",
        seed=meta["seed"],
    )


def _validated_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Every field of a saved calculator's metadata, type- and range-checked."""
    if meta.get("kind") != KIND or meta.get("version") != VERSION:
        raise ValueError(
            f"kind {meta.get('kind')!r}, version {meta.get('version')!r}; expected {KIND!r}, "
            f"{VERSION} (files of older versions: refit and save again)"
        )
    out = dict(meta)
    for name in ("num_parameters", "k_largest_eig_vals", "subspace_dim", "block_size"):
        out[name] = _count(meta[name], name)
    out["num_hessian_examples"] = _count(meta["num_hessian_examples"], "num_hessian_examples")
    seed = meta["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed is {seed!r}, expected an integer >= 0")
    out["damping"] = finite_number(meta["damping"], "damping", minimum=0.0)
    out["residual_norm"] = finite_number(meta["residual_norm"], "residual_norm", minimum=0.0)
    loss = meta["orthogonality_loss"]
    out["orthogonality_loss"] = (
        None if loss is None else finite_number(loss, "orthogonality_loss", minimum=0.0)
    )
    for name in ("dtype", "model_dtype"):
        if meta[name] not in ("float32", "float64"):
            raise ValueError(f"{name} is {meta[name]!r}, expected 'float32' or 'float64'")
    for name in ("fingerprint", "engine"):
        if not isinstance(meta[name], str):
            raise ValueError(f"{name} is {meta[name]!r}, expected a string")
    if meta["eigenvalue_selection"] not in EIGENVALUE_SELECTIONS:
        raise ValueError(f"eigenvalue_selection is {meta['eigenvalue_selection']!r}")
    if not isinstance(meta["force_hermitian"], bool):
        raise ValueError(f"force_hermitian is {meta['force_hermitian']!r}, expected a boolean")
    if meta["hessian_data"] not in ("train_dataset", "hessian_dataset"):
        raise ValueError(f"hessian_data is {meta['hessian_data']!r}")
    setting = meta["complement_setting"]
    out["complement_setting"] = resolve_complement(setting)
    out["complement_probes"] = _count(meta["complement_probes"], "complement_probes")
    found = meta["complement"]
    if found is None:
        if setting != "none":
            raise ValueError(f"complement is None but complement_setting is {setting!r}")
        out["complement"] = None
    else:
        if not isinstance(found, dict) or found.get("method") not in ("mean", "given"):
            raise ValueError(f"complement is {found!r}")
        value = finite_number(found["value"], "complement value")
        if value + out["damping"] <= 0:
            raise ValueError("complement value plus damping is not positive")
        optional = {
            name: None if found.get(name) is None else finite_number(found[name], name)
            for name in ("trace", "stderr")
        }
        out["complement"] = SpectralComplement(
            value, found["method"], optional["trace"], optional["stderr"], _probes(found)
        )
    restarts = meta["arnoldi_restarts"]
    if not isinstance(restarts, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in restarts
    ):
        raise ValueError(f"arnoldi_restarts is {restarts!r}, expected a list of integers")
    if (
        out["k_largest_eig_vals"] > out["subspace_dim"]
        or out["subspace_dim"] > out["num_parameters"]
    ):
        raise ValueError("k_largest_eig_vals <= subspace_dim <= num_parameters does not hold")
    return out


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} is {value!r}, expected a positive integer")
    return value


def _probes(found: dict[str, Any]) -> int:
    probes = found.get("probes")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
        raise ValueError(f"complement probes is {probes!r}, expected an integer >= 0")
    return probes
