"""Recipes: a TOML file listing passes with their options, what to export and how to validate.

    description = "Static INT8"
    [[passes]]
    name = "fold-batchnorm"
    [[passes]]
    name = "quantize"
    per_channel = true
    [export]
    formats = ["onnx", "torchscript"]
    [validate]
    min_top1_agreement = 0.99

Built-in recipes ship as package data (`slimfx/recipes/NAME.toml`). Every mistake
(bad TOML, unknown key, unknown pass or option, wrong type) raises RecipeError
naming the file, the table and the key, before any work starts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from slimfx.ir.errors import PassError, RecipeError
from slimfx.passes import Pass, PassContext, PassManager, create_pass

TOP_LEVEL_KEYS = ("name", "description", "passes", "export", "validate")
EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass
class Recipe:
    """A loaded recipe. `passes` is a list of (pass name, options dict), in order."""

    name: str
    description: str = ""
    passes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    export: dict[str, Any] = field(default_factory=dict)
    validate: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def build_passes(self) -> list[Pass]:
        """The pass objects, options checked (RecipeError naming `passes[i]` on a mistake)."""
        out = []
        for i, (name, options) in enumerate(self.passes):
            try:
                out.append(create_pass(name, options))
            except PassError as e:
                raise RecipeError(f"{self._where()}: passes[{i}] (name = {name!r}): {e}") from e
        return out

    def build_pipeline(self, **manager_options: Any) -> PassManager:
        """A PassManager running this recipe's passes (options: those of PassManager)."""
        return PassManager(self.build_passes(), **manager_options)

    def check_context(self, passes: list[Pass], ctx: PassContext) -> None:
        """Before any work: RecipeError naming the first pass whose needs `ctx` does not meet
        (e.g. distillation without training data)."""
        for i, p in enumerate(passes):
            missing = p.check_context(ctx)
            if missing:
                raise RecipeError(f"{self._where()}: passes[{i}] (name = {p.name!r}) cannot run: {missing}")

    def _where(self) -> str:
        return f"recipe {str(self.source) if self.source else repr(self.name)}"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, name: str = "recipe", source: Path | None = None) -> Recipe:
        """Build and check a recipe from parsed TOML (or any dict of the same shape)."""
        where = f"recipe {source}" if source else f"recipe {name!r}"
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe is a table of keys, got {type(data).__name__}")
        unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
        if unknown:
            raise RecipeError(f"{where}: unknown top-level key {unknown[0]!r}; accepted keys: "
                              f"{', '.join(TOP_LEVEL_KEYS)} (pass options go inside a [[passes]] table)")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise RecipeError(f"{where}: key 'description' must be a string")
        raw_passes = data.get("passes", [])
        if not isinstance(raw_passes, list) or not all(isinstance(p, dict) for p in raw_passes):
            raise RecipeError(f"{where}: 'passes' must be an array of tables: write each pass as "
                              "[[passes]] followed by name = \"...\" and its options")
        steps: list[tuple[str, dict[str, Any]]] = []
        for i, table in enumerate(raw_passes):
            if "name" not in table:
                raise RecipeError(f"{where}: passes[{i}] has no key 'name' (keys given: "
                                  f"{', '.join(table) or 'none'})")
            pname = table["name"]
            if not isinstance(pname, str):
                raise RecipeError(f"{where}: passes[{i}].name must be a string, got {pname!r}")
            steps.append((pname, {k: v for k, v in table.items() if k != "name"}))
        export = data.get("export", {})
        if not isinstance(export, dict):
            raise RecipeError(f"{where}: 'export' must be a table ([export])")
        formats = export.get("formats", [])
        if isinstance(formats, str):
            formats = [formats]
        if not isinstance(formats, list) or any(f not in EXPORT_FORMATS for f in formats):
            raise RecipeError(f"{where}: export.formats must be a list drawn from "
                              f"{', '.join(map(repr, EXPORT_FORMATS))}; got {export.get('formats')!r}")
        if "formats" in export:
            export = {**export, "formats": formats}
        validate = data.get("validate", {})
        if not isinstance(validate, dict):
            raise RecipeError(f"{where}: 'validate' must be a table ([validate])")
        for k, v in validate.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RecipeError(f"{where}: validate.{k} must be a number (a threshold), got {v!r}")
        recipe = cls(name=str(data.get("name", name)), description=description, passes=steps,
                     export=dict(export), validate=dict(validate), source=source)
        recipe.build_passes()  # check every pass and option now, before any work starts
        return recipe


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with slimfx."""
    root = resources.files("slimfx") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_recipe(spec: str | Path) -> Recipe:
    """Load a built-in recipe by name (`"cleanup"`) or a TOML file by path (`"my.toml"`)."""
    text_spec = str(spec)
    path = Path(text_spec)
    is_path = isinstance(spec, Path) or text_spec.endswith(".toml") or "/" in text_spec or path.exists()
    if is_path:
        if not path.is_file():
            raise RecipeError(f"recipe file {text_spec} does not exist")
        name, source = path.stem, path
        data = path.read_bytes()
    else:
        res = resources.files("slimfx") / "recipes" / f"{text_spec}.toml"
        if not res.is_file():
            raise RecipeError(f"unknown recipe {text_spec!r}; built-in recipes: {', '.join(builtin_recipes())} "
                              "(or give a path to a .toml file)")
        name, source = text_spec, Path(str(res))
        data = res.read_bytes()
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {source}: not valid TOML: {e}") from e
    return Recipe.from_dict(parsed, name=name, source=source)


__all__ = ["Recipe", "load_recipe", "builtin_recipes"]
