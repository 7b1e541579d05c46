"""Public test utilities: the neutral model description and the engine conformance suite.

- :class:`MLPSpec` / :func:`random_mlp_spec`: a small MLP with weights and data that every
  engine builds with the same flat parameters (``Engine.from_neutral_spec``), with NumPy
  oracles (forward pass, backpropagated gradients, finite-difference Hessian).
- :mod:`krylov_influence.testing.strategies` (needs ``hypothesis``): ``mlp_specs()``.
- :mod:`krylov_influence.testing.conformance` (needs ``pytest`` and ``hypothesis``):
  ``EngineConformance``, the suite an engine must pass. In an engine's test module::

      from krylov_influence.testing.conformance import EngineConformance

      class TestMyEngine(EngineConformance):
          engine = "myengine"
"""

from typing import Any

from krylov_influence.testing.spec import (
    ACTIVATIONS,
    LOSSES,
    MLPSpec,
    numpy_activation,
    random_mlp_spec,
)

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "EngineConformance",
    "MLPSpec",
    "mlp_specs",
    "numpy_activation",
    "random_mlp_spec",
]


def __getattr__(name: str) -> Any:
    # pytest and hypothesis are test dependencies: import them only when asked for.
    if name == "EngineConformance":
        from krylov_influence.testing.conformance import EngineConformance

        return EngineConformance
    if name == "mlp_specs":
        from krylov_influence.testing.strategies import mlp_specs

        return mlp_specs
    raise AttributeError(f"module 'krylov_influence.testing' has no attribute {name!r}")
