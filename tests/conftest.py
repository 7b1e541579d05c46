"""Shared test configuration: Hypothesis profiles and array-namespace fixtures.

Profiles: ``ci`` (default; modest example counts so the suite stays quick on 2 cores) and
``thorough`` (``HYPOTHESIS_PROFILE=thorough`` for a longer local run). ``deadline=None``:
first autodiff calls take seconds.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _namespace(name: str):
    """The array namespace called ``name``, or a skip when its framework is missing."""
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    if name == "torch":
        pytest.importorskip("torch")
        import array_api_compat.torch as xp

        return xp
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)  # float64 cases need it; dtypes stay explicit
        return jax.numpy
    raise ValueError(name)


@pytest.fixture(scope="session", params=["numpy", "array_api_strict", "torch", "jax"])
def xp(request):
    """Each array namespace the core must run in."""
    return _namespace(request.param)
