"""The public conformance suite on the torch engine."""

import pytest

from krylov_influence.testing.conformance import EngineConformance

pytest.importorskip("torch")


class TestTorchEngine(EngineConformance):
    engine = "torch"
