"""Quick supervised trainer, accuracy metric, and the on-disk weight cache used by ZooModel.trained()."""

from __future__ import annotations

import math
import os
import pathlib
import sys
import tempfile
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset, load_dataset


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
    """Top-1 accuracy in [0, 1] of `module` (run in eval mode, mode restored after) on a dataset split."""
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

    `fingerprint` (see `recipe_fingerprint`) keys the file by architecture and training recipe too: a
    changed stride or learning rate keeps every param shape, so the old weights would load silently.
    """
    suffix = f"-{fingerprint}" if fingerprint else ""
    return cache_dir() / "weights" / f"{name}-seed{seed}{suffix}.pt"


def recipe_fingerprint(module: nn.Module, train_config: dict) -> str:
    """A short hash of the module's structure (its repr) and the training settings."""
    import hashlib

    text = repr(module) + repr(sorted(train_config.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def load_weights(module: nn.Module, path: pathlib.Path) -> bool:
    """Load a cached state_dict into `module`; False (with a warning) if missing, corrupt or mismatched."""
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # corrupt pickle, truncated file, wrong keys or shapes: retrain instead
        warnings.warn(f"ignoring unusable weight cache {path} ({type(exc).__name__}: {exc}); retraining",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def save_weights(module: nn.Module, path: pathlib.Path) -> None:
    """Write the state_dict atomically (temp file in the same directory, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(module.state_dict(), fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
