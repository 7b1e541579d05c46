"""Do the libraries of a run compute the same scores? Their score matrices against one another.

Where no exact oracle fits in memory (``cnn``, ``transformer``), the accuracy columns of
``run.py``'s table are empty; this compares the score matrices that every library of the run
left in ``--out-dir`` (``<problem>-<peer>-<form>.scores.npy``, queries × training examples)
with those of the first library given:

    python benchmarks/agreement.py --problem transformer \\
        --peers ours-torch,ours-jax,ours-tensorflow,pydvl

For each other library it prints max |difference| / max |reference score| and the Spearman
rank correlation of all the scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", required=True)
    parser.add_argument(
        "--peers", required=True, help="comma-separated; the first is the reference"
    )
    parser.add_argument("--input-form", default="prebatched")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    peers = args.peers.split(",")

    def scores(peer: str) -> np.ndarray:
        path = Path(args.out_dir) / f"{args.problem}-{peer}-{args.input_form}.scores.npy"
        return np.load(path).astype(np.float64)

    reference = scores(peers[0])
    scale = float(np.abs(reference).max())
    for peer in peers[1:]:
        other = scores(peer)
        if other.shape != reference.shape:
            print(f"{peer}: shape {other.shape}, expected {reference.shape}")
            continue
        worst = float(np.abs(other - reference).max()) / scale
        rho = float(spearmanr(other.ravel(), reference.ravel()).statistic)
        print(
            f"{peer} vs {peers[0]}: max |difference| / max |score| {worst:.1e}, Spearman {rho:.5f}"
        )


if __name__ == "__main__":
    main()
