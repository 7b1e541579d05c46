"""``block_size``: block Arnoldi through every engine's vectorised HVPs, against exact."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from calculator_support import Problem, build

from krylov_influence import ArnoldiInfluenceCalculator, exact
from krylov_influence.testing import random_mlp_spec


@pytest.mark.parametrize("block_size", [2, 4])
def test_block_arnoldi_over_the_whole_space_is_exact(
    softmax_problem: Problem, block_size: int, monkeypatch: Any
) -> None:
    """subspace_dim = p: the block Krylov space is the whole space, so influence is exact;
    and the products go through the engine's vectorised ``hvps`` (never ``hvp``)."""
    problem = softmax_problem
    model = problem.model
    calls: list[int] = []
    make_operator = model.hessian_operator

    def counted_operator(batches: Any) -> Any:
        operator = make_operator(batches)
        products = operator.mm

        def counting(vectors: Any) -> Any:
            calls.append(int(vectors.shape[0]))
            return products(vectors)

        operator.mm = counting
        operator.mv = lambda v: pytest.fail("mv called in block Arnoldi")
        return operator

    monkeypatch.setattr(model, "hessian_operator", counted_operator)
    p = model.num_parameters
    calc = ArnoldiInfluenceCalculator(
        model,
        problem.train,
        p,
        True,
        p,
        "float64",
        block_size=block_size,
        damping=problem.calc.damping,  # the problem's (the indefinite MLP's is 0.1)
    )
    assert sum(calls) == p and max(calls) == block_size
    scale = np.abs(problem.scores).max()
    np.testing.assert_allclose(
        calc.influence_matrix(problem.queries, problem.train), problem.scores, atol=1e-8 * scale
    )
    # Relative to the largest: on the indefinite MLP self-influence changes sign.
    scale = np.abs(problem.self_influence).max()
    np.testing.assert_allclose(
        calc.self_influence(problem.train), problem.self_influence, rtol=0, atol=1e-8 * scale
    )
    assert calc.eigenbasis.orthogonality_loss < 1e-12


def test_block_size_is_saved_and_validated(numpy_problem: Problem, tmp_path: Any) -> None:
    problem = numpy_problem
    p = problem.model.num_parameters
    calc = ArnoldiInfluenceCalculator(
        problem.model, problem.train, 8, True, 3, "float64", block_size=4
    )
    loaded = ArnoldiInfluenceCalculator.load(
        calc.save(tmp_path / "calc.npz"), problem.model, train_dataset=problem.train
    )
    assert loaded.block_size == 4
    eig_vals, _ = loaded.arnoldi(8)  # a refit with the saved block size: the same basis
    np.testing.assert_allclose(
        problem.model.to_numpy(eig_vals), problem.model.to_numpy(calc.eig_vals), rtol=1e-12
    )
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="block_size="):
            ArnoldiInfluenceCalculator(
                problem.model, problem.train, 8, True, 3, "float64", block_size=bad
            )
    with pytest.raises(ValueError, match="block_size=9: expected at most subspace_dim = 8"):
        ArnoldiInfluenceCalculator(problem.model, problem.train, 8, True, 3, block_size=9)
    with pytest.raises(ValueError, match="block_size=4: expected at most subspace_dim = 3"):
        calc.arnoldi(3)
    assert p >= 8


def test_block_ritz_residuals_bound_the_eigenvalue_errors(numpy_problem: Problem) -> None:
    """k < p with a subspace too small to converge: every kept Ritz value lies within its
    reported residual of an exact eigenvalue (symmetric A: |θ − λ| ≤ ‖A v − θ v‖), so the
    residuals block Arnoldi reports are honest; and b = 1 agrees where both converged."""
    rng = np.random.default_rng(4)
    spec = random_mlp_spec(rng, (12, 5), num_examples=80, batch_size=32, l2=0.01)  # p = 65
    model, train = build(numpy_problem.engine, spec)
    exact_eigenvalues = np.linalg.eigvalsh(exact.dense_hessian(model, train))
    for block_size in (1, 3, 5):
        calc = ArnoldiInfluenceCalculator(
            model, train, 15, True, 4, "float64", block_size=block_size
        )
        ritz = calc.eigenbasis.ritz
        distance = np.min(np.abs(exact_eigenvalues[None, :] - ritz.eigenvalues[:, None]), axis=1)
        assert np.all(distance <= ritz.residuals + 1e-12), (block_size, distance, ritz.residuals)
        assert np.any(ritz.residuals > 1e-8)  # not converged: the bound is what is tested
