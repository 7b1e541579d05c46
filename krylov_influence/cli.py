"""The ``krylov-influence`` command.

``krylov-influence demo``
    Train a digits classifier with 10 % flipped labels, find them by self-influence, show
    proponents and opponents of test digits; write a picture and a JSON summary.
``krylov-influence memory -p P -n N --k K [--batch-size B ...]``
    The memory each stage of a fit and of scoring needs, before any work is done.
``krylov-influence engines [--devices]``
    List the engines found and their frameworks' versions, read from package metadata
    without importing any framework (seconds saved, no framework log lines); ``--devices``
    imports each framework to list its devices.

Importing this module imports neither a framework nor scikit-learn or matplotlib: the demo
imports them when it runs, each framework only inside its own trainer.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

_PROG = "krylov-influence"


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    """A positive integer, with ``_`` or ``,`` separators allowed (``20_000_000``)."""
    return _positive_int(text.replace("_", "").replace(",", ""))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction with 0 < flip < 1, got {value:g}")
    return value


def _complement(text: str) -> str | float:
    if text in ("none", "mean"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected none, mean or a number c >= 0, got {text!r}"
        ) from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected none, mean or a number c >= 0, got {text!r}")
    return value


def _damping(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value:g}")
    return value


def _framework_installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _demo_engines() -> dict[str, bool]:
    """Engines the demo can train in, registered here, and whether their framework is found."""
    from krylov_influence.demo.training import DEMO_ENGINES
    from krylov_influence.registry import available_engines

    registered = available_engines()
    return {
        name: _framework_installed(module)
        for name, module in DEMO_ENGINES.items()
        if name in registered
    }


def _engine(text: str) -> str:
    engines = _demo_engines()
    ready = [name for name, found in engines.items() if found]
    if text not in engines:
        raise argparse.ArgumentTypeError(
            f"unknown engine {text!r}; installed engines: {', '.join(ready)}"
        )
    if not engines[text]:
        raise argparse.ArgumentTypeError(
            f"the {text} engine needs {text}, which is not installed ({INSTALL[text]}); "
            f"installed engines: {', '.join(ready)}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``krylov-influence`` (sub-commands ``demo`` and ``engines``)."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Influence functions at scale with the Arnoldi method.",
    )
    from krylov_influence import __version__

    parser.add_argument("--version", action="version", version=f"{_PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="find flipped labels in scikit-learn's digits by self-influence",
        description=(
            "Flip a fraction of the training labels of scikit-learn's bundled digits, train a "
            "classifier (softmax regression for numpy, a 64-32-10 MLP for the frameworks), fit "
            "the Arnoldi influence calculator, rank the training set by self-influence and "
            "show proponents and opponents of a few test digits. Writes influence_demo.png "
            "and summary.json."
        ),
    )
    demo.add_argument(
        "--engine",
        type=_engine,
        default="numpy",
        help="numpy (default, no framework needed), torch, jax or tensorflow",
    )
    demo.add_argument("--seed", type=_seed, default=0, help="seed of every random choice (0)")
    demo.add_argument(
        "--flip", type=_fraction, default=0.1, help="fraction of training labels flipped (0.1)"
    )
    demo.add_argument(
        "--subspace-dim",
        type=_positive_int,
        default=200,
        help="Arnoldi steps, i.e. Hessian-vector products (200)",
    )
    demo.add_argument(
        "--k", type=_positive_int, default=50, help="eigenvalues kept, at most --subspace-dim (50)"
    )
    demo.add_argument(
        "--damping", type=_damping, default=1e-3, help="added to the kept eigenvalues (1e-3)"
    )
    demo.add_argument(
        "--complement",
        type=_complement,
        default="none",
        help="what the discarded eigen-directions get: none (the paper), mean, or a number c",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("influence_demo"),
        help="folder for influence_demo.png and summary.json (./influence_demo)",
    )
    demo.add_argument(
        "--quiet", action="store_true", help="no progress bars, a plain report without decorations"
    )
    # Errors found after parsing (--k against --subspace-dim) are reported by this parser.
    demo.set_defaults(subparser=demo)
    memory = commands.add_parser(
        "memory",
        help="the memory each stage needs, from p, n, k and the batch sizes (no model needed)",
        description=(
            "List the arrays that each stage of a fit and of scoring allocates, where they live "
            "and their total, before any work is done (krylov_influence.memory.estimate_memory)."
            " The model's own parameters and activations come on top, and during the fit "
            "the linearised Hessian data (up to 1 GiB: "
            "linearize_hessian_data)."
        ),
    )
    memory.add_argument("--parameters", "-p", type=_count, required=True, help="p")
    memory.add_argument("--subspace-dim", "-n", type=_count, required=True, help="n")
    memory.add_argument("--k", type=_count, required=True, help="k_largest_eig_vals")
    memory.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    memory.add_argument("--batch-size", type=_count, default=256, help="training batch size")
    memory.add_argument("--query-batch-size", type=_count, default=None)
    memory.add_argument(
        "--num-train", type=_count, default=None, help="training examples (kept vectors)"
    )
    memory.add_argument("--block-size", type=_count, default=1)
    memory.add_argument("--complement", action="store_true", help='complement != "none"')
    memory.add_argument("--checkpoint", action="store_true", help="checkpoint_path set")
    memory.add_argument("--basis-location", choices=("device", "host", "disk"), default="device")
    memory.set_defaults(subparser=memory)
    engines_parser = commands.add_parser(
        "engines", help="list the engines found and their versions (no framework is imported)"
    )
    engines_parser.add_argument(
        "--devices",
        action="store_true",
        help="import each framework to list its devices (seconds, and its log lines)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``krylov-influence``; returns the exit status (argparse exits with 2 on bad options).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "engines":
        return _engines(probe_devices=args.devices)
    if args.command == "memory":
        return _memory(args)
    return _demo(parser, args)


def _memory(args: argparse.Namespace) -> int:
    from krylov_influence.memory import estimate_memory

    try:
        plan = estimate_memory(
            args.parameters,
            args.subspace_dim,
            args.k,
            dtype=args.dtype,
            batch_size=args.batch_size,
            query_batch_size=args.query_batch_size,
            num_train=args.num_train,
            block_size=args.block_size,
            complement=args.complement,
            checkpoint=args.checkpoint,
            basis_location=args.basis_location,
        )
    except ValueError as error:
        args.subparser.error(str(error))
    print(plan.table())
    return 0


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from krylov_influence.demo import DemoConfig, run_demo
    from krylov_influence.demo.report import format_report
    from krylov_influence.demo.training import num_parameters

    demo_parser: argparse.ArgumentParser = args.subparser
    if args.k > args.subspace_dim:
        demo_parser.error(
            f"argument --k: expected at most --subspace-dim = {args.subspace_dim}, got {args.k}"
        )
    p = num_parameters(args.engine)
    if args.subspace_dim > p:
        demo_parser.error(
            f"argument --subspace-dim: expected at most {p}, the number of parameters of the "
            f"{args.engine} demo model, got {args.subspace_dim}"
        )
    config = DemoConfig(
        engine=args.engine,
        seed=args.seed,
        flip=args.flip,
        subspace_dim=args.subspace_dim,
        k=args.k,
        damping=args.damping,
        complement=args.complement,
        out=args.out,
        show_progress=not args.quiet,
    )
    log = None if args.quiet else lambda line: print(f"  ✓ {line}", flush=True)
    try:
        result = run_demo(config, log=log)
    except ValueError as error:
        demo_parser.error(str(error))
    except NotImplementedError as error:
        print(f"{_PROG} demo: error: the {args.engine} engine cannot run: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print()
    print(format_report(result.summary, decorated=not args.quiet))
    return 0


def _engines(*, probe_devices: bool = False) -> int:
    from krylov_influence.demo.training import DEMO_ENGINES
    from krylov_influence.registry import available_engines

    registered = available_engines()
    rows = []
    for name in sorted(set(registered) | set(DEMO_ENGINES)):
        status, version, devices, note = _describe(
            registered.get(name), DEMO_ENGINES.get(name), probe_devices
        )
        rows.append((name, status, version, devices, note))
    widths = [max(len(str(row[i])) for row in [*rows, _HEADER]) for i in range(len(_HEADER))]
    for row in [_HEADER, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


_HEADER = ("engine", "status", "version", "devices", "note")

#: Distributions that provide each framework's module (TensorFlow has several builds).
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "jax": ("jax",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel"),
}


def _distribution_version(framework: str) -> str | None:
    """The installed version of ``framework`` from package metadata (no import)."""
    from importlib import metadata

    for distribution in _DISTRIBUTIONS.get(framework, (framework,)):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


#: How to install each framework so that its engine (shipped with this package) works. The
#: package itself is installed from its checkout, so the hint names the framework alone;
#: torch pinned to the CPU build (a bare `torch` resolves a multi-GB CUDA build).
INSTALL = {
    "torch": "pip install torch==2.13.0",
    "jax": 'pip install "jax>=0.4.30"',
    "tensorflow": 'pip install "tensorflow-cpu>=2.16" "keras>=3.0"',
}


def _describe(engine: Any, framework: str | None, probe_devices: bool) -> tuple[str, ...]:
    """(status, framework version, devices, note) of one engine, never raising."""
    if engine is None:
        return "unavailable", "-", "-", "not registered (its plugin failed to load)"
    if framework is not None and not _framework_installed(framework):
        return "unavailable", "-", "-", INSTALL.get(framework, f"install {framework}")
    if framework not in (None, "numpy") and not probe_devices:  # numpy: already imported
        version = _distribution_version(framework)
        if version is not None:
            return "available", version, "-", "--devices to probe devices"
    try:
        version = str(engine.version())
        devices = ", ".join(engine.devices())
    except Exception as error:  # a broken framework install must not break the listing
        return "unavailable", "-", "-", f"{type(error).__name__}: {error}"
    if version == "unavailable":  # registered, but cannot bind models in this build
        return "unavailable", "-", "-", "engine not implemented in this build"
    return "available", version, devices, ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
