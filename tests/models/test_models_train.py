"""Trainer, accuracy and the trained-weight cache (isolated in a temporary SLIMFX_CACHE_DIR)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import pathlib
import pickle
import random
import tempfile

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


# A cheap stand-in for a zoo model: the mlp spec trained for 2 epochs (its own fingerprint and cache file).
QUICK = dataclasses.replace(models.get("mlp"), train_config={**models.get("mlp").train_config, "epochs": 2})


@pytest.fixture(scope="module")
def clean() -> torch.nn.Module:
    """QUICK trained in an empty cache of its own: what every refused cache file must be replaced by."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFX_CACHE_DIR", tmp)
        return QUICK.trained(seed=0, progress=False)


def _count_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real_train = models.trainer.train
    monkeypatch.setattr(models.trainer, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    return calls


class _RunsCode:
    """Unpickling this creates a directory: a file that is not ours must never be unpickled."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def _truncated(path, clean, meta):
    models.trainer.save_weights(clean, path, meta)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path, clean, meta):
    path.write_bytes(random.Random(0).randbytes(4096))


def _foreign_same_shapes(path, clean, meta):
    """Another seed's trained weights with this file's metadata copied in (same keys and shapes)."""
    models.trainer.save_weights(clean, path, meta)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {k: v + 0.01 for k, v in payload["state_dict"].items()}
    torch.save(payload, path)


def _other_seed_file(path, clean, meta):
    """A valid file trained for seed 1 copied over seed 0's file."""
    models.trainer.save_weights(QUICK.build(seed=1), path, QUICK.cache_meta(seed=1))


def _untrained_by_hand(path, clean, meta):
    torch.save(QUICK.build(seed=0).state_dict(), path)  # the #13 incident: 8% accuracy, loaded silently


def _untrained_with_metadata(path, clean, meta):
    models.trainer.save_weights(QUICK.build(seed=0), path, meta)


def _wrong_fingerprint(path, clean, meta):
    models.trainer.save_weights(clean, path, {**meta, "fingerprint": "0123456789"})


def _other_data_split(path, clean, meta):
    models.trainer.save_weights(clean, path, {**meta, "data": "digits-flat:0000000000000000"})


def _old_format(path, clean, meta):
    torch.save(clean.state_dict(), path)  # the right weights, but no digest or metadata: not trusted


def _wrong_shapes(path, clean, meta):
    torch.save({"fc1.weight": torch.zeros(2, 2)}, path)


def _not_ours_pickle(path, clean, meta):
    path.write_bytes(pickle.dumps(_RunsCode(path.parent / "pwned"), protocol=2))


def _not_ours_dict(path, clean, meta):
    torch.save({"hello": "world", "n": 3}, path)


def _future_format(path, clean, meta):
    models.trainer.save_weights(clean, path, meta)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format": "slimfx-weights/99"}, path)


@pytest.mark.parametrize("corrupt,reason", [
    (_truncated, "unreadable"),
    (_random_bytes, "unreadable"),
    (_foreign_same_shapes, "do not match the digest"),
    (_other_seed_file, "seed 1 instead of 0"),
    (_untrained_by_hand, "bare state_dict"),
    (_untrained_with_metadata, "untrained initial weights"),
    (_wrong_fingerprint, "fingerprint '0123456789' instead of"),
    (_other_data_split, "data 'digits-flat:0000000000000000' instead of 'digits-flat:"),
    (_old_format, "bare state_dict without a digest"),
    (_wrong_shapes, "bare state_dict"),
    (_not_ours_pickle, "unreadable"),
    (_not_ours_dict, "not a slimfx weight file"),
    (_future_format, "format 'slimfx-weights/99'"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "why")
def test_unusable_cache_file_is_retrained_with_a_warning(corrupt, reason, clean, cache, monkeypatch, caplog):
    path = QUICK.weights_path(0)
    path.parent.mkdir(parents=True)
    corrupt(path, clean, QUICK.cache_meta(0))
    calls = _count_training(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="slimfx"):
        module = QUICK.trained(seed=0, progress=False)
    assert calls == [1]
    (record,) = [r for r in caplog.records if r.name == "slimfx"]
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage() and reason in record.getMessage() and "retraining" in record.getMessage()
    assert _same_weights(module, clean)  # retrained from a clean init, exactly as a first training
    assert not (path.parent / "pwned").exists()
    assert not list(path.parent.glob("*.tmp"))

    # the cache was rewritten: the next call loads it, silently and without training
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimfx"):
        again = QUICK.trained(seed=0, progress=False)
    assert calls == [1] and not caplog.records and _same_weights(again, clean)


def test_valid_cache_file_loads_without_training_or_warning(clean, cache, monkeypatch, caplog):
    models.trainer.save_weights(clean, QUICK.weights_path(0), QUICK.cache_meta(0))
    calls = _count_training(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="slimfx"):
        module = QUICK.trained(seed=0, progress=False)
    assert calls == [] and not caplog.records
    assert _same_weights(module, clean) and not module.training


def test_cache_file_holds_digest_and_training_metadata(clean, cache):
    QUICK.trained(seed=0, progress=False)
    payload = torch.load(QUICK.weights_path(0), weights_only=True)
    assert payload["format"] == models.trainer.WEIGHTS_FORMAT
    assert payload["meta"] == QUICK.cache_meta(0)
    assert payload["meta"]["model"] == "mlp" and payload["meta"]["seed"] == 0
    assert payload["meta"]["data"].startswith("digits-flat:")
    assert payload["digest"] == models.data.tensors_digest(clean.state_dict())
    assert _same_weights(clean, _loaded(payload["state_dict"]))


def _loaded(state: dict) -> torch.nn.Module:
    module = QUICK.build()
    module.load_state_dict(state)
    return module


def test_concurrent_writers_leave_one_valid_file(clean, cache):
    """Test workers share a cache: many simultaneous save_weights must leave a whole, valid file."""
    path, meta = QUICK.weights_path(0), QUICK.cache_meta(0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: models.trainer.save_weights(clean, path, meta), range(12)))
    assert not list(path.parent.glob("*.tmp"))
    module = QUICK.build()
    assert models.trainer.load_weights(module, path, meta) and _same_weights(module, clean)


def test_cache_key_follows_the_data_split(monkeypatch):
    """Another train/val/test split (here: a different digest of the data) must not reuse the file."""
    before = QUICK.weights_path(0)
    meta = QUICK.cache_meta(0)
    monkeypatch.setattr(models.data, "split_digest", lambda name, seed=0: "f" * 64)
    assert QUICK.weights_path(0) != before and QUICK.cache_meta(0)["data"] != meta["data"]


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
    assert models.accuracy(a, ds) == models.accuracy(a, ds, split="test")  # the documented default
    correct = (a.eval()(ds.val_x).argmax(1) == ds.val_y).sum().item()
    assert models.accuracy(a, ds, split="val") == correct / len(ds.val_y)
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        models.accuracy(a, ds, split="validation")


def test_train_looks_at_no_held_out_data():
    """No best-epoch pick or early stop: garbage in val and test cannot change a single trained weight."""
    ds = models.load_dataset("digits-flat")
    junk = dataclasses.replace(ds, val_x=torch.full_like(ds.val_x, float("nan")), val_y=ds.val_y.flip(0),
                               test_x=torch.full_like(ds.test_x, float("nan")), test_y=ds.test_y.flip(0))
    kw = dict(epochs=2, lr=3e-3, batch_size=64, seed=0, progress=False, num_threads=1)
    spec = models.get("mlp")
    assert _same_weights(models.train(spec.build(), ds, **kw), models.train(spec.build(), junk, **kw))


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
