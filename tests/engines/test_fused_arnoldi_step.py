"""The fused Arnoldi step of the JAX and TensorFlow namespaces (one compiled program per step:
CGS2, the scaling and the row update) against the step-by-step path and the exact algebra,
breakdowns and restarts included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from krylov_influence import _xp, arnoldi
from krylov_influence.arnoldi import arnoldi_iteration


def _jax_namespace() -> Any:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)  # the float64 cases; dtypes stay explicit
    from krylov_influence_jax._namespace import JAX_NAMESPACE

    return JAX_NAMESPACE


def _tensorflow_namespace() -> Any:
    pytest.importorskip("tensorflow")
    from krylov_influence_tf._namespace import namespace

    return namespace


@pytest.fixture(params=["jax", "tensorflow"])
def engine_xp(request: Any) -> Any:
    """The namespace an engine hands the core, with its compile and row-update hooks."""
    return {"jax": _jax_namespace, "tensorflow": _tensorflow_namespace}[request.param]()


class DenseOperator:
    """``A v`` for a dense symmetric matrix held in ``xp``."""

    def __init__(self, xp: Any, matrix: np.ndarray):
        self.xp = xp
        self.matrix = xp.asarray(matrix, dtype=xp.float64)
        self.shape = matrix.shape
        self.dtype = xp.float64
        self.device = None

    def mv(self, vector: Any) -> Any:
        return self.xp.matmul(self.matrix, vector)


def _rotated(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((eigenvalues.size,) * 2))
    return (basis * eigenvalues) @ basis.T


P = 40
MATRICES: dict[str, Callable[[], np.ndarray]] = {
    # 36 steps: two padded basis shapes (32 rows, then 36), so two compiled programs.
    "generic": lambda: _rotated(np.random.default_rng(1).uniform(-3.0, 5.0, P), 2),
    "2I": lambda: 2.0 * np.eye(P),  # breaks down at every step
    "zero": lambda: np.zeros((P, P)),
    "rank 5": lambda: _rotated(np.r_[np.arange(1.0, 6.0), np.zeros(P - 5)], 3),
}


@pytest.mark.parametrize("case", sorted(MATRICES))
def test_fused_steps_give_the_step_by_step_basis(engine_xp: Any, case: str, monkeypatch: Any):
    matrix = MATRICES[case]()
    dim = 36
    real = arnoldi.fused_step_for
    calls = [0]

    def counting(xp: Any, rows: int) -> Any:
        step = real(xp, rows)
        assert step is not None, "the engine's namespace should compile a fused step"

        def counted(*args: Any) -> Any:
            calls[0] += 1
            return step(*args)

        return counted

    monkeypatch.setattr(arnoldi, "fused_step_for", counting)
    fused = arnoldi_iteration(DenseOperator(engine_xp, matrix), dim, seed=5)
    assert calls[0] == dim - 1  # every step but the last, which writes no row
    monkeypatch.setattr(arnoldi, "fused_step_for", lambda xp, rows: None)
    plain = arnoldi_iteration(DenseOperator(engine_xp, matrix), dim, seed=5)

    def host(result: Any) -> np.ndarray:
        return np.asarray(_xp.to_numpy(result.basis, engine_xp), dtype=np.float64)

    q = host(fused)
    scale = max(1.0, float(np.abs(matrix).max()))
    assert fused.restarts == plain.restarts
    assert (len(fused.restarts) > 0) == (case != "generic")
    np.testing.assert_allclose(q, host(plain), rtol=0, atol=1e-12)
    np.testing.assert_allclose(fused.hessenberg, plain.hessenberg, rtol=0, atol=1e-12 * scale)
    # The exact algebra: orthonormal rows and H = Q A Qᵀ, whatever path wrote them.
    np.testing.assert_allclose(q @ q.T, np.eye(dim), rtol=0, atol=1e-12)
    np.testing.assert_allclose(fused.hessenberg, q @ matrix @ q.T, rtol=0, atol=1e-11 * scale)


@pytest.mark.parametrize("case", ["generic", "rank 5"])
def test_a_resumed_fit_continues_the_fused_steps_exactly(engine_xp: Any, case: str):
    """A checkpoint taken between fused steps (rows written by the compiled program, the next
    row kept at hand) and resumed gives the uninterrupted basis and Hessenberg matrix."""
    matrix = MATRICES[case]()
    dim = 36
    states: list[Any] = []
    whole = arnoldi_iteration(
        DenseOperator(engine_xp, matrix), dim, seed=5, checkpoint=states.append, checkpoint_every=7
    )
    assert [state.products for state in states] == [7, 14, 21, 28, 35]
    resumed = arnoldi_iteration(DenseOperator(engine_xp, matrix), dim, seed=5, resume=states[2])

    def host(result: Any) -> np.ndarray:
        return np.asarray(_xp.to_numpy(result.basis, engine_xp), dtype=np.float64)

    assert resumed.restarts == whole.restarts
    np.testing.assert_array_equal(host(resumed), host(whole))
    np.testing.assert_array_equal(resumed.hessenberg, whole.hessenberg)
