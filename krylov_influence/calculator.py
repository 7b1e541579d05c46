"""``ArnoldiInfluenceCalculator``: fit the low-rank inverse Hessian once, score many examples.

The fitted state is an :class:`~krylov_influence.eigen.EigenBasis`: k eigenvalues ``λ`` and
the projector ``G`` (k × p). Every example is reduced to its projection ``P = G g`` (k numbers,
by the engine's ``project``: JVPs, or gradients × Gᵀ for small blocks), and every quantity is
k-dimensional algebra on projections:

- influence vector ``v(x) = diag(1/(λ+δ)) G g_x``, shape (k,);
- self-influence ``S(x) = Σ_i (G g_x)_i² / (λ_i + δ)``;
- pairwise score ``I(x, z) = (G g_z)ᵀ diag(1/(λ+δ)) (G g_x) = P_z · v(x)`` (positive: x is a
  proponent of z).

Results are lazy :class:`~krylov_influence._data.BatchStream` objects: re-iterable, computed
batch by batch as they are consumed, in the engine's own array type. Nothing of size
``N_train × p`` is ever formed; training data is held in memory only as k-dimensional influence
vectors: for one call when ``CACHE.MEMORY`` asks for it, or across calls after
:meth:`ArnoldiInfluenceCalculator.cache_training_vectors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence import _xp
from krylov_influence._archive import (
    register_for_cleanup,
    remove_stale_temporaries,
    unregister_cleanup,
)
from krylov_influence._checkpoint import (
    CheckpointKey,
    HessianLosses,
    read_checkpoint,
    remove_checkpoint,
    write_checkpoint,
)
from krylov_influence._data import (
    BatchStream,
    progress_bar,
    require_reiterable,
    resolve_show_progress,
)
from krylov_influence._host_basis import HostBasis, HostProjector
from krylov_influence._identity import require_fixed_order
from krylov_influence._linearizing import linearize_hessian_data, resolve_linearize_budget
from krylov_influence._staging import resolve_stage_budget, stage_hessian_data
from krylov_influence._streaming import (
    Placement,
    TrainingVectors,
    batch_stream,
    open_checked_store,
    prepare_training_vectors,
    require_data,
    require_finite,
    save_scores,
    save_top_k,
    write_kept_store,
    write_vector_store,
)
from krylov_influence.arnoldi import ArnoldiState, arnoldi_iteration
from krylov_influence.cache import CACHE, MemoryStore, StoreKey, as_cache, resolve_path
from krylov_influence.complement import (
    SpectralComplement,
    estimate_mean_discarded,
    resolve_complement,
)
from krylov_influence.eigen import EIGENVALUE_SELECTIONS, EigenBasis, build_eigenbasis
from krylov_influence.engine import InfluenceModel, ShardedHessianData
from krylov_influence.errors import NegativeEigenvalueWarning, NonFiniteError
from krylov_influence.registry import bind_model
from krylov_influence.topk import (
    ORDER,
    BaseNearestNeighbors,
    LinearNearestNeighbors,
    RunningTopK,
    TopKBatch,
    TrainingTopK,
    as_order,
)

__all__ = ["ArnoldiInfluenceCalculator"]


class ArnoldiInfluenceCalculator:
    """Influence functions by the Arnoldi method (Schioppa et al., AAAI 2022).

    The constructor fits: ``subspace_dim`` Hessian-vector products over the Hessian data build
    a Krylov basis, whose ``k_largest_eig_vals`` Ritz pairs give the projector ``G``.

    Parameters
    ----------
    model : InfluenceModel or a model an engine recognises
        A bound model (``krylov_influence.InfluenceModel(...)``) or, for models that carry
        their own loss (``krylov_influence.reference``), the model itself.
    train_dataset : re-iterable of batches
        The training data (a list of batches, a ``DataLoader``, a ``tf.data.Dataset``).
    subspace_dim : int
        ``n``: Hessian-vector products, and dimension of the Krylov subspace (≤ p).
    force_hermitian : bool
        Symmetrise the Hessenberg matrix and use ``eigh`` (recommended).
    k_largest_eig_vals : int
        ``k ≤ subspace_dim``: eigenpairs kept.
    dtype : str or dtype, optional
        Working dtype of the Krylov basis and projector (``"float32"``/``"float64"`` or the
        engine's dtype object). Default: the model's. Every output is in the model's dtype, so
        another dtype is refused: bind the model in the precision you want
        (``InfluenceModel(..., dtype="float64")``).
    damping : float, keyword-only, default 0.0
        δ ≥ 0 added to the kept eigenvalues (the exact reference is then ``(H + δI)⁻¹``).
    seed : int, keyword-only, default 0
        Seed of the host generator of the start vector; the same in every engine.
    block_size : int, keyword-only, default 1
        ``b``: Hessian-vector products per Arnoldi step, computed in one vectorised pass over
        the Hessian data (block Arnoldi from b start vectors; ``1 ≤ b ≤ subspace_dim``). The
        same ``subspace_dim`` products then cost less where the engine vectorises them (JAX:
        0.81 instead of 2.3 ms per product at b = 8 on the digits MLP), but reach a Krylov
        polynomial degree of about ``subspace_dim / b``: check
        ``eigenbasis.ritz.residuals`` (or compare with b = 1) before trusting a large b.
    hessian_dataset : re-iterable of batches or ShardedHessianData, optional, keyword-only
        Data the Hessian averages over; default ``train_dataset``. A
        :class:`~krylov_influence.engine.ShardedHessianData` (such as
        :class:`krylov_influence.ray.RayHessianData`, data held by Ray actors) applies the
        Hessian where the data lives: the calculator takes its operator, example count and
        losses instead of iterating batches, and does not stage it (``docs/cluster.md``).
    eigenvalue_selection : {"magnitude", "positive", "algebraic"}, keyword-only
        Which Ritz pairs to keep: largest |λ| (default, the paper), largest positive λ, or
        largest λ.
    show_progress : bool, optional, keyword-only
        tqdm bars on the Arnoldi loop and passes over data; default: when stderr is a
        terminal.
    complement : {"none", "mean"} or float, keyword-only, default "none"
        What the directions outside the kept eigenpairs get (:mod:`krylov_influence.complement`):
        nothing (the paper's truncation), the mean discarded eigenvalue ``c`` estimated at fit
        time from ``complement_probes`` Hessian-vector products, or a given ``c ≥ 0``. Every
        method then adds ``(g_zᵀ g_x − (G g_z)ᵀ (G g_x)) / (c + δ)`` to each score (a
        projection onto the query gradients per training batch for pairwise scores).
    complement_probes : int, keyword-only, default 10
        Hutchinson probes of the estimate of ``c``.
    stage_hessian_data : bool, int or str, keyword-only, default True
        Memory budget for staging the Hessian data: before the Arnoldi loop the data is
        iterated once and every batch kept as the engine's arrays on the model's device, so
        the ``subspace_dim`` Hessian-vector products neither re-iterate a ``DataLoader`` /
        ``tf.data`` pipeline nor copy batches to the device again. ``True``: up to 1 GiB;
        ``False`` or ``0``: never; an int: bytes; a string: ``"512MiB"``, ``"4GB"``. Data
        above the budget is streamed on every product. The results are the same either
        way; the Arnoldi progress bar (and the ``krylov_influence`` logger, at INFO) says
        which happened.
    linearize_hessian_data : bool, int or str, keyword-only, default True
        Memory budget for linearising the staged Hessian data: before the Arnoldi loop the
        engine runs the forward and gradient passes of each staged batch once and keeps
        what the second-order pass needs (PyTorch: the gradient's autograd graph; JAX: the
        residuals of ``jax.linearize``; TensorFlow: the tensors that the product's graph,
        split where the vector enters, reads from its first passes), so that each
        Hessian-vector product costs only its vector-dependent part (0.5-0.9 of a full
        product on the benchmark CNN and transformer). The same forms as
        ``stage_hessian_data`` (``True``: up to 1 GiB); batches are linearised in order while
        they fit, the rest recomputed on every product. The products are the engine's own to
        rounding (PyTorch: bit for bit); data that is not staged is unaffected
        (:mod:`krylov_influence._linearizing`).
    checkpoint_path : str or os.PathLike, optional, keyword-only
        Make the fit resumable: every ``checkpoint_every`` Hessian-vector products the basis
        so far, the Hessenberg matrix and the restart generator's state are written to this
        file (atomically; an existing directory holds ``arnoldi_checkpoint.npz``). When the
        file exists, the fit **continues from it** and gives the same result as an
        uninterrupted fit, after checking that it belongs to this fit (the same model
        parameters, ``subspace_dim``, ``block_size``, ``seed``, dtype and Hessian data, by
        every per-example loss); a checkpoint of another fit is refused
        (``IncompatibleStoreError``), never overwritten. Removed when the fit completes.
        Each write copies the basis so far (up to ``subspace_dim × p`` numbers) to disk.
    checkpoint_every : int, keyword-only, default 10
        Hessian-vector products between checkpoints.
    basis_location : {"auto", "device", "host", "disk"}, keyword-only, default "auto"
        Where the Krylov basis (``subspace_dim × p`` numbers) lives during the fit: on the
        model's device; in host memory; or in a memory-mapped file in ``basis_dir`` (removed
        after the fit). Off the device, Gram–Schmidt runs on the host over blocks of parameter
        columns and each step moves one p-vector each way; the results agree with the device
        basis to round-off. ``"auto"``: past ``basis_memory``, disk; else host memory when the
        device is the host's (a CPU; ``G`` then goes to the device after the fit: NumPy's
        Gram–Schmidt is cheaper than a framework's there), the device otherwise. With
        ``block_size = b > 1`` each step moves b rows to the device and b products back,
        orthogonalised one by one on the host.
    basis_memory : int or str, keyword-only, default "auto"
        The budget of ``"auto"``: bytes, or a size (``"8GiB"``); ``"auto"`` is a quarter of the
        machine's physical memory.
    basis_dir : str or os.PathLike, optional, keyword-only
        Directory of the memory-mapped basis (default: the system's temporary directory).

    Attributes
    ----------
    model : InfluenceModel
    eigenbasis : EigenBasis
        The fitted state, with diagnostics (Ritz residuals, orthogonality, restarts).
    resumed_from : int or None
        Hessian-vector products read from ``checkpoint_path`` by the last fit (``None``: it
        started afresh).
    basis_placement : str
        Where the last fit kept its basis: ``"device"``, ``"host"`` or ``"disk"``.

    Raises
    ------
    ValueError
        On ``k_largest_eig_vals > subspace_dim``, ``subspace_dim > p``,
        ``block_size > subspace_dim``, an empty dataset, or non-finite losses (naming the
        batch).

    Notes
    -----
    Every method taking ``device=`` runs on ``model.on_device(device)`` (``None``: the model's
    own device); the fitted state is copied there once and reused.
    """

    # Class defaults: a loaded calculator (built by ``load``, not ``__init__``) refits without
    # checkpoints unless these are set on it.
    checkpoint_path: str | None = None
    checkpoint_every: int = 10
    resumed_from: int | None = None
    basis_location: str = "auto"
    basis_memory: int | None = None  # None: a quarter of physical memory
    basis_dir: str | None = None
    basis_placement: str = "device"

    def __init__(
        self,
        model: Any,
        train_dataset: Iterable[Any],
        subspace_dim: int,
        force_hermitian: bool,
        k_largest_eig_vals: int,
        dtype: Any = None,
        *,
        damping: float = 0.0,
        seed: int = 0,
        block_size: int = 1,
        hessian_dataset: Iterable[Any] | None = None,
        eigenvalue_selection: str = "magnitude",
        show_progress: bool | None = None,
        stage_hessian_data: bool | int | str = True,
        linearize_hessian_data: bool | int | str = True,
        complement: str | float = "none",
        complement_probes: int = 10,
        checkpoint_path: Any = None,
        checkpoint_every: int = 10,
        basis_location: str = "auto",
        basis_memory: int | str = "auto",
        basis_dir: Any = None,
    ):
        require_reiterable(train_dataset, "train_dataset")
        if basis_location not in BASIS_LOCATIONS:
            raise ValueError(
                f"basis_location={basis_location!r}: expected one of {BASIS_LOCATIONS}"
            )
        self.basis_location = basis_location
        self.basis_memory = (
            None
            if isinstance(basis_memory, str) and basis_memory == "auto"
            else resolve_stage_budget(basis_memory, "basis_memory")
        )
        self.basis_dir = None if basis_dir is None else os.fspath(basis_dir)
        self.checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        self.checkpoint_every = _positive_int(checkpoint_every, "checkpoint_every")
        self._configure(
            model,
            train_dataset,
            hessian_dataset,
            dtype=dtype,
            force_hermitian=force_hermitian,
            k_largest_eig_vals=k_largest_eig_vals,
            subspace_dim=subspace_dim,
            damping=damping,
            seed=seed,
            block_size=block_size,
            eigenvalue_selection=eigenvalue_selection,
            show_progress=show_progress,
            stage_hessian_data=stage_hessian_data,
            linearize_hessian_data=linearize_hessian_data,
            complement=complement,
            complement_probes=complement_probes,
        )
        assert self.hessian_dataset is not None  # the constructor always has train data
        self.num_hessian_examples = self._validate_data(
            self.hessian_dataset, "train_dataset" if hessian_dataset is None else "hessian_dataset"
        )
        self._set_eigenbasis(self._fit(self.subspace_dim))
        self._warn_if_indefinite()

    def _configure(
        self,
        model: Any,
        train_dataset: Iterable[Any] | None,
        hessian_dataset: Iterable[Any] | None,
        *,
        dtype: Any,
        force_hermitian: bool,
        k_largest_eig_vals: int,
        subspace_dim: int,
        damping: float,
        seed: int,
        block_size: int,
        eigenvalue_selection: str,
        show_progress: bool | None,
        stage_hessian_data: bool | int | str = True,
        linearize_hessian_data: bool | int | str = True,
        complement: str | float = "none",
        complement_probes: int = 10,
    ) -> None:
        """Validate and store the settings (shared by the constructor and :meth:`load`)."""
        self.model: InfluenceModel = bind_model(model)
        self.train_dataset = (
            None if train_dataset is None else require_reiterable(train_dataset, "train_dataset")
        )
        hessian = train_dataset if hessian_dataset is None else hessian_dataset
        # Which argument the Hessian data came from (saved: the check at load needs it).
        self.hessian_argument = "train_dataset" if hessian_dataset is None else "hessian_dataset"
        self.hessian_dataset = (
            None
            if hessian is None or isinstance(hessian, ShardedHessianData)
            else require_reiterable(hessian, "hessian_dataset")
        )
        if isinstance(hessian, ShardedHessianData):
            self.hessian_dataset = hessian
        self.dtype = self.model.dtype_name if dtype is None else _xp.dtype_name(dtype)
        self.force_hermitian = bool(force_hermitian)
        self.k_largest_eig_vals = _positive_int(k_largest_eig_vals, "k_largest_eig_vals")
        self.subspace_dim = _positive_int(subspace_dim, "subspace_dim")
        self.damping = _damping(damping)
        self.seed = _seed(seed)
        self.block_size = _positive_int(block_size, "block_size")
        if eigenvalue_selection not in EIGENVALUE_SELECTIONS:
            raise ValueError(
                f"eigenvalue_selection={eigenvalue_selection!r}: expected one of "
                f"{EIGENVALUE_SELECTIONS}"
            )
        self.eigenvalue_selection = eigenvalue_selection
        self.show_progress = resolve_show_progress(show_progress)
        self.stage_hessian_data = resolve_stage_budget(stage_hessian_data)
        self.linearize_hessian_data = resolve_linearize_budget(linearize_hessian_data)
        self.complement = resolve_complement(complement)
        self.complement_probes = _positive_int(complement_probes, "complement_probes")
        if self.dtype == "float64" and not self.model.capabilities.float64:
            raise ValueError(f"dtype='float64': the {self.model.engine_name} engine has no float64")
        if self.dtype != self.model.dtype_name:
            # A float64 G with float32 HVPs, eigenvalues and outputs would look like float64
            # and be float32 (2e-7 off); a float32 G under a float64 model loses half the digits.
            raise ValueError(
                f"dtype={self.dtype!r}: the model computes in {self.model.dtype_name}, and every "
                f"output is in the model's dtype; bind the model in {self.dtype} "
                f"(InfluenceModel(..., dtype={self.dtype!r})) or omit dtype"
            )
        self._placements: dict[str, Placement] = {}
        self._digest: str | None = None
        self._scratch_dir: str | None = None
        self._kept: KeptTrainingVectors | None = None

    # --------------------------------------------------------------------------- fitting
    def _validate_data(self, dataset: Iterable[Any], name: str) -> int:
        """One forward pass: count examples and check every loss is finite."""
        if isinstance(dataset, ShardedHessianData):
            return int(dataset.count_examples())
        xp, model = self.model.xp, self.model
        count = 0
        for index, batch in enumerate(dataset):
            try:
                losses = model.losses(batch)
            except (RuntimeError, TypeError, ValueError) as error:
                raise type(error)(
                    f"{name}: batch {index} cannot be evaluated by the model and loss_fn "
                    f"({type(error).__name__}: {error})"
                ) from error
            if not bool(xp.all(xp.isfinite(losses))):
                raise NonFiniteError(f"{name}: batch {index} has non-finite losses (NaN or Inf)")
            count += model.batch_size(batch)
        if count == 0:
            raise ValueError(f"{name}: the dataset is empty")
        return count

    def _checkpointing(
        self, data: Iterable[Any], subspace_dim: int
    ) -> tuple[ArnoldiState | None, Callable[[ArnoldiState], None] | None, str | None]:
        """``(state to resume from, checkpoint writer, file)`` for ``checkpoint_path``."""
        if self.checkpoint_path is None:
            return None, None, None
        model = self.model
        target = resolve_path(self.checkpoint_path, "checkpoint")
        key = CheckpointKey(
            fingerprint=model.fingerprint(),
            num_parameters=int(model.num_parameters),
            subspace_dim=int(subspace_dim),
            block_size=int(self.block_size),
            seed=int(self.seed),
            dtype=self.dtype,
        )
        resume = None
        losses = HessianLosses(model, data)
        if os.path.exists(target):
            resume, losses = read_checkpoint(target, key, model, data)

        def checkpoint(state: ArnoldiState) -> None:
            write_checkpoint(target, key, state, losses)

        return resume, checkpoint, target

    def _fit(self, subspace_dim: int) -> EigenBasis:
        model = self.model
        p = model.num_parameters
        if subspace_dim > p:
            raise ValueError(
                f"subspace_dim={subspace_dim}: expected at most p = {p} (the number of parameters)"
            )
        if self.k_largest_eig_vals > subspace_dim:
            raise ValueError(
                f"k_largest_eig_vals={self.k_largest_eig_vals}: expected at most "
                f"subspace_dim = {subspace_dim}"
            )
        if self.block_size > subspace_dim:
            raise ValueError(
                f"block_size={self.block_size}: expected at most subspace_dim = {subspace_dim}"
            )
        if self.hessian_dataset is None:
            raise ValueError(
                "hessian_dataset: this calculator was loaded without Hessian data; pass "
                "hessian_dataset= (or train_dataset=) to ArnoldiInfluenceCalculator.load to refit"
            )
        data: Any
        if isinstance(self.hessian_dataset, ShardedHessianData):
            # Staged where it lives (each shard on its actor), not here.
            data, staging = self.hessian_dataset, "sharded"
            operator = data.hessian_operator(model)
        else:
            data, staging = stage_hessian_data(model, self.hessian_dataset, self.stage_hessian_data)
            # The operator alone gets the linearised batches; everything else (checkpoint
            # identity, culprit search) iterates the staged data.
            linearized, note = linearize_hessian_data(model, data, self.linearize_hessian_data)
            staging = f"{staging}, {note}" if note else staging
            operator = model.hessian_operator(linearized)
        resume, checkpoint, target = self._checkpointing(data, subspace_dim)
        self.resumed_from = None if resume is None else resume.products
        host_basis = self._host_basis(subspace_dim)
        try:
            return self._fit_with(
                data, operator, subspace_dim, staging, resume, checkpoint, target, host_basis
            )
        finally:
            if host_basis is not None:
                path = host_basis.path
                host_basis.release()
                if path is not None:
                    unregister_cleanup(path)

    def _host_basis(self, subspace_dim: int) -> HostBasis | None:
        """The basis off the device, as ``basis_location`` (and ``basis_memory``) say."""
        model = self.model
        p = int(model.num_parameters)
        nbytes = subspace_dim * p * np.dtype(self.dtype).itemsize
        location = self.basis_location
        if location == "auto":
            budget = _physical_memory() // 4 if self.basis_memory is None else self.basis_memory
            if nbytes > budget:
                location = "disk"
            elif model.host_memory:
                # The same memory, and NumPy's blocked CGS2 costs 0.4x a framework's steps on
                # the digits MLP (no dispatch per step) and 0.8x on the 525 828-parameter
                # transformer (one CPU thread; docs/benchmarks.md).
                location = "host"  # G goes to the device after the fit (_built_eigenbasis)
            else:
                location = "device"
        self.basis_placement = location
        if location == "device":
            return None
        if location == "host":
            return HostBasis.allocate(subspace_dim, p, self.dtype)
        directory = self.basis_dir if self.basis_dir is not None else tempfile.gettempdir()
        # The basis files of killed processes (their pid is in the name) go first.
        remove_stale_temporaries(directory, BASIS_PATTERN)
        handle, path = tempfile.mkstemp(
            prefix=f"krylov_influence_{os.getpid()}_basis_", suffix=".npy", dir=directory
        )
        os.close(handle)
        register_for_cleanup(path)
        return HostBasis.allocate(subspace_dim, p, self.dtype, path=path)

    def _fit_with(
        self,
        data: Iterable[Any],
        operator: Any,
        subspace_dim: int,
        staging: str,
        resume: ArnoldiState | None,
        checkpoint: Callable[[ArnoldiState], None] | None,
        target: str | None,
        host_basis: HostBasis | None,
    ) -> EigenBasis:
        model = self.model
        with progress_bar(self.show_progress, subspace_dim, f"Arnoldi ({staging})") as bar:
            try:
                result = arnoldi_iteration(
                    operator,
                    subspace_dim,
                    seed=self.seed,
                    dtype=self.dtype,
                    xp=model.xp,
                    device=model.device,
                    to_numpy=model.to_numpy,
                    progress=bar.update,
                    block_size=self.block_size,
                    resume=resume,
                    checkpoint=checkpoint,
                    checkpoint_every=self.checkpoint_every,
                    host_basis=host_basis,
                )
            except NonFiniteError as error:
                culprit = self._non_finite_hessian_batch()
                if culprit is None:
                    raise
                raise NonFiniteError(f"{error}; {culprit}") from None
        if target is not None:
            remove_checkpoint(target)
        basis = self._built_eigenbasis(result)
        return self._with_complement(basis, result, operator)

    def _built_eigenbasis(self, result: Any) -> EigenBasis:
        model = self.model
        basis = build_eigenbasis(
            result,
            self.k_largest_eig_vals,
            force_hermitian=self.force_hermitian,
            selection=self.eigenvalue_selection,  # type: ignore[arg-type]
            damping=self.damping,
            xp=model.xp,
            device=model.device,
        )
        projector = basis.projector
        if self.basis_location == "auto" and self.basis_placement == "host":
            # "auto" put the basis in host memory because the device is the host's: G goes to
            # the device, as if the basis had been there.
            rows = model.xp.asarray(projector.rows, device=model.device)
            return dataclasses.replace(basis, projector=rows)
        if isinstance(projector, HostProjector) and projector.path is not None:
            # G's file lives as long as the eigenbasis (and goes at exit or on SIGTERM).
            register_for_cleanup(projector.path)
            weakref.finalize(projector, _remove_file, projector.path)
        return basis

    def _with_complement(self, basis: EigenBasis, result: Any, operator: Any) -> EigenBasis:
        model = self.model
        if self.complement == "none":
            return basis
        if self.complement == "mean":
            found = estimate_mean_discarded(
                operator,
                result.basis,
                basis.ritz.spectrum,
                basis.eigenvalues,
                probes=self.complement_probes,
                seed=self.seed,
                xp=model.xp,
                device=model.device,
                to_numpy=model.to_numpy,
            )
        else:
            found = SpectralComplement(float(self.complement), "given")
        if found.value + self.damping <= 0 and basis.rank < model.num_parameters:
            raise ValueError(
                f"complement={self.complement!r}: the discarded spectrum's value c = "
                f"{found.value:.3g} plus damping {self.damping:g} is not positive, so the "
                "complement cannot be inverted; add damping > -c (an indefinite Hessian)"
            )
        return dataclasses.replace(basis, complement=found)

    def _warn_if_indefinite(self) -> None:
        """Say once per fit when kept ``λ + δ`` are negative, and what damping fixes it."""
        basis = self.eigenbasis
        if basis.negative_count == 0:
            return
        warnings.warn(
            f"{basis.negative_count} of the {basis.rank} kept eigenvalues plus damping are "
            f"negative (smallest λ = {float(np.min(basis.eigenvalues)):.3g}, damping "
            f"{self.damping:g}): the Hessian is indefinite on the kept subspace (the model is "
            "not at a minimum), and influence along those directions changes sign. "
            f"damping > {basis.positive_damping:.3g} makes the kept spectrum positive (or "
            "eigenvalue_selection='positive' keeps only positive ones); "
            "calc.eigenbasis.negative_count reports it",
            NegativeEigenvalueWarning,
            stacklevel=3,
        )

    def _non_finite_hessian_batch(self) -> str | None:
        """After a non-finite product: the first Hessian batch whose own HVP overflows."""
        model, data = self.model, self.hessian_dataset
        assert data is not None
        if isinstance(data, ShardedHessianData):
            return None  # its batches live elsewhere; the operator's error names the shard
        rng = np.random.default_rng(self.seed)
        probe = rng.standard_normal(model.num_parameters)
        vector = model.from_numpy(probe / np.linalg.norm(probe))
        name = self.hessian_argument
        for index, batch in enumerate(data):
            product = model.to_numpy(model.hvp(vector, [batch]))
            if not np.isfinite(product).all():
                return f"batch {index} of {name} gives non-finite Hessian-vector products"
        return None

    def _set_eigenbasis(self, eigenbasis: EigenBasis) -> None:
        self.eigenbasis = eigenbasis
        self._placements = {}
        self._digest = None
        self._kept = None  # vectors of another fit

    def arnoldi(self, dim: int | None = None) -> tuple[Any, Any]:
        """Refit with a Krylov subspace of dimension ``dim``; return ``(eig_vals, G)``.

        Parameters
        ----------
        dim : int, optional
            New ``subspace_dim`` (``k_largest_eig_vals ≤ dim ≤ p``). ``None`` refits with the
            current ``subspace_dim`` (a fresh start only if ``seed`` changed).

        Returns
        -------
        eig_vals : array, shape (k,)
            The kept eigenvalues of the damped Hessian, ``λ + δ`` (what the influence
            formula inverts), in the model's namespace.
        G : array, shape (k, p)
            The projector; its rows are orthonormal Ritz vectors.

        Raises
        ------
        ValueError
            For ``dim = p`` while ``subspace_dim < p``: influenciae's ``arnoldi(dim)`` takes the
            start vector's length, always ``p``, so a call ported from it would silently run
            a full-rank fit here (p HVPs instead of ``subspace_dim``).
        """
        if dim is None:
            dim = self.subspace_dim
        dim = _positive_int(dim, "dim")
        p = self.model.num_parameters
        if dim == p and self.subspace_dim < p:
            raise ValueError(
                f"dim={dim}: that is p, the number of parameters. Here dim is the new Krylov "
                f"subspace dimension, not influenciae's start vector length (always p), so this "
                f"would run a full-rank fit of {p} HVPs instead of subspace_dim="
                f"{self.subspace_dim}. Call arnoldi() to refit with subspace_dim="
                f"{self.subspace_dim}; for a full-rank fit, set calc.subspace_dim = {p} first"
            )
        eigenbasis = self._fit(dim)
        self.subspace_dim = dim
        self._set_eigenbasis(eigenbasis)
        self._warn_if_indefinite()
        return self.eig_vals, self.G

    @property
    def eig_vals(self) -> Any:
        """``λ + δ`` of the kept pairs, shape (k,), in the model's namespace and dtype."""
        return self.model.from_numpy(self.eigenbasis.damped_eigenvalues)

    @property
    def G(self) -> Any:
        """The projector, shape (k, p), in the working dtype on the model's device.

        With ``basis_location`` ``"host"`` or ``"disk"`` (or ``"auto"`` past ``basis_memory``),
        ``G`` stays where the basis was: a NumPy array, or a read-only memory map of its file.
        """
        projector = self.eigenbasis.projector
        return projector.view() if isinstance(projector, HostProjector) else projector

    @property
    def eigenbasis_digest(self) -> str:
        """A digest of the kept eigenvalues, damping and projector ``G`` (hex, 32 chars).

        Stores of influence vectors carry it, so a store computed with another fit is never
        reused. Computed once per fit (one host copy of ``G``).
        """
        if self._digest is None:
            digest = hashlib.sha256()
            digest.update(np.ascontiguousarray(self.eigenbasis.damped_eigenvalues, "<f8").data)
            projector = self.eigenbasis.projector
            if isinstance(projector, HostProjector):  # row chunks: the same bytes in order
                for rows in projector.row_chunks(64 * 2**20):
                    digest.update(np.ascontiguousarray(rows, "<f8").data)
            else:
                digest.update(np.ascontiguousarray(self.model.to_numpy(projector), "<f8").data)
            self._digest = digest.hexdigest()[:32]
        return self._digest

    # --------------------------------------------------------------------- save and load
    def save(self, path: Any) -> str:
        """Save the fitted eigenbasis and settings to an ``.npz`` archive (atomically).

        See :func:`krylov_influence.persistence.save_calculator` for the format.

        Parameters
        ----------
        path : str or os.PathLike
            A file path, or an existing directory (the file is then ``calculator.npz``).

        Returns
        -------
        str
            The path written.
        """
        from krylov_influence.persistence import save_calculator

        return save_calculator(self, path)

    @classmethod
    def load(
        cls,
        path: Any,
        model: Any,
        *,
        train_dataset: Iterable[Any] | None = None,
        hessian_dataset: Iterable[Any] | None = None,
        check_model: bool = True,
        show_progress: bool | None = None,
        projector_location: str = "device",
    ) -> ArnoldiInfluenceCalculator:
        """Load a calculator saved by :meth:`save` onto ``model`` (any engine), checked.

        A basis is only valid for the model whose Hessian it was fitted on, and parameters
        alone do not identify a model (a Tanh and a ReLU net may share them; so may two
        losses or two ``l2``). So, besides the parameter count, values (fingerprint) and
        precision, the load checks that the kept Ritz pairs are still Ritz pairs of
        ``model``'s Hessian over the data the fit used: three Hessian-vector products in one
        pass over it (see ``docs/calculator.md``, "What is checked before stored results are
        reused"). That data is ``train_dataset`` when the fit averaged the Hessian over the
        training set (the default), ``hessian_dataset`` when it was given one.

        Parameters
        ----------
        path : str or os.PathLike
        model : InfluenceModel or a model an engine recognises
            The model the basis was fitted on: same parameter count, values and flat order,
            same precision; the engine may differ.
        train_dataset, hessian_dataset : re-iterable of batches, optional
            The data the Hessian was fitted on (for the check; then also for :meth:`arnoldi`).
        check_model : bool, default True
            ``False`` skips the Hessian check and trusts the parameter fingerprint alone.
        show_progress : bool, optional
        projector_location : {"device", "disk"}, default "device"
            ``"disk"`` leaves ``G`` (k × p) in the file and reads its rows in place, a chunk at
            a time, whenever it projects (the file must stay where it is); the load reads it
            through once to check it, in 64 MiB chunks. For models whose ``G`` does not fit.

        Returns
        -------
        ArnoldiInfluenceCalculator

        Raises
        ------
        IncompatibleStoreError
            If the file is not a valid saved calculator (corrupt, truncated, foreign,
            malformed metadata), or ``model`` is not the fitted model (parameters, precision,
            Hessian), or the data has another number of examples than the fit's.
        ValueError
            If ``check_model`` and the data the check needs is not given.
        """
        from krylov_influence.persistence import load_calculator

        return load_calculator(
            cls,
            path,
            model,
            train_dataset=train_dataset,
            hessian_dataset=hessian_dataset,
            check_model=check_model,
            show_progress=show_progress,
            projector_location=projector_location,
        )

    # ------------------------------------------------------------------------ placement
    def _placed(self, device: Any) -> Placement:
        """The model on ``device`` and the fitted state there, cached per device."""
        # Keyed by the argument, so an engine's on_device (which may copy the model) runs
        # once per device, not once per call.
        key = _device_key(device)
        placement = self._placements.get(key)
        if placement is not None:
            return placement
        model = self.model.on_device(device)
        xp = model.xp
        projector = self.eigenbasis.projector
        if isinstance(projector, HostProjector):
            pass  # off the device: projections take its rows to the device a chunk at a time
        elif model is not self.model:
            projector = model.from_numpy(self.model.to_numpy(projector))
        if not isinstance(projector, HostProjector) and projector.dtype != model.dtype:
            projector = xp.astype(projector, model.dtype)
        inverse = model.from_numpy(self.eigenbasis.inverse_eigenvalues)
        complement = self.eigenbasis.complement
        weight = None
        if complement is not None and self.eigenbasis.rank < model.num_parameters:
            weight = complement.weight(self.eigenbasis.damping)  # with k = p: nothing left
        placement = Placement(model, projector, inverse, self.show_progress, weight)
        self._placements[key] = placement
        return placement

    # ------------------------------------------------------ training vectors kept across calls
    def cache_training_vectors(self, train_set: Iterable[Any], device: Any = None) -> int:
        """Project ``train_set`` once and keep its influence vectors for the calls that follow.

        Every method that takes a ``train_set`` projects it, one gradient per example, on
        every call; that is most of the cost of scoring a few queries. After this call, the
        methods given **this same object** as ``train_set`` (tested with ``is``) on the same
        ``device`` reuse the kept vectors instead: ``compute_influence_values``,
        ``compute_influence_vector``, ``compute_top_k_from_training_dataset``,
        ``estimate_influence_values_in_batches``, ``top_k``, ``self_influence`` and
        ``influence_matrix``. Only their query side is then computed (whatever
        ``influence_vector_in_cache`` says, since the memory is already spent; a
        ``load_…_path`` still takes precedence, and a ``save_…_path`` receives the kept
        vectors). Memory: ``N × k`` numbers of the working dtype on the device.

        The vectors belong to the data as it is now: after changing ``train_set`` in place,
        call this again. A batch count or batch size that no longer matches the kept vectors
        is refused (:class:`IncompatibleStoreError`). Refitting (:meth:`arnoldi`) drops them,
        as does :meth:`clear_training_vectors`; calling this with another ``train_set``
        replaces them.

        Parameters
        ----------
        train_set : re-iterable of batches
        device : optional
            Where to compute and keep them (``model.on_device(device)``).

        Returns
        -------
        int
            ``N``, the number of training examples kept.

        Raises
        ------
        ValueError
            If ``train_set`` is empty; ``NonFiniteError`` on non-finite gradients.
        """
        placement = self._placed(device)
        self._scoring_data(train_set, "train_set")
        self._kept = None  # a failure below leaves nothing half-kept
        # The losses of the same pass: a store later written from these vectors records them.
        arrays, losses = placement.vectors_and_losses(train_set, True)
        store = MemoryStore(None, arrays, losses)
        self._kept = KeptTrainingVectors(train_set, _device_key(device), store)
        return self._kept.store.num_examples

    def _kept_norms(self, placement: Placement, train_set: Iterable[Any]) -> list[Any]:
        """``‖g‖²`` per kept batch, computed once when the spectral complement needs them."""
        kept = self._kept
        if placement.complement_weight is None or kept is None:
            return []
        if kept.norms is None:
            norms = [
                placement.gradient_norms(batch, index, "train_set")
                for index, batch in enumerate(train_set)
            ]
            self._kept = dataclasses.replace(kept, norms=norms)
            return norms
        return kept.norms

    def clear_training_vectors(self) -> None:
        """Drop the vectors kept by :meth:`cache_training_vectors` (if any)."""
        self._kept = None

    def _kept_vectors(self, train_set: Iterable[Any], device: Any) -> MemoryStore | None:
        """The kept store when it belongs to this very ``train_set`` on this device."""
        kept = self._kept
        if kept is None or kept.train_set is not train_set or kept.device != _device_key(device):
            return None
        return kept.store

    # ------------------------------------------------------------------- influence vectors
    def compute_influence_vector(
        self,
        train_set: Iterable[Any],
        save_influence_vector_ds_path: Any = None,
        device: Any = None,
    ) -> BatchStream:
        """Influence vectors ``diag(1/(λ+δ)) G g_x`` of every example, batch by batch.

        Parameters
        ----------
        train_set : re-iterable of batches
        save_influence_vector_ds_path : str or os.PathLike, optional
            An ``.npz`` store (or a directory, holding ``influence_vectors.npz``). When a store
            there exists and was computed with this model (fingerprint), this eigenbasis
            (digest) and this dtype, it is **loaded** and nothing is recomputed; when none
            exists, the vectors are computed now and saved there atomically. A store of
            another model, fit or dtype is refused (:class:`IncompatibleStoreError`).
        device : optional
            Where to compute (``model.on_device(device)``).

        Returns
        -------
        BatchStream of ``(batch, vectors)``
            ``batch`` is the batch of ``train_set`` untouched; ``vectors`` has shape
            (B, k) in the model's namespace and dtype. Lazy: without a path, each iteration
            computes batch by batch; with a path, it reads the store batch by batch.

        Raises
        ------
        IncompatibleStoreError
            If the store at the path belongs to another model, fit or dtype, or its batches
            do not line up with ``train_set``'s.
        """
        self._scoring_data(train_set, "train_set")
        placement = self._placed(device)
        kept = self._kept_vectors(train_set, device)
        if save_influence_vector_ds_path is None:
            if kept is not None:
                training = TrainingVectors(placement, train_set, kept, "train_set")
                return BatchStream(training.paired, len(kept.batch_sizes))
            return placement.vector_stream(train_set, "train_set")
        argument = "save_influence_vector_ds_path"
        path = resolve_path(save_influence_vector_ds_path, "influence_vectors")
        key = self._store_key(placement)
        if os.path.exists(path):
            store = open_checked_store(placement, train_set, path, key, argument)
        elif kept is not None:
            arrays = list(kept.blocks(placement.model.from_numpy))
            assert kept.losses is not None  # cache_training_vectors records them
            store = write_kept_store(placement.model, arrays, kept.losses, path, key, argument)
        else:
            store = write_vector_store(placement, train_set, path, key, argument)
        vectors = TrainingVectors(placement, train_set, store, argument)
        return BatchStream(vectors.paired, len(store.batch_sizes))

    def compute_influence_values(self, train_set: Iterable[Any], device: Any = None) -> BatchStream:
        """Self-influence ``S(x) = g_xᵀ H⁻¹ g_x`` of every example, batch by batch.

        Parameters
        ----------
        train_set : re-iterable of batches
        device : optional
            Where to compute (``model.on_device(device)``).

        Returns
        -------
        BatchStream of ``(batch, values)``
            ``values`` has shape (B,), in the model's namespace and dtype.
        """
        self._scoring_data(train_set, "train_set")
        placement = self._placed(device)
        xp = placement.xp
        kept = self._kept_vectors(train_set, device)
        if kept is not None:
            # S = Σ v² (λ + δ) with v = P / (λ + δ): the kept vectors suffice.
            training = TrainingVectors(placement, train_set, kept, "train_set")
            damped = 1 / placement.inverse

            norms = self._kept_norms(placement, train_set)
            weight = placement.complement_weight

            def from_kept() -> Iterator[tuple[Any, Any]]:
                for index, (batch, vectors) in enumerate(training.paired()):
                    values = xp.sum(vectors * vectors * damped, axis=1)
                    if weight is not None:
                        projected = vectors * damped
                        kept_part = xp.sum(projected * projected, axis=1)
                        values = values + weight * (norms[index] - kept_part)
                    yield batch, require_finite(xp, values, "self-influence", "train_set", index)

            return BatchStream(from_kept, len(kept.batch_sizes))

        def produce(index: int, batch: Any) -> tuple[Any, Any]:
            return batch, placement.self_influence(batch, index, "train_set")

        return batch_stream(train_set, "train_set", produce, self.show_progress)

    def compute_top_k_from_training_dataset(
        self,
        train_set: Iterable[Any],
        k: int,
        order: ORDER = ORDER.DESCENDING,
        device: Any = None,
    ) -> TrainingTopK:
        """The ``k`` training examples of highest (or lowest) self-influence.

        One pass over ``train_set`` with a running top-k: memory ``O(k + B)``.

        Parameters
        ----------
        train_set : re-iterable of batches
        k : int
            ``1 ≤ k ≤ N`` (the number of examples).
        order : ORDER, default ORDER.DESCENDING
            ``DESCENDING``: highest self-influence first (e.g. mislabelled candidates);
            ``ASCENDING``: lowest first.
        device : optional
            Where to compute.

        Returns
        -------
        TrainingTopK ``(indices, values)``
            ``indices``: integers (int64; int32 in JAX without x64) of shape (k,), global
            positions in ``train_set`` (counting across batches from 0); ``values``: shape
            (k,), their self-influence, best first. Ties keep the smaller index. The
            examples themselves are ``locate_examples(train_set, indices)`` away.

        Raises
        ------
        ValueError
            If ``k`` exceeds the number of examples, ``order`` is unknown, or the data is empty.
        """
        k = _positive_int(k, "k")
        order = as_order(order)
        placement = self._placed(device)
        xp = placement.xp
        running = RunningTopK(k, order, xp=xp, device=placement.model.device)
        start = 0
        for _, values in self.compute_influence_values(train_set, device=device):
            size = int(values.shape[0])
            running.update(xp.reshape(values, (1, size)), start)
            start += size
        values, indices = running.result()
        return TrainingTopK(xp.reshape(indices, (k,)), xp.reshape(values, (k,)))

    # ----------------------------------------------------------------- training stores
    def _scoring_data(self, dataset: Iterable[Any], name: str) -> None:
        """Re-iterable, non-empty, and the same order on every pass (see ``random_order``)."""
        require_data(dataset, name)
        require_fixed_order(self.model, dataset, name)

    def _store_key(self, placement: Placement) -> StoreKey:
        return StoreKey(
            fingerprint=self.model.fingerprint(),
            eigenbasis=self.eigenbasis_digest,
            dtype=placement.model.dtype_name,
            rank=self.eigenbasis.rank,
        )

    def _scratch_path(self) -> str:
        """A fresh file name in a private directory removed with the calculator."""
        if self._scratch_dir is None:
            # The pid in the name lets a later process remove the stores of one that was killed.
            remove_stale_temporaries(tempfile.gettempdir(), SCRATCH_PATTERN)
            self._scratch_dir = tempfile.mkdtemp(prefix=f"krylov_influence_{os.getpid()}_")
            register_for_cleanup(self._scratch_dir)
            weakref.finalize(self, _remove_scratch, self._scratch_dir)
        handle, path = tempfile.mkstemp(dir=self._scratch_dir, suffix=".npz")
        os.close(handle)
        os.remove(path)
        return path

    def _training_vectors(
        self,
        placement: Placement,
        train_set: Iterable[Any],
        cache: CACHE,
        load_path: Any,
        save_path: Any,
        arguments: tuple[str, str],
        device: Any,
    ) -> TrainingVectors:
        return prepare_training_vectors(
            placement,
            train_set,
            cache,
            lambda: self._store_key(placement),
            kept=self._kept_vectors(train_set, device),
            load_path=load_path,
            save_path=save_path,
            load_argument=arguments[0],
            save_argument=arguments[1],
            scratch_path=self._scratch_path,
        )

    def _provenance(self, placement: Placement) -> dict[str, Any]:
        complement = self.eigenbasis.complement
        return {
            "fingerprint": self.model.fingerprint(),
            "eigenbasis": self.eigenbasis_digest,
            "dtype": placement.model.dtype_name,
            "rank": self.eigenbasis.rank,
            # Saved scores depend on c; the influence vectors (and their stores) do not.
            "complement": None if complement is None else complement.value,
        }

    # --------------------------------------------------------------------- pairwise scores
    def estimate_influence_values_in_batches(
        self,
        dataset_to_evaluate: Iterable[Any],
        train_set: Iterable[Any],
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        load_influence_vector_path: Any = None,
        save_influence_vector_path: Any = None,
        save_influence_value_path: Any = None,
        device: Any = None,
    ) -> BatchStream:
        """Scores of every query against every training example, streamed.

        Each query batch is projected once (``G g_z``, by the engine's ``project``); its
        scores against a training batch are one ``(B_query, k) @ (k, B_train)`` product with
        the training influence vectors, which are computed once per call (or loaded) and kept
        as ``influence_vector_in_cache`` says, or taken from
        :meth:`cache_training_vectors` when they were kept for this ``train_set``.

        Parameters
        ----------
        dataset_to_evaluate : re-iterable of batches
            The queries z.
        train_set : re-iterable of batches
            The training examples x.
        influence_vector_in_cache : CACHE, default CACHE.MEMORY
            ``MEMORY``: training vectors held in memory (``N_train × k`` numbers);
            ``DISK``: streamed from a store on disk; ``NO_CACHE``: recomputed from
            ``train_set`` for every query batch.
        load_influence_vector_path : str or os.PathLike, optional
            A store written earlier (``save_influence_vector_path``, or
            ``compute_influence_vector(..., save_influence_vector_ds_path)``) to use instead
            of computing; it must match this model, fit and dtype.
        save_influence_vector_path : str or os.PathLike, optional
            Save the training vectors there as a store (atomically).
        save_influence_value_path : str or os.PathLike, optional
            Compute every score **now** and save them in an ``.npz`` archive (member
            ``scores_{q:06d}_{t:06d}`` is the (B_query, B_train) block of query batch q and
            training batch t); the returned stream then reads them back from the file.
        device : optional
            Where to compute.

        Returns
        -------
        BatchStream of ``(query_batch, BatchStream of (train_batch, scores))``
            ``scores`` has shape (B_query, B_train), in the model's namespace and dtype:
            ``scores[i, j] = I(x_j, z_i) = g_{z_i}ᵀ H⁻¹ g_{x_j}``. The inner stream is
            re-iterable and reuses the query projections.

        Raises
        ------
        ValueError
            On an unknown ``influence_vector_in_cache`` or an empty dataset.
        IncompatibleStoreError
            If a store to load belongs to another model, fit, dtype or training set.
        """
        placement, stream = self._score_stream(
            dataset_to_evaluate,
            train_set,
            as_cache(influence_vector_in_cache, "influence_vector_in_cache"),
            (load_influence_vector_path, save_influence_vector_path),
            device,
            with_train_batches=True,
        )
        if save_influence_value_path is None:
            return stream
        return save_scores(
            placement,
            stream,
            save_influence_value_path,
            dataset_to_evaluate,
            train_set,
            self._provenance(placement),
        )

    def _score_stream(
        self,
        dataset_to_evaluate: Iterable[Any],
        train_set: Iterable[Any],
        cache: CACHE,
        store_paths: tuple[Any, Any],
        device: Any,
        with_train_batches: bool,
    ) -> tuple[Placement, BatchStream]:
        """The placement, and ``(query batch, BatchStream of (train batch or None, scores
        (B_query, B_train)))``.

        Both datasets are checked first; the training vectors come as ``cache`` and the store
        paths (load, save) say. Without ``with_train_batches`` (and without the spectral
        complement, which needs them) the training set is not iterated again for its batches:
        the scores come from the training vectors alone, which saves a pass over
        ``train_set`` per query batch, and kept vectors are checked against it once here.
        """
        self._scoring_data(dataset_to_evaluate, "dataset_to_evaluate")
        self._scoring_data(train_set, "train_set")
        placement = self._placed(device)
        training = self._training_vectors(
            placement,
            train_set,
            cache,
            *store_paths,
            ("load_influence_vector_path", "save_influence_vector_path"),
            device,
        )
        if not with_train_batches:
            training.require_aligned()
        xp = placement.xp

        def scores_against_training(projected: Any, query_grads: Any) -> BatchStream:
            def run() -> Iterator[tuple[Any, Any]]:
                if query_grads is not None:
                    for index, (batch, vectors) in enumerate(training.paired()):
                        yield (
                            batch,
                            placement.complement_scores(
                                projected, query_grads, batch, vectors, index
                            ),
                        )
                    return
                pairs = (
                    training.paired()
                    if with_train_batches
                    else ((None, vectors) for _, vectors in training.indexed_blocks(lambda v: v))
                )
                for index, (batch, vectors) in enumerate(pairs):
                    scores = xp.matmul(projected, xp.permute_dims(vectors, (1, 0)))
                    yield batch, require_finite(xp, scores, "scores", "train_set", index)

            return BatchStream(run, training.num_batches)

        def produce(index: int, query: Any) -> tuple[Any, BatchStream]:
            projected, query_grads = placement.query_side(query, index)
            return query, scores_against_training(projected, query_grads)

        return placement, batch_stream(
            dataset_to_evaluate, "dataset_to_evaluate", produce, self.show_progress
        )

    # ------------------------------------------------------------------------------ top-k
    def top_k(
        self,
        dataset_to_evaluate: Iterable[Any],
        train_set: Iterable[Any],
        k: int = 5,
        nearest_neighbors: BaseNearestNeighbors | None = None,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        load_influence_vector_ds_path: Any = None,
        save_influence_vector_ds_path: Any = None,
        save_top_k_ds_path: Any = None,
        order: ORDER = ORDER.DESCENDING,
        d_type: Any = None,
        device: Any = None,
    ) -> BatchStream:
        """For each query, the ``k`` most influential training examples: values and indices.

        An exact blocked search: every query batch is projected once, then scored against
        the training influence vectors in blocks of consecutive training batches (the
        search's ``block_columns``, default 4096 examples), keeping a running top-k per query
        (memory ``O(B_query · (k + block_columns + B_train))``, plus ``N_train × k`` for
        ``CACHE.MEMORY`` or :meth:`cache_training_vectors`).

        Parameters
        ----------
        dataset_to_evaluate : re-iterable of batches
            The queries z.
        train_set : re-iterable of batches
            The training examples x.
        k : int, default 5
            ``1 ≤ k ≤ N_train``.
        nearest_neighbors : BaseNearestNeighbors, optional
            The search; default a new :class:`~krylov_influence.topk.LinearNearestNeighbors`
            (exact). It is (re)built for this call.
        influence_vector_in_cache : CACHE, default CACHE.MEMORY
            Where the training vectors live (see
            :meth:`estimate_influence_values_in_batches`).
        load_influence_vector_ds_path : str or os.PathLike, optional
            A matching store of training vectors to use instead of computing them.
        save_influence_vector_ds_path : str or os.PathLike, optional
            Save the training vectors there as a store (atomically).
        save_top_k_ds_path : str or os.PathLike, optional
            Compute every result **now** and save them in an ``.npz`` archive (members
            ``values_{q:06d}`` and ``indices_{q:06d}`` per query batch); the returned
            stream then reads them back from the file.
        order : ORDER, default ORDER.DESCENDING
            ``DESCENDING``: highest scores (proponents) first; ``ASCENDING``: lowest
            (opponents) first.
        d_type : dtype, optional
            dtype of the search (``"float32"``, ``"float64"`` or a framework dtype); default
            the model's.
        device : optional
            Where to compute.

        Returns
        -------
        BatchStream of TopKBatch ``(queries, values, indices)``
            ``queries``: the query batch untouched; ``values``: shape (B_query, k), the
            scores ``I(x, z_i)`` best first; ``indices``: integers (int64; int32 in JAX
            without x64), shape (B_query, k), the global positions of those training
            examples in ``train_set`` (counting across batches from 0; ties keep the smaller
            index). Training examples are not held:
            :meth:`locate_examples` maps indices to (batch, row).

        Raises
        ------
        ValueError
            On ``k`` above the number of training examples, an unknown ``order`` or
            ``influence_vector_in_cache``, an empty dataset.
        IncompatibleStoreError
            If a store to load belongs to another model, fit or dtype.
        """
        k = _positive_int(k, "k")
        order = as_order(order)
        cache = as_cache(influence_vector_in_cache, "influence_vector_in_cache")
        chosen_search = nearest_neighbors is not None
        if nearest_neighbors is None:
            nearest_neighbors = LinearNearestNeighbors()
        elif not isinstance(nearest_neighbors, BaseNearestNeighbors):
            raise TypeError(
                "nearest_neighbors: expected a krylov_influence.BaseNearestNeighbors, got "
                f"{type(nearest_neighbors).__name__}"
            )
        self._scoring_data(dataset_to_evaluate, "dataset_to_evaluate")
        self._scoring_data(train_set, "train_set")
        placement = self._placed(device)
        xp = placement.xp
        score_dtype = (
            placement.model.dtype if d_type is None else getattr(xp, _xp.dtype_name(d_type))
        )

        def convert(array: Any) -> Any:
            return array if array.dtype == score_dtype else xp.astype(array, score_dtype)

        training = self._training_vectors(
            placement,
            train_set,
            cache,
            load_influence_vector_ds_path,
            save_influence_vector_ds_path,
            ("load_influence_vector_ds_path", "save_influence_vector_ds_path"),
            device,
        )
        num_examples = training.num_examples
        if num_examples is not None and k > num_examples:
            raise ValueError(
                f"k={k}: expected at most the number of training examples ({num_examples})"
            )
        if placement.complement_weight is not None:
            if chosen_search:
                raise ValueError(
                    "nearest_neighbors: with the spectral complement a score is not an inner "
                    "product of k-vectors, so top_k scans every training batch exactly; leave "
                    "nearest_neighbors=None"
                )
        else:
            # The search reads the vectors alone: kept ones are checked against train_set here.
            training.require_aligned()
            nearest_neighbors.build(
                lambda: training.indexed_blocks(convert), num_examples=num_examples, xp=xp
            )
        search = nearest_neighbors

        def scan(projected: Any, query_grads: Any) -> tuple[Any, Any]:
            """Exact top-k over the complement's score blocks (one training pass)."""
            running = placement.complement_top_k(
                projected, query_grads, training.paired(), k, order, convert
            )
            return running.result()  # k above the examples seen: a ValueError naming k

        def produce(index: int, query: Any) -> TopKBatch:
            projected, query_grads = placement.query_side(query, index)
            if query_grads is not None:
                values, indices = scan(projected, query_grads)
            else:
                values, indices = search.query(convert(projected), k, order)
            require_finite(xp, values, "top-k scores", "dataset_to_evaluate", index)
            return TopKBatch(query, values, indices)

        stream = batch_stream(
            dataset_to_evaluate, "dataset_to_evaluate", produce, self.show_progress
        )
        if save_top_k_ds_path is None:
            return stream
        metadata = {"k": k, "order": order.name, **self._provenance(placement)}
        return save_top_k(
            placement, stream, save_top_k_ds_path, dataset_to_evaluate, convert, metadata
        )

    # ------------------------------------------------------------------------ helpers
    def locate_examples(self, train_set: Iterable[Any], indices: Any) -> tuple[Any, Any]:
        """Map global training indices to ``(batch number, row in batch)``.

        One pass over ``train_set`` reading only batch sizes (no gradients).

        Parameters
        ----------
        train_set : re-iterable of batches
            The training set the indices refer to.
        indices : array of int, any shape
            Global indices, e.g. ``TopKBatch.indices`` or ``TrainingTopK.indices``.

        Returns
        -------
        batch_numbers, rows : numpy.ndarray of int64, the shape of ``indices``
            Example ``indices[...]`` is row ``rows[...]`` of batch ``batch_numbers[...]``
            (for a list of batches: ``train_set[b][...][r]``).

        Raises
        ------
        IndexError
            If an index is negative or not below the number of training examples.
        """
        self._scoring_data(train_set, "train_set")
        found = np.asarray(_xp.to_numpy(indices))
        if found.dtype.kind not in "iu":
            raise TypeError(
                f"indices: expected integers (e.g. TopKBatch.indices), got dtype {found.dtype}"
            )
        host = found.astype(np.int64)
        sizes = np.array([self.model.batch_size(b) for b in train_set], dtype=np.int64)
        ends = np.cumsum(sizes)
        total = int(ends[-1]) if ends.size else 0
        if host.size and (host.min() < 0 or host.max() >= total):
            raise IndexError(
                f"indices: expected values in [0, {total}), got {host.min()}..{host.max()}"
            )
        batch_numbers = np.searchsorted(ends, host, side="right")
        rows = host - (ends[batch_numbers] - sizes[batch_numbers])
        return batch_numbers.astype(np.int64), rows.astype(np.int64)

    def influence_matrix(
        self, dataset_to_evaluate: Iterable[Any], train_set: Iterable[Any], device: Any = None
    ) -> np.ndarray:
        """All scores as one host matrix, shape (N_queries, N_train), float64 (small data)."""
        # The scores alone: the training set is iterated once (for its vectors), not once
        # more per query batch for batches that this matrix does not return.
        _, stream = self._score_stream(
            dataset_to_evaluate, train_set, CACHE.MEMORY, (None, None), device, False
        )
        rows = []
        for _, per_train in stream:
            rows.append(np.concatenate([self.model.to_numpy(s) for _, s in per_train], axis=1))
        return np.concatenate(rows, axis=0).astype(np.float64)

    def self_influence(self, train_set: Iterable[Any], device: Any = None) -> np.ndarray:
        """All self-influence values as one host vector, shape (N,), float64."""
        return np.concatenate(
            [
                self.model.to_numpy(v)
                for _, v in self.compute_influence_values(train_set, device=device)
            ]
        ).astype(np.float64)


@dataclass(frozen=True)
class KeptTrainingVectors:
    """Influence vectors kept by ``cache_training_vectors``: for which data, on which device."""

    train_set: Iterable[Any]  # held, so that its id can never be reused by another object
    device: str
    store: MemoryStore
    norms: list[Any] | None = None  # ‖g‖² per batch, once the spectral complement asks


BASIS_LOCATIONS = ("auto", "device", "host", "disk")


def _physical_memory() -> int:
    """Bytes of physical memory (POSIX ``sysconf``; 16 GiB where it is unavailable)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 16 * 2**30


BASIS_PATTERN = re.compile(r"krylov_influence_(?P<pid>\d+)_basis_[A-Za-z0-9_]+\.npy(\.G\.npy)?")


def _remove_file(path: str) -> None:
    unregister_cleanup(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


SCRATCH_PATTERN = re.compile(r"krylov_influence_(?P<pid>\d+)_[A-Za-z0-9_]+")


def _remove_scratch(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    unregister_cleanup(directory)


def _device_key(device: Any) -> str:
    return "" if device is None else str(device)


def _damping(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"damping={value!r}: expected a finite number >= 0")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"damping={value!r}: expected a finite number >= 0")
    return number


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise TypeError(f"seed={value!r}: expected an integer >= 0 (the start vector's seed)")
    return int(value)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)
