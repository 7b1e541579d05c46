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


# A framework that failed to install must not pass CI as skipped tests. With
# KRYLOV_INFLUENCE_REQUIRE_ALL=1 (set by .ci/run) a skip for a missing framework, engine or
# test dependency is a failure; without it (a developer with one framework) it stays a skip.
_MISSING = ("could not import", "not available", "not installed", "no module named")


REQUIRED_MODULES = (
    "torch",
    "jax",
    "flax",
    "equinox",
    "tensorflow",
    "keras",
    "array_api_strict",
    "sklearn",
    "ray",
    "zarr",
)


def pytest_configure(config):
    if os.environ.get("KRYLOV_INFLUENCE_REQUIRE_ALL") != "1":
        return
    import importlib

    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as error:  # a broken install counts as missing
            missing.append(f"{name} ({type(error).__name__}: {error})")
    if missing:
        raise pytest.UsageError(
            "KRYLOV_INFLUENCE_REQUIRE_ALL=1 but these cannot be imported, so their tests "
            f"would be skipped: {', '.join(missing)}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("KRYLOV_INFLUENCE_REQUIRE_ALL") != "1" or not report.skipped:
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if any(marker in reason.lower() for marker in _MISSING):
        report.outcome = "failed"
        report.longrepr = f"KRYLOV_INFLUENCE_REQUIRE_ALL=1 and a dependency is missing: {reason}"


# Whole files of slow tests (each test several seconds: compiles, subprocesses, Hypothesis over
# engines), marked here in one place; single slow tests carry @pytest.mark.slow themselves.
# `pytest -m "not slow"` is the quick subset (README).
_SLOW = (
    "tests/conformance/",
    "tests/engines/test_tensorflow_layers.py",
    "tests/engines/test_torch_layers.py",
    "tests/engines/test_jax_layers.py",
    "tests/engines/test_jax_models.py",  # compiles a dozen Flax/Equinox models
    "tests/calculator/test_calculator_basis_location.py",  # fits on disk, several engines
    # The slowest single cases of the quick subset (4-6 s each: compiled per engine).
    "test_stored_identity.py::test_load_refuses_a_model_with_the_same_parameters_but_another",
    "test_block_arnoldi.py::test_block_basis_is_orthonormal_and_h_is_q_a_qt[jax]",
    "test_tensorflow.py::test_regressions_match_the_numpy_reference_engine",
    "test_jax.py::test_calculator_matches_exact_influence",
    "tests/test_readme.py",
    "tests/test_no_silent_skips.py",
    "tests/calculator/test_store_faults.py",  # subprocess writers, killed and racing
    "tests/test_ray.py",  # a local Ray cluster per module, actors started per test
    "test_tensorflow.py::test_hvp_symmetry_linearity_and_projection",
    "test_tensorflow.py::test_hvp_equals_the_finite_difference_hessian",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = str(item.path).replace(os.sep, "/") + "::" + item.name
        if any(part in where for part in _SLOW):
            item.add_marker(pytest.mark.slow)
