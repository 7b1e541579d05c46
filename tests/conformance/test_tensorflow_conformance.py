"""The public engine conformance suite on the TensorFlow engine."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

from krylov_influence.testing.conformance import EngineConformance


class TestTensorFlow(EngineConformance):
    engine = "tensorflow"
