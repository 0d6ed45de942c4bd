"""Resolve a MODEL argument: a zoo name, `package.module:callable`, `path/to/file.py:callable`, or a saved
model `path/to/model.slimfx` (slimfx.save / `compile --format slimfx`).

The callable returns a module, or `(module, example_inputs)` (or `(module, args, kwargs)`). A user
model without example inputs gets none inferred: we say how to provide them.

Imports work as they do for `python -m`: the working directory is importable, and so is the model
file's folder (and, when that folder is a package, i.e. has `__init__.py`, the folder holding its top
package; the file is then imported under its package name, so relative imports work). A project with
its own `models/` package runs `slimfx compile models/net.py:make` where net.py does
`from models.layers import Block`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimfx.ir.errors import SlimfxError

IMPORT_NOTE = ("As with `python -m`, the working directory is importable, and so is a model file's folder (or, "
               "when the file is inside a package, the folder holding that package), so "
               "'models/net.py:make' may do `from models.layers import Block`.")
SPEC_FORMS = "a zoo name, 'package.module:callable', 'path/to/file.py:callable' or a saved 'model.slimfx'"
RETURN_SHAPE = ("(module, example_inputs): an nn.Module and a tensor or a tuple of tensors, e.g. "
                "`return model, (torch.randn(1, 3, 224, 224),)` (or (module, args, kwargs) with a dict of "
                "keyword tensors)")


class ModelSpecError(SlimfxError):
    """A MODEL argument that names nothing loadable, or whose callable fails or returns the wrong thing."""


@dataclass
class LoadedModel:
    """A model ready to capture: the module (eval mode), its example inputs, and the zoo entry if any."""

    name: str
    module: nn.Module
    example_inputs: tuple
    zoo: Any = None
    example_kwargs: dict | None = None
    graph: Any = None  # a saved model (.slimfx): the ir.Graph it holds; `module` is its lowering

    def positional(self) -> tuple[nn.Module, tuple]:
        """(module, inputs) taking every example input positionally: keyword inputs follow the positional
        ones in forward's parameter order, as they do in the captured graph and its exports."""
        if not self.example_kwargs:
            return self.module, self.example_inputs
        params = list(inspect.signature(self.module.forward).parameters)[len(self.example_inputs):]
        unknown = [k for k in self.example_kwargs if k not in params]
        if unknown:
            raise ModelSpecError(f"the example keyword input {unknown[0]!r} is not a parameter of "
                                 f"{type(self.module).__name__}.forward (it takes {', '.join(params)})")
        kw_names = [n for n in params if n in self.example_kwargs]
        return (_KeywordsLast(self.module, len(self.example_inputs), kw_names),
                self.example_inputs + tuple(self.example_kwargs[n] for n in kw_names))


class _KeywordsLast(nn.Module):
    """Calls `model(*xs[:n_pos], **dict(zip(kw_names, xs[n_pos:])))`."""

    def __init__(self, model: nn.Module, n_pos: int, kw_names: list[str]):
        super().__init__()
        self.model, self.n_pos, self.kw_names = model, n_pos, kw_names

    def forward(self, *xs: Any) -> Any:
        return self.model(*xs[:self.n_pos], **dict(zip(self.kw_names, xs[self.n_pos:])))


def _zoo_names() -> list[str]:
    from slimfx import models

    return list(models.names())


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0][:300] if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _prepend_path(folder: Path) -> None:
    """Put `folder` at the front of sys.path unless it is already there (as `python -m` does for the cwd)."""
    resolved = str(folder.resolve())
    present = {str(Path(p or os.curdir).resolve()) for p in sys.path if isinstance(p, str)}
    if resolved not in present:
        sys.path.insert(0, resolved)


def _package_name(path: Path) -> tuple[Path, str] | None:
    """(folder holding the top package, dotted module name) when `path` lies inside a package."""
    path = path.resolve()
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file() and folder.parent != folder:
        parts.insert(0, folder.name)
        folder = folder.parent
    if len(parts) == 1 or not all(p.isidentifier() for p in parts):
        return None
    return folder, ".".join(parts)


def _import_file(path: Path, spec: str, what: str = "model") -> Any:
    """Import a model file with its folder (and package root) importable; under its package name when it
    lies inside a package, else under a private name. The file is recorded as an input no output replaces."""
    from slimfx.output import note_input

    note_input(path, f"{what} file")
    _prepend_path(Path.cwd())
    _prepend_path(path.parent)
    pkg = _package_name(path)
    package_error: Exception | None = None
    if pkg is not None:
        root, dotted = pkg
        _prepend_path(root)
        try:
            module = importlib.import_module(dotted)
        except Exception as e:  # noqa: BLE001 - a broken user file is a user error
            package_error: Exception | None = e
        else:
            package_error = None
            if Path(getattr(module, "__file__", "") or "").resolve() == path.resolve():
                return module
        # The dotted name is taken by another package (installed, or loaded before), or the package's
        # __init__ fails: load the file by itself.
    mod_name = f"_slimfx_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    try:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # noqa: BLE001 - a broken user file is a user error
        sys.modules.pop(mod_name, None)
        if pkg is not None and package_error is not None:  # the error met importing it as its package's module
            raise ModelSpecError(f"could not import {what} file {str(path)!r} (as {pkg[1]}) from {what} spec "
                                 f"{spec!r}: {_one_line(package_error)} (run with --debug for the traceback)"
                                 ) from package_error
        raise ModelSpecError(f"could not import {what} file {str(path)!r} from {what} spec {spec!r}: "
                             f"{_one_line(e)} (run with --debug for the traceback)") from e
    return module


def _import_module(target: str, spec: str, what: str = "model") -> Any:
    _prepend_path(Path.cwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise ModelSpecError(f"no module named {e.name!r} (from {what} spec {spec!r}): run slimfx from the "
                                 f"folder that holds it, install its package, or give 'path/to/file.py:callable'"
                                 ) from e
        raise ModelSpecError(f"could not import module {target!r} from {what} spec {spec!r}: {_one_line(e)} "
                             "(run with --debug for the traceback)") from e
    except Exception as e:  # noqa: BLE001 - a module that fails on import is a user error
        raise ModelSpecError(f"could not import module {target!r} from {what} spec {spec!r}: {_one_line(e)} "
                             "(run with --debug for the traceback)") from e


def _describe(obj: Any) -> str:
    if isinstance(obj, tuple):
        return f"a tuple of {len(obj)} ({', '.join(type(o).__name__ for o in obj)})"
    if isinstance(obj, str):
        return f"a string {obj[:40]!r}"
    return f"{'None' if obj is None else type(obj).__name__}"


def _check_inputs(spec: str, inputs: Any, kwargs: Any) -> tuple[tuple, dict | None]:
    """The example inputs as (tuple of tensors, dict of keyword tensors or None), or ModelSpecError."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, dict) and kwargs is None:
        kwargs, inputs = inputs, ()
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, tuple):
        raise ModelSpecError(f"model spec {spec!r} returned (module, {_describe(inputs)}) but the second item "
                             f"must be the example inputs; return {RETURN_SHAPE}")
    if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
        raise ModelSpecError(f"model spec {spec!r} returned (module, args, {_describe(kwargs)}); the third item "
                             "must be a dict of keyword inputs, e.g. {'attention_mask': mask}")
    named = [(f"example input {i}", x) for i, x in enumerate(inputs)] + \
            [(f"example keyword input {k!r}", x) for k, x in (kwargs or {}).items()]
    if not named:
        raise ModelSpecError(f"model spec {spec!r} returned no example inputs; return {RETURN_SHAPE}")
    for what, x in named:
        if not isinstance(x, torch.Tensor):
            raise ModelSpecError(f"model spec {spec!r}: {what} is {_describe(x)}, not a tensor; return "
                                 f"{RETURN_SHAPE}")
        if x.dim() == 0:
            raise ModelSpecError(f"model spec {spec!r}: {what} is a 0-d tensor (a scalar); slimfx needs a batch "
                                 "dimension first: give it shape [1] (e.g. x.reshape(1)) or [batch, ...]")
        if x.numel() == 0:
            raise ModelSpecError(f"model spec {spec!r}: {what} has shape {list(x.shape)}, which holds no "
                                 "values; give at least one sample (batch size 1 or more)")
        if x.device.type == "meta":
            raise ModelSpecError(f"model spec {spec!r}: {what} is on the meta device (it has no values); "
                                 "give real tensors, e.g. torch.randn(...)")
    return inputs, (kwargs or None)


def is_file_target(target: str) -> bool:
    """Whether the code part of a spec names a file (`x.py`, a path) rather than a dotted module."""
    return target.endswith(".py") or "/" in target or "\\" in target or Path(target).is_file()


def import_source(target: str, spec: str, what: str, *, relative_to: str | None = None) -> Any:
    """Import the code part of a spec, a `path/to/file.py` or a `package.module`, as the module docstring
    says; ModelSpecError naming the spec (`what`: "model", "data", "plugin") otherwise. `relative_to` says
    what a relative path was resolved against (default: the working directory)."""
    if not is_file_target(target):
        return _import_module(target, spec, what)
    path = Path(target)
    if path.is_file() and path.suffix != ".py":
        raise ModelSpecError(f"{what} file {str(path)!r} is not a Python file (.py): the spec names Python "
                             "code, as 'path/to/file.py:callable'")
    if not path.is_file():
        problem = "is a folder, not a .py file" if path.is_dir() else "does not exist"
        raise ModelSpecError(f"{what} file {str(path)!r} {problem} (from {what} spec {spec!r}; paths are "
                             f"relative to {relative_to or 'the working directory ' + os.getcwd()})")
    return _import_file(path, spec, what)


def _import_target(spec: str, what: str, base: Path | None = None,
                   given_by: str = "") -> tuple[Any, str, str]:
    """(module, target, attribute) of a `package.module:attr` or `path/to/file.py:attr` spec, imported as
    the module docstring says; ModelSpecError naming the spec (`what`: "model", "data") otherwise. A relative
    file path is resolved against `base` (default: the working directory); `given_by` says who gave it."""
    target, _, attr = spec.strip().rpartition(":")
    if not target or not attr:
        raise ModelSpecError(f"{what} spec {spec!r} must be 'package.module:callable' or 'path/to/file.py:callable'")
    relative_to = None
    if base is not None and is_file_target(target) and not Path(target).is_absolute():
        relative_to = f"the folder {base}" + (f" ({given_by})" if given_by else "")
        target = str(base / target)
    module = import_source(target, spec, what, relative_to=relative_to)
    if not attr.isidentifier() or not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelSpecError(f"{target!r} has no attribute {attr!r}{hint}; callables there: "
                             f"{', '.join(public[:20]) or 'none'}")
    return module, target, attr


def import_spec(spec: str, *, what: str, base: Path | None = None, given_by: str = "") -> Any:
    """The object a `package.module:attr` or `path/to/file.py:attr` spec names, imported like a MODEL (a
    relative file path resolved against `base`, default the working directory)."""
    module, _, attr = _import_target(spec, what, base, given_by)
    return getattr(module, attr)


def resolve_model(spec: str, *, trained: bool = True, seed: int = 0, batch: int = 1,
                  progress: bool = True, need_inputs: bool = True) -> LoadedModel:
    """Load the model a MODEL argument names (zoo models come trained unless `trained=False`).

    A user callable is called after `torch.manual_seed(seed)` and on one torch thread, so random weights and
    example inputs are the same from run to run, and a callable that trains or computes its weights builds the
    same model in every command whatever their --threads (float sums differ between thread counts). With
    `need_inputs=False` a callable may return a bare module (the caller brings its own inputs, e.g. `slimfx
    distill --student`); example_inputs is then empty.
    """
    spec = spec.strip()
    from slimfx.persist import SUFFIX

    if spec.endswith(SUFFIX):
        return _load_saved(spec, seed=seed)
    if ":" not in spec:
        names = _zoo_names()
        if spec not in names:
            close = difflib.get_close_matches(spec, names, n=2)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            if spec.endswith(".py"):
                hint = f" ({spec} looks like a file: name the callable that builds the model, e.g. '{spec}:make')"
            elif Path(spec).exists():
                hint = (f" ({spec} is a file or folder, but MODEL names Python code that builds a PyTorch model, "
                        "not a model file)")
            raise ModelSpecError(f"unknown model {spec!r}{hint}; give {SPEC_FORMS}; zoo models: {', '.join(names)}")
        from slimfx import models

        zoo = models.get(spec)
        module = zoo.trained(seed=seed, progress=progress) if trained and zoo.dataset else zoo.build(seed=seed)
        return LoadedModel(spec, module.eval(), tuple(zoo.example_inputs(batch=batch, seed=seed)), zoo)

    module, target, attr = _import_target(spec, "model")
    fn = getattr(module, attr)
    obj = fn
    if callable(fn) and not isinstance(fn, nn.Module):
        torch.manual_seed(seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            obj = fn()
        except Exception as e:  # noqa: BLE001 - the user's factory failing is a user error
            raise ModelSpecError(f"model spec {spec!r}: calling {attr}() raised {_one_line(e)} "
                                 "(run with --debug for the traceback)") from e
        finally:
            torch.set_num_threads(threads)
    kwargs = None
    if isinstance(obj, nn.Module):
        # A bare module: take example inputs from a module-level `example_inputs` (value or callable).
        ex = getattr(module, "example_inputs", None)
        if ex is None:
            if not need_inputs:
                return LoadedModel(attr, _eval(obj, spec), (), None, None)
            raise ModelSpecError(
                f"{spec} gave a module but slimfx cannot know its input shapes: return (module, example_inputs) "
                f"from {attr}(), e.g. `return model, (torch.randn(1, 3, 224, 224),)`, or define "
                f"`example_inputs` next to it in {target}")
        if callable(ex):
            try:
                ex = ex()
            except Exception as e:  # noqa: BLE001
                raise ModelSpecError(f"model spec {spec!r}: calling example_inputs() in {target} raised "
                                     f"{_one_line(e)} (run with --debug for the traceback)") from e
        obj = (obj, ex)
    if isinstance(obj, list):
        obj = tuple(obj)
    if not (isinstance(obj, tuple) and len(obj) in (2, 3) and isinstance(obj[0], nn.Module)):
        if isinstance(obj, tuple) and len(obj) in (2, 3):
            got = f"a tuple whose first item is {_describe(obj[0])}, not an nn.Module"
        else:
            got = _describe(obj)
        raise ModelSpecError(f"model spec {spec!r} returned {got}; it must return {RETURN_SHAPE}")
    inputs, kwargs = _check_inputs(spec, obj[1], obj[2] if len(obj) == 3 else None)
    return LoadedModel(attr, _eval(obj[0], spec), inputs, None, kwargs)


def _load_saved(spec: str, *, seed: int) -> LoadedModel:
    """A .slimfx file: its graph, the graph's lowering as the module, example inputs made from the stored
    input metas (the shapes the graph was captured with), and the zoo entry when the file was saved from a zoo model (so commands can
    bring the zoo's data)."""
    from slimfx import ir
    from slimfx.persist import example_inputs, load

    graph = load(spec)
    from slimfx.output import note_input

    note_input(spec, "saved model")
    name = str((graph.metadata.get("model") or {}).get("name") or graph.name)
    inputs = example_inputs(graph, seed=seed)
    return LoadedModel(name, ir.lower(graph, copy_params=True).eval(), inputs, _zoo_of(name, graph), None, graph)


def _zoo_of(name: str, graph: Any) -> Any:
    """The zoo entry a saved graph came from: its recorded model name is a zoo name and its inputs are that
    model's (dtype and shape past the batch dim); None otherwise."""
    if name not in _zoo_names():
        return None
    from slimfx import models

    zoo = models.get(name)
    ins = [n.meta for n in graph.inputs]
    if len(ins) == 1 and getattr(ins[0], "dtype", None) == zoo.input_dtype \
            and tuple(ins[0].shape[1:]) == tuple(zoo.input_shape):
        return zoo
    return None


def _eval(module: nn.Module, spec: str) -> nn.Module:
    meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if meta:
        raise ModelSpecError(f"model spec {spec!r}: the model's {meta[0]!r} (and {len(meta) - 1} more) is on the "
                             "meta device, so it has no weights; load or initialize them (e.g. "
                             "model.to_empty(device='cpu') then load_state_dict) before returning it")
    from slimfx.ir.capture import unwrap

    return unwrap(module).eval()
