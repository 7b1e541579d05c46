"""Engine discovery, inference from the model's type, dispatch of InfluenceModel(...)."""

from __future__ import annotations

import sys
import warnings
from importlib import metadata

import numpy as np
import pytest

import krylov_influence as ki
from krylov_influence import registry
from krylov_influence.reference import LinearRegression, NumpyInfluenceModel


@pytest.fixture
def fresh_registry(monkeypatch):
    """Forget the memoised engines for one test, and restore them afterwards."""
    monkeypatch.setattr(registry, "_engines", None)
    yield
    registry._engines = None


def test_numpy_engine_is_found_and_inferred():
    engines = ki.available_engines()
    assert engines["numpy"].name == "numpy"
    model = LinearRegression(np.ones(3))
    assert ki.infer_engine(model) is engines["numpy"]
    bound = ki.InfluenceModel(model)
    assert isinstance(bound, NumpyInfluenceModel) and isinstance(bound, ki.InfluenceModel)
    assert bound.engine_name == "numpy" and bound.num_parameters == 4


def test_installed_engines_are_registered_by_entry_point():
    names = {e.name for e in metadata.entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert {"numpy", "torch", "jax", "tensorflow"} <= names
    assert names <= set(ki.available_engines())


def test_unknown_engine_lists_the_installed_ones():
    with pytest.raises(ki.EngineNotFoundError, match=r"engine='nope'.*installed engines: .*numpy"):
        ki.InfluenceModel(LinearRegression(np.ones(2)), engine="nope")


def test_unrecognised_model_says_so():
    with pytest.raises(ki.EngineNotFoundError, match="no installed engine recognises"):
        ki.InfluenceModel(object())


def test_already_bound_model_passes_through():
    bound = ki.InfluenceModel(LinearRegression(np.ones(2)))
    assert ki.InfluenceModel(bound) is bound
    with pytest.raises(ValueError, match="already bound"):
        ki.InfluenceModel(bound, engine="torch")


def test_broken_plugin_is_a_warning_not_an_error(fresh_registry, monkeypatch):
    real = metadata.entry_points

    def with_broken(group=None, **kwargs):
        found = list(real(group=group, **kwargs))
        if group == registry.ENTRY_POINT_GROUP:
            found.append(metadata.EntryPoint("broken", "no_such_module:Engine", group))
            found.append(metadata.EntryPoint("notanengine", "math:pi", group))
        return found

    monkeypatch.setattr(metadata, "entry_points", with_broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engines = ki.available_engines()
    assert "numpy" in engines and "broken" not in engines and "notanengine" not in engines
    messages = " ".join(str(w.message) for w in caught)
    assert "'broken'" in messages and "'notanengine'" in messages


def test_discovery_is_memoised(fresh_registry, monkeypatch):
    calls = []
    real = registry._discover
    monkeypatch.setattr(registry, "_discover", lambda: calls.append(1) or real())
    ki.available_engines()
    ki.available_engines()
    assert calls == [1]


def test_inference_never_imports_a_framework(monkeypatch):
    # An object whose class claims to come from torch is only offered to the torch engine
    # if torch is already imported; inference must not import it to find out.
    fake = type("FakeModule", (), {"__module__": "torch.nn.modules.module"})()
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    with pytest.raises(ki.EngineNotFoundError):
        ki.infer_engine(fake)
    assert "torch" not in sys.modules
