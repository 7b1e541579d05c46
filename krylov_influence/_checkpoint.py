"""Checkpoints of a running Arnoldi fit: written atomically, resumed only by the same fit.

Private to :mod:`krylov_influence.calculator` (``checkpoint_path=``, ``checkpoint_every=``),
which documents the behaviour. A checkpoint is one archive (see :mod:`krylov_influence._archive`)
holding an :class:`~krylov_influence.arnoldi.ArnoldiState` (the basis rows so far, the
Hessenberg matrix, the restart generator's state) and what identifies the fit it belongs to:

- the settings that shape the iteration (p, ``subspace_dim``, ``block_size``, ``seed``, the
  working dtype);
- the model's parameter fingerprint;
- the Hessian data: every batch size and every per-example loss (float64), recomputed and
  compared before a resume, as for stores of influence vectors. Another activation, loss or
  ``l2`` with the same parameters changes the losses too.

A checkpoint that does not match is refused with :class:`IncompatibleStoreError`, never
overwritten silently: it may be the only copy of hours of work of another fit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from krylov_influence._archive import ArchiveReader, AtomicArchiveWriter
from krylov_influence._identity import check_losses, loss_tolerance
from krylov_influence.arnoldi import ArnoldiState
from krylov_influence.engine import InfluenceModel, ShardedHessianData
from krylov_influence.errors import IncompatibleStoreError

__all__ = [
    "CheckpointKey",
    "HessianLosses",
    "read_checkpoint",
    "remove_checkpoint",
    "write_checkpoint",
]

KIND = "krylov_influence.arnoldi_checkpoint"
VERSION = 1


@dataclass(frozen=True)
class CheckpointKey:
    """What a checkpoint must match to be resumed (beside the Hessian data's losses)."""

    fingerprint: str
    num_parameters: int
    subspace_dim: int
    block_size: int
    seed: int
    dtype: str

    def fields(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "num_parameters": self.num_parameters,
            "subspace_dim": self.subspace_dim,
            "block_size": self.block_size,
            "seed": self.seed,
            "dtype": self.dtype,
        }


class HessianLosses:
    """The Hessian data's per-example losses, computed once per fit (one forward pass)."""

    def __init__(
        self,
        model: InfluenceModel,
        data: Iterable[Any],
        known: tuple[list[int], np.ndarray] | None = None,
    ):
        # known: losses already checked against the data (a resumed checkpoint's), so the
        # next write does not make a second forward pass.
        self._model, self._data = model, data
        self._value: tuple[list[int], np.ndarray] | None = known

    def get(self) -> tuple[list[int], np.ndarray]:
        """``(batch sizes, all losses (N,) float64)``."""
        if self._value is None and isinstance(self._data, ShardedHessianData):
            sizes, flat = self._data.hessian_losses()
            self._value = ([int(size) for size in sizes], np.asarray(flat, dtype=np.float64))
        if self._value is None:
            sizes, losses = [], []
            for batch in self._data:
                sizes.append(int(self._model.batch_size(batch)))
                losses.append(self._model.to_numpy(self._model.losses(batch)))
            flat = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in losses])
            self._value = (sizes, flat)
        return self._value


def write_checkpoint(
    path: str, key: CheckpointKey, state: ArnoldiState, losses: HessianLosses
) -> None:
    """Replace the checkpoint at ``path`` by ``state``, atomically."""
    sizes, flat = losses.get()
    metadata = {
        "kind": KIND,
        "version": VERSION,
        **key.fields(),
        "products": int(state.products),
        "basis_rows": int(state.basis_rows.shape[0]),
        "restarts": [int(r) for r in state.restarts],
        "norm_estimate": float(state.norm_estimate),
        "rng_state": state.rng_state,
        "hessian_batch_sizes": sizes,
    }
    with AtomicArchiveWriter(path) as writer:
        writer.write_array("basis", np.ascontiguousarray(state.basis_rows))
        writer.write_array("hessenberg", np.asarray(state.hessenberg, dtype=np.float64))
        writer.write_array("hessian_losses", flat)
        writer.write_json("metadata", metadata)


def read_checkpoint(
    path: str,
    key: CheckpointKey,
    model: InfluenceModel,
    hessian_data: Iterable[Any],
    argument: str = "checkpoint_path",
) -> tuple[ArnoldiState, HessianLosses]:
    """The state saved at ``path``, after checking that it belongs to this fit, and the
    Hessian data's losses it recorded (checked equal to the data's: later writes reuse them).

    Raises
    ------
    IncompatibleStoreError
        Naming the file and what differs (a setting, the model, the Hessian data), or what
        is wrong with the file.
    """
    reader = ArchiveReader(path, argument)
    try:
        meta = reader.metadata
        if meta.get("kind") != KIND or meta.get("version") != VERSION:
            raise reader.error(
                f"not an Arnoldi checkpoint of this version (kind {meta.get('kind')!r}, "
                f"version {meta.get('version')!r}; expected {KIND!r}, {VERSION})"
            )
        for name, expected in key.fields().items():
            if meta.get(name) != expected:
                what = "another model" if name == "fingerprint" else f"{name}={meta.get(name)!r}"
                raise reader.error(
                    f"the checkpoint belongs to another fit ({what}; this fit has "
                    f"{name}={expected!r}); remove the file to start afresh"
                )
        try:
            products, rows = int(meta["products"]), int(meta["basis_rows"])
            sizes = [int(size) for size in meta["hessian_batch_sizes"]]
            restarts = tuple(int(r) for r in meta["restarts"])
            norm_estimate = float(meta["norm_estimate"])
            rng_state = dict(meta["rng_state"])
        except (KeyError, TypeError, ValueError) as error:
            raise reader.error(f"malformed metadata ({type(error).__name__}: {error})") from None
        p, n = key.num_parameters, key.subspace_dim
        basis = reader.read_array("basis", shape=(rows, p), dtypes=(key.dtype,))
        hessenberg = reader.read_array("hessenberg", shape=(n, n), dtypes=("float64",))
        stored = reader.read_array("hessian_losses", shape=(sum(sizes),), dtypes=("float64",))
    finally:
        reader.close()
    ends = np.cumsum([0, *sizes])
    check_losses(
        model,
        hessian_data,
        sizes,
        lambda index: stored[ends[index] : ends[index + 1]],
        loss_tolerance(key.dtype),
        where=f"{argument}={path!r}",
        names=("hessian_dataset", "checkpoint", "Hessian data"),
    )
    state = ArnoldiState(
        products=products,
        basis_rows=basis,
        hessenberg=hessenberg,
        restarts=restarts,
        norm_estimate=norm_estimate,
        rng_state=rng_state,
        block_size=key.block_size,
    )
    if not 1 <= products < n or not products <= rows <= n:
        raise IncompatibleStoreError(
            f"{argument}={path!r}: malformed checkpoint ({products} products, {rows} rows, n = {n})"
        )
    return state, HessianLosses(model, hessian_data, (sizes, stored))


def remove_checkpoint(path: str) -> None:
    """Remove a finished fit's checkpoint (it holds n × p numbers)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
