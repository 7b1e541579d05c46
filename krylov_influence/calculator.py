"""``ArnoldiInfluenceCalculator``: fit the low-rank inverse Hessian once, score many examples.

The fitted state is an :class:`~krylov_influence.eigen.EigenBasis`: k eigenvalues ``λ`` and
the projector ``G`` (k × p). Every example is reduced to its projection ``P = G g`` (k numbers,
by JVPs), and every quantity is k-dimensional algebra on projections:

- influence vector ``v(x) = diag(1/(λ+δ)) G g_x``, shape (k,);
- self-influence ``S(x) = Σ_i (G g_x)_i² / (λ_i + δ)``;
- pairwise score ``I(x, z) = (G g_z)ᵀ diag(1/(λ+δ)) (G g_x)`` (positive: x is a proponent of z).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from krylov_influence import _xp
from krylov_influence._data import (
    BatchStream,
    dataset_length,
    progress_bar,
    require_reiterable,
    resolve_show_progress,
)
from krylov_influence.arnoldi import arnoldi_iteration
from krylov_influence.eigen import EIGENVALUE_SELECTIONS, EigenBasis, build_eigenbasis
from krylov_influence.engine import InfluenceModel
from krylov_influence.errors import NonFiniteError
from krylov_influence.registry import bind_model

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
    dtype : str or dtype, default "float32"
        Working dtype of the Krylov basis and projector (``"float32"``/``"float64"`` or the
        engine's dtype object).
    damping : float, keyword-only, default 0.0
        δ ≥ 0 added to the kept eigenvalues (the exact reference is then ``(H + δI)⁻¹``).
    seed : int, keyword-only, default 0
        Seed of the host generator of the start vector; the same in every engine.
    hessian_dataset : re-iterable of batches, optional, keyword-only
        Data the Hessian averages over; default ``train_dataset``.
    eigenvalue_selection : {"magnitude", "positive", "algebraic"}, keyword-only
        Which Ritz pairs to keep: largest |λ| (default, the paper), largest positive λ, or
        largest λ.
    show_progress : bool, optional, keyword-only
        tqdm bars on the Arnoldi loop and passes over data; default: when stderr is a
        terminal.

    Attributes
    ----------
    model : InfluenceModel
    eigenbasis : EigenBasis
        The fitted state, with diagnostics (Ritz residuals, orthogonality, restarts).

    Raises
    ------
    ValueError
        On ``k_largest_eig_vals > subspace_dim``, ``subspace_dim > p``, an empty dataset,
        or non-finite losses (naming the batch).
    """

    def __init__(
        self,
        model: Any,
        train_dataset: Iterable[Any],
        subspace_dim: int,
        force_hermitian: bool,
        k_largest_eig_vals: int,
        dtype: Any = "float32",
        *,
        damping: float = 0.0,
        seed: int = 0,
        hessian_dataset: Iterable[Any] | None = None,
        eigenvalue_selection: str = "magnitude",
        show_progress: bool | None = None,
    ):
        self.model: InfluenceModel = bind_model(model)
        self.train_dataset = require_reiterable(train_dataset, "train_dataset")
        self.hessian_dataset = require_reiterable(
            train_dataset if hessian_dataset is None else hessian_dataset, "hessian_dataset"
        )
        self.dtype = _xp.dtype_name(dtype)
        self.force_hermitian = bool(force_hermitian)
        self.k_largest_eig_vals = _positive_int(k_largest_eig_vals, "k_largest_eig_vals")
        self.subspace_dim = _positive_int(subspace_dim, "subspace_dim")
        self.damping = float(damping)
        self.seed = int(seed)
        if eigenvalue_selection not in EIGENVALUE_SELECTIONS:
            raise ValueError(
                f"eigenvalue_selection={eigenvalue_selection!r}: expected one of "
                f"{EIGENVALUE_SELECTIONS}"
            )
        self.eigenvalue_selection = eigenvalue_selection
        self.show_progress = resolve_show_progress(show_progress)
        if self.dtype == "float64" and not self.model.capabilities.float64:
            raise ValueError(f"dtype='float64': the {self.model.engine_name} engine has no float64")
        self.num_hessian_examples = self._validate_data(self.hessian_dataset, "hessian_dataset")
        self.eigenbasis: EigenBasis = self._fit(self.subspace_dim)

    # --------------------------------------------------------------------------- fitting
    def _validate_data(self, dataset: Iterable[Any], name: str) -> int:
        """One forward pass: count examples and check every loss is finite."""
        xp, model = self.model.xp, self.model
        count = 0
        for index, batch in enumerate(dataset):
            losses = model.losses(batch)
            if not bool(xp.all(xp.isfinite(losses))):
                raise NonFiniteError(f"{name}: batch {index} has non-finite losses (NaN or Inf)")
            count += model.batch_size(batch)
        if count == 0:
            raise ValueError(f"{name}: the dataset is empty")
        return count

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
        operator = model.hessian_operator(self.hessian_dataset)
        with progress_bar(self.show_progress, subspace_dim, "Arnoldi") as bar:
            result = arnoldi_iteration(
                operator,
                subspace_dim,
                seed=self.seed,
                dtype=self.dtype,
                xp=model.xp,
                device=model.device,
                to_numpy=model.to_numpy,
                progress=bar.update,
            )
        return build_eigenbasis(
            result,
            self.k_largest_eig_vals,
            force_hermitian=self.force_hermitian,
            selection=self.eigenvalue_selection,  # type: ignore[arg-type]
            damping=self.damping,
            xp=model.xp,
            device=model.device,
        )

    def arnoldi(self, dim: int) -> tuple[Any, Any]:
        """Refit with a Krylov subspace of dimension ``dim``; return ``(eig_vals, G)``.

        Parameters
        ----------
        dim : int
            New ``subspace_dim`` (``k_largest_eig_vals ≤ dim ≤ p``).

        Returns
        -------
        eig_vals : array, shape (k,)
            The kept eigenvalues of the damped Hessian, ``λ + δ`` (what the influence
            formula inverts), in the model's namespace.
        G : array, shape (k, p)
            The projector; its rows are orthonormal Ritz vectors.
        """
        self.subspace_dim = _positive_int(dim, "dim")
        self.eigenbasis = self._fit(self.subspace_dim)
        return self.eig_vals, self.G

    @property
    def eig_vals(self) -> Any:
        """``λ + δ`` of the kept pairs, shape (k,), in the model's namespace and dtype."""
        return self.model.from_numpy(self.eigenbasis.damped_eigenvalues)

    @property
    def G(self) -> Any:
        """The projector, shape (k, p), in the working dtype on the model's device."""
        return self.eigenbasis.projector

    # ------------------------------------------------------------------------ projections
    def _projections(self, batch: Any, index: int, stage: str) -> Any:
        """``G g`` for every example of ``batch``: shape (B, k), model dtype."""
        model = self.model
        projector = self.eigenbasis.projector
        if projector.dtype != model.dtype:
            projector = model.xp.astype(projector, model.dtype)
        projected = model.project(projector, batch)
        xp = model.xp
        if not bool(xp.all(xp.isfinite(projected))):
            raise NonFiniteError(
                f"{stage}: batch {index} gives non-finite gradients (NaN or Inf loss?)"
            )
        return projected

    def _inverse_eigenvalues(self) -> Any:
        return self.model.from_numpy(self.eigenbasis.inverse_eigenvalues)

    def _stream(self, dataset: Iterable[Any], name: str, produce: Any) -> BatchStream:
        """Lazy per-batch results of ``produce(index, batch)``; empty data is an error."""
        require_reiterable(dataset, name)

        def run() -> Iterator[Any]:
            seen = False
            with progress_bar(self.show_progress, dataset_length(dataset), name) as bar:
                for index, batch in enumerate(dataset):
                    seen = True
                    yield produce(index, batch)
                    bar.update(1)
            if not seen:
                raise ValueError(f"{name}: the dataset is empty")

        return BatchStream(run, dataset_length(dataset))

    def compute_influence_vector(
        self,
        train_set: Iterable[Any],
        save_influence_vector_ds_path: Any = None,
        device: Any = None,
    ) -> BatchStream:
        """Influence vectors ``diag(1/(λ+δ)) G g`` of every example, batch by batch.

        Parameters
        ----------
        train_set : re-iterable of batches
        save_influence_vector_ds_path : optional
            Reserved for the disk cache.
        device : optional
            Reserved for device placement.

        Returns
        -------
        BatchStream of ``(batch, vectors)``
            ``vectors`` has shape (B, k), in the model's namespace.
        """
        inverse = self._inverse_eigenvalues()

        def produce(index: int, batch: Any) -> tuple[Any, Any]:
            return batch, self._projections(batch, index, "train_set") * inverse

        return self._stream(train_set, "train_set", produce)

    def compute_influence_values(self, train_set: Iterable[Any], device: Any = None) -> BatchStream:
        """Self-influence ``g_xᵀ H⁻¹ g_x`` of every example, batch by batch.

        Parameters
        ----------
        train_set : re-iterable of batches
        device : optional
            Reserved for device placement.

        Returns
        -------
        BatchStream of ``(batch, values)``
            ``values`` has shape (B,), in the model's namespace.
        """
        inverse = self._inverse_eigenvalues()
        xp = self.model.xp

        def produce(index: int, batch: Any) -> tuple[Any, Any]:
            projected = self._projections(batch, index, "train_set")
            return batch, xp.sum(projected * projected * inverse, axis=1)

        return self._stream(train_set, "train_set", produce)

    def estimate_influence_values_in_batches(
        self, dataset_to_evaluate: Iterable[Any], train_set: Iterable[Any]
    ) -> BatchStream:
        """Scores of every query against every training example, streamed.

        Each query batch is projected once; the training influence vectors are computed
        once and kept in memory (k numbers per example).

        Parameters
        ----------
        dataset_to_evaluate : re-iterable of batches
            The queries z.
        train_set : re-iterable of batches
            The training examples x.

        Returns
        -------
        BatchStream of ``(query_batch, BatchStream of (train_batch, scores))``
            ``scores`` has shape (B_query, B_train): ``scores[i, j] = I(x_j, z_i)``.
        """
        cached = [vectors for _, vectors in self.compute_influence_vector(train_set)]
        train_batches = train_set

        def produce(index: int, query: Any) -> tuple[Any, BatchStream]:
            projected = self._projections(query, index, "dataset_to_evaluate")

            def inner() -> Iterator[Any]:
                for batch, vectors in zip(train_batches, cached):
                    yield batch, projected @ vectors.T

            return query, BatchStream(inner, len(cached))

        return self._stream(dataset_to_evaluate, "dataset_to_evaluate", produce)

    # ------------------------------------------------------------------------ helpers
    def influence_matrix(
        self, dataset_to_evaluate: Iterable[Any], train_set: Iterable[Any]
    ) -> np.ndarray:
        """All scores as one host matrix, shape (N_queries, N_train), float64 (small data)."""
        rows = []
        for _, per_train in self.estimate_influence_values_in_batches(
            dataset_to_evaluate, train_set
        ):
            rows.append(np.concatenate([self.model.to_numpy(s) for _, s in per_train], axis=1))
        return np.concatenate(rows, axis=0).astype(np.float64)

    def self_influence(self, train_set: Iterable[Any]) -> np.ndarray:
        """All self-influence values as one host vector, shape (N,), float64."""
        return np.concatenate(
            [self.model.to_numpy(v) for _, v in self.compute_influence_values(train_set)]
        ).astype(np.float64)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)
