"""Trainer, accuracy and the trained-weight cache (isolated in a temporary SLIMFX_CACHE_DIR)."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch

from slimfx import models


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("trained() retrained although a valid cache file exists")

    monkeypatch.setattr(models.trainer, "train", boom)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SLIMFX_CACHE_DIR")
    assert models.cache_dir() == tmp_path / "x" / "slimfx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "slimfx"


def test_digits_cnn_trains_and_cache_round_trips(shared_cache: pathlib.Path, monkeypatch):
    spec = models.get("digits_cnn")
    first = spec.trained(seed=0, progress=False)
    assert not first.training
    assert models.accuracy(first, "digits") >= 0.97
    path = spec.weights_path(0)
    assert path.parent == shared_cache / "weights" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # atomic write left no temp file behind

    _forbid_training(monkeypatch)
    second = spec.trained(seed=0, progress=False)
    assert second is not first and _same_weights(first, second)
    assert not second.training


def test_corrupt_cache_is_retrained(cache: pathlib.Path, monkeypatch):
    spec = models.get("mlp")
    path = spec.weights_path(0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"definitely not a state dict")
    calls = []
    real_train = models.trainer.train
    monkeypatch.setattr(models.trainer, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    with pytest.warns(RuntimeWarning, match="retraining"):
        module = spec.trained(progress=False)
    assert calls == [1]
    assert models.accuracy(module, "digits-flat") >= 0.96
    reloaded = spec.build()
    reloaded.load_state_dict(torch.load(path, weights_only=True))
    assert _same_weights(module, reloaded)


def test_mismatched_cache_is_retrained(cache: pathlib.Path, monkeypatch):
    spec = models.get("mlp")
    path = spec.weights_path(3)
    path.parent.mkdir(parents=True)
    torch.save({"fc1.weight": torch.zeros(2, 2)}, path)
    calls = []
    monkeypatch.setattr(models.trainer, "train", lambda m, *a, **k: calls.append(1) or m)
    with pytest.warns(RuntimeWarning):
        module = spec.trained(seed=3, progress=False)
    assert calls == [1]
    assert _same_weights(module, spec.build(seed=3))  # retrained from a clean init, not a half-loaded one
    assert torch.load(path, weights_only=True)["fc1.weight"].shape == (128, 64)


def test_train_is_seeded_and_accuracy_restores_mode():
    ds = models.load_dataset("digits-flat")
    spec = models.get("mlp")
    a = models.train(spec.build(), ds, epochs=1, lr=1e-3, batch_size=128, seed=5, progress=False,
                     num_threads=1)
    b = models.train(spec.build(), ds, epochs=1, lr=1e-3, batch_size=128, seed=5, progress=False,
                     num_threads=1)
    c = models.train(spec.build(), ds, epochs=1, lr=1e-3, batch_size=128, seed=6, progress=False,
                     num_threads=1)
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert not a.training
    a.train()
    acc = models.accuracy(a, ds, split="train")
    assert 0.0 <= acc <= 1.0 and a.training
    with pytest.raises(ValueError):
        models.accuracy(a, ds, split="val")


def test_trained_requires_a_dataset():
    spec = models.ZooModel("x", "no data", torch.nn.Identity, (2,), torch.float32, 2, None)
    with pytest.raises(ValueError, match="no dataset"):
        spec.trained()


def test_cache_key_follows_architecture_and_training_recipe():
    """A changed stride or learning rate keeps every param shape: the old weights must not load."""
    spec = models.get("mlp")
    other = dataclasses.replace(spec, train_config={**spec.train_config, "lr": 1.0})
    assert spec.weights_path(0) != other.weights_path(0)
    assert spec.weights_path(0) == models.get("mlp").weights_path(0)
