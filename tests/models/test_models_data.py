"""Bundled datasets: shapes, value and label ranges, the train/val/test split, shuffling and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimfx import models
from slimfx.models import data


@pytest.mark.parametrize(
    "name,shape,sizes,n_classes",
    [
        ("digits", (1, 8, 8), (1259, 179, 359), 10),
        ("digits-flat", (64,), (1259, 179, 359), 10),
        ("mnist5k-32", (3, 32, 32), (3500, 500, 1000), 10),
        ("synthetic-text", (64,), (2800, 400, 800), 4),
    ],
)
def test_shapes_labels_and_split_sizes(name, shape, sizes, n_classes):
    ds = models.load_dataset(name)
    assert ds.name == name and ds.num_classes == n_classes
    parts = [ds.split(p) for p in ("train", "val", "test")]
    for (x, y), p in zip(parts, ("train", "val", "test")):
        assert x is getattr(ds, f"{p}_x") and y is getattr(ds, f"{p}_y")
    assert tuple(len(x) for x, _ in parts) == sizes and all(len(x) == len(y) for x, y in parts)
    n_total = sum(sizes)
    assert abs(sizes[1] / n_total - 0.1) < 0.01 and abs(sizes[2] / n_total - 0.2) < 0.01
    for x, y in parts:
        assert x.shape[1:] == shape
        assert y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(n_classes))  # every split sees every class
    if name == "synthetic-text":
        assert ds.train_x.dtype == torch.int64 and 0 <= ds.train_x.min() and ds.train_x.max() < 1000
    else:
        assert ds.train_x.dtype == torch.float32
        assert ds.train_x.min() >= 0.0 and ds.train_x.max() <= 1.0


def test_split_indices_partition_the_data_stratified():
    y = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # digits' class counts
    tr, va, te = data._stratified_split(y, seed=0)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(len(y)))  # disjoint, nothing lost
    for idx, frac in ((tr, 0.7), (va, 0.1), (te, 0.2)):
        per_class = np.bincount(y[idx], minlength=10) / np.bincount(y)
        assert np.abs(per_class - frac).max() < 0.01  # each class in the same proportion
        assert (np.diff(y[idx]) != 0).mean() > 0.5     # shuffled, not grouped by class


def test_test_part_is_the_former_80_20_test_split():
    """Carving val out of train must not move a single test row: earlier test scores stay comparable."""
    y = np.repeat(np.arange(10), 50)
    rng = np.random.default_rng(3)  # the former split, step by step
    rest, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:10])
        rest.append(idx[10:])
    old_train, old_test = rng.permutation(np.concatenate(rest)), rng.permutation(np.concatenate(test))
    tr, va, te = data._stratified_split(y, seed=3)
    assert np.array_equal(te, old_test)
    assert np.array_equal(tr, old_train[~np.isin(old_train, va)])  # train keeps its order minus val rows


@pytest.mark.parametrize("name", ["digits", "mnist5k-32", "synthetic-text"])
def test_deterministic_per_seed(name):
    a, b, c = models.load_dataset(name), models.load_dataset(name, seed=0), models.load_dataset(name, seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.train_y, c.train_y) and not torch.equal(a.val_y, c.val_y)
    assert data.split_digest(name, 0) != data.split_digest(name, 1)


def test_mnist_is_shuffled_padded_and_three_channel():
    ds = models.load_dataset("mnist5k-32")
    # the file is sorted by class; a shuffled split is not
    assert (ds.train_y[:-1] != ds.train_y[1:]).float().mean() > 0.5
    assert (ds.test_y[:-1] != ds.test_y[1:]).float().mean() > 0.5
    assert (ds.val_y[:-1] != ds.val_y[1:]).float().mean() > 0.5
    assert torch.equal(ds.train_x[:, 0], ds.train_x[:, 1]) and torch.equal(ds.train_x[:, 0], ds.train_x[:, 2])
    border = torch.cat([ds.train_x[..., :2, :].flatten(), ds.train_x[..., -2:, :].flatten()])
    assert border.abs().max() == 0  # 28x28 centred in 32x32


def test_splits_are_disjoint_and_fresh():
    ds = models.load_dataset("digits-flat")
    rows = {p: {tuple(r.tolist()) for r in ds.split(p)[0]} for p in ("train", "val", "test")}
    # sklearn digits has a handful of exact duplicate images, nothing more
    assert len(rows["train"] & rows["test"]) <= 5 and len(rows["train"] & rows["val"]) <= 5
    assert len(rows["val"] & rows["test"]) <= 5
    ds.train_x.zero_()
    ds.val_x.zero_()
    again = models.load_dataset("digits-flat")
    assert again.train_x.abs().sum() > 0 and again.val_x.abs().sum() > 0  # callers cannot poison the cache


def test_split_digest_tracks_the_data():
    ds = models.load_dataset("digits")
    parts = {f"{p}_{v}": t for p in ("train", "val", "test") for v, t in zip("xy", ds.split(p))}
    assert data.split_digest("digits") == data.tensors_digest(parts)
    moved = dict(parts, val_y=parts["val_y"].clone())
    moved["val_y"][0] = (moved["val_y"][0] + 1) % 10
    assert data.tensors_digest(moved) != data.tensors_digest(parts)
    assert data.split_digest("digits") != data.split_digest("digits-flat")


def test_split_of_a_dataset_built_without_val():
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    ds = models.Dataset("mine", x, y, x, y, 2)
    assert ds.split("train")[0] is x
    with pytest.raises(ValueError, match="no 'val' split.*val_x="):
        ds.split("val")
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        ds.split("validation")


def test_synthetic_text_label_is_majority_key_token():
    ds = models.load_dataset("synthetic-text")
    counts = torch.stack([(ds.train_x == k + 1).sum(1) for k in range(ds.num_classes)], dim=1)
    assert torch.equal(counts.argmax(1), ds.train_y)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="digits"):
        models.load_dataset("imagenet")
