"""The memory estimate names the arrays a real fit and real scoring allocate, at their sizes."""

from __future__ import annotations

import numpy as np
import pytest

from krylov_influence import ArnoldiInfluenceCalculator, arnoldi_iteration
from krylov_influence.cli import main
from krylov_influence.memory import estimate_memory, format_bytes
from krylov_influence.reference import NumpyEngine
from krylov_influence.testing import random_mlp_spec


def _item(plan, stage, name):
    (found,) = [item for item in plan.items if item.stage == stage and item.name.startswith(name)]
    return found


@pytest.mark.parametrize("complement", [False, True])
def test_the_estimate_matches_the_arrays_of_a_real_fit(complement):
    spec = random_mlp_spec(np.random.default_rng(0), (6, 4), num_examples=40, batch_size=16)
    model, train = NumpyEngine.from_neutral_spec(spec)
    p, n, k = model.num_parameters, 20, 5
    plan = estimate_memory(
        p, n, k, dtype="float64", batch_size=16, num_train=40, complement=complement
    )
    basis = arnoldi_iteration(model.hessian_operator(train), n, dtype="float64").basis
    assert _item(plan, "fit", "Krylov basis Q").nbytes == basis.nbytes
    assert _item(plan, "fit", "Krylov basis Q").shape == basis.shape
    calc = ArnoldiInfluenceCalculator(
        model, train, n, True, k, "float64", complement="mean" if complement else "none"
    )
    assert _item(plan, "projection", "projector G").nbytes == np.asarray(calc.G).nbytes
    grads = model.per_example_grads(train[0])
    assert _item(plan, "projection", "per-example gradients").nbytes == grads.nbytes
    first_block = next(iter(next(iter(calc.estimate_influence_values_in_batches(train, train)))[1]))
    assert _item(plan, "scores", "score block").shape == first_block[1].shape
    kept = [item for item in plan.items if item.name.startswith("kept training")]
    if complement:  # the complement recomputes training gradients instead of keeping vectors
        assert not kept
    else:
        assert kept[0].nbytes == 40 * k * 8
    assert plan.peak("fit") >= basis.nbytes
    assert plan.peak("save", "host") == np.asarray(calc.G).nbytes


def test_large_batches_project_in_chunks_of_examples():
    # One example's gradient (80 MB) exceeds the 64 MiB budget: chunks of one example.
    plan = estimate_memory(20_000_000, 64, 32, batch_size=256)
    item = _item(plan, "projection", "per-example gradients")
    assert item.shape == (1, 20_000_000) and "256 chunks" in item.name
    assert _item(plan, "fit", "Krylov basis Q").nbytes == 64 * 20_000_000 * 4
    # 4 MB a row: 16 rows fit 64 MiB, so 16 equal chunks of 16 examples.
    mid = estimate_memory(1_000_000, 64, 32, batch_size=256)
    item = _item(mid, "projection", "per-example gradients")
    assert item.shape == (16, 1_000_000) and "16 chunks" in item.name
    assert item.nbytes <= 64 * 2**20
    small = estimate_memory(10_000, 64, 32, batch_size=256)
    assert _item(small, "projection", "per-example gradients").shape == (256, 10_000)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((10, 20, 5), "subspace_dim=20"),
        ((100, 20, 30), "k_largest_eig_vals=30"),
        ((100, 0, 0), "subspace_dim=0"),
    ],
)
def test_impossible_settings_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(*arguments)


def test_the_cli_prints_the_table(capsys):
    assert main(["memory", "-p", "20_000_000", "-n", "64", "--k", "32", "--checkpoint"]) == 0
    out = capsys.readouterr().out
    assert "Krylov basis Q" in out and format_bytes(64 * 20_000_000 * 4) in out
    basis, products = 64 * 20_000_000 * 4, 2 * 20_000_000 * 4
    assert (
        f"fit: {format_bytes(basis + products)} on the device, {format_bytes(basis)} on the host"
        in out
    )
    with pytest.raises(SystemExit):
        main(["memory", "-p", "10", "-n", "20", "--k", "5"])
    assert "subspace_dim=20: expected at most num_parameters = 10" in capsys.readouterr().err


def test_off_the_device_the_basis_is_counted_where_it_lives():
    plan = estimate_memory(20_000_000, 64, 32, basis_location="disk")
    assert _item(plan, "fit", "Krylov basis Q").where == "disk"
    assert plan.peak("fit", "disk") == 64 * 20_000_000 * 4
    assert plan.peak("fit") == 2 * 20_000_000 * 4  # the row q_j moved over and A q_j
    # A block of columns, the product and its remainder, the Hessenberg matrix.
    assert plan.peak("fit", "host") == 8 * 2**20 + 2 * 20_000_000 * 4 + 64 * 64 * 8
    # Block Arnoldi: b rows and b products on the device, b residual rows kept at the end.
    blocks = estimate_memory(20_000_000, 64, 32, basis_location="disk", block_size=4)
    assert blocks.peak("fit") == 8 * 20_000_000 * 4
    assert blocks.peak("fit", "host") == plan.peak("fit", "host") + 4 * 20_000_000 * 4
    with pytest.raises(ValueError, match="basis_location='gpu'"):
        estimate_memory(100, 20, 5, basis_location="gpu")


def test_the_linearised_hessian_data_is_an_item_of_the_fit():
    # What a real linearisation keeps, as the engine reports it (the reference engine keeps
    # each batch's z and softmax probabilities).
    from krylov_influence._linearizing import linearize_hessian_data
    from krylov_influence._staging import stage_hessian_data

    spec = random_mlp_spec(np.random.default_rng(0), (6, 4), num_examples=40, batch_size=16)
    model, train = NumpyEngine.from_neutral_spec(spec)
    staged, _ = stage_hessian_data(model, train, 2**30)
    linearized, _ = linearize_hessian_data(model, staged, 2**30)
    assert linearized.nbytes == 40 * (6 + 1) * 8 + 40 * 4 * 8
    plan = estimate_memory(model.num_parameters, 20, 5, linearized_bytes=linearized.nbytes)
    assert _item(plan, "fit", "linearised Hessian data").nbytes == linearized.nbytes
    without = estimate_memory(model.num_parameters, 20, 5)
    assert not [item for item in without.items if item.name.startswith("linearised")]
    assert plan.peak("fit") == without.peak("fit") + linearized.nbytes
