"""Which parameters of a ``torch.nn.Module`` are differentiated, and their flat order.

The flat vector θ is the chosen parameters in ``module.named_parameters()`` order (shared
parameters appear once, under their first name), each flattened in C order. The order in
which the user *names* the parameters does not matter: the module's order always wins, so
the same selection gives the same θ however it is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["select_parameters"]


def select_parameters(module: torch.nn.Module, parameters: Any) -> list[str]:
    """Names of the chosen parameters of ``module``, in ``named_parameters()`` order.

    Parameters
    ----------
    module : torch.nn.Module
    parameters : None, callable, str, or iterable of str / torch.nn.Parameter
        ``None``: every parameter with ``requires_grad``. A callable ``(name, param) -> bool``
        chooses by predicate. Otherwise each entry is a parameter name (``"fc2.weight"``), a
        submodule name (``"fc2"``: all its parameters, recursively), or a parameter object of
        ``module``. A single string is one name.

    Returns
    -------
    list of str
        Non-empty, without duplicates, in the module's order.

    Raises
    ------
    ValueError
        On unknown names, a parameter object that does not belong to ``module``, or an empty
        selection.
    TypeError
        If ``parameters`` is none of the accepted kinds.
    """
    named = list(module.named_parameters())
    if parameters is None:
        chosen = {name for name, param in named if param.requires_grad}
        if not chosen:
            raise ValueError(
                "parameters=None: the module has no parameter with requires_grad=True; "
                "pass parameters=[...] to choose some"
            )
    elif callable(parameters) and not isinstance(parameters, torch.nn.Parameter):
        chosen = _by_predicate(named, parameters)
    else:
        chosen = _by_names(module, named, parameters)
    if not chosen:
        raise ValueError(f"parameters={parameters!r}: the selection is empty")
    return [name for name, _ in named if name in chosen]


def _by_predicate(
    named: list[tuple[str, torch.nn.Parameter]], predicate: Callable[[str, Any], Any]
) -> set[str]:
    chosen = set()
    for name, param in named:
        if predicate(name, param):
            chosen.add(name)
    return chosen


def _by_names(
    module: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]], parameters: Any
) -> set[str]:
    entries: Iterable[Any]
    if isinstance(parameters, (str, torch.nn.Parameter)):
        entries = [parameters]
    else:
        try:
            entries = list(parameters)
        except TypeError:
            raise TypeError(
                "parameters: expected None, a predicate (name, param) -> bool, or an iterable "
                f"of parameter or module names, got {type(parameters).__name__}"
            ) from None
    by_name = dict(named)
    by_id = {id(param): name for name, param in named}
    submodules = dict(module.named_modules(remove_duplicate=False))
    chosen: set[str] = set()
    for entry in entries:
        if isinstance(entry, torch.Tensor):
            if id(entry) not in by_id:
                raise ValueError(
                    f"parameters: a tensor of shape {tuple(entry.shape)} is not a parameter "
                    "of this module"
                )
            chosen.add(by_id[id(entry)])
        elif isinstance(entry, str):
            if entry in by_name:
                chosen.add(entry)
            elif entry in submodules and entry != "":
                inside = [f"{entry}.{name}" for name, _ in submodules[entry].named_parameters()]
                # A submodule whose parameters are all shared with an earlier module has
                # them under another name in the flat order.
                inside = [name for name in inside if name in by_name] or [
                    by_id[id(p)] for p in submodules[entry].parameters()
                ]
                if not inside:
                    raise ValueError(f"parameters: module {entry!r} has no parameters")
                chosen.update(inside)
            else:
                raise ValueError(
                    f"parameters: {entry!r} is neither a parameter nor a submodule name; "
                    f"parameters are {_preview(by_name)}"
                )
        else:
            raise TypeError(
                "parameters: expected parameter or module names (str) or parameter objects, "
                f"got an entry of type {type(entry).__name__}"
            )
    return chosen


def _preview(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
