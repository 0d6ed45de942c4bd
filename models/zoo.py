"""The model registry: one ZooModel spec per reference model, with seeded build and cached training."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import data, trainer
from .bert import TinyBert
from .digits import DigitsCNN, DigitsMLP
from .mobilenet import MobileNetV2
from .resnet import ResNet20


class UnknownModelError(KeyError, ValueError):
    """Raised by get() for a name not in the zoo; catchable as KeyError or ValueError."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ZooModel:
    """A reference model: how to build it, what it eats, and how it is trained."""

    name: str
    description: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]            # without the batch dimension
    input_dtype: torch.dtype
    num_classes: int
    dataset: str | None
    train_config: dict[str, Any] = field(default_factory=dict)
    input_high: int | None = None           # for integer inputs: ids are drawn from [0, input_high)

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh module with seeded random init, in eval() mode; leaves the global RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.factory()
        return module.eval()

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded random inputs of the right shape and dtype (uniform [0,1) floats or valid token ids)."""
        g = torch.Generator().manual_seed(seed)
        shape = (batch, *self.input_shape)
        if self.input_dtype.is_floating_point:
            return (torch.rand(shape, generator=g, dtype=self.input_dtype),)
        return (torch.randint(0, self.input_high or 2, shape, generator=g, dtype=self.input_dtype),)

    def cache_meta(self, seed: int = 0, module: nn.Module | None = None) -> dict[str, Any]:
        """What this model's trained weights at `seed` are trained for; stored in and checked against the cache.

        model name, seed, the dataset with a digest of its seed-0 train/val/test split, and a fingerprint of
        architecture (the built module's repr), training recipe and that split. `module`: a fresh build(seed)
        to reuse.
        """
        data_id = f"{self.dataset}:{data.split_digest(self.dataset, 0)[:16]}" if self.dataset else ""
        module = self.build(seed) if module is None else module
        return {"model": self.name, "seed": seed, "data": data_id,
                "fingerprint": trainer.recipe_fingerprint(module, self.train_config, data_id)}

    def weights_path(self, seed: int = 0) -> pathlib.Path:
        """The cache file of this model's trained weights, keyed by seed, architecture, recipe and data split."""
        return trainer.weights_path(self.name, seed, self.cache_meta(seed)["fingerprint"])

    def trained(self, seed: int = 0, progress: bool = True) -> nn.Module:
        """Trained weights, eval() mode: loaded from cache_dir()/weights, else trained now and cached.

        Always trains on the train part of the seed-0 split of `dataset` (val and test stay held out: accuracy()
        on either is an unseen score); `seed` picks the init and the batch order. A cache file that is not
        exactly these weights (see trainer.load_weights) is retrained with a warning and rewritten atomically.
        """
        if self.dataset is None:
            raise ValueError(f"model {self.name!r} has no dataset to train on")
        module = self.build(seed)
        meta = self.cache_meta(seed, module)
        path = trainer.weights_path(self.name, seed, meta["fingerprint"])
        if trainer.load_weights(module, path, meta):
            return module.eval()
        module = self.build(seed)  # never train on top of whatever a refused file left behind
        trainer.train(module, data.load_dataset(self.dataset), seed=seed, progress=progress,
                      **self.train_config)
        trainer.save_weights(module, path, meta)
        return module.eval()


_REGISTRY: dict[str, ZooModel] = {}


def register(spec: ZooModel) -> ZooModel:
    """Add a spec to the zoo (names must be unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"zoo model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    """Registered model names in registration order."""
    return list(_REGISTRY)


def get(name: str) -> ZooModel:
    """The spec called `name`; UnknownModelError (a KeyError and ValueError) lists valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}") from None


register(ZooModel(
    name="mlp",
    description="MLP 64-128-64-10 with ReLU and dropout on flattened 8x8 sklearn digits",
    factory=DigitsMLP,
    input_shape=(64,),
    input_dtype=torch.float32,
    num_classes=10,
    dataset="digits-flat",
    train_config=dict(epochs=40, lr=3e-3, batch_size=64, num_threads=1),
))
register(ZooModel(
    name="digits_cnn",
    description="3-conv CNN with BatchNorm and a 2-layer head for 1x8x8 sklearn digits (~41k params)",
    factory=DigitsCNN,
    input_shape=(1, 8, 8),
    input_dtype=torch.float32,
    num_classes=10,
    dataset="digits",
    train_config=dict(epochs=30, lr=3e-3, batch_size=64, num_threads=1),
))
register(ZooModel(
    name="resnet20",
    description="CIFAR-style ResNet-20 (16/32/64, option-B shortcuts) on 32x32 3-channel MNIST (5k sample)",
    factory=ResNet20,
    input_shape=(3, 32, 32),
    input_dtype=torch.float32,
    num_classes=10,
    dataset="mnist5k-32",
    train_config=dict(epochs=6, lr=3e-3, batch_size=64),
))
register(ZooModel(
    name="mobilenetv2",
    description="CIFAR-sized MobileNetV2 (width 0.5, shortened) on 32x32 3-channel MNIST (5k sample)",
    factory=MobileNetV2,
    input_shape=(3, 32, 32),
    input_dtype=torch.float32,
    num_classes=10,
    dataset="mnist5k-32",
    train_config=dict(epochs=8, lr=3e-3, batch_size=64),
))
register(ZooModel(
    name="tiny_bert",
    description="4-layer, 4-head, d_model 128 transformer encoder classifying synthetic token sequences",
    factory=lambda: TinyBert(vocab_size=data.TEXT_VOCAB, num_classes=data.TEXT_CLASSES,
                             seq_len=data.TEXT_SEQ_LEN),
    input_shape=(data.TEXT_SEQ_LEN,),
    input_dtype=torch.int64,
    num_classes=data.TEXT_CLASSES,
    dataset="synthetic-text",
    train_config=dict(epochs=2, lr=1e-3, batch_size=32, weight_decay=0.01),
    input_high=data.TEXT_VOCAB,
))
