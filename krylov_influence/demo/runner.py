"""The demo, stage by stage: data, training, Arnoldi fit, self-influence, scores, picture."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from krylov_influence.demo.data import load_digits_data
from krylov_influence.demo.metrics import INSPECTED_FRACTIONS, choose_queries, strongest_neighbours
from krylov_influence.demo.training import TrainingConfig, engine_context, train
from krylov_influence.evaluation import mislabel_detection

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

PICTURE_NAME = "influence_demo.png"
SUMMARY_NAME = "summary.json"
SCORES_NAME = "detection_scores.npz"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (the CLI's options).

    Attributes
    ----------
    engine : str
        ``"numpy"`` (softmax regression), ``"torch"``, ``"jax"`` or ``"tensorflow"`` (MLP).
    seed : int
        Seeds the split, the flipped labels, the MLP's initial weights, the Arnoldi start
        vector and the choice of test digits.
    flip : float
        Fraction of training labels flipped.
    subspace_dim : int
        Arnoldi steps (Hessian-vector products).
    k : int
        Eigenpairs kept (``k_largest_eig_vals``).
    damping : float
        δ added to the kept eigenvalues. 1e-3 is under 1 % of the smallest eigenvalue kept
        with the defaults (about 0.1 with ``l2 = 1e-2``), so it barely changes scores, yet it
        keeps ``1/(λ+δ)`` bounded if a larger ``k`` reaches the near-zero or negative Ritz
        values of the MLP's non-convex Hessian.
    complement : {"none", "mean"} or float
        The calculator's spectral complement (``"none"``: the paper's truncation).
    out : pathlib.Path
        Folder for ``influence_demo.png``, ``summary.json`` and ``detection_scores.npz``
        (self-influence, training losses, gradient norms and the flipped mask, shape (N,)
        each, for recomputing the detection figures).
    num_queries : int
        Test digits whose proponents and opponents are shown.
    num_neighbours : int
        Proponents (and opponents) shown per test digit.
    show_progress : bool
        tqdm bars on every stage that takes more than a moment.
    training : TrainingConfig
        How the model is trained (its ``seed`` is overridden by ``seed``).
    """

    engine: str = "numpy"
    seed: int = 0
    flip: float = 0.1
    subspace_dim: int = 200
    k: int = 50
    damping: float = 1e-3
    complement: str | float = "none"
    out: Path = Path("influence_demo")
    num_queries: int = 4
    num_neighbours: int = 3
    show_progress: bool = True
    training: TrainingConfig = field(default_factory=TrainingConfig)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes
    ----------
    summary : dict
        The content of ``summary.json``.
    picture : pathlib.Path
    summary_path : pathlib.Path
    """

    summary: dict[str, Any]
    picture: Path
    summary_path: Path


class _Stages:
    """Wall time of each stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start


def run_demo(config: DemoConfig, *, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the mislabelled-digits demo and write its picture and summary.

    Parameters
    ----------
    config : DemoConfig
    log : callable, optional
        Receives one line as each stage finishes (the CLI prints them unless ``--quiet``).

    Returns
    -------
    DemoResult

    Raises
    ------
    NotImplementedError
        If the engine is registered but cannot bind a model yet.
    ValueError
        On inconsistent settings (``k > subspace_dim``, a flip fraction that flips nothing).
    """
    import krylov_influence as ki
    from krylov_influence.demo.plot import draw_demo

    if config.k > config.subspace_dim:
        raise ValueError(f"k={config.k}: expected at most subspace_dim = {config.subspace_dim}")
    say = log or (lambda line: None)
    stages = _Stages()
    started = time.perf_counter()
    with stages("data"):
        data = load_digits_data(config.seed, config.flip)
    say(
        f"data: {data.num_train} training / {data.y_test.size} test digits, "
        f"{data.num_flipped} training labels flipped ({stages.seconds['data']:.1f} s)"
    )
    training = TrainingConfig(
        **{**asdict(config.training), "seed": config.seed, "show_progress": config.show_progress}
    )
    with engine_context(config.engine):
        with stages("train"):
            trained = train(config.engine, data, training)
        say(f"train: {trained.description} ({stages.seconds['train']:.1f} s)")

        with stages("fit"):
            calc = ki.ArnoldiInfluenceCalculator(
                trained.model,
                trained.train_batches,
                subspace_dim=config.subspace_dim,
                force_hermitian=True,
                k_largest_eig_vals=config.k,
                dtype="float64",
                damping=config.damping,
                seed=config.seed,
                show_progress=config.show_progress,
                complement=config.complement,
            )
        say(f"fit: {config.subspace_dim} Arnoldi steps ({stages.seconds['fit']:.1f} s)")

        with stages("self_influence"):
            self_influence = calc.self_influence(trained.train_batches)
        say(f"self-influence of {data.num_train} digits ({stages.seconds['self_influence']:.1f} s)")

        with stages("baselines"):
            losses, gradient_norms = _baselines(trained.model, trained.train_batches)
        say(
            f"baselines: training loss and gradient norm of {data.num_train} digits "
            f"({stages.seconds['baselines']:.1f} s)"
        )

        with stages("scores"):
            queries = choose_queries(
                trained.test_predictions, data.y_test, config.num_queries, config.seed
            )
            query_batch = trained.make_batch(data.x_test[queries], data.y_test[queries])
            neighbours = strongest_neighbours(
                calc, trained.model, [query_batch], trained.train_batches, config.num_neighbours
            )
        say(
            f"scores of {queries.size} test digits against the training set "
            f"({stages.seconds['scores']:.1f} s)"
        )

    detected = mislabel_detection(
        self_influence,
        data.flipped,
        losses=losses,
        gradient_norms=gradient_norms,
        fractions=INSPECTED_FRACTIONS,
    )
    by_influence = detected.influence
    by_loss, by_gradient_norm = detected.curves["loss"], detected.curves["gradient_norm"]
    basis = calc.eigenbasis
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    scores_path = out / SCORES_NAME
    np.savez(
        scores_path,
        self_influence=np.asarray(self_influence, dtype=np.float64),
        losses=losses,
        gradient_norms=gradient_norms,
        flipped=data.flipped,
    )
    picture = out / PICTURE_NAME
    with stages("plot"):
        draw_demo(
            picture,
            data=data,
            self_influence=self_influence,
            by_influence=by_influence,
            by_loss=by_loss,
            by_gradient_norm=by_gradient_norm,
            eigenbasis=basis,
            queries=queries,
            test_predictions=trained.test_predictions,
            neighbours=neighbours,
            title=(
                f"krylov-influence demo: {config.engine} engine, "
                f"{int(100 * config.flip)} % of training labels flipped, seed {config.seed}"
            ),
        )
    say(f"plot: {picture} ({stages.seconds['plot']:.1f} s)")
    stages.seconds["total"] = time.perf_counter() - started

    summary = {
        "settings": {
            "engine": config.engine,
            "seed": config.seed,
            "flip": config.flip,
            "subspace_dim": config.subspace_dim,
            "k_largest_eig_vals": config.k,
            "damping": config.damping,
            "complement": config.complement,
            "complement_value": (
                None if calc.eigenbasis.complement is None else calc.eigenbasis.complement.value
            ),
            "eigenvalue_selection": calc.eigenvalue_selection,
            "dtype": calc.dtype,
            "l2": training.l2,
            "batch_size": training.batch_size,
            "model": trained.description,
            "num_parameters": int(trained.model.num_parameters),
            "num_train": data.num_train,
            "num_test": int(data.y_test.size),
            "num_flipped": data.num_flipped,
        },
        "seeds": {
            "split_and_flip": config.seed,
            "initial_weights": config.seed,
            "arnoldi_start_vector": config.seed,
            "test_digits": config.seed,
        },
        "results": {
            "detection_auc": by_influence.auc,
            "found_after_inspecting": {f"{f:.2f}": v for f, v in by_influence.found.items()},
            "loss_ranking_auc": by_loss.auc,
            "loss_ranking_found_after_inspecting": {
                f"{f:.2f}": v for f, v in by_loss.found.items()
            },
            "gradient_norm_ranking_auc": by_gradient_norm.auc,
            "gradient_norm_ranking_found_after_inspecting": {
                f"{f:.2f}": v for f, v in by_gradient_norm.found.items()
            },
            "train_accuracy_given_labels": trained.train_accuracy,
            "test_accuracy": trained.test_accuracy,
            "gradient_norm_at_optimum": trained.gradient_norm,
            "kept_eigenvalues": [float(v) for v in basis.eigenvalues],
            "ritz_spectrum": [float(v) for v in basis.ritz.spectrum],
            "diagnostics": {
                "max_ritz_residual": float(np.max(basis.ritz.residuals)),
                "orthogonality_loss": basis.orthogonality_loss,
                "arnoldi_restarts": list(basis.arnoldi_restarts),
                "arnoldi_residual_norm": basis.residual_norm,
            },
            "queries": [_query_summary(data, trained, q, n) for q, n in zip(queries, neighbours)],
        },
        "timings_s": {name: round(s, 4) for name, s in stages.seconds.items()},
        "versions": _versions(trained.framework_version),
        "outputs": {
            "picture": str(picture),
            "summary": str(out / SUMMARY_NAME),
            "scores": str(scores_path),
        },
    }
    summary_path = out / SUMMARY_NAME
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return DemoResult(summary, picture, summary_path)


def _baselines(model: Any, batches: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-example training loss and gradient norm ``‖∇L(x)‖`` of every training example.

    The two rankings that self-influence ``g_xᵀ H⁻¹ g_x`` must beat: the loss alone, and the
    gradient without the inverse Hessian. Per-example gradients are (B, p) per batch, cheap
    for the demo's models (p = 650 or 2410).

    Returns
    -------
    losses, gradient_norms : numpy.ndarray, shape (N,), float64
    """
    losses, norms = [], []
    for batch in batches:
        losses.append(model.to_numpy(model.losses(batch)).astype(np.float64))
        grads = model.to_numpy(model.per_example_grads(batch)).astype(np.float64)
        norms.append(np.linalg.norm(grads, axis=1))
    return np.concatenate(losses), np.concatenate(norms)


def _query_summary(data: Any, trained: Any, query: int, neighbours: Any) -> dict[str, Any]:
    def rows(indices: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "train_index": int(i),
                "score": float(s),
                "given_label": int(data.y_train[i]),
                "true_label": int(data.y_train_true[i]),
            }
            for i, s in zip(indices, scores)
        ]

    return {
        "test_index": int(query),
        "label": int(data.y_test[query]),
        "predicted": int(trained.test_predictions[query]),
        "proponents": rows(neighbours.proponents, neighbours.proponent_scores),
        "opponents": rows(neighbours.opponents, neighbours.opponent_scores),
    }


def _versions(framework: str) -> dict[str, str]:
    import matplotlib
    import scipy
    import sklearn
    import tqdm

    import krylov_influence

    return {
        "krylov_influence": krylov_influence.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "matplotlib": matplotlib.__version__,
        "tqdm": tqdm.__version__,
        "engine_framework": framework,
    }
