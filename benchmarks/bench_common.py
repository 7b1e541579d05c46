"""Framework-free helpers shared by the benchmark driver and every peer script.

Peers run in their own virtual environments (some without torch, one without NumPy 2), so this
module imports only the standard library and NumPy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: Stages every peer reports, in table order.
STAGES = ("fit", "self_influence", "scores", "top_k")
TOP_K = 10

#: How the data reaches a library (``--input-form``), each measured and reported separately:
#:
#: - ``prebatched``: batches made once, before any timing: a list of ``(x, y)`` tensor
#:   tuples, or the thinnest loader over them for a library that insists on one;
#: - ``dataloader``: the framework's idiomatic pipeline over the examples, re-run at every
#:   pass over the data: ``DataLoader(TensorDataset(x, y), batch_size=B)`` in PyTorch
#:   (collating B single examples per batch), ``tf.data.Dataset.from_tensor_slices((x, y))
#:   .batch(B)`` in TensorFlow, host NumPy batches in JAX (which has no loader of its own).
INPUT_FORMS = ("prebatched", "dataloader")


def tf_data_autotuned() -> bool:
    """Whether the benchmark's ``tf.data`` pipelines keep tf.data's autotuning (the default).

    Not in a process confined to one CPU (the like-for-like runs pin every process to one):
    there tf.data's autotuning has no parallelism to tune, yet its model thread makes every
    pass over a pipeline wait about 20 ms, idle, when the pass ends (TensorFlow 2.21, a
    200-example pipeline: 21 ms a pass with autotuning, 0.5 ms without; on two CPUs 0.9 ms).
    There the pipeline runs as a one-CPU user would run it, with
    ``options.autotune.enabled = False``; ``BENCH_TF_DATA_AUTOTUNE=1`` keeps the default for
    comparison. The batches are the same either way. (influenciae keeps the default: it
    reads ``_batch_size`` of a ``BatchDataset`` and refuses the options wrapper; its stages
    take seconds.)
    """
    one_cpu = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) == 1
    return not one_cpu or os.environ.get("BENCH_TF_DATA_AUTOTUNE") == "1"


def tf_data_pipeline(tf: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> Any:
    """``tf.data.Dataset.from_tensor_slices((x, y)).batch(B)``, autotuned or not (above)."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    if tf_data_autotuned():
        return dataset
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Sample the RSS every ``interval`` s in a thread; ``peak_mb`` is the rise over the start.

    tracemalloc does not see the C++ allocators of torch and TensorFlow, so the resident set
    is sampled instead. The sampler sleeps between samples and costs well under 1 % of a core.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_mb = 0.0
        self.max_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.max_mb = rss_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.max_mb = max(self.max_mb, rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.max_mb = max(self.max_mb, rss_mb())

    @property
    def peak_mb(self) -> float:
        return self.max_mb - self.start_mb


class StageRecorder:
    """Wall times, CPU times and peak memory of named stages, over repeats.

    The CPU time (all threads of the process) is recorded next to the wall time because the
    benchmark machine may be shared: under load the wall time stretches while the CPU time
    of the work itself changes much less.

    Warm-up: none is run apart from the repeats. The first repeat of every stage includes
    whatever the library does on a first call (tracing and compilation for JAX and
    ``tf.function``, torch's lazy initialisation); it is reported on its own as the *first
    call*, and the medians are taken over the repeats after the first when there are two
    or more (with a single repeat, the median is that first call).
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, list[float]]] = {}

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        with PeakMemory() as mem:
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        entry = self.stages.setdefault(stage, {"seconds": [], "cpu_seconds": [], "peak_mb": []})
        entry["seconds"].append(elapsed)
        entry["cpu_seconds"].append(cpu)
        entry["peak_mb"].append(mem.peak_mb)
        return out

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per stage: every repeat, the first call, and medians over the later repeats."""
        out = {}
        for name, entry in self.stages.items():
            wall, cpu = entry["seconds"], entry["cpu_seconds"]
            steady = slice(1, None) if len(wall) >= 2 else slice(None)
            out[name] = {
                "seconds": wall,
                "cpu_seconds": cpu,
                "first_s": wall[0],
                "first_cpu_s": cpu[0],
                "median_s": statistics.median(wall[steady]),
                "median_cpu_s": statistics.median(cpu[steady]),
                "median_of": "repeats 2.." + str(len(wall)) if len(wall) >= 2 else "repeat 1",
                "peak_mb": max(entry["peak_mb"]),
            }
        return out


def load_problem(name: str) -> dict[str, Any]:
    """The arrays and settings written by ``prepare.py`` for problem ``name``."""
    path = RESULTS / f"{name}.npz"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python benchmarks/prepare.py` first")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["config"] = json.loads(str(arrays.pop("config_json")))
    return arrays


def top_k_indices(scores: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of the ``k`` largest scores of every row, best first, shape (Q, k)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def peer_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--problem", default="digits", help="digits, cnn or transformer (from prepare.py)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    parser.add_argument(
        "--no-mislabel", action="store_true", help="skip the fit on the flipped-label model"
    )
    parser.add_argument("--engine", default="torch", help="ours only: torch, jax or tensorflow")
    parser.add_argument(
        "--input-form",
        default="prebatched",
        choices=INPUT_FORMS,
        help="prebatched (batches made once) or dataloader (the framework's own pipeline)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model and the inputs, make one pass over them, and stop",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def dry_run_report(args: argparse.Namespace, peer: str, inputs: dict[str, Any]) -> None:
    """One pass over every input of ``inputs`` (name -> iterable of batches); print the sizes.

    Proves the input form is built and iterable for the problem without running any stage.
    """
    parts = []
    for name, batches in inputs.items():
        sizes = [int(np.shape(_first(batch))[0]) for batch in batches]
        parts.append(f"{name}: {len(sizes)} batch(es) of {sorted(set(sizes), reverse=True)}")
    print(f"dry run {peer} {args.problem} {args.input_form}: " + "; ".join(parts), flush=True)


def _first(batch: Any) -> Any:
    """``x`` of an ``(x, y)`` batch (a tuple, list or dict with key ``x``)."""
    if isinstance(batch, dict):
        return batch.get("x", next(iter(batch.values())))
    return batch[0]


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's threads so far, summed by thread name (Linux /proc).

    Shows which pools did the work (``python``: the main thread and Python-level threads;
    ``tf_XLAEigen``: XLA's CPU pool; ...); threads under 10 ms are left out.
    """
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return {name: round(s, 3) for name, s in sorted(out.items()) if s >= 0.01}


def affinity_note(threads: int) -> str:
    """The process's thread setting and the CPUs it may run on."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return f"--threads {threads or 'default'}; " + (
        f"CPU affinity {cpus} of {os.cpu_count()} CPUs" if cpus else "affinity unknown"
    )


def write_result(
    args: argparse.Namespace,
    peer: str,
    recorder: StageRecorder,
    scores: np.ndarray | None,
    self_influence: np.ndarray | None,
    flipped_self_influence: np.ndarray | None,
    topk: np.ndarray | None,
    versions: dict[str, str],
    notes: list[str],
) -> None:
    """Write the peer's figures as JSON, and its arrays (our convention) next to it as .npy."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, array in (
        ("scores", scores),
        ("self_influence", self_influence),
        ("flipped_self_influence", flipped_self_influence),
        ("top_k", topk),
    ):
        if array is not None:
            path = out.with_suffix(f".{key}.npy")
            np.save(path, np.asarray(array))
            files[key] = str(path)
    result = {
        "peer": peer,
        "problem": args.problem,
        "input_form": args.input_form,
        "repeats": args.repeats,
        "stages": recorder.summary(),
        "max_rss_mb": max_rss_mb(),
        "thread_cpu_s": thread_cpu_seconds(),
        "files": files,
        "versions": versions,
        "notes": [*notes, affinity_note(args.threads)],
    }
    out.write_text(json.dumps(result, indent=1))
