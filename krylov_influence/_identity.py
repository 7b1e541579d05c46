"""What identifies a model, a training set and a stored result, and the checks that use it.

A stored result is served only to the model, data and order that produced it. Three
identities, each comparable across engines (the same neutral model in PyTorch and JAX must
be able to use each other's files):

Model
    The exact digest of the flat parameter values (:meth:`InfluenceModel.fingerprint`), and,
    for a fitted eigenbasis loaded onto a model, the **Hessian check**: the kept Ritz pairs
    ``(λ_i, g_i)`` must still be Ritz pairs of the loaded model's Hessian over the Hessian
    data, ``‖H g_i − λ_i g_i‖ ≤ 2 r_i + tol · max|λ|`` with ``r_i`` the residual the fit
    reported. Another activation, another loss or another ``l2`` changes ``H`` and fails it;
    the same model in another engine passes within round-off. Parameters alone cannot tell a
    Tanh net from a ReLU net with the same weights.
Training data
    The per-example losses of every batch, stored beside the influence vectors (float64) and
    recomputed (one forward pass, no gradients) before a store is reused: another data set
    with the same batch layout, a reordered one or one with a changed label fails it.
Order
    A dataset that yields a different order on every pass (a ``DataLoader`` with
    ``shuffle=True``) is refused where results are paired with batches or indices by position.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from krylov_influence._archive import ArchiveReader
from krylov_influence.cache import DiskStore
from krylov_influence.engine import InfluenceModel, ShardedHessianData
from krylov_influence.errors import IncompatibleStoreError, NonFiniteError

__all__ = [
    "check_hessian_agreement",
    "check_losses",
    "check_training_data",
    "guard_overwrite",
    "loss_tolerance",
    "require_fixed_order",
]


def loss_tolerance(dtype_name: str) -> float:
    """Relative tolerance on recomputed losses: ``√eps`` of the dtype they were computed in.

    Recomputing in the same engine gives the same bits; another engine differs by a few ulps
    of the logits; a changed example changes its loss by far more than ``√eps``.
    """
    return float(np.sqrt(np.finfo(dtype_name).eps))


def check_training_data(
    model: InfluenceModel, train_set: Iterable[Any], store: DiskStore, argument: str
) -> None:
    """Refuse ``store`` unless ``train_set`` is the data its vectors were computed on.

    One forward pass over ``train_set``: the number of batches, every batch size and every
    per-example loss must match what the store recorded.

    Raises
    ------
    IncompatibleStoreError
        Naming the argument, the store's path and the first batch that differs.
    """
    check_losses(
        model,
        train_set,
        store.batch_sizes,
        store.stored_losses,
        loss_tolerance(store.key.dtype),
        where=f"{argument}={store.path!r}",
        names=("train_set", "store", "training set"),
    )


def check_losses(
    model: InfluenceModel,
    dataset: Iterable[Any],
    batch_sizes: Sequence[int],
    stored_losses: Callable[[int], np.ndarray],
    tol: float,
    *,
    where: str,
    names: tuple[str, str, str],
) -> None:
    """Refuse unless ``dataset`` has these batch sizes and per-example losses (within ``tol``).

    Parameters
    ----------
    names : (dataset argument, what recorded them, what the data is called)
        For the messages, e.g. ``("train_set", "store", "training set")``.
    """
    dataset_name, owner, kind = names
    count = 0
    for index, (size, losses) in enumerate(_sizes_and_losses(model, dataset)):
        if index >= len(batch_sizes):
            raise IncompatibleStoreError(
                f"{where}: {dataset_name} has more batches than the {owner} "
                f"({len(batch_sizes)}); the {owner} was computed on another {kind}"
            )
        if size != batch_sizes[index]:
            raise IncompatibleStoreError(
                f"{where}: batch {index} of {dataset_name} has {size} examples but the {owner} "
                f"has {batch_sizes[index]}; the {owner} was computed on another {kind}"
            )
        stored = stored_losses(index)
        scale = tol * (np.abs(stored) + np.abs(losses) + np.mean(np.abs(stored)) + 1e-300)
        worst = np.abs(losses - stored) - scale
        if not np.isfinite(losses).all() or (worst > 0).any():
            row = int(np.argmax(worst)) if np.isfinite(losses).all() else 0
            raise IncompatibleStoreError(
                f"{where}: example {row} of batch {index} of {dataset_name} has loss "
                f"{losses[row]!r} but the {owner} was computed on an example with loss "
                f"{stored[row]!r}; the {owner} belongs to another {kind} (or another order, "
                "or changed labels)"
            )
        count += 1
    if count != len(batch_sizes):
        raise IncompatibleStoreError(
            f"{where}: {dataset_name} has {count} batches but the {owner} has "
            f"{len(batch_sizes)}; the {owner} was computed on another {kind}"
        )


def _sizes_and_losses(model: InfluenceModel, dataset: Any) -> Iterable[tuple[int, np.ndarray]]:
    """``(batch size, per-example losses float64)`` per batch, lazily; sharded Hessian data
    (:class:`~krylov_influence.engine.ShardedHessianData`) computes them where it lives."""
    if isinstance(dataset, ShardedHessianData):
        sizes, flat = dataset.hessian_losses()
        ends = np.cumsum([0, *sizes])
        for index, size in enumerate(sizes):
            yield int(size), flat[ends[index] : ends[index + 1]]
        return
    for batch in dataset:
        losses = np.asarray(model.to_numpy(model.losses(batch)), dtype=np.float64)
        yield int(model.batch_size(batch)), losses


def check_hessian_agreement(
    model: InfluenceModel,
    hessian_data: Iterable[Any],
    eigenvalues: np.ndarray,
    projector: Any,
    residuals: np.ndarray,
    *,
    where: str,
    seed: int = 0,
) -> None:
    """Refuse an eigenbasis whose Ritz pairs are not Ritz pairs of ``model``'s Hessian.

    Three Hessian-vector products in one pass over ``hessian_data``: the Ritz vectors of the
    largest and of the smallest kept |λ|, and a random unit combination of all k of them.

    Parameters
    ----------
    model : InfluenceModel
    hessian_data : re-iterable of batches
    eigenvalues : numpy.ndarray, shape (k,)
        Undamped kept eigenvalues.
    projector : array, shape (k, p)
        ``G`` in the model's namespace.
    residuals : numpy.ndarray, shape (k,)
        Ritz residual estimates from the fit.
    where : str
        Names the file, for messages.

    Raises
    ------
    IncompatibleStoreError
        When a residual exceeds what the fit reported by more than round-off.
    """
    k = eigenvalues.shape[0]
    coefficients = np.random.default_rng(seed).standard_normal(k)
    coefficients /= np.linalg.norm(coefficients)
    picks = sorted({0, int(np.argmin(np.abs(eigenvalues)))})
    # Three combinations of G's rows; G off the device is read a chunk of rows at a time.
    # Rows: the picked g_i, then Σ c_i g_i (the probes), then Σ c_i λ_i g_i (its expected H·).
    combine = np.zeros((len(picks) + 2, k))
    combine[np.arange(len(picks)), picks] = 1.0
    combine[-2] = coefficients
    combine[-1] = coefficients * eigenvalues
    if hasattr(projector, "row_chunks"):  # a HostProjector
        combined, start = np.zeros((combine.shape[0], int(projector.shape[1]))), 0
        for rows in projector.row_chunks(64 * 2**20):
            stop = start + rows.shape[0]
            combined += combine[:, start:stop] @ np.asarray(rows, dtype=np.float64)
            start = stop
    else:
        combined = combine @ np.asarray(model.to_numpy(projector), dtype=np.float64)
    probes, host_rows = combined[:-1], combined[: len(picks)]
    if isinstance(hessian_data, ShardedHessianData):
        products = hessian_data.hessian_operator(model).mm(model.from_numpy(probes))
    else:
        products = model.hvps(model.from_numpy(probes), hessian_data)
    products = np.asarray(model.to_numpy(products), dtype=np.float64)
    if not np.isfinite(products).all():
        raise NonFiniteError(f"{where}: the Hessian check gave non-finite products")
    # H g_i = λ_i g_i for the picks; H Σ c_i g_i = Σ c_i λ_i g_i.
    expected = np.concatenate([eigenvalues[picks, None] * host_rows, combined[-1:]])
    found = np.linalg.norm(products - expected, axis=1)
    bounds = np.concatenate([residuals[picks], [np.abs(coefficients) @ residuals]])
    # Round-off of an HVP in the model's dtype, scaled by ‖H‖ ≈ max|λ|; 64 ulps of margin.
    eps = float(np.finfo(model.dtype_name).eps)
    allowed = 2.0 * bounds + 64 * eps * np.sqrt(model.num_parameters) * np.max(np.abs(eigenvalues))
    if (found > allowed).any():
        worst = int(np.argmax(found / allowed))
        what = "the combination of all" if worst == len(picks) else f"Ritz pair {picks[worst]} of"
        raise IncompatibleStoreError(
            f"{where}: the eigenbasis does not fit this model's Hessian: for {what} the kept "
            f"pairs, ‖H g − λ g‖ = {found[worst]:.3g} where the fit reported at most "
            f"{bounds[worst]:.3g} (tolerance {allowed[worst]:.3g}). The model computes "
            "something else than the one the basis was fitted on (another architecture, "
            "activation, loss or l2), or the Hessian data differs; refit, or load it onto the "
            "model and data it was fitted with"
        )


def guard_overwrite(target: str, argument: str, kind: str, provenance: dict[str, Any]) -> None:
    """Refuse to write over a file that is not a result of this model and fit.

    A save may replace an archive of the same ``kind`` produced by the same model, eigenbasis,
    dtype and rank (an earlier run of the same computation); anything else at ``target`` (a
    foreign file, another kind of archive, another model's results) is left alone.

    Raises
    ------
    IncompatibleStoreError
        Naming the argument, the path and why it is not overwritten.
    """
    if not os.path.exists(target):
        return
    try:
        reader = ArchiveReader(target, argument)
    except IncompatibleStoreError as error:
        raise IncompatibleStoreError(
            f"{error}; it is not overwritten: delete it or choose another path"
        ) from None
    meta = reader.metadata
    reader.close()
    if meta.get("kind") != kind:
        raise reader.error(
            f"holds a {meta.get('kind')!r} archive, not {kind!r}; it is not overwritten: delete "
            "it or choose another path"
        )
    differs = [name for name, value in provenance.items() if meta.get(name) != value]
    if differs:
        raise reader.error(
            f"holds results of another model or fit (differs in {', '.join(differs)}); it is "
            "not overwritten: delete it or choose another path"
        )


def require_fixed_order(model: InfluenceModel, dataset: Any, name: str) -> None:
    """Refuse a dataset that yields another order on every pass (the engine knows which).

    Raises
    ------
    ValueError
        Naming ``name`` and what makes the order random.
    """
    reason = model.random_order(dataset)
    if reason is not None:
        raise ValueError(
            f"{name}: {reason}, so every pass yields the examples in another order and results "
            "would be paired with the wrong batches and indices; pass a deterministic loader "
            "(e.g. DataLoader(..., shuffle=False)) for scoring"
        )
