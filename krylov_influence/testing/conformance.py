"""The engine conformance suite: what every engine must satisfy, public for plugin authors.

Usage, in any pytest test module of an engine's own repository::

    from krylov_influence.testing.conformance import EngineConformance

    class TestMyEngine(EngineConformance):
        engine = "myengine"          # the entry-point name of the engine under test

The engine must implement ``Engine.from_neutral_spec``. Every check is a Hypothesis property
over small random MLPs (2–40 parameters; see :func:`~krylov_influence.testing.strategies.
mlp_specs`), in float32 and float64, against oracles that do not involve the engine: the
spec's NumPy forward pass and backpropagation, a finite-difference Hessian of those analytic
gradients, the exact inverse-Hessian influence, and every other installed engine that builds
the same spec. Tolerances derive from the dtype: ``4·sqrt(eps)`` relative to the largest
entry compared.

Class attributes to override: ``engine`` (required), ``dtypes``, ``device``,
``max_hidden_layers`` (0 for engines that only build regressions), ``activations``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from krylov_influence import _xp, exact
from krylov_influence.calculator import ArnoldiInfluenceCalculator
from krylov_influence.engine import Engine
from krylov_influence.registry import available_engines
from krylov_influence.testing.spec import ACTIVATIONS, MLPSpec
from krylov_influence.testing.strategies import mlp_specs

__all__ = ["EngineConformance", "build", "tolerance"]

_DTYPES = ("float32", "float64")
_BASE_FROM_SPEC = getattr(Engine.from_neutral_spec, "__func__", None)


def tolerance(dtype: str) -> float:
    """``4·sqrt(eps)`` of ``dtype``: 4.9e-4 for float32, 6.0e-8 for float64."""
    return 4.0 * math.sqrt(float(np.finfo(dtype).eps))


def build(engine: str, spec: MLPSpec, dtype: str, device: Any = None) -> tuple[Any, list[Any]]:
    """``engine``'s bound model and batches for ``spec``.

    Skips the test when the engine or its framework is not installed; rejects the Hypothesis
    example (``assume``) when the engine cannot build this particular spec.
    """
    engines = available_engines()
    if engine not in engines:
        pytest.skip(f"engine {engine!r} is not installed")
    try:
        return engines[engine].from_neutral_spec(spec, dtype=dtype, device=device)
    except ImportError as why:  # the engine's framework is missing
        pytest.skip(f"engine {engine!r}: {why}")
    except NotImplementedError:
        assume(False)
        raise  # unreachable: assume(False) rejects the example


def builders_of_specs(excluding: str) -> list[str]:
    """Installed engines other than ``excluding`` that implement ``from_neutral_spec``."""
    return [
        name
        for name, engine in available_engines().items()
        if name != excluding
        and getattr(engine.from_neutral_spec, "__func__", None) is not _BASE_FROM_SPEC
    ]


def _close(actual: Any, expected: np.ndarray, dtype: str, what: str, scale: float = 1.0) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bound = tolerance(dtype) * scale * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} ({dtype})"


def _suite_settings(examples: int | None = None) -> settings:
    """The current profile with fewer examples, and no ``differing_executors`` check.

    Each example builds a model and compiles its kernels for new shapes (seconds in JAX and
    TensorFlow): a third of the profile's budget, at least 4.
    The same test method runs on several ``EngineConformance`` subclasses (one per engine),
    which Hypothesis flags as differing executors; that is the suite's design, not a bug.
    """
    current = settings()
    return settings(
        current,
        max_examples=examples if examples is not None else max(4, current.max_examples // 3),
        suppress_health_check=[*current.suppress_health_check, HealthCheck.differing_executors],
    )


class EngineConformance:
    """Subclass with ``engine = "<name>"`` to run the whole suite on an engine."""

    engine: ClassVar[str]
    dtypes: ClassVar[tuple[str, ...]] = _DTYPES
    device: ClassVar[Any] = None
    max_hidden_layers: ClassVar[int] = 2
    activations: ClassVar[tuple[str, ...]] = ACTIVATIONS

    # ------------------------------------------------------------------------------ helpers
    def _build(self, spec: MLPSpec, dtype: str) -> tuple[Any, list[Any]]:
        if dtype not in self.dtypes:
            pytest.skip(f"{self.engine} does not claim {dtype}")
        assume(spec.hidden_layers <= self.max_hidden_layers)
        assume(spec.activation in self.activations or spec.hidden_layers == 0)
        return build(self.engine, spec, dtype, self.device)

    def _host(self, model: Any, array: Any) -> np.ndarray:
        return model.to_numpy(array).astype(np.float64)

    # ----------------------------------------------------------------------------- checks
    @pytest.mark.parametrize("dtype", _DTYPES)
    @_suite_settings()
    @given(spec=mlp_specs())
    def test_losses_match_the_numpy_forward_pass(self, spec: MLPSpec, dtype: str) -> None:
        model, batches = self._build(spec, dtype)
        np.testing.assert_allclose(
            self._host(model, model.flat_parameters()), spec.flat_parameters(), rtol=1e-6
        )
        for batch, index in zip(batches, spec.batch_slices()):
            assert model.batch_size(batch) == index.stop - index.start
            expected = spec.losses(spec.x[index], spec.y[index])
            _close(self._host(model, model.losses(batch)), expected, dtype, "losses")

    @pytest.mark.parametrize("dtype", _DTYPES)
    @_suite_settings()
    @given(spec=mlp_specs())
    def test_per_example_gradients_match_backpropagation(self, spec: MLPSpec, dtype: str) -> None:
        model, batches = self._build(spec, dtype)
        for batch, index in zip(batches, spec.batch_slices()):
            expected = spec.gradients(spec.x[index], spec.y[index])
            _close(self._host(model, model.per_example_grads(batch)), expected, dtype, "grads")

    @pytest.mark.parametrize("dtype", _DTYPES)
    @_suite_settings()
    @given(spec=mlp_specs(activations=("tanh", "softplus", "gelu")), seed=st.integers(0, 99))
    def test_hvp_is_the_hessian_of_the_mean_loss(self, spec: MLPSpec, dtype: str, seed: int):
        # Oracle: central differences of the analytic mean gradient (smooth activations only:
        # across a relu kink a difference quotient is not the Hessian).
        model, batches = self._build(spec, dtype)
        hessian = spec.hessian()
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((3, spec.num_parameters))
        for v in vectors:
            product = model.hvp(model.from_numpy(v), batches)
            _close(self._host(model, product), hessian @ v, dtype, "hvp", scale=4.0)
        stacked = model.hvps(model.from_numpy(vectors), batches)
        _close(self._host(model, stacked), vectors @ hessian, dtype, "hvps", scale=4.0)

    @pytest.mark.parametrize("dtype", _DTYPES)
    @_suite_settings()
    @given(spec=mlp_specs(), seed=st.integers(0, 99))
    def test_hvp_is_symmetric_and_linear(self, spec: MLPSpec, dtype: str, seed: int) -> None:
        model, batches = self._build(spec, dtype)
        rng = np.random.default_rng(seed)
        u, v = rng.standard_normal((2, spec.num_parameters))
        hu = self._host(model, model.hvp(model.from_numpy(u), batches))
        hv = self._host(model, model.hvp(model.from_numpy(v), batches))
        scale = float(
            np.linalg.norm(hu) * np.linalg.norm(v) + np.linalg.norm(hv) * np.linalg.norm(u)
        )
        assert abs(u @ hv - v @ hu) <= tolerance(dtype) * max(scale, 1e-12)
        combined = self._host(model, model.hvp(model.from_numpy(2.0 * u - 3.0 * v), batches))
        _close(combined, 2.0 * hu - 3.0 * hv, dtype, "linearity")

    @pytest.mark.parametrize("dtype", _DTYPES)
    @_suite_settings()
    @given(spec=mlp_specs(), k=st.integers(1, 6), seed=st.integers(0, 99))
    def test_projection_is_the_projector_times_the_gradients(
        self, spec: MLPSpec, dtype: str, k: int, seed: int
    ) -> None:
        model, batches = self._build(spec, dtype)
        rng = np.random.default_rng(seed)
        # Two projectors held as engine arrays and used in turn on every batch: an engine
        # that keeps what it derived from a projector (split, transposed) must never serve
        # it for the other one.
        projectors = [rng.standard_normal((k, spec.num_parameters)) for _ in range(2)]
        projectors = [g / np.linalg.norm(g, axis=1, keepdims=True) for g in projectors]
        held = [model.from_numpy(g) for g in projectors]
        for batch, index in zip(batches, spec.batch_slices()):
            grads = spec.gradients(spec.x[index], spec.y[index])
            for projector, array in zip(projectors * 2, held * 2):
                projected = self._host(model, model.project(array, batch))
                _close(projected, grads @ projector.T, dtype, "projection", scale=2.0)
            # The pass a store records: the same projections and the batch's losses.
            both, losses = model.project_and_losses(model.from_numpy(projectors[0]), batch)
            expected = grads @ projectors[0].T
            _close(self._host(model, both), expected, dtype, "project_and_losses", scale=2.0)
            expected_losses = spec.losses(spec.x[index], spec.y[index])
            _close(self._host(model, losses), expected_losses, dtype, "project_and_losses")

    @pytest.mark.parametrize("dtype", _DTYPES)
    @_suite_settings(max(2, settings().max_examples // 4))
    @given(spec=mlp_specs())
    def test_outputs_follow_the_model_dtype_and_device(self, spec: MLPSpec, dtype: str) -> None:
        model, batches = self._build(spec, dtype)
        assert _xp.dtype_name(model.dtype) == dtype == model.dtype_name
        p = spec.num_parameters
        batch = batches[0]
        outputs = {
            "flat_parameters": model.flat_parameters(),
            "losses": model.losses(batch),
            "per_example_grads": model.per_example_grads(batch),
            "hvp": model.hvp(model.from_numpy(np.ones(p)), batches),
            "hvps": model.hvps(model.from_numpy(np.ones((2, p))), batches),
            "project": model.project(model.from_numpy(np.ones((3, p))), batch),
        }
        b = model.batch_size(batch)
        shapes = {
            "flat_parameters": (p,),
            "losses": (b,),
            "per_example_grads": (b, p),
            "hvp": (p,),
            "hvps": (2, p),
            "project": (b, 3),
        }
        for name, out in outputs.items():
            assert tuple(out.shape) == shapes[name], f"{name}: shape {tuple(out.shape)}"
            assert _xp.dtype_name(out.dtype) == dtype, f"{name}: dtype {out.dtype}"
            assert str(_xp.device_of(out)) == str(model.device), f"{name}: device"
        assert model.num_parameters == p

    @_suite_settings()
    @given(spec=mlp_specs(), seed=st.integers(0, 9))
    def test_full_subspace_equals_exact_influence(self, spec: MLPSpec, seed: int) -> None:
        # subspace_dim = k = p in float64: the Arnoldi influence is the exact one. The oracle's
        # inverse amplifies round-off by cond(H); keep cases where 1e-6 is meaningful.
        model, batches = self._build(spec, "float64")
        hessian = exact.dense_hessian(model, batches)
        values = np.abs(np.linalg.eigvalsh(hessian))
        assume(values.min() > 1e-6 * values.max())
        p = spec.num_parameters
        calc = ArnoldiInfluenceCalculator(model, batches, p, True, p, "float64", seed=seed)
        inverse = exact.inverse_hessian(hessian)
        expected = exact.exact_self_influence(model, batches, inverse=inverse)
        actual = calc.self_influence(batches)
        assert np.max(np.abs(actual - expected)) <= 1e-6 * np.max(np.abs(expected))
        pairs = exact.exact_influence(model, batches, batches[:2], inverse=inverse)
        actual_pairs = calc.influence_matrix(batches[:2], batches)
        assert np.max(np.abs(actual_pairs - pairs)) <= 1e-6 * np.max(np.abs(pairs))

    @_suite_settings()
    @given(spec=mlp_specs(), data=st.data())
    def test_spectral_complement_is_its_formula(self, spec: MLPSpec, data: Any) -> None:
        # k < p with complement=c: every score is g_zᵀ [Gᵀ diag(1/(λ+δ)) G + (I − GᵀG)/(c+δ)]
        # g_x with the fit's own G and λ, and the spec's backpropagation gradients; the
        # engine's project_with_norms and query-gradient projections are what is tested.
        p = spec.num_parameters
        assume(p >= 3)
        model, batches = self._build(spec, "float64")
        k = data.draw(st.integers(1, p - 1), label="k")
        c = data.draw(st.floats(0.0, 2.0), label="c")
        try:
            calc = ArnoldiInfluenceCalculator(
                model, batches, p, True, k, "float64", damping=0.5, complement=c
            )
        except ValueError:  # a kept λ + δ of zero: the inverse does not exist
            assume(False)
            raise  # unreachable
        assume(np.min(np.abs(calc.eigenbasis.damped_eigenvalues)) > 1e-3)
        g = self._host(model, calc.G)
        inverse = g.T @ np.diag(calc.eigenbasis.inverse_eigenvalues) @ g
        inverse += (np.eye(p) - g.T @ g) / (c + 0.5)
        grads = spec.gradients(spec.x, spec.y)
        _close(
            calc.self_influence(batches),
            np.einsum("ip,pq,iq->i", grads, inverse, grads),
            "float64",
            "self-influence with the complement",
        )
        queries = batches[:1]
        first = spec.batch_slices()[0]
        _close(
            calc.influence_matrix(queries, batches),
            grads[first] @ inverse @ grads.T,
            "float64",
            "scores with the complement",
        )

    @pytest.mark.parametrize("dtype", _DTYPES)
    @_suite_settings()
    @given(spec=mlp_specs(), data=st.data())
    def test_agrees_with_another_engine(self, spec: MLPSpec, dtype: str, data: Any) -> None:
        # Same spec, same seed, k < p, subspace_dim = p: the same eigenvalues and scores as a
        # partner engine, to round-off amplified by at most 1/gap and 1/λ_k (bounded below).
        # One partner per example, the first in a drawn order that builds the spec: the cost
        # stays linear in the number of engines while the examples cover every pair.
        others = builders_of_specs(self.engine)
        if not others:
            pytest.skip("no other installed engine builds neutral specs")
        partner = None
        for other in data.draw(st.permutations(sorted(others)), label="partner order"):
            try:
                partner = (other, *available_engines()[other].from_neutral_spec(spec, dtype=dtype))
                break
            except (NotImplementedError, ValueError):
                # The NumPy engine builds no hidden layer; JAX refuses float64 without x64.
                # Each partner is checked by its own suite, so skipping one here hides nothing.
                continue
        assume(partner is not None)
        assert partner is not None
        name, theirs_model, theirs_batches = partner
        p = spec.num_parameters
        values = np.sort(np.abs(np.linalg.eigvalsh(spec.hessian())))[::-1]
        k = data.draw(st.integers(1, p), label="k")
        # A near-tie at the cut makes "the k largest" ill-defined, and a tiny kept eigenvalue
        # amplifies round-off by 1/λ: both are properties of the spec, not of the engine.
        floor = 0.05 if dtype == "float32" else 1e-3
        gap = values[k - 1] - values[k] if k < p else np.inf
        assume(gap > floor * values[0] and values[k - 1] > floor * values[0])
        model, batches = self._build(spec, dtype)
        mine = ArnoldiInfluenceCalculator(model, batches, p, True, k, dtype, seed=3)
        theirs = ArnoldiInfluenceCalculator(theirs_model, theirs_batches, p, True, k, dtype, seed=3)
        _close(
            mine.eigenbasis.eigenvalues,
            theirs.eigenbasis.eigenvalues,
            dtype,
            f"eigenvalues vs {name}",
            scale=4.0,
        )
        _close(
            mine.influence_matrix(batches[:1], batches),
            theirs.influence_matrix(theirs_batches[:1], theirs_batches),
            dtype,
            f"scores vs {name}",
            scale=4.0,
        )
