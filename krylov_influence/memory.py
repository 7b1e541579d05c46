"""How much memory each stage of a fit and of scoring needs, before any work is done.

A fit of a large model can run for hours and then fail for memory; the arrays it holds are
known in advance from p, ``subspace_dim``, ``k_largest_eig_vals``, the dtype and the batch
sizes. :func:`estimate_memory` lists them, stage by stage, with where each one lives, and
``krylov-influence memory`` prints the same table::

    krylov-influence memory --parameters 20_000_000 --subspace-dim 64 --k 32 --batch-size 256

What it counts: the arrays the library itself allocates (the Krylov basis, the projector,
Gram–Schmidt temporaries, projections, per-example gradient blocks, kept influence vectors,
the staged Hessian data up to its budget). What it cannot know: the model's own parameters and
activations, which the framework allocates for each Hessian-vector product and each batch's
gradients (a few times one batch's forward activations; measure one batch of your model).

With ``basis_location="device"`` (the default when the basis fits) every array lives on the
model's device except the checkpoint copy and the n × n matrices (host); off the device the
basis is in host memory or a memory-mapped file and only p-vectors and ``G`` are on the
device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from krylov_influence._staging import format_bytes

__all__ = ["MemoryItem", "MemoryPlan", "estimate_memory", "format_bytes"]

# The engines' budget for a (B, p) block of per-example gradients in a projection
# (``GRADIENT_PROJECTION_BYTES``); above it, projections take chunks of examples in turn.
GRADIENT_BLOCK_BYTES = 64 * 2**20
# Columns of a basis on disk read at once (krylov_influence._host_basis.DISK_BLOCK_BYTES).
_DISK_BLOCK_BYTES = 8 * 2**20
# Rows of the projector in one vectorised JVP pass when the JVP route is taken (the JAX
# engine's default: as many as keep B × chunk ≤ 2¹⁸; torch and TensorFlow are similar).
JVP_CHUNK_ELEMENTS = 2**18


@dataclass(frozen=True)
class MemoryItem:
    """One array of one stage.

    Attributes
    ----------
    stage : str
        ``"fit"``, ``"projection"`` (self-influence, influence vectors, a query batch),
        ``"scores"`` (pairwise scores and top-k), ``"save"``.
    name : str
        What the array is.
    shape : tuple of int
    nbytes : int
    where : str
        ``"device"`` (the model's), ``"host"`` or ``"disk"``.
    """

    stage: str
    name: str
    shape: tuple[int, ...]
    nbytes: int
    where: str


@dataclass(frozen=True)
class MemoryPlan:
    """The arrays of every stage, and each stage's peak on the device and on the host.

    Attributes
    ----------
    items : tuple of MemoryItem
    """

    items: tuple[MemoryItem, ...]

    def peak(self, stage: str, where: str = "device") -> int:
        """Bytes that stage ``stage`` holds at once in ``where`` (the sum of its arrays)."""
        return sum(i.nbytes for i in self.items if i.stage == stage and i.where == where)

    @property
    def stages(self) -> list[str]:
        """The stages, in order of first appearance."""
        return list(dict.fromkeys(item.stage for item in self.items))

    def table(self) -> str:
        """A plain-text table: every array, then each stage's total per place."""
        rows = [("stage", "array", "shape", "size", "where")]
        for item in self.items:
            shape = " × ".join(f"{n:,}" for n in item.shape) or "()"
            rows.append((item.stage, item.name, shape, format_bytes(item.nbytes), item.where))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.append("")
        for stage in self.stages:
            device, host = self.peak(stage, "device"), self.peak(stage, "host")
            disk = self.peak(stage, "disk")
            on_disk = f", {format_bytes(disk)} on disk" if disk else ""
            lines.append(
                f"{stage}: {format_bytes(device)} on the device, {format_bytes(host)} on the host"
                f"{on_disk} (plus the model's parameters and one batch's activations)"
            )
        return "\n".join(lines)


def estimate_memory(
    num_parameters: int,
    subspace_dim: int,
    k_largest_eig_vals: int,
    *,
    dtype: str = "float32",
    batch_size: int = 256,
    query_batch_size: int | None = None,
    num_train: int | None = None,
    block_size: int = 1,
    hessian_data_bytes: int = 0,
    linearized_bytes: int = 0,
    complement: bool = False,
    checkpoint: bool = False,
    basis_location: str = "device",
) -> MemoryPlan:
    """The arrays each stage of :class:`~krylov_influence.ArnoldiInfluenceCalculator` holds.

    Parameters
    ----------
    num_parameters : int
        ``p``.
    subspace_dim : int
        ``n``.
    k_largest_eig_vals : int
        ``k``.
    dtype : {"float32", "float64"}
    batch_size : int
        Training (and Hessian) batch size ``B``.
    query_batch_size : int, optional
        Query batch size for scores and top-k; default ``batch_size``.
    num_train : int, optional
        Training examples: adds the kept influence vectors of ``CACHE.MEMORY`` /
        ``cache_training_vectors`` (N × k) to the scores stage.
    block_size : int
        ``b`` of block Arnoldi.
    hessian_data_bytes : int
        Size of the Hessian data as the engine's arrays; staged on the device when it is at
        most the default 1 GiB budget (``stage_hessian_data``).
    linearized_bytes : int
        What linearising the staged Hessian data keeps on the device during the fit
        (``linearize_hessian_data``): about one training step's activations and gradient
        intermediates per batch, capped by the budget (1 GiB by default). The fit's progress
        bar and the ``krylov_influence`` logger report the figure.
    complement : bool
        ``complement != "none"``: per-example gradient blocks replace projections.
    checkpoint : bool
        ``checkpoint_path`` set: the host copy of the basis each checkpoint writes.
    basis_location : {"device", "host", "disk"}
        Where the calculator keeps the basis (``basis_location=``; ``"auto"`` resolves to one
        of these). On disk, Gram–Schmidt reads the basis in 8 MiB blocks of columns.

    Returns
    -------
    MemoryPlan

    Raises
    ------
    ValueError
        On sizes that a calculator would refuse (``k > n``, ``n > p``, ``b > n``).
    """
    p, n, k = int(num_parameters), int(subspace_dim), int(k_largest_eig_vals)
    b, batch = int(block_size), int(batch_size)
    queries = batch if query_batch_size is None else int(query_batch_size)
    for name, value in [
        ("num_parameters", p),
        ("subspace_dim", n),
        ("k_largest_eig_vals", k),
        ("block_size", b),
        ("batch_size", batch),
        ("query_batch_size", queries),
    ]:
        if value < 1:
            raise ValueError(f"{name}={value}: expected a positive integer")
    if n > p:
        raise ValueError(f"subspace_dim={n}: expected at most num_parameters = {p}")
    if k > n:
        raise ValueError(f"k_largest_eig_vals={k}: expected at most subspace_dim = {n}")
    if b > n:
        raise ValueError(f"block_size={b}: expected at most subspace_dim = {n}")
    if basis_location not in ("device", "host", "disk"):
        raise ValueError(f"basis_location={basis_location!r}: expected 'device', 'host' or 'disk'")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'float64'")
    size = np.dtype(dtype).itemsize
    items: list[MemoryItem] = []

    def add(
        stage: str, name: str, shape: tuple[int, ...], where: str = "device", item: int = size
    ) -> None:
        count = int(np.prod(shape, dtype=np.int64))
        items.append(MemoryItem(stage, name, shape, count * item, where))

    if basis_location == "device":
        add("fit", "Krylov basis Q", (n, p))
        add("fit", "products A Q_j and their CGS2 remainders", (2 * b, p))
    else:
        if basis_location == "host":
            add("fit", "Krylov basis Q", (n, p), "host")
        else:
            columns = max(1, min(p, _DISK_BLOCK_BYTES // (n * size)))
            add("fit", "Krylov basis Q (a file read block by block)", (n, p), "disk")
            add("fit", "a block of basis columns being read", (n, columns), "host")
        add("fit", "the rows Q_j and their products A Q_j", (2 * b, p))
        add("fit", "a product and its CGS2 remainder", (2, p), "host")
        if b > 1:
            add("fit", "the last block's residual rows", (b, p), "host")
    add("fit", "Hessenberg matrix (float64)", (n, n), "host", 8)
    if 0 < hessian_data_bytes <= 2**30:
        items.append(MemoryItem("fit", "staged Hessian data", (), hessian_data_bytes, "device"))
    if linearized_bytes > 0:
        items.append(
            MemoryItem("fit", "linearised Hessian data", (), int(linearized_bytes), "device")
        )
    if checkpoint:
        add("fit", "checkpoint copy of the basis", (n, p), "host")
    if basis_location == "device":
        add("eigen-reduction", "Krylov basis Q", (n, p))
        add("eigen-reduction", "projector G = Yᵀ Q", (k, p))
    else:
        add("eigen-reduction", "projector G = Yᵀ Q, built over column blocks", (k, p), "host")
        add("eigen-reduction", "projector G", (k, p))
    # JAX and TensorFlow split G per parameter and transpose it once per projector, and keep
    # that copy while the projector lives (torch and NumPy project with G as it is).
    split = "G split per parameter and transposed (JAX, TensorFlow)"
    add("projection", "projector G", (k, p))
    add("projection", split, (k, p))
    add("projection", *_projection_block(batch, p, k, size, complement))
    add("projection", "projections and influence vectors", (2, batch, k))
    add("scores", "projector G", (k, p))
    add("scores", split, (k, p))
    add("scores", *_projection_block(queries, p, k, size, complement, "query "))
    if complement:
        add("scores", "training batch's per-example gradients", (batch, p))
    else:
        add("scores", *_projection_block(batch, p, k, size, False, "training "))
    add("scores", "score block", (queries, batch))
    if num_train is not None and not complement:
        add("scores", "kept training influence vectors (CACHE.MEMORY)", (int(num_train), k))
    add("save", "projector G (host copy)", (k, p), "host")
    return MemoryPlan(tuple(items))


def _projection_block(
    batch: int, p: int, k: int, size: int, complement: bool, prefix: str = ""
) -> tuple[str, tuple[int, ...], str, int]:
    """The largest temporary of projecting one batch with ``projection="auto"``: the
    per-example gradients of the batch, or of a chunk of it when the (B, p) block exceeds the
    engines' budget (the model's activations, which only the model knows, come on top).
    """
    if complement or batch * p * size <= GRADIENT_BLOCK_BYTES:
        return f"{prefix}per-example gradients", (batch, p), "device", size
    # projection="auto" (every engine): the gradients of equal chunks of examples in turn.
    pieces = -(-batch // max(1, GRADIENT_BLOCK_BYTES // (p * size)))
    chunk = -(-batch // pieces)
    return f"{prefix}per-example gradients, {pieces} chunks of examples", (chunk, p), "device", size
