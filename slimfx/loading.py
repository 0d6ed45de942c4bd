"""Resolve a MODEL argument: a zoo name, `package.module:callable` or `path/to/file.py:callable`.

The callable returns a module, or `(module, example_inputs)`. A user model without
example inputs gets none inferred: we say how to provide them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimfx.ir.errors import SlimfxError


class ModelSpecError(SlimfxError):
    """A MODEL argument that names nothing loadable."""


@dataclass
class LoadedModel:
    """A model ready to capture: the module (eval mode), its example inputs, and the zoo entry if any."""

    name: str
    module: nn.Module
    example_inputs: tuple
    zoo: Any = None
    example_kwargs: dict | None = None


def _zoo_names() -> list[str]:
    from slimfx import models

    return list(models.names())


def _import_target(spec: str, *, what: str) -> tuple[Any, str]:
    """(module, attribute name) of a `package.module:attr` or `path/to/file.py:attr` spec."""
    target, _, attr = spec.strip().rpartition(":")
    if not target or not attr:
        raise ModelSpecError(f"{what} spec {spec!r} must look like 'package.module:callable' or "
                             "'path/to/file.py:callable'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ModelSpecError(f"{what} file {str(path)!r} does not exist (from {what} spec {spec!r})")
        mod_name = f"_slimfx_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:
            module = sys.modules[mod_name]
        else:
            try:
                loader_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
                sys.modules[mod_name] = module
                loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - a broken user file is a user error
                sys.modules.pop(mod_name, None)
                raise ModelSpecError(f"could not import {str(path)!r}: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelSpecError(f"could not import module {target!r} from {what} spec {spec!r}: {e}") from e
    if getattr(module, attr, None) is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelSpecError(f"{target!r} has no attribute {attr!r}; callables there: {', '.join(public[:20])}")
    return module, attr


def import_spec(spec: str, *, what: str) -> Any:
    """The object a `package.module:attr` or `path/to/file.py:attr` spec names (ModelSpecError otherwise)."""
    module, attr = _import_target(spec, what=what)
    return getattr(module, attr)


def resolve_model(spec: str, *, trained: bool = True, seed: int = 0, batch: int = 1,
                  progress: bool = True) -> LoadedModel:
    """Load the model a MODEL argument names (zoo models come trained unless `trained=False`)."""
    spec = spec.strip()
    if ":" not in spec:
        names = _zoo_names()
        if spec not in names:
            raise ModelSpecError(
                f"unknown model {spec!r}: give a zoo name ({', '.join(names)}), "
                "'package.module:callable' or 'path/to/file.py:callable'")
        from slimfx import models

        zoo = models.get(spec)
        module = zoo.trained(seed=seed, progress=progress) if trained and zoo.dataset else zoo.build(seed=seed)
        return LoadedModel(spec, module.eval(), tuple(zoo.example_inputs(batch=batch, seed=seed)), zoo)

    module, attr = _import_target(spec, what="model")
    fn = getattr(module, attr)
    obj = fn() if (callable(fn) and not isinstance(fn, nn.Module)) else fn
    if isinstance(obj, nn.Module):
        # A bare module: take example inputs from a module-level `example_inputs` (value or callable).
        ex = getattr(module, "example_inputs", None)
        if ex is None:
            raise ModelSpecError(
                f"{spec} gave a module but slimfx cannot know its input shapes: return (module, example_inputs) "
                f"from {attr}(), e.g. `return model, (torch.randn(1, 3, 224, 224),)`, or define "
                f"`example_inputs` next to it in {spec.rpartition(':')[0]}")
        obj = (obj, ex() if callable(ex) else ex)
    if not (isinstance(obj, tuple) and len(obj) in (2, 3) and isinstance(obj[0], nn.Module)):
        raise ModelSpecError(f"{spec} must return an nn.Module with example inputs as "
                             f"(module, example_inputs); got {type(obj).__name__}")
    module_obj, inputs = obj[0], obj[1]
    kwargs = obj[2] if len(obj) == 3 else None
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, dict):
        kwargs, inputs = inputs, ()
    return LoadedModel(attr, module_obj.eval(), tuple(inputs), None, kwargs)
