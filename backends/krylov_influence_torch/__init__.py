"""The PyTorch engine of krylov_influence (``engine="torch"``).

Binds any ``torch.nn.Module`` and per-example loss::

    import torch
    import krylov_influence as ki

    model = ki.InfluenceModel(net.eval(), torch.nn.CrossEntropyLoss(reduction="none"),
                              parameters=["fc2"], dtype="float64")

Operators are built on ``torch.func`` (``functional_call``, ``grad``, ``jvp``, ``vmap``):
forward-over-reverse Hessian-vector products, projections by JVPs vectorised over the rows of
the projector, per-example gradients by ``vmap(grad)``. Where a layer's kernels cannot take
one of these routes (recurrent layers under ``vmap``, attention and oneDNN LSTMs in forward
mode...), an operator falls back once to an exact route and says so with a
:class:`RouteFallbackWarning`; ``model.routes`` reports the route each operator takes
(``docs/layers.md``). See
:class:`~krylov_influence_torch._model.TorchInfluenceModel` for the options, the flat
parameter order and the batch formats.

Importing this package does not import torch; :meth:`TorchEngine.bind` does.
"""

from __future__ import annotations

from typing import Any

from krylov_influence.engine import Engine, InfluenceModel

__all__ = ["RouteFallbackWarning", "TorchEngine"]


def __getattr__(name: str) -> Any:
    # Lazily, so that importing this package (the registry does) never imports torch.
    if name == "RouteFallbackWarning":
        from krylov_influence_torch._routes import RouteFallbackWarning

        return RouteFallbackWarning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TorchEngine(Engine):
    """The ``torch`` engine: ``torch.nn.Module`` models with ``loss_fn(outputs, targets)``.

    Options of :meth:`bind` beyond the common ones: ``l2`` (float, adds ``½ l2 ‖θ‖²`` to every
    per-example loss), ``chunk_size`` (rows of a projector per vectorised pass), ``hvp_mode``
    (``"reverse-over-reverse"`` or ``"forward-over-reverse"``) and ``projection`` (``"auto"``,
    ``"jvp"`` or ``"gradients"``).
    """

    name = "torch"
    framework_modules = ("torch",)

    @classmethod
    def version(cls) -> str:
        try:
            import torch
        except ImportError:
            return "unavailable"
        return str(torch.__version__)

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        from krylov_influence_torch._model import available_devices

        return available_devices()

    @classmethod
    def recognises(cls, model: Any, **options: Any) -> bool:
        import torch

        return isinstance(model, torch.nn.Module)

    @classmethod
    def bind(
        cls,
        model: Any,
        loss_fn: Any = None,
        *,
        parameters: Any = None,
        device: Any = None,
        dtype: Any = None,
        **options: Any,
    ) -> InfluenceModel:
        """Wrap a ``torch.nn.Module`` and a per-example loss.

        Parameters
        ----------
        model : torch.nn.Module
        loss_fn : callable
            ``loss_fn(outputs, targets) -> (B,)``.
        parameters, device, dtype
            See :class:`~krylov_influence_torch._model.TorchInfluenceModel`.
        **options
            ``l2`` (float, default 0), ``chunk_size`` (int, optional), ``hvp_mode``
            (``"reverse-over-reverse"``, the default, or ``"forward-over-reverse"``) and
            ``projection`` (``"auto"``, ``"jvp"`` or ``"gradients"``).

        Returns
        -------
        TorchInfluenceModel
        """
        from krylov_influence_torch._model import TorchInfluenceModel

        unknown = sorted(set(options) - {"l2", "chunk_size", "hvp_mode", "projection"})
        if unknown:
            raise TypeError(
                f"unexpected options for the torch engine: {unknown}; it takes l2=, "
                "chunk_size=, hvp_mode= and projection="
            )
        return TorchInfluenceModel(
            model, loss_fn, parameters=parameters, device=device, dtype=dtype, **options
        )

    @classmethod
    def from_neutral_spec(
        cls, spec: Any, *, dtype: Any = "float64", device: Any = None
    ) -> tuple[InfluenceModel, list[Any]]:
        """Build an :class:`~krylov_influence.testing.MLPSpec` as a torch module.

        Returns
        -------
        model : TorchInfluenceModel
            All parameters chosen; flat order ``W_1`` (in, out) C order, ``b_1``, ``W_2``...
        batches : list of (x, y) tuples of tensors
            ``x`` (B, d_in) in ``dtype``; ``y`` int64 labels (B,) or ``dtype`` targets
            (B, d_out); on the model's device, one per ``spec.batch_slices()``.
        """
        import torch

        from krylov_influence_torch._model import torch_dtype
        from krylov_influence_torch._spec import NeutralMLP, neutral_loss

        kind = torch_dtype(dtype)
        target = torch.device("cpu") if device is None else device

        def tensor(array: Any, kind: Any = kind) -> Any:
            return torch.as_tensor(array).to(dtype=kind)

        net = NeutralMLP(
            [tensor(w) for w in spec.weights], [tensor(b) for b in spec.biases], spec.activation
        ).eval()
        model = cls.bind(net, neutral_loss(spec.loss), device=target, l2=spec.l2)
        label = torch.int64 if spec.loss == "cross_entropy" else kind
        batches = [
            (
                tensor(x).to(model.device),
                tensor(y, label).to(model.device),
            )
            for x, y in spec.numpy_batches()
        ]
        return model, batches
