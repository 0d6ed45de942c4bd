"""Quick supervised trainer, accuracy metric, and the on-disk weight cache used by ZooModel.trained()."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pathlib
import sys
import tempfile
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset, load_dataset, tensors_digest

log = logging.getLogger("slimfx")

# The on-disk layout of a trained-weight file; a file with any other "format" is not used.
WEIGHTS_FORMAT = "slimfx-weights/1"


def cache_dir() -> pathlib.Path:
    """$SLIMFX_CACHE_DIR, else $XDG_CACHE_HOME/slimfx, else ~/.cache/slimfx (not created here)."""
    if os.environ.get("SLIMFX_CACHE_DIR"):
        return pathlib.Path(os.environ["SLIMFX_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "slimfx"
    return pathlib.Path.home() / ".cache" / "slimfx"


def _as_dataset(dataset: Dataset | str) -> Dataset:
    return load_dataset(dataset) if isinstance(dataset, str) else dataset


@torch.no_grad()
def accuracy(module: nn.Module, dataset: Dataset | str, split: str = "test", batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of `module` (run in eval mode, mode restored after) on one part of a dataset.

    `split` is "train", "val" or "test" (the default: the final held-out score). Score decisions (which
    epoch, which setting) on "val"; a score used to choose must not be reported as the test score.
    """
    x, y = _as_dataset(dataset).split(split)
    was_training = module.training
    module.eval()
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            correct += (module(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum().item()
    finally:
        module.train(was_training)
    return correct / max(len(x), 1)


def train(
    module: nn.Module,
    dataset: Dataset | str,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    num_threads: int | None = None,
) -> nn.Module:
    """Train `module` in place with cross-entropy and a per-step cosine LR schedule; returns it in eval mode.

    Fits on `train_x`/`train_y` only and looks at no held-out data: a fixed number of epochs, no best-epoch
    pick and no early stop, so neither val nor test can leak into the weights.

    Deterministic for a given seed: the global RNG is forked (dropout draws from it) and batches come from a
    seeded generator. `optimizer` is "adam" (AdamW when weight_decay > 0) or "sgd" (momentum 0.9, nesterov).
    The progress bar shows only when `progress` is true and stderr is a TTY. `num_threads` sets torch's
    intra-op threads for the run (restored after); 1 suits tiny models and is far more robust than 2 when
    the cores are shared (OpenMP spin-waiting made a 2-thread run 10x slower on a loaded 2-core box).
    """
    ds = _as_dataset(dataset)
    x, y = ds.train_x, ds.train_y
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = (
            torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay
            else torch.optim.Adam(params, lr=lr)
        )
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'adam' or 'sgd'")
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(epochs * steps_per_epoch, 1), pct_start=0.15, anneal_strategy="cos"
    )
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    show = progress and sys.stderr.isatty()
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.train()
        bar = tqdm(total=epochs * steps_per_epoch, disable=not show, desc=f"train {ds.name}", leave=False)
        try:
            for _ in range(epochs):
                perm = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), batch_size):
                    idx = perm[i:i + batch_size]
                    loss = loss_fn(module(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        finally:
            bar.close()
            module.eval()
            torch.set_num_threads(old_threads)
    return module


def weights_path(name: str, seed: int, fingerprint: str = "") -> pathlib.Path:
    """Where the trained state_dict of zoo model `name` at `seed` is cached.

    `fingerprint` (see `recipe_fingerprint`) keys the file by architecture, training recipe and data split
    too, so caches trained for something else live in other files (and load_weights checks it again).
    """
    suffix = f"-{fingerprint}" if fingerprint else ""
    return cache_dir() / "weights" / f"{name}-seed{seed}{suffix}.pt"


def recipe_fingerprint(module: nn.Module, train_config: dict, data: str = "") -> str:
    """A short hash of the module's structure (its repr), the training settings and the training data id.

    A changed stride or learning rate keeps every param shape, so only this tells such weights apart.
    """
    text = repr(module) + repr(sorted(train_config.items())) + data
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _check_weights(module: nn.Module, payload: Any, meta: dict[str, Any]) -> str | None:
    """Why `payload` (a loaded weight file) must not be used for `module` trained as `meta`; None if it may."""
    if not isinstance(payload, dict):
        return f"not a slimfx weight file (it holds a {type(payload).__name__})"
    if "format" not in payload:
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            return "a bare state_dict without a digest or training metadata (an old cache file or copied-in weights)"
        return "not a slimfx weight file (no 'format' entry)"
    if payload["format"] != WEIGHTS_FORMAT:
        return f"format {payload['format']!r}, expected {WEIGHTS_FORMAT!r}"
    state, stored_meta = payload.get("state_dict"), payload.get("meta")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "no state_dict of tensors"
    if not isinstance(stored_meta, dict):
        return "no training metadata"
    if payload.get("digest") != tensors_digest(state):
        return "its tensors do not match the digest stored with them (corrupted or edited)"
    wrong = [f"{k} {stored_meta.get(k)!r} instead of {v!r}" for k, v in meta.items() if stored_meta.get(k) != v]
    if wrong:
        return "trained for something else: " + ", ".join(wrong)
    current = dict(module.named_parameters())
    if current and all(k in state and torch.equal(state[k], p.detach()) for k, p in current.items()):
        return "its parameters are the untrained initial weights"
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        return f"its tensors do not fit the model ({exc})"
    return None


def load_weights(module: nn.Module, path: pathlib.Path, meta: dict[str, Any]) -> bool:
    """Load a trained-weight file written by save_weights into freshly built `module`; True if it was used.

    False, silently, when there is no file. False with a warning on the "slimfx" logger naming the file and
    the reason when the file is unreadable, truncated or not ours, lacks its digest or metadata (old format),
    its tensors fail the digest, its metadata differs from `meta` (another model, seed, recipe or data
    split), its parameters equal `module`'s untrained ones, or its tensors do not fit. Nothing but tensors
    and plain values is ever unpickled (torch.load with weights_only=True).
    """
    if not path.exists():
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, a pickle of objects other than tensors, ...
        reason = f"unreadable as a weight file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    else:
        reason = _check_weights(module, payload, meta)
    if reason is None:
        return True
    log.warning("weight cache %s is not used: %s; retraining and rewriting it", path, reason)
    return False


def save_weights(module: nn.Module, path: pathlib.Path, meta: dict[str, Any]) -> None:
    """Write the state_dict with its digest and `meta` (what it was trained for), atomically.

    The file goes to a temp file in the same directory, then os.replace: concurrent writers (test workers
    sharing a cache) never leave a half-written file, and readers see either the old file or the new one.
    """
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    payload = {"format": WEIGHTS_FORMAT, "meta": dict(meta), "digest": tensors_digest(state), "state_dict": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
