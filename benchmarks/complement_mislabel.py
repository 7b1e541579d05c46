"""Mislabel detection on the demo's data with and without the spectral complement.

For each engine and seed, the demo's pipeline (10 % of scikit-learn's digits labels flipped,
the demo's trained model, n = 200, k = 50, damping 1e-3) ranks the training set by
self-influence with ``complement="none"`` and ``"mean"``; the table gives the ROC AUC of each
beside the loss-only and gradient-norm baselines (``krylov_influence.evaluation``) and beside
the exact damped inverse ``g_xᵀ (H + δI)⁻¹ g_x`` of the same trained model (dense Hessian,
``krylov_influence.exact``): what any truncation or completion of the inverse approaches.

    python benchmarks/complement_mislabel.py --engines numpy,torch,jax,tensorflow --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any


def exact_auc(config: Any) -> float:
    """The detection AUC of the exact damped inverse on the demo's model for ``config``.

    The demo's data and training are deterministic in the seed, so this is the very model
    that ``run_demo(config)`` fitted.
    """
    from krylov_influence.demo.data import load_digits_data
    from krylov_influence.demo.training import TrainingConfig, engine_context, train
    from krylov_influence.evaluation import roc_auc
    from krylov_influence.exact import exact_self_influence

    data = load_digits_data(config.seed, config.flip)
    training = TrainingConfig(
        **{**asdict(config.training), "seed": config.seed, "show_progress": False}
    )
    with engine_context(config.engine):
        trained = train(config.engine, data, training)
        exact = exact_self_influence(trained.model, trained.train_batches, damping=config.damping)
    return roc_auc(exact, data.flipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="numpy,torch,jax,tensorflow")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    from krylov_influence.demo import DemoConfig, run_demo

    print(
        "| engine | seed | self-influence AUC | with complement | exact inverse | loss AUC "
        "| gradient-norm AUC |"
    )
    print("|---|---|---|---|---|---|---|")
    for engine in args.engines.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            aucs = {}
            for complement in ("none", "mean"):
                with tempfile.TemporaryDirectory() as out:
                    config = DemoConfig(
                        engine=engine,
                        seed=seed,
                        complement=complement,
                        out=Path(out),
                        show_progress=False,
                    )
                    aucs[complement] = run_demo(config).summary["results"]
            plain, completed = aucs["none"], aucs["mean"]
            print(
                f"| {engine} | {seed} | {plain['detection_auc']:.4f} | "
                f"{completed['detection_auc']:.4f} | {exact_auc(config):.4f} | "
                f"{plain['loss_ranking_auc']:.4f} | "
                f"{plain['gradient_norm_ranking_auc']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
