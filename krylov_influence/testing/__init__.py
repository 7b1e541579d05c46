"""Public test utilities: the neutral model description and the engine conformance suite.

Engine authors run the same suite as the built-in engines (see ``docs/engines.md``).
"""

from krylov_influence.testing.spec import (
    ACTIVATIONS,
    LOSSES,
    MLPSpec,
    numpy_activation,
    random_mlp_spec,
)

__all__ = ["ACTIVATIONS", "LOSSES", "MLPSpec", "numpy_activation", "random_mlp_spec"]
