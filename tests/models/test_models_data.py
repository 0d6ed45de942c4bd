"""Bundled datasets: shapes, value and label ranges, split sizes, shuffling and determinism."""

from __future__ import annotations

import pytest
import torch

from slimfx import models


@pytest.mark.parametrize(
    "name,shape,n_total,n_classes",
    [
        ("digits", (1, 8, 8), 1797, 10),
        ("digits-flat", (64,), 1797, 10),
        ("mnist5k-32", (3, 32, 32), 5000, 10),
        ("synthetic-text", (64,), 4000, 4),
    ],
)
def test_shapes_labels_and_split_sizes(name, shape, n_total, n_classes):
    ds = models.load_dataset(name)
    assert ds.name == name and ds.num_classes == n_classes
    assert ds.train_x.shape[1:] == shape and ds.test_x.shape[1:] == shape
    assert len(ds.train_x) == len(ds.train_y) and len(ds.test_x) == len(ds.test_y)
    assert len(ds.train_x) + len(ds.test_x) == n_total
    assert abs(len(ds.test_x) / n_total - 0.2) < 0.01
    for y in (ds.train_y, ds.test_y):
        assert y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(n_classes))  # both splits see every class
    if name == "synthetic-text":
        assert ds.train_x.dtype == torch.int64 and 0 <= ds.train_x.min() and ds.train_x.max() < 1000
    else:
        assert ds.train_x.dtype == torch.float32
        assert ds.train_x.min() >= 0.0 and ds.train_x.max() <= 1.0


@pytest.mark.parametrize("name", ["digits", "mnist5k-32", "synthetic-text"])
def test_deterministic_per_seed(name):
    a, b, c = models.load_dataset(name), models.load_dataset(name, seed=0), models.load_dataset(name, seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_y, c.train_y)


def test_mnist_is_shuffled_padded_and_three_channel():
    ds = models.load_dataset("mnist5k-32")
    # the file is sorted by class; a shuffled split is not
    assert (ds.train_y[:-1] != ds.train_y[1:]).float().mean() > 0.5
    assert (ds.test_y[:-1] != ds.test_y[1:]).float().mean() > 0.5
    assert torch.equal(ds.train_x[:, 0], ds.train_x[:, 1]) and torch.equal(ds.train_x[:, 0], ds.train_x[:, 2])
    border = torch.cat([ds.train_x[..., :2, :].flatten(), ds.train_x[..., -2:, :].flatten()])
    assert border.abs().max() == 0  # 28x28 centred in 32x32


def test_splits_are_disjoint_and_fresh():
    ds = models.load_dataset("digits-flat")
    train_rows = {tuple(r.tolist()) for r in ds.train_x}
    overlap = sum(tuple(r.tolist()) in train_rows for r in ds.test_x)
    assert overlap <= 5  # sklearn digits has a handful of exact duplicate images, nothing more
    ds.train_x.zero_()
    assert models.load_dataset("digits-flat").train_x.abs().sum() > 0  # callers cannot poison the cache


def test_synthetic_text_label_is_majority_key_token():
    ds = models.load_dataset("synthetic-text")
    counts = torch.stack([(ds.train_x == k + 1).sum(1) for k in range(ds.num_classes)], dim=1)
    assert torch.equal(counts.argmax(1), ds.train_y)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="digits"):
        models.load_dataset("imagenet")
