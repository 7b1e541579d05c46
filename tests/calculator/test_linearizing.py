"""Linearising the staged Hessian data (``linearize_hessian_data=``): same products, the
vector-independent passes once, a budget.

Oracles: the Hessians in closed form (``calculator_support.softmax_hessian`` / ``mlp_hessian``,
NumPy, no engine and no autodiff), the engine's own products over the staged batches, and the
number of forward passes of a PyTorch module counted by a forward hook.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from calculator_support import ENGINE_KINDS, KINDS, build, engine_class, training_spec

from krylov_influence import ArnoldiInfluenceCalculator
from krylov_influence._linearizing import (
    DEFAULT_LINEARIZE_BYTES,
    LinearizedBatches,
    linearize_hessian_data,
    resolve_linearize_budget,
)
from krylov_influence._staging import DEFAULT_STAGE_BYTES, stage_hessian_data
from krylov_influence.registry import get_engine

# The engines that linearise (every one: TensorFlow splits the graph of its single product).
LINEARIZING = ("numpy", "torch", "jax", "tensorflow")


def _identifier(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


def staged_and_linearized(engine: Any, kind: str, budget: int = DEFAULT_LINEARIZE_BYTES) -> Any:
    spec = KINDS[kind].spec()
    model, train = build(engine, spec)
    staged, _ = stage_hessian_data(model, train, DEFAULT_STAGE_BYTES)
    linearized, note = linearize_hessian_data(model, staged, budget)
    return spec, model, staged, linearized, note


def dense(model: Any, batches: Any, *, block: bool) -> np.ndarray:
    """The Hessian by products with the identity's columns: one block, or one at a time."""
    p = model.num_parameters
    eye = model.from_numpy(np.eye(p))
    if block:
        return np.asarray(model.to_numpy(model.hvps(eye, batches)))
    return np.stack([np.asarray(model.to_numpy(model.hvp(eye[i], batches))) for i in range(p)])


@pytest.mark.parametrize("pair", ENGINE_KINDS, ids=_identifier)
def test_linearised_products_are_the_hessian(pair: tuple[str, str]):
    engine_name, kind = pair
    spec, model, staged, linearized, note = staged_and_linearized(engine_class(engine_name), kind)
    expected = KINDS[kind].hessian(spec)
    scale = float(np.abs(expected).max())
    if engine_name not in LINEARIZING:
        assert linearized is staged and note == ""
        return
    assert isinstance(linearized, LinearizedBatches)
    assert linearized.linearized == len(staged) == 5 and linearized.nbytes > 0
    assert note.startswith("linearised ") and "of" not in note
    for block in (False, True):
        found = dense(model, linearized, block=block)
        np.testing.assert_allclose(found, expected, rtol=0, atol=1e-12 * scale)
        again = dense(model, linearized, block=block)  # the kept state survives products
        np.testing.assert_array_equal(again, found)
        streamed = dense(model, staged, block=block)
        if engine_name == "torch":  # the same kernels on the same saved tensors
            np.testing.assert_array_equal(found, streamed)
        else:
            np.testing.assert_allclose(found, streamed, rtol=0, atol=1e-13 * scale)


@pytest.mark.parametrize("engine_name", LINEARIZING)
def test_the_budget_linearises_a_prefix_of_the_batches(engine_name: str, caplog: Any):
    engine = engine_class(engine_name)
    kind = "softmax" if engine_name == "numpy" else "mlp"
    spec, model, staged, everything, _ = staged_and_linearized(engine, kind)
    sizes = [model.linearize_batch(batch, DEFAULT_LINEARIZE_BYTES)[1] for batch in staged]
    assert sum(sizes) == everything.nbytes and min(sizes) > 0
    two = sizes[0] + sizes[1]
    with caplog.at_level(logging.INFO, logger="krylov_influence"):
        partial, note = linearize_hessian_data(model, staged, two)
    assert isinstance(partial, LinearizedBatches) and partial.linearized == 2
    assert partial.nbytes == two and note.endswith(", 2 of 5 batches")
    assert partial.batches[2:] == staged.batches[2:]  # the rest as staged, in order
    assert "2 of 5 batches" in caplog.text
    expected = KINDS[kind].hessian(spec)
    np.testing.assert_allclose(
        dense(model, partial, block=True), expected, rtol=0, atol=1e-12 * np.abs(expected).max()
    )
    # Below the first batch, off, or data that is not staged: the data itself, no note.
    assert linearize_hessian_data(model, staged, sizes[0] - 1) == (staged, "")
    assert linearize_hessian_data(model, staged, 0) == (staged, "")
    _, train = build(engine, spec)
    assert linearize_hessian_data(model, train, DEFAULT_LINEARIZE_BYTES) == (train, "")


def test_a_linearised_torch_fit_runs_the_forward_pass_once_per_batch():
    engine = engine_class("torch")
    spec = KINDS["mlp"].spec()
    model, train = build(engine, spec)
    calls = {"count": 0}

    def count(*_: Any) -> None:
        calls["count"] += 1

    handle = model.module.register_forward_hook(count)
    p = model.num_parameters
    try:

        def forward_passes(**options: Any) -> tuple[int, np.ndarray]:
            calls["count"] = 0
            calc = ArnoldiInfluenceCalculator(model, train, p, True, p, "float64", **options)
            return calls["count"], np.asarray(model.to_numpy(calc.eig_vals))

        linearised, eig_linearised = forward_passes()
        every, eig_every = forward_passes(linearize_hessian_data=False)
    finally:
        handle.remove()
    batches = len(train)
    # Both: one pass checking the losses; then one per batch (linearising, plus the check of
    # the route's second backward pass) against one per batch and product.
    assert linearised == batches + batches
    assert every == batches + p * batches
    np.testing.assert_array_equal(eig_linearised, eig_every)


def test_a_linearised_tensorflow_fit_runs_the_passes_before_the_vector_once_per_batch(
    monkeypatch: Any,
):
    from krylov_influence_tf._linearized import LinearMap

    engine = engine_class("tensorflow")
    spec = KINDS["mlp"].spec()
    model, train = build(engine, spec)
    computed = {"count": 0}
    residuals = LinearMap.residuals

    def counting(self: Any, x: Any, y: Any) -> Any:
        computed["count"] += 1
        return residuals(self, x, y)

    monkeypatch.setattr(LinearMap, "residuals", counting)
    p = model.num_parameters
    calc = ArnoldiInfluenceCalculator(model, train, p, True, p, "float64")
    assert computed["count"] == len(train)  # once per batch, for p products each
    expected = np.sort(np.linalg.eigvalsh(KINDS["mlp"].hessian(spec)))
    found = np.sort(np.asarray(model.to_numpy(calc.eig_vals)))
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_linearised_fits_agree_with_unlinearised_ones_on_every_engine(engine: Any):
    spec = training_spec()
    model, train = build(engine, spec)
    p = model.num_parameters

    def fitted(**options: Any) -> np.ndarray:
        calc = ArnoldiInfluenceCalculator(model, train, p, True, p, "float64", **options)
        return np.asarray(model.to_numpy(calc.eig_vals))

    expected = np.sort(np.linalg.eigvalsh(KINDS["softmax"].hessian(spec)))
    for option in (True, False, "1MiB"):
        found = np.sort(fitted(linearize_hessian_data=option))
        np.testing.assert_allclose(found, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("value", "expected"), [(True, DEFAULT_LINEARIZE_BYTES), (False, 0), ("2 MiB", 2 * 2**20)]
)
def test_budget_values(value: Any, expected: int):
    assert resolve_linearize_budget(value) == expected


@pytest.mark.parametrize("value", [-1, "lots", None])
def test_a_bad_budget_is_a_clear_error_naming_the_argument(value: Any):
    model, train = build(get_engine("numpy"), training_spec())
    with pytest.raises((TypeError, ValueError), match=r"linearize_hessian_data=.*expected"):
        ArnoldiInfluenceCalculator(model, train, 5, True, 5, linearize_hessian_data=value)


@pytest.mark.parametrize("engine_name", ["torch", "tensorflow"])
def test_what_a_fit_linearised_is_freed_when_the_fit_ends(engine_name: str, monkeypatch: Any):
    import gc
    import weakref

    import krylov_influence.calculator as calculator_module

    engine = engine_class(engine_name)
    model, train = build(engine, KINDS["mlp"].spec())
    kept: list[Any] = []

    def recording(*args: Any) -> Any:
        result = linearize_hessian_data(*args)
        # torch: the gradient with its graph; TensorFlow: the batch that holds its residuals
        kept.extend(
            weakref.ref(item.gradient if engine_name == "torch" else item)
            for item in result[0].batches
        )
        return result

    monkeypatch.setattr(calculator_module, "linearize_hessian_data", recording)
    p = model.num_parameters
    calc = ArnoldiInfluenceCalculator(model, train, p, True, p, "float64")
    gc.collect()
    assert len(kept) == 5 and calc.eig_vals is not None
    assert all(ref() is None for ref in kept)  # no graph outlives the fit
