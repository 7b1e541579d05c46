"""Engines by name (entry points) and by the type of the user's model.

Engines register under the entry-point group ``krylov_influence.engines``; the entry point's
name is the engine name and its target an :class:`~krylov_influence.engine.Engine` subclass.
Discovery runs once, lazily, behind a lock; a plugin that fails to load is a warning, not an
error. Inference looks at the top-level modules of the model's class hierarchy (and of the
leaves of ``params=``) and only offers the model to engines whose framework is already in
``sys.modules``: if torch was never imported, the object cannot be a torch module, and no
framework is ever imported to find out.
"""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from importlib import metadata
from typing import Any

from krylov_influence.engine import Engine, InfluenceModel
from krylov_influence.errors import EngineNotFoundError

__all__ = [
    "ENTRY_POINT_GROUP",
    "available_engines",
    "bind_model",
    "get_engine",
    "infer_engine",
]

ENTRY_POINT_GROUP = "krylov_influence.engines"

# The reference engine ships with the core, so it is found even without package metadata
# (running from a source tree); entry points of the same name take precedence.
_BUILTIN = {"numpy": "krylov_influence.reference:NumpyEngine"}

_lock = threading.Lock()
_engines: dict[str, type[Engine]] | None = None


def available_engines() -> dict[str, type[Engine]]:
    """Every engine that loads, by name (discovered once, then memoised).

    Returns
    -------
    dict of str to Engine subclass
    """
    global _engines
    if _engines is None:
        with _lock:
            if _engines is None:
                _engines = _discover()
    return dict(_engines)


def _discover() -> dict[str, type[Engine]]:
    targets = dict(_BUILTIN)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        targets[entry.name] = entry.value
    found: dict[str, type[Engine]] = {}
    for name, target in sorted(targets.items()):
        try:
            engine = metadata.EntryPoint(name, target, ENTRY_POINT_GROUP).load()
        except Exception as error:  # a broken plugin must not break the others
            warnings.warn(
                f"krylov_influence: engine plugin {name!r} ({target}) failed to load: {error!r}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        if not (isinstance(engine, type) and issubclass(engine, Engine)):
            warnings.warn(
                f"krylov_influence: engine plugin {name!r} ({target}) is not an Engine subclass",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        found[name] = engine
    return found


def get_engine(name: str) -> type[Engine]:
    """The engine registered as ``name``.

    Raises
    ------
    EngineNotFoundError
        If no engine has that name; the message lists the installed engines.
    """
    engines = available_engines()
    if name not in engines:
        raise EngineNotFoundError(
            f"engine={name!r}: no such engine; installed engines: {', '.join(sorted(engines))}"
        )
    return engines[name]


@functools.lru_cache(maxsize=256)
def _type_roots(cls: type) -> frozenset[str]:
    """Top-level module names of the classes in ``cls``'s method resolution order."""
    return frozenset(klass.__module__.split(".")[0] for klass in cls.__mro__)


def _object_roots(obj: Any, depth: int = 3) -> frozenset[str]:
    """Top-level modules of ``obj``'s type and, for containers, of a few of its leaves."""
    roots = set(_type_roots(type(obj)))  # type: ignore[arg-type]
    if depth > 0:
        children: list[Any] = []
        if isinstance(obj, dict):
            children = list(obj.values())[:4]
        elif isinstance(obj, (list, tuple)):
            children = list(obj)[:4]
        for child in children:
            roots |= _object_roots(child, depth - 1)
    return frozenset(roots)


def infer_engine(model: Any, **options: Any) -> type[Engine]:
    """The engine that recognises ``model`` (and ``options`` such as ``params=``).

    Raises
    ------
    EngineNotFoundError
        If no engine, or more than one, recognises the model.
    """
    roots = set(_object_roots(model))
    if "params" in options:
        roots |= _object_roots(options["params"])
    candidates = []
    for engine in available_engines().values():
        frameworks = [m for m in engine.framework_modules if m in roots and m in sys.modules]
        if frameworks and engine.recognises(model, **options):
            candidates.append(engine)
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(sorted(available_engines()))
    if not candidates:
        raise EngineNotFoundError(
            f"model of type {type(model).__module__}.{type(model).__qualname__}: no installed "
            f"engine recognises it (installed: {names}); pass engine=... explicitly"
        )
    raise EngineNotFoundError(
        f"model of type {type(model).__qualname__} is recognised by several engines "
        f"({', '.join(e.name for e in candidates)}); pass engine=... to choose"
    )


def bind_model(
    model: Any,
    loss_fn: Any = None,
    *,
    parameters: Any = None,
    engine: str | None = None,
    device: Any = None,
    dtype: Any = None,
    **options: Any,
) -> InfluenceModel:
    """Wrap ``model`` with the named or inferred engine; what ``InfluenceModel(...)`` calls.

    Parameters
    ----------
    model, loss_fn, parameters, device, dtype
        See :class:`~krylov_influence.engine.InfluenceModel`.
    engine : str, optional
        Engine name; inferred from ``model`` (and ``params=``) when omitted.
    **options
        Engine-specific keywords (e.g. ``params=`` for JAX).

    Returns
    -------
    InfluenceModel
    """
    if isinstance(model, InfluenceModel):
        if engine is not None and engine != model.engine_name:
            raise ValueError(
                f"engine={engine!r}: the model is already bound to {model.engine_name!r}"
            )
        return model.on_device(device)
    chosen = get_engine(engine) if engine is not None else infer_engine(model, **options)
    return chosen.bind(model, loss_fn, parameters=parameters, device=device, dtype=dtype, **options)
