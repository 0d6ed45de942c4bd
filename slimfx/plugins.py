"""Plugins: your passes, ops and emitters, loaded before a recipe is resolved.

A plugin is Python code that registers things when imported (`@register_pass`, `register_op`, an
emitter): a file (`my_passes.py`, `path/to/my_passes.py`) or an importable module (`mypkg.passes`).
`FILE_OR_MODULE:function` also calls `function()` (no arguments) after the import. Plugins come from

- `--plugin FILE_OR_MODULE` on the command line (repeatable; paths relative to the working directory),
- a recipe's `plugins = ["my_passes.py"]` key (paths relative to the recipe file),
- installed packages: entry points in the group `slimfx.plugins`, e.g. in pyproject.toml
  `[project.entry-points."slimfx.plugins"] mypasses = "mypkg.passes"`; loaded once per process by every
  command that resolves models, recipes or passes, and by `Recipe`.

Files are imported the way MODEL files are (slimfx.loading): their folder is importable. A plugin loads
once per process however often it is named. Every pass registered while a plugin loads records that
plugin as its origin, which `slimfx passes` shows. A plugin that fails to import or registers a name
that is taken is a PluginError naming the plugin (the CLI's exit code 2).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from slimfx.ir.errors import SlimfxError
from slimfx.loading import ModelSpecError, _one_line, import_source, is_file_target
from slimfx.passes import registered_passes

ENTRY_POINT_GROUP = "slimfx.plugins"

_LOADED: dict[str, str] = {}  # what was imported (resolved file path or module name) -> its origin text
_ORIGINS: dict[str, str] = {}  # pass name -> origin of the plugin that registered it
_entry_points_loaded = False


class PluginError(SlimfxError):
    """A plugin that cannot be found or imported, or whose import fails (e.g. a pass name that is taken)."""


def load_plugins(specs: Iterable[str], *, base: Path | None = None, given_by: str = "--plugin") -> None:
    """Load each plugin spec in order (see the module docstring); relative paths are resolved against
    `base` (default: the working directory). `given_by` says where the specs come from, for messages
    (e.g. "--plugin", "recipe my.toml key 'plugins'")."""
    for spec in specs:
        load_plugin(spec, base=base, given_by=given_by)


def load_plugin(spec: str, *, base: Path | None = None, given_by: str = "--plugin") -> None:
    """Load one plugin spec (FILE_OR_MODULE or FILE_OR_MODULE:function) unless it is loaded already."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"plugin {spec!r} (from {given_by}): give a .py file or a module name, e.g. "
                          "my_passes.py or mypkg.passes")
    text = spec.strip()
    target, sep, fn_name = text.rpartition(":")
    if not sep or not fn_name.isidentifier():  # no function part (a ':' may be a Windows drive)
        target, fn_name = text, ""
    relative_to = None
    if is_file_target(target) and base is not None and not Path(target).is_absolute():
        relative_to = f"the folder {base} ({given_by})"
        target = str(base / target)
    key = str(Path(target).resolve()) if is_file_target(target) else target
    origin = f"plugin {text}"
    if key in _LOADED:
        return
    before = registered_passes()
    try:
        module = import_source(target, text, "plugin", relative_to=relative_to)
    except ModelSpecError as e:
        named = given_by in str(e)  # a relative path's message names it already
        raise PluginError(f"{e}{'' if named else f' (plugin given by {given_by})'}") from e.__cause__
    if fn_name:
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise PluginError(f"plugin {text!r} (from {given_by}): {target} has no function {fn_name!r}")
        _call(fn, f"plugin {text!r} (from {given_by}): calling {fn_name}()")
    _record(before, origin)
    _LOADED[key] = origin


def load_entry_points() -> None:
    """Load every plugin installed under the entry point group `slimfx.plugins` (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"plugin {ep.value} (entry point {ep.name!r}" + (f" of {dist.name})" if dist else ")")
        if ep.value in _LOADED:
            continue
        before = registered_passes()
        what = f"{origin} in the group {ENTRY_POINT_GROUP!r}"
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - an installed plugin that fails on import is a user error
            raise PluginError(f"{what} failed to import: {_one_line(e)}; fix or uninstall "
                              f"{dist.name if dist else 'the package that declares it'} (run with --debug for "
                              "the traceback)") from e
        if callable(obj) and not isinstance(obj, type):
            _call(obj, f"{what}: calling {ep.value}")
        _record(before, origin)
        _LOADED[ep.value] = origin
    _entry_points_loaded = True


def pass_origin(name: str) -> str:
    """Where a registered pass comes from: 'built-in', 'plugin FILE_OR_MODULE' or 'module NAME'."""
    if name in _ORIGINS:
        return _ORIGINS[name]
    cls = registered_passes()[name]
    return "built-in" if cls.__module__.startswith("slimfx.") else f"module {cls.__module__}"


def _call(fn: Callable[[], Any], what: str) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the plugin's own code failing is a user error
        raise PluginError(f"{what} raised {_one_line(e)} (run with --debug for the traceback)") from e


def _record(before: dict[str, type], origin: str) -> None:
    for name, cls in registered_passes().items():
        if before.get(name) is not cls:
            _ORIGINS[name] = origin


__all__ = ["ENTRY_POINT_GROUP", "PluginError", "load_plugins", "load_plugin", "load_entry_points", "pass_origin"]
