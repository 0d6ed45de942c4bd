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

import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from slimfx.ir.errors import PassError, RecipeError
from slimfx.passes import Pass, PassContext, PassManager, create_pass

TOP_LEVEL_KEYS = ("name", "description", "passes", "export", "validate", "data")
EXPORT_FORMATS = ("onnx", "torchscript")
MIN_OPSET, MAX_OPSET = 17, 23


@dataclass(frozen=True)
class ExportConfig:
    """The recipe's [export] table: which files to write and how."""

    formats: tuple[str, ...] = ("onnx",)
    opset: int = 17  # ONNX opset, MIN_OPSET..MAX_OPSET


@dataclass(frozen=True)
class ValidateConfig:
    """The recipe's [validate] table: the gate the compiled model must pass (None: that check is off).

    Checks compare the compiled model with the original on the validation split (or generated inputs).
    atol/rtol override the exporters' tolerances (export file vs the IR it was written from).
    """

    min_top1_agreement: float | None = None  # fraction in [0, 1]
    min_sqnr_db: float | None = None
    atol: float | None = None  # >= 0
    rtol: float | None = None  # >= 0
    max_accuracy_drop: float | None = None  # fraction in [0, 1] of accuracy on labelled validation data


@dataclass
class Recipe:
    """A loaded recipe. `passes` is a list of (pass name, options dict), in order."""

    name: str
    description: str = ""
    passes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    export: ExportConfig = field(default_factory=ExportConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    source: Path | None = None
    data: str | None = None  # a data spec ('file.py:fn' / 'package.module:fn' returning slimfx.Data)

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
        data_spec = data.get("data")
        if data_spec is not None and (not isinstance(data_spec, str) or ":" not in data_spec):
            raise RecipeError(f"{where}: 'data' must be a spec string like 'data.py:make_data' or "
                              f"'package.module:make_data', got {data_spec!r}")
        recipe = cls(name=str(data.get("name", name)), description=description, passes=steps, data=data_spec,
                     export=_export_config(data.get("export", {}), where),
                     validate=_validate_config(data.get("validate", {}), where), source=source)
        recipe.build_passes()  # check every pass and option now, before any work starts
        return recipe


def _export_config(table: Any, where: str) -> ExportConfig:
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: 'export' must be a table ([export])")
    _no_unknown_keys(table, ExportConfig, "export", where)
    formats = table.get("formats", list(ExportConfig.formats))
    if isinstance(formats, str):
        formats = [formats]
    if not isinstance(formats, list) or not formats or any(f not in EXPORT_FORMATS for f in formats):
        raise RecipeError(f"{where}: export.formats must be a non-empty list drawn from "
                          f"{', '.join(map(repr, EXPORT_FORMATS))}; got {table.get('formats')!r}")
    opset = table.get("opset", ExportConfig.opset)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise RecipeError(f"{where}: export.opset must be an integer from {MIN_OPSET} to {MAX_OPSET}; "
                          f"got {opset!r}")
    return ExportConfig(formats=tuple(dict.fromkeys(formats)), opset=opset)


# [validate] key -> (lowest, highest) accepted value (None: unbounded), and what it means.
VALIDATE_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "min_top1_agreement": (0.0, 1.0, "a fraction, e.g. 0.99"),
    "min_sqnr_db": (None, None, "decibels, e.g. 30"),
    "atol": (0.0, None, "an absolute tolerance >= 0"),
    "rtol": (0.0, None, "a relative tolerance >= 0"),
    "max_accuracy_drop": (0.0, 1.0, "a fraction of accuracy, e.g. 0.01 for one point"),
}


def _validate_config(table: Any, where: str) -> ValidateConfig:
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: 'validate' must be a table ([validate])")
    _no_unknown_keys(table, ValidateConfig, "validate", where)
    for k, v in table.items():
        lo, hi, meaning = VALIDATE_RANGES[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise RecipeError(f"{where}: validate.{k} must be a number ({meaning}), got {v!r}")
    return ValidateConfig(**{k: float(v) for k, v in table.items()})


def _no_unknown_keys(table: dict[str, Any], config: type, section: str, where: str) -> None:
    known = [f.name for f in fields(config)]
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: unknown key {section}.{key}{hint}; [{section}] accepts "
                              f"{', '.join(known)}")


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
