"""The calculator tests catch a broken engine on their own, without the conformance suite.

A wrapper delegates every operator to a real engine's bound model and injects one fault: the
sign of the Hessian-vector products flipped, the per-example gradients (and the projections
built from them) scaled by 1.01, or the projector read in another parameter order than the
Hessian's. Each fault must make the calculator tests' own oracle checks (the test functions of
``test_calculator_methods``, called on a problem fitted through the broken model) fail, and
the unbroken wrapper must pass them: so those checks, not only the engine conformance suite,
stand between an engine bug and a wrong influence score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import test_calculator_methods as methods
from calculator_support import Problem, engine_class, make_problem

from krylov_influence import ORDER
from krylov_influence.engine import InfluenceModel

FAULTS = (None, "hvp_sign", "gradient_scale", "project_layout")


class FaultyModel(InfluenceModel):
    """A real bound model with (at most) one fault injected; everything else delegated.

    ``hessian_operator`` is the base class's, so the fit goes through :meth:`hvp`/:meth:`hvps`
    here (an engine's faster operator would bypass the fault).
    """

    def __init__(self, inner: InfluenceModel, fault: str | None) -> None:
        if fault not in FAULTS:
            raise ValueError(f"fault={fault!r}")
        self.inner, self.fault = inner, fault
        self.engine_name = inner.engine_name  # type: ignore[misc]
        p = inner.num_parameters
        # The projector read in reversed parameter order (all but the middle entry moved).
        self._reversed = inner.xp.asarray(list(range(p - 1, -1, -1)), device=inner.device)

    # delegated placement, data and conversion
    xp = property(lambda self: self.inner.xp)
    dtype = property(lambda self: self.inner.dtype)
    device = property(lambda self: self.inner.device)
    num_parameters = property(lambda self: self.inner.num_parameters)
    capabilities = property(lambda self: self.inner.capabilities)

    def on_device(self, device: Any) -> InfluenceModel:
        placed = self.inner.on_device(device)
        return self if placed is self.inner else FaultyModel(placed, self.fault)

    def batch_size(self, batch: Any) -> int:
        return self.inner.batch_size(batch)

    def losses(self, batch: Any) -> Any:
        return self.inner.losses(batch)

    def random_order(self, dataset: Any) -> str | None:
        return self.inner.random_order(dataset)

    def stage_batch(self, batch: Any) -> tuple[Any, int] | None:
        return self.inner.stage_batch(batch)

    def flat_parameters(self) -> Any:
        return self.inner.flat_parameters()

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def to_numpy(self, array: Any) -> Any:
        return self.inner.to_numpy(array)

    def from_numpy(self, array: Any, dtype: Any = None) -> Any:
        return self.inner.from_numpy(array, dtype)

    # the operators, where the faults go
    def hvp(self, vector: Any, batches: Any) -> Any:
        product = self.inner.hvp(vector, batches)
        return -product if self.fault == "hvp_sign" else product

    def hvps(self, vectors: Any, batches: Any) -> Any:
        products = self.inner.hvps(vectors, batches)
        return -products if self.fault == "hvp_sign" else products

    def per_example_grads(self, batch: Any) -> Any:
        grads = self.inner.per_example_grads(batch)
        return 1.01 * grads if self.fault == "gradient_scale" else grads

    def project(self, projector: Any, batch: Any) -> Any:
        if self.fault == "project_layout":
            projector = self.xp.take(projector, self._reversed, axis=1)
        projected = self.inner.project(projector, batch)
        return 1.01 * projected if self.fault == "gradient_scale" else projected


# The calculator tests' own checks, each against the engine-independent oracle.
CHECKS: dict[str, Callable[[Problem], None]] = {
    "self_influence": methods.test_influence_values_match_exact_self_influence,
    "all_pairs": methods.test_estimate_influence_values_matches_all_pairs,
    "influence_vectors": methods.test_influence_vectors_are_the_scaled_projections,
    "top_k": lambda problem: methods.test_top_k_matches_sorted_brute_force(
        problem, ORDER.DESCENDING
    ),
}

# NumPy on the convex softmax regression (quick); torch on the indefinite, damped MLP.
SETTINGS = [
    pytest.param("numpy", "softmax", id="numpy"),
    pytest.param("torch", "mlp_indefinite", id="torch-mlp_indefinite", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("engine", "kind"), SETTINGS)
def test_each_injected_fault_fails_every_oracle_check(engine: str, kind: str) -> None:
    problem = make_problem(engine_class(engine), kind=kind, wrap=lambda m: FaultyModel(m, None))
    model = problem.calc.model
    assert isinstance(model, FaultyModel)
    for check in CHECKS.values():
        check(problem)  # the wrapper itself is faithful: every check passes

    # The fit only uses Hessian-vector products: a projection fault needs no refit.
    for fault in ("gradient_scale", "project_layout", "hvp_sign"):
        model.fault = fault
        if fault == "hvp_sign":
            problem.calc.arnoldi(problem.calc.subspace_dim)  # refit through the broken HVPs
        for name, check in CHECKS.items():
            with pytest.raises(AssertionError):
                check(problem)
            print(f"{fault}: the {name} check fails, as it must")
