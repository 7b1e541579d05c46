"""The public conformance suite on the JAX engine (float64 needs ``jax_enable_x64``)."""

import pytest

from krylov_influence.testing.conformance import EngineConformance

jax = pytest.importorskip("jax")
# Process-global: the suite's float64 half needs it; every array in the suite has an explicit
# dtype, so float32 cases are unaffected.
jax.config.update("jax_enable_x64", True)


class TestJaxEngine(EngineConformance):
    engine = "jax"
