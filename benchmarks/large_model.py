"""A model whose Krylov basis does not fit in memory: the basis and G on disk.

A wide float32 MLP in PyTorch (``--width`` 4096: p ≈ 21 million parameters), fitted with
``subspace_dim`` n and ``k`` kept pairs and the basis on disk (``basis_location="disk"``),
then self-influence of ``--examples`` training examples. Prints the wall time of each stage
and the peak resident memory of the process (``ru_maxrss``) beside what the in-memory basis
alone would take, and with ``--compare`` the same fit with the basis in memory (for models
where both fit) and the ratio of the two fit times.

Run (each configuration in its own process, so that peak RSS is its own)::

    python benchmarks/large_model.py --width 4096 --n 64 --k 32 --examples 1000
    python benchmarks/large_model.py --width 1024 --n 64 --k 32 --examples 200 --compare
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--hessian-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", action="store_true", help="also fit with the basis in memory")
    args = parser.parse_args()

    import torch

    import krylov_influence as ki
    from krylov_influence._staging import format_bytes

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(args.inputs, args.width),
        torch.nn.Tanh(),
        torch.nn.Linear(args.width, args.width),
        torch.nn.Tanh(),
        torch.nn.Linear(args.width, 10),
    ).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.examples, args.inputs, generator=generator)
    y = torch.randint(0, 10, (args.examples,), generator=generator)
    b = args.batch_size
    train = [(x[i : i + b], y[i : i + b]) for i in range(0, args.examples, b)]
    hessian = [
        (x[i : i + b], y[i : i + b]) for i in range(0, min(args.hessian_examples, args.examples), b)
    ]
    model = ki.InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), l2=1e-3)
    p = model.num_parameters
    basis_bytes = args.n * p * 4
    print(
        f"p = {p:,} float32; basis n × p = {format_bytes(basis_bytes)}; G k × p = "
        f"{format_bytes(args.k * p * 4)}; model parameters {format_bytes(p * 4)}",
        flush=True,
    )
    print(f"peak RSS after building the model and data: {format_bytes(peak_rss_bytes())}")

    # Warm-up: the first Hessian-vector products pay one-off costs (torch.func set-up,
    # allocator growth) that would otherwise land on whichever fit runs first.
    ki.ArnoldiInfluenceCalculator(model, hessian, 2, True, 1, show_progress=False)
    locations = ["disk", "device"] if args.compare else ["disk"]
    fits, cpu = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for location in locations:
            start, start_cpu = time.perf_counter(), time.process_time()
            calc = ki.ArnoldiInfluenceCalculator(
                model,
                hessian,
                args.n,
                True,
                args.k,
                hessian_dataset=hessian,
                damping=1e-3,
                basis_location=location,
                basis_dir=directory,
                show_progress=False,
            )
            fits[location] = time.perf_counter() - start
            cpu[location] = time.process_time() - start_cpu
            print(
                f"{location}: fit {fits[location]:.1f} s, CPU {cpu[location]:.1f} s "
                f"(placement {calc.basis_placement}, "
                f"orthogonality loss {calc.eigenbasis.orthogonality_loss:.1e}); peak RSS "
                f"{format_bytes(peak_rss_bytes())}",
                flush=True,
            )
            start = time.perf_counter()
            values = calc.self_influence(train)
            elapsed = time.perf_counter() - start
            print(
                f"{location}: self-influence of {args.examples} examples {elapsed:.1f} s "
                f"({args.examples / elapsed:.1f} examples/s, finite: "
                f"{bool(np.isfinite(values).all())}); peak RSS "
                f"{format_bytes(peak_rss_bytes())}",
                flush=True,
            )
            if location == "disk":
                disk_values, disk_eigenvalues = values, calc.eigenbasis.eigenvalues
            else:
                kept = calc.eigenbasis.eigenvalues
                print(
                    f"disk vs device: max relative difference of self-influence "
                    f"{np.max(np.abs(disk_values - values) / np.abs(values)):.1e}, of the "
                    f"kept eigenvalues {np.max(np.abs(disk_eigenvalues / kept - 1)):.1e}"
                )
            del calc
    if args.compare:
        print(
            f"fit time, basis on disk / in memory: {fits['disk'] / fits['device']:.2f} "
            f"(CPU time: {cpu['disk'] / cpu['device']:.2f}; on a shared machine the steadier)"
        )


if __name__ == "__main__":
    main()
