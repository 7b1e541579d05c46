"""The demo's data: scikit-learn's bundled digits, standardised, split, with flipped labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DigitsData", "load_digits_data"]

NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsData:
    """The 8 × 8 digits split into training and test sets, some training labels flipped.

    Attributes
    ----------
    x_train : numpy.ndarray, shape (N, 64), float64
        Standardised pixels (mean 0, variance 1 per pixel on the training set; constant
        pixels are only centred).
    y_train : numpy.ndarray, shape (N,), int64
        The *given* labels, some of them flipped: what the model is trained on.
    y_train_true : numpy.ndarray, shape (N,), int64
        The true labels.
    flipped : numpy.ndarray, shape (N,), bool
        Which training labels were flipped.
    x_test : numpy.ndarray, shape (M, 64), float64
    y_test : numpy.ndarray, shape (M,), int64
    images_train, images_test : numpy.ndarray, shape (N, 8, 8) and (M, 8, 8)
        The raw pixels (0 to 16), for pictures.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    y_train_true: np.ndarray
    flipped: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    images_train: np.ndarray
    images_test: np.ndarray

    @property
    def num_train(self) -> int:
        """``N``, the number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_flipped(self) -> int:
        """How many training labels were flipped."""
        return int(np.count_nonzero(self.flipped))


def load_digits_data(seed: int, flip: float, test_fraction: float = 0.2) -> DigitsData:
    """Load the bundled digits (no download), split and flip a fraction of training labels.

    Parameters
    ----------
    seed : int
        Seeds the stratified split and the choice of flipped labels (two independent
        streams of ``numpy.random.default_rng(seed)``).
    flip : float
        Fraction of training labels replaced by a different class, ``0 <= flip < 1``;
        ``round(flip * N)`` examples are flipped, each to a class drawn uniformly among the
        nine others.
    test_fraction : float
        Fraction of the 1797 digits held out for the test set.

    Returns
    -------
    DigitsData
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 <= flip < 1.0:
        raise ValueError(f"flip={flip!r}: expected a fraction with 0 <= flip < 1")
    digits = load_digits()
    images = digits.images.astype(np.float64)
    labels = digits.target.astype(np.int64)
    split_seed, flip_seed = np.random.SeedSequence(seed).generate_state(2)
    train_idx, test_idx = train_test_split(
        np.arange(labels.size),
        test_size=test_fraction,
        random_state=int(split_seed),
        stratify=labels,
    )
    flat = images.reshape(labels.size, -1)
    mean = flat[train_idx].mean(axis=0)
    scale = flat[train_idx].std(axis=0)
    # Border pixels are always 0 in the training set: centre them, do not divide by zero.
    scale[scale == 0.0] = 1.0
    standardised = (flat - mean) / scale

    y_true = labels[train_idx]
    rng = np.random.default_rng(flip_seed)
    count = round(flip * y_true.size)
    if count == 0:
        raise ValueError(
            f"flip={flip!r}: flips no label of the {y_true.size} training digits; "
            f"expected at least {0.5 / y_true.size:.2g}"
        )
    chosen = rng.choice(y_true.size, size=count, replace=False)
    given = y_true.copy()
    # A shift by 1..9 modulo 10 always lands on another class, uniformly.
    given[chosen] = (y_true[chosen] + rng.integers(1, NUM_CLASSES, size=count)) % NUM_CLASSES
    flipped = np.zeros(y_true.size, dtype=bool)
    flipped[chosen] = True
    return DigitsData(
        x_train=standardised[train_idx],
        y_train=given,
        y_train_true=y_true,
        flipped=flipped,
        x_test=standardised[test_idx],
        y_test=labels[test_idx],
        images_train=images[train_idx],
        images_test=images[test_idx],
    )
