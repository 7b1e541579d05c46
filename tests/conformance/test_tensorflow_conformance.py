"""The public engine conformance suite on the TensorFlow engine."""

import pytest

from krylov_influence.testing.conformance import EngineConformance

pytest.importorskip("tensorflow")
pytest.importorskip("keras")


class TestTensorFlowEngine(EngineConformance):
    engine = "tensorflow"
