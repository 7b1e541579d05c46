"""The tensorflow engine of krylov_influence (work in progress: not implemented yet)."""

from __future__ import annotations

from typing import Any

from krylov_influence.engine import Engine, InfluenceModel

__all__ = ["TensorFlowEngine"]


class TensorFlowEngine(Engine):
    """Placeholder registration of the ``tensorflow`` engine; binding raises until it lands."""

    name = "tensorflow"
    framework_modules: tuple[str, ...] = ()

    @classmethod
    def version(cls) -> str:
        return "unavailable"

    @classmethod
    def recognises(cls, model: Any, **options: Any) -> bool:
        return False

    @classmethod
    def bind(cls, model: Any, loss_fn: Any = None, **options: Any) -> InfluenceModel:
        raise NotImplementedError("the tensorflow engine is not implemented yet")
