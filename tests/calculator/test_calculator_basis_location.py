"""The Krylov basis off the device (``basis_location="host"`` / ``"disk"``) gives the same fit.

Oracle: the same calculator with the basis on the device (round-off apart: the host path sums
the Gram–Schmidt products over column blocks), and through it the exact Hessian; blocks are
made tiny so that every operation crosses many of them.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import zipfile

import numpy as np
import pytest
from calculator_support import build, engine_class, query_spec, softmax_hessian, training_spec

import krylov_influence._host_basis as host_basis_module
from krylov_influence import ArnoldiInfluenceCalculator, MatrixOperator, arnoldi_iteration
from krylov_influence._host_basis import HostBasis
from krylov_influence.errors import IncompatibleStoreError
from krylov_influence.testing import random_mlp_spec


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch):
    # 3-column blocks: every product, restart, check and projection spans many blocks.
    original = HostBasis.allocate.__func__

    def allocate(cls, n, p, dtype, *, path=None, block_bytes=0):
        return original(cls, n, p, dtype, path=path, block_bytes=3 * n * np.dtype(dtype).itemsize)

    monkeypatch.setattr(HostBasis, "allocate", classmethod(allocate))
    assert host_basis_module.DEFAULT_BLOCK_BYTES > 0


def _small_model(engine):
    """``(model, batches, n)``: a small MLP in ``engine`` and the Krylov dimension to fit.

    The NumPy engine's spec is softmax regression, whose Hessian has a 5-fold eigenvalue
    (l2): a Krylov space of one vector stops at 11 of p = 15, and near that the next row is
    round-off amplified and differs between any two summation orders. Below it (n = 9), both
    paths are well determined.
    """
    if engine == "numpy":
        model, train = build(engine_class(engine), training_spec())
        return model, train, 9
    spec = random_mlp_spec(np.random.default_rng(5), (4, 5, 3), num_examples=23, batch_size=5)
    model, train = build(engine_class(engine), spec)
    return model, train, 30


def _fit(model, train, location, tmp_path, dtype="float64", **options):
    return ArnoldiInfluenceCalculator(
        model,
        train,
        options.pop("n", 30),
        True,
        6,
        dtype,
        basis_location=location,
        basis_dir=tmp_path,
        damping=1e-3,
        show_progress=False,
        **options,
    )


@pytest.mark.parametrize("engine", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("location", ["host", "disk"])
def test_the_fit_off_the_device_equals_the_fit_on_it(engine, location, tmp_path):
    model, train, n = _small_model(engine)
    device = _fit(model, train, "device", tmp_path, n=n, complement="mean")
    off = _fit(model, train, location, tmp_path, n=n, complement="mean")
    assert device.basis_placement == "device" and off.basis_placement == location
    np.testing.assert_allclose(
        off.eigenbasis.ritz.spectrum, device.eigenbasis.ritz.spectrum, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(off.self_influence(train), device.self_influence(train), rtol=1e-10)
    assert off.eigenbasis.complement.value == pytest.approx(
        device.eigenbasis.complement.value, rel=1e-10
    )
    assert off.eigenbasis.orthogonality_loss < 1e-13
    # G stays off the device too: the same rows up to round-off (and each row's sign).
    g_off, g_device = np.asarray(off.G), np.asarray(device.G)
    assert isinstance(off.G, np.ndarray)
    signs = np.sign(np.sum(g_off * g_device, axis=1, keepdims=True))
    np.testing.assert_allclose(g_off * signs, g_device, rtol=0, atol=1e-10)
    # The basis file goes after the fit; G's file (disk) lives as long as the calculator.
    left = os.listdir(tmp_path)
    assert len(left) == (1 if location == "disk" else 0) and all(n.endswith(".G.npy") for n in left)
    del off, g_off
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_float32_off_the_device_agrees_to_the_dtype(tmp_path):
    spec = random_mlp_spec(np.random.default_rng(5), (4, 5, 3), num_examples=23, batch_size=5)
    model, train = build(engine_class("torch"), spec, dtype="float32")
    device = _fit(model, train, "device", tmp_path, dtype="float32")
    disk = _fit(model, train, "disk", tmp_path, dtype="float32")
    top = device.eigenbasis.ritz.spectrum[:6]
    np.testing.assert_allclose(disk.eigenbasis.ritz.spectrum[:6], top, rtol=2e-4)
    assert disk.eigenbasis.orthogonality_loss < 1e-5


def test_a_full_rank_fit_on_disk_restarts_and_is_exact(tmp_path):
    # n = p on softmax regression: the Krylov space of one vector is smaller than p, so the
    # fit restarts from fresh directions drawn and orthogonalised block by block on disk.
    spec = training_spec()
    model, train = build(engine_class("numpy"), spec)
    disk = _fit(model, train, "disk", tmp_path, n=15)
    device = _fit(model, train, "device", tmp_path, n=15)
    assert disk.eigenbasis.arnoldi_restarts == device.eigenbasis.arnoldi_restarts != ()
    exact = np.sort(np.linalg.eigvalsh(softmax_hessian(spec)))[::-1][:6] + 1e-3
    np.testing.assert_allclose(np.sort(np.asarray(disk.eig_vals))[::-1], exact, rtol=1e-10)


@pytest.mark.parametrize("rank", [40, 6])
def test_the_core_iteration_off_the_device_takes_the_same_steps(rank):
    rng = np.random.default_rng(1)
    factor = rng.standard_normal((40, rank))
    matrix = factor @ factor.T  # rank 6 < n: the Krylov space runs out and the fit restarts
    device = arnoldi_iteration(MatrixOperator(matrix), 25, seed=2)
    basis = HostBasis.allocate(25, 40, np.float64, block_bytes=3 * 25 * 8)
    host = arnoldi_iteration(MatrixOperator(matrix), 25, seed=2, host_basis=basis)
    assert host.restarts == device.restarts and bool(host.restarts) == (rank < 25)
    # Round-off apart (sums over column blocks): relative to ‖A‖ for the Hessenberg matrix.
    scale = float(np.max(np.abs(device.hessenberg)))
    np.testing.assert_allclose(host.hessenberg, device.hessenberg, rtol=0, atol=1e-11 * scale)
    assert host.orthogonality_loss < 1e-13
    if rank == 40:  # no near-breakdown row, whose direction is round-off amplified in both
        np.testing.assert_allclose(basis.array, device.basis, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [40, 6])
def test_block_arnoldi_off_the_device_takes_the_same_steps_and_resumes(rank):
    rng = np.random.default_rng(1)
    factor = rng.standard_normal((40, rank))
    matrix = factor @ factor.T  # rank 6: blocks break down, restart and drop couplings

    def run(host_basis=None, **options):
        states = []
        result = arnoldi_iteration(
            MatrixOperator(matrix),
            25,
            seed=2,
            block_size=3,
            host_basis=host_basis,
            checkpoint=states.append,
            checkpoint_every=5,
            **options,
        )
        return result, states

    device, device_states = run()
    basis = HostBasis.allocate(25, 40, np.float64, block_bytes=3 * 25 * 8)
    host, states = run(basis)
    assert host.restarts == device.restarts and bool(host.restarts) == (rank < 25)
    assert host.residual_columns == device.residual_columns
    scale = float(np.max(np.abs(device.hessenberg)))
    np.testing.assert_allclose(host.hessenberg, device.hessenberg, rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(host.residual_gram, device.residual_gram, atol=1e-11 * scale**2)
    assert host.orthogonality_loss < 1e-13
    assert [s.products for s in states] == [s.products for s in device_states] != []
    # Resumed from each of its checkpoints, the host iteration repeats itself exactly.
    for state in states:
        again = HostBasis.allocate(25, 40, np.float64, block_bytes=3 * 25 * 8)
        resumed, _ = run(again, resume=state)
        np.testing.assert_array_equal(resumed.hessenberg, host.hessenberg)
        np.testing.assert_array_equal(again.array, basis.array)


@pytest.mark.parametrize("engine", ["numpy", "torch", "jax"])
def test_a_block_fit_on_disk_equals_the_block_fit_on_the_device(engine, tmp_path):
    model, train, n = _small_model(engine)
    device = _fit(model, train, "device", tmp_path, n=n, block_size=3, complement="mean")
    disk = _fit(model, train, "disk", tmp_path, n=n, block_size=3, complement="mean")
    assert disk.basis_placement == "disk"
    np.testing.assert_allclose(
        disk.eigenbasis.ritz.spectrum, device.eigenbasis.ritz.spectrum, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(disk.self_influence(train), device.self_influence(train), rtol=1e-10)
    assert disk.eigenbasis.orthogonality_loss < 1e-13


def test_auto_takes_the_disk_above_the_budget_and_resumes_there(tmp_path):
    spec = training_spec()
    model, train = build(engine_class("numpy"), spec)
    small = ArnoldiInfluenceCalculator(
        model, train, 12, True, 6, "float64", basis_memory=12 * 15 * 8, basis_dir=tmp_path
    )
    assert small.basis_placement == "host"  # the numpy engine's device is the host's
    over = ArnoldiInfluenceCalculator(
        model, train, 12, True, 6, "float64", basis_memory="1KiB", basis_dir=tmp_path
    )
    assert over.basis_placement == "disk"
    np.testing.assert_allclose(over.self_influence(train), small.self_influence(train), rtol=1e-10)
    # A checkpointed fit on disk resumes like one on the device.
    checkpoint = tmp_path / "fit.npz"
    resumed = ArnoldiInfluenceCalculator(
        model,
        train,
        12,
        True,
        6,
        "float64",
        basis_location="disk",
        basis_dir=tmp_path,
        checkpoint_path=checkpoint,
        checkpoint_every=4,
    )
    assert resumed.resumed_from is None and not checkpoint.exists()


@pytest.mark.parametrize("engine", ["numpy", "torch", "jax", "tensorflow"])
def test_auto_orthogonalises_a_cpu_basis_on_the_host_and_keeps_g_on_the_device(engine, tmp_path):
    model, train, n = _small_model(engine)
    assert model.host_memory  # every engine's CPU
    device = _fit(model, train, "device", tmp_path, n=n)
    auto = _fit(model, train, "auto", tmp_path, n=n)
    assert auto.basis_placement == "host" and device.basis_placement == "device"
    # G is the model's array on its device, as with the basis there, not a NumPy copy.
    assert type(auto.G) is type(device.G)
    assert str(model.xp.asarray(auto.G).device) == str(model.xp.asarray(device.G).device)
    np.testing.assert_allclose(
        auto.eigenbasis.ritz.spectrum, device.eigenbasis.ritz.spectrum, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(auto.self_influence(train), device.self_influence(train), rtol=1e-10)


def test_auto_keeps_the_basis_on_a_device_that_is_not_the_hosts(tmp_path):
    engine = engine_class("numpy")
    model, train = build(engine, training_spec())

    class Accelerated(type(model)):
        """The reference model, declared as on a device with its own memory."""

        host_memory = False

    model.__class__ = Accelerated
    auto = _fit(model, train, "auto", tmp_path, n=9)
    assert auto.basis_placement == "device"


def test_bad_basis_settings(tmp_path):
    model, train = build(engine_class("numpy"), training_spec())
    with pytest.raises(ValueError, match="basis_location='gpu'"):
        ArnoldiInfluenceCalculator(model, train, 12, True, 6, basis_location="gpu")
    with pytest.raises(ValueError, match="basis_memory='lots'"):
        ArnoldiInfluenceCalculator(model, train, 12, True, 6, basis_memory="lots")


@pytest.mark.parametrize("complement", ["none", "mean"])
def test_every_method_with_g_on_disk_equals_the_device(complement, tmp_path, monkeypatch):
    import krylov_influence._streaming as streaming

    monkeypatch.setattr(streaming, "PROJECTOR_CHUNK_BYTES", 1)  # one row of G at a time
    spec = random_mlp_spec(np.random.default_rng(5), (4, 5, 3), num_examples=23, batch_size=5)
    model, train = build(engine_class("torch"), spec)
    _, queries = build(engine_class("torch"), query_spec(spec))
    device = _fit(model, train, "device", tmp_path, complement=complement)
    disk = _fit(model, train, "disk", tmp_path, complement=complement)
    scale = np.max(np.abs(device.influence_matrix(queries, train)))
    np.testing.assert_allclose(
        disk.influence_matrix(queries, train),
        device.influence_matrix(queries, train),
        rtol=0,
        atol=1e-9 * scale,
    )
    np.testing.assert_allclose(disk.self_influence(train), device.self_influence(train), rtol=1e-9)
    (top_disk,) = list(disk.top_k(queries[:1], train, k=3))
    (top_device,) = list(device.top_k(queries[:1], train, k=3))
    np.testing.assert_array_equal(np.asarray(top_disk.indices), np.asarray(top_device.indices))
    # A store written from G on disk is read back by the same calculator; saving and loading
    # the calculator brings G onto the device with the same scores.
    store = tmp_path / "vectors.npz"
    list(disk.compute_influence_vector(train, store))
    reread = disk.estimate_influence_values_in_batches(
        queries, train, load_influence_vector_path=store
    )
    first = np.asarray(next(iter(next(iter(reread))[1]))[1])
    np.testing.assert_allclose(
        first, disk.influence_matrix(queries, train)[:3, :5], rtol=0, atol=1e-12 * scale
    )
    disk.save(tmp_path / "calc.npz")
    loaded = ArnoldiInfluenceCalculator.load(tmp_path / "calc.npz", model, train_dataset=train)
    np.testing.assert_allclose(loaded.self_influence(train), disk.self_influence(train), rtol=1e-12)


def test_a_saved_calculator_loads_with_g_left_in_the_file(tmp_path):
    spec = random_mlp_spec(np.random.default_rng(5), (4, 5, 3), num_examples=23, batch_size=5)
    model, train = build(engine_class("torch"), spec)
    _, queries = build(engine_class("torch"), query_spec(spec))
    fitted = _fit(model, train, "device", tmp_path)
    path = tmp_path / "calc.npz"
    fitted.save(path)
    loaded = ArnoldiInfluenceCalculator.load(
        path, model, train_dataset=train, projector_location="disk"
    )
    assert isinstance(loaded.G, np.memmap)
    np.testing.assert_array_equal(np.asarray(loaded.G), np.asarray(fitted.G))
    assert loaded.eigenbasis_digest == fitted.eigenbasis_digest  # stores stay compatible
    np.testing.assert_allclose(
        loaded.influence_matrix(queries, train), fitted.influence_matrix(queries, train), rtol=1e-12
    )
    # The Hessian check still runs (reading G's rows in place) and refuses another model.
    other_spec = dataclasses.replace(spec, activation="relu")
    other, other_train = build(engine_class("torch"), other_spec)
    with pytest.raises(IncompatibleStoreError, match="does not fit this model's Hessian"):
        ArnoldiInfluenceCalculator.load(
            path, other, train_dataset=other_train, projector_location="disk"
        )
    # A corrupted G is found by the checking pass (the archive's CRC), not served.
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("projector.npy")
    middle = info.header_offset + 30 + len(info.filename) + 200
    data[middle] ^= 0x40
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(IncompatibleStoreError, match="projector"):
        ArnoldiInfluenceCalculator.load(
            corrupt, model, train_dataset=train, projector_location="disk"
        )
    with pytest.raises(ValueError, match="projector_location='gpu'"):
        ArnoldiInfluenceCalculator.load(path, model, train_dataset=train, projector_location="gpu")
    # The file copied over in place after the load (same inode, other bytes) is refused,
    # not read as if it were still the G that was checked.
    other_bytes = corrupt.read_bytes()
    with open(path, "r+b") as handle:
        handle.write(other_bytes)
    with pytest.raises(IncompatibleStoreError, match="changed after it was loaded"):
        loaded.influence_matrix(queries, train)
