"""The autodiff floor on the benchmark model, in PyTorch (``torch.func``).

What one pass of the autodiff itself costs, so that a fit or projection time can be read as a
multiple of it:

- ``hvp``: one Hessian-vector product of the mean objective over the whole training set
  (forward-over-reverse, ``jvp(grad)``), and the same by reverse-over-reverse double backward;
- ``hvp_vmap10``: ten HVPs sharing one pass through ``vmap``, per vector;
- ``per_example_grads``: one ``vmap(grad)`` pass over the training set (B × p gradients);
- ``project_jvp``: ``k`` directional derivatives of every per-example loss, ``vmap`` over the
  k directions of ``jvp`` (the projection as the Arnoldi method does it).

Run with the main environment::

    python benchmarks/floor.py --problem digits --out benchmarks/results/floor-digits.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vmap

from bench_common import load_problem
from bench_torch import load_model, tensors

CPU_TIMES: dict[str, float] = {}


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2, name: str = "") -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after ``warmup`` calls.

    The median CPU time (all threads) goes to ``CPU_TIMES[name]``: on a shared machine it is
    the steadier of the two.
    """
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    if name:
        CPU_TIMES[name] = statistics.median(cpu)
    return statistics.median(times)


def measure(problem_name: str, repeats: int) -> dict[str, Any]:
    problem = load_problem(problem_name)
    config = problem["config"]
    model = load_model(problem)
    t = tensors(problem)
    x, y = t["x_train"], t["y_train"]
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for _, p in model.named_parameters())
    l2 = config["l2"]
    dtype = params[0].dtype

    def mean_objective(*ps: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, ps)), (x,))
        reg = 0.5 * l2 * sum((p * p).sum() for p in ps)
        return torch.nn.functional.cross_entropy(out, y) + reg

    def example_loss(ps: tuple[torch.Tensor, ...], xi: torch.Tensor, yi: torch.Tensor):
        out = functional_call(model, dict(zip(names, ps)), (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    gen = torch.Generator().manual_seed(0)
    v = tuple(torch.randn(p.shape, generator=gen, dtype=dtype) for p in params)
    v10 = tuple(torch.randn((10, *p.shape), generator=gen, dtype=dtype) for p in params)
    k = config["k"]
    vk = tuple(torch.randn((k, *p.shape), generator=gen, dtype=dtype) for p in params)
    grad_fn = grad(mean_objective, argnums=tuple(range(len(params))))

    def hvp_fwd_rev(vec: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return jvp(lambda *ps: grad_fn(*ps), params, vec)[1]

    def hvp_rev_rev() -> Any:
        ps = tuple(p.clone().requires_grad_(True) for p in params)
        gs = torch.autograd.grad(mean_objective(*ps), ps, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(gs, v))
        return torch.autograd.grad(dot, ps)

    hvp10 = vmap(hvp_fwd_rev)
    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def per_example_losses(ps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, ps)), (x,))
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    project = vmap(lambda direction: jvp(lambda *ps: per_example_losses(ps), params, direction)[1])

    with torch.no_grad():
        figures = {
            "hvp_s": median_time(lambda: hvp_fwd_rev(v), repeats, name="hvp"),
            "hvp_vmap10_per_vector_s": median_time(lambda: hvp10(v10), repeats, name="hvp10") / 10,
            "per_example_grads_s": median_time(
                lambda: per_example(params, x, y), repeats, name="per_example_grads"
            ),
            f"project_jvp_k{k}_s": median_time(lambda: project(vk), repeats, name="project"),
        }
    figures["hvp_rev_rev_s"] = median_time(hvp_rev_rev, repeats, name="hvp_rev_rev")
    figures["cpu_s"] = dict(CPU_TIMES)
    figures["cpu_s"]["hvp10"] /= 10
    figures["subspace_dim"] = config["subspace_dim"]
    figures["hvp_floor_fit_s"] = config["subspace_dim"] * min(
        figures["hvp_s"], figures["hvp_rev_rev_s"]
    )
    figures["num_train"] = int(x.shape[0])
    figures["num_parameters"] = int(sum(p.numel() for p in params))
    figures["torch"] = torch.__version__
    figures["threads"] = torch.get_num_threads()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="digits")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = measure(args.problem, args.repeats)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
