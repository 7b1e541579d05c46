"""The public conformance suite on the NumPy reference engine (regressions only)."""

from krylov_influence.testing.conformance import EngineConformance


class TestNumpyEngine(EngineConformance):
    engine = "numpy"
    max_hidden_layers = 0  # reference models are linear and softmax regressions
