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
    [tune]                    # optional: per-layer int8/fp32 under an accuracy budget
    max_accuracy_drop = 0.003 # a fraction, as in [validate]: 0.3 points on the validation data
    target = "latency"

A recipe may use passes of your own: `plugins = ["my_passes.py"]` (paths relative to the recipe file, or
module names) loads them before its passes are built (slimfx/plugins.py).

Built-in recipes ship as package data (`slimfx/recipes/NAME.toml`). Every mistake
(bad TOML, unknown key, unknown pass or option, wrong type) raises RecipeError
naming the file, the table and the key, before any work starts.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from slimfx.ir.errors import PassError, RecipeError
from slimfx.passes import Pass, PassContext, PassManager, create_pass
from slimfx.plugins import PluginError, load_entry_points, load_plugins

TOP_LEVEL_KEYS = ("name", "description", "passes", "export", "validate", "tune", "data", "plugins")
EXPORT_FORMATS = ("onnx", "torchscript", "pt2", "slimfx")
MIN_OPSET, MAX_OPSET = 17, 23


@dataclass(frozen=True)
class ExportConfig:
    """The recipe's [export] table: which files to write and how. Checked when built (RecipeError)."""

    formats: tuple[str, ...] = ("onnx",)
    opset: int | None = None  # ONNX opset, MIN_OPSET..MAX_OPSET; None: 17, or 21 when the graph has 4-bit weights

    def __post_init__(self) -> None:
        for k, v in _check_export(self.__dict__, "ExportConfig").items():
            object.__setattr__(self, k, v)


@dataclass(frozen=True)
class ValidateConfig:
    """The recipe's [validate] table: the gate the compiled model must pass (None: that check is off).

    Checks compare the compiled model with the original on the validation split (or generated inputs).
    atol/rtol override the exporters' tolerances (export file vs the IR it was written from).
    Checked when built (RecipeError).
    """

    min_top1_agreement: float | None = None  # fraction in [0, 1]
    min_sqnr_db: float | None = None
    atol: float | None = None  # >= 0
    rtol: float | None = None  # >= 0
    max_accuracy_drop: float | None = None  # fraction in [0, 1] of accuracy on labelled validation data

    def __post_init__(self) -> None:
        for k, v in _check_validate(self.__dict__, "ValidateConfig").items():
            object.__setattr__(self, k, v)


@dataclass(frozen=True)
class TuneConfig:
    """The recipe's [tune] table: tune the recipe's quantize step to a budget (passes/quantize/tune.py).

    A budget (at least one): max_accuracy_drop, a fraction of accuracy on the validation data as in [validate]
    (0.003 = 0.3 points; needs labelled validation data), and/or min_sqnr_db, the output SQNR against the float
    model on the calibration data. Within it the tuner picks which layers stay float (the rest int8) for the
    `target` ("latency" or "size"), in at most `max_evaluations` full evaluations (the float baseline included).
    The keys set the quantize step's options max_accuracy_drop, min_sqnr_db, tune_target and tune_evaluations.
    Checked when built (RecipeError).
    """

    max_accuracy_drop: float | None = None
    min_sqnr_db: float | None = None
    target: str = "latency"
    max_evaluations: int = 5

    def __post_init__(self) -> None:
        for k, v in _check_tune(self.__dict__, "TuneConfig").items():
            object.__setattr__(self, k, v)

    @property
    def active(self) -> bool:
        return self.max_accuracy_drop is not None or self.min_sqnr_db is not None

    def quantize_options(self) -> dict[str, Any]:
        """The quantize step's options this table sets."""
        return {k: v for k, v in (("max_accuracy_drop", self.max_accuracy_drop), ("min_sqnr_db", self.min_sqnr_db),
                                  ("tune_target", self.target), ("tune_evaluations", self.max_evaluations))}


@dataclass
class Recipe:
    """A recipe. `passes` is a list of (pass name, options dict), in order.

    Built from TOML (`load_recipe`, `Recipe.from_dict`) or in Python, it is checked the same way when
    constructed: `passes` entries may be `(name, options)` tuples or TOML-shaped dicts (`{"name": ...,
    option: value}`), `export`/`validate` an ExportConfig/ValidateConfig or a dict of the TOML table's keys.
    `plugins` (files relative to the recipe file, or module names) are loaded first, with the installed
    `slimfx.plugins` entry points. The pass objects are built and checked once, here; `build_passes()`
    hands out copies of them. Every mistake (unknown pass, option or key, wrong type, out-of-range value)
    is a RecipeError.
    """

    name: str
    description: str = ""
    passes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    export: ExportConfig = field(default_factory=ExportConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    source: Path | None = None
    # a data spec ('file.py:fn' relative to the recipe file, or 'package.module:fn') returning slimfx.Data
    data: str | None = None
    # .py files (relative to the recipe file; to the working directory without one) or module names
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.source is not None and not isinstance(self.source, Path):
            self.source = Path(self.source)
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"recipe {self.name!r}: the name must be a non-empty string")
        where = self._where()
        if not isinstance(self.description, str):
            raise RecipeError(f"{where}: key 'description' must be a string")
        self.passes = _check_passes(self.passes, where)
        self.export = _export_config(self.export, where)
        self.validate = _validate_config(self.validate, where)
        self.tune = _tune_config(self.tune, where)
        if self.data is not None and (not isinstance(self.data, str) or ":" not in self.data):
            raise RecipeError(f"{where}: 'data' must be a spec string like 'data.py:make_data' or "
                              f"'package.module:make_data', got {self.data!r}")
        self.plugins = self._load_plugins(where)
        self._built = self._build()  # every pass and option checked now, before any work starts

    def build_passes(self) -> list[Pass]:
        """The recipe's pass objects, checked when the recipe was built (copies: a run may not change the
        recipe's own); rebuilt, and checked again, only if `passes` was changed since."""
        if self.passes != self._built[0]:
            self._built = self._build()
        return copy.deepcopy(self._built[1])

    def _build(self) -> tuple[list[tuple[str, dict[str, Any]]], list[Pass]]:
        """(the `passes` built from, the pass objects); RecipeError naming `passes[i]` on a mistake."""
        out = []
        tuned = self._tuned_step()
        for i, (name, options) in enumerate(self.passes):
            if i == tuned:
                options = {**options, **self.tune.quantize_options()}
            try:
                out.append(create_pass(name, options))
            except PassError as e:  # an unknown name says how to load a pass of your own
                raise RecipeError(f"{self._where()}: passes[{i}] (name = {name!r}): {e}") from e
        return copy.deepcopy(self.passes), out

    def _tuned_step(self) -> int | None:
        """The index of the quantize step [tune] applies to (the last one); RecipeError when [tune] is given
        without one, or when that step sets the same options itself."""
        if not self.tune.active:
            return None
        steps = [i for i, (name, _) in enumerate(self.passes) if name == "quantize"]
        if not steps:
            raise RecipeError(f"{self._where()}: [tune] tunes the quantize step, and the recipe has none; add a "
                              "[[passes]] table with name = \"quantize\" (or remove [tune])")
        both = [k for k in self.tune.quantize_options() if k in self.passes[steps[-1]][1]]
        if both:
            raise RecipeError(f"{self._where()}: passes[{steps[-1]}] (name = 'quantize') sets {both[0]!r}, which "
                              "[tune] sets too; give the budget in [tune] only")
        return steps[-1]

    def _load_plugins(self, where: str) -> list[str]:
        plugins = self.plugins
        if isinstance(plugins, str):
            plugins = [plugins]
        if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in plugins):
            raise RecipeError(f"{where}: 'plugins' must be a list of .py files (relative to the recipe file) or "
                              f"module names, e.g. plugins = [\"my_passes.py\"]; got {plugins!r}")
        base = self.source.parent if self.source is not None else None
        try:
            load_entry_points()
            load_plugins(plugins, base=base, given_by=f"{where}, key 'plugins'")
        except PluginError as e:
            raise RecipeError(str(e)) from e
        return list(plugins)

    def load_data(self) -> Any:
        """The slimfx.Data the recipe's `data` spec returns (a relative file resolved like `plugins`, against
        the recipe's folder), or None when the recipe names no data."""
        if self.data is None:
            return None
        from slimfx.data import load_data

        base = self.source.parent if self.source is not None else None
        return load_data(self.data, base=base, given_by=f"{self._where()}, key 'data'")

    def build_pipeline(self, **manager_options: Any) -> PassManager:
        """A PassManager running this recipe's passes (options: those of PassManager)."""
        return PassManager(self.build_passes(), **manager_options)

    def check_context(self, passes: list[Pass], ctx: PassContext) -> None:
        """Before any work: RecipeError naming the first pass whose needs `ctx` does not meet
        (e.g. distillation without training data)."""
        for i, p in enumerate(passes):
            if p.runs_after and not any(q.name in p.runs_after for q in passes[:i]):
                raise RecipeError(f"{self._where()}: passes[{i}] (name = {p.name!r}) must run after "
                                  f"{' or '.join(map(repr, p.runs_after))}; put it later in the recipe")
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
            close = difflib.get_close_matches(str(unknown[0]), TOP_LEVEL_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: unknown top-level key {unknown[0]!r}{hint}; accepted keys: "
                              f"{', '.join(TOP_LEVEL_KEYS)} (pass options go inside a [[passes]] table)")
        rname = data.get("name", name)
        if not isinstance(rname, str) or not rname:
            raise RecipeError(f"{where}: key 'name' must be a non-empty string, got {rname!r}")
        return cls(name=rname, description=data.get("description", ""), passes=data.get("passes", []),
                   export=data.get("export", {}), validate=data.get("validate", {}), tune=data.get("tune", {}),
                   source=source,
                   data=data.get("data"), plugins=data.get("plugins", []))


_PASSES_SHAPE = ("'passes' must be an array of tables: write each pass as [[passes]] followed by name = \"...\" "
                 "and its options (in Python: a list of (name, options) tuples or of {'name': ..., option: value} "
                 "dicts)")


def _check_passes(raw: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """`passes` as a list of (name, options dict): from (name, options) tuples or TOML-shaped tables."""
    if not isinstance(raw, (list, tuple)):
        raise RecipeError(f"{where}: {_PASSES_SHAPE}; got {type(raw).__name__} {raw!r:.60}")
    steps: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            if "name" not in item:
                raise RecipeError(f"{where}: passes[{i}] has no key 'name' (keys given: "
                                  f"{', '.join(map(str, item)) or 'none'})")
            pname, options = item["name"], {k: v for k, v in item.items() if k != "name"}
        elif isinstance(item, tuple) and len(item) == 2:
            pname, options = item
            if options is None:
                options = {}
            if not isinstance(options, dict):
                raise RecipeError(f"{where}: passes[{i}] options must be a dict of option = value, got "
                                  f"{type(options).__name__}")
        else:
            raise RecipeError(f"{where}: passes[{i}] is {type(item).__name__} {item!r:.60}; {_PASSES_SHAPE}")
        if not isinstance(pname, str):
            raise RecipeError(f"{where}: passes[{i}].name must be a string, got {pname!r}")
        bad = [k for k in options if not isinstance(k, str)]
        if bad:
            raise RecipeError(f"{where}: passes[{i}] (name = {pname!r}): option names must be strings, got {bad[0]!r}")
        steps.append((pname, dict(options)))
    return steps


def _config_table(table: Any, cls: type, key: str, where: str) -> dict[str, Any]:
    """A recipe table ([export], [validate], [tune]) as a dict of known keys: from TOML's dict, a Python dict,
    or the table's config object."""
    if isinstance(table, cls):
        table = {f.name: getattr(table, f.name) for f in fields(cls)}
    if not isinstance(table, dict):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise RecipeError(f"{where}: '{key}' must be a table ([{key}]; in Python {article} {cls.__name__} or a dict)")
    _no_unknown_keys(table, cls, key, where)
    return table


def _export_config(table: Any, where: str) -> ExportConfig:
    table = _config_table(table, ExportConfig, "export", where)
    return ExportConfig(**_check_export(table, where))


def _check_export(table: dict[str, Any], where: str) -> dict[str, Any]:
    """The [export] values, checked and normalized (formats a tuple without repeats)."""
    formats = table.get("formats", ExportConfig.formats)
    if isinstance(formats, str):
        formats = [formats]
    if not isinstance(formats, (list, tuple)) or not formats or any(f not in EXPORT_FORMATS for f in formats):
        raise RecipeError(f"{where}: export.formats must be a non-empty list drawn from "
                          f"{', '.join(map(repr, EXPORT_FORMATS))}; got {table.get('formats')!r}")
    opset = table.get("opset", ExportConfig.opset)
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not MIN_OPSET <= opset <= MAX_OPSET):
        raise RecipeError(f"{where}: export.opset must be an integer from {MIN_OPSET} to {MAX_OPSET}; "
                          f"got {opset!r}")
    return {"formats": tuple(dict.fromkeys(formats)), "opset": opset}


# [validate] key -> (lowest, highest) accepted value (None: unbounded), and what it means.
VALIDATE_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "min_top1_agreement": (0.0, 1.0, "a fraction, e.g. 0.99"),
    "min_sqnr_db": (None, None, "decibels, e.g. 30"),
    "atol": (0.0, None, "an absolute tolerance >= 0"),
    "rtol": (0.0, None, "a relative tolerance >= 0"),
    "max_accuracy_drop": (0.0, 1.0, "a fraction of accuracy, e.g. 0.01 for one point"),
}


def _validate_config(table: Any, where: str) -> ValidateConfig:
    table = _config_table(table, ValidateConfig, "validate", where)
    return ValidateConfig(**_check_validate(table, where))


def _check_validate(table: dict[str, Any], where: str) -> dict[str, Any]:
    """The [validate] values, checked (None: check off) and made floats."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if v is None:  # only reachable from Python (TOML has no null): the check is off
            out[k] = None
            continue
        lo, hi, meaning = VALIDATE_RANGES[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = (f" from {lo:g} to {hi:g}" if lo is not None and hi is not None else
                      f" at least {lo:g}" if lo is not None else "")
            raise RecipeError(f"{where}: validate.{k} must be a finite number{bounds} ({meaning}), got {v!r}")
        _check_accuracy_drop(k, v, "validate", where)
        out[k] = float(v)
    return out


def _check_accuracy_drop(key: str, value: float, table: str, where: str) -> None:
    """max_accuracy_drop is a fraction in every table; a value that reads like points is refused
    (`ir.metrics.accuracy_drop_problem`, the rule quantize's option follows too)."""
    from slimfx.ir.metrics import accuracy_drop_problem

    problem = accuracy_drop_problem(float(value)) if key == "max_accuracy_drop" else None
    if problem:
        raise RecipeError(f"{where}: {table}.max_accuracy_drop {problem}")


# [tune] key -> (lowest, highest, what it means); `target` is one of TUNE_TARGETS
TUNE_RANGES: dict[str, tuple[float, float, str]] = {
    "max_accuracy_drop": (0.0, 1.0, "a fraction of accuracy as in [validate], e.g. 0.003 for 0.3 points"),
    "min_sqnr_db": (-100.0, 200.0, "decibels of output SQNR against the float model, e.g. 30"),
    "max_evaluations": (2, 50, "an integer: full evaluations the tuner may make, the float baseline included"),
}
TUNE_TARGETS = ("latency", "size")


def _tune_config(table: Any, where: str) -> TuneConfig:
    table = _config_table(table, TuneConfig, "tune", where)
    out = _check_tune(table, where)
    if any(v is not None for v in table.values()) and out.get("max_accuracy_drop") is None \
            and out.get("min_sqnr_db") is None and table != {f.name: f.default for f in fields(TuneConfig)}:
        raise RecipeError(f"{where}: [tune] needs a budget: max_accuracy_drop (e.g. 0.003 for 0.3 points) and/or "
                          "min_sqnr_db (e.g. 30)")
    return TuneConfig(**out)


def _check_tune(table: dict[str, Any], where: str) -> dict[str, Any]:
    """The [tune] values, checked (None: that budget is off)."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k == "target":
            if v not in TUNE_TARGETS:
                raise RecipeError(f"{where}: tune.target must be one of {', '.join(map(repr, TUNE_TARGETS))}, "
                                  f"got {v!r}")
            out[k] = v
            continue
        if v is None and k != "max_evaluations":  # only reachable from Python: that budget is off
            out[k] = None
            continue
        lo, hi, meaning = TUNE_RANGES[k]
        integer = k == "max_evaluations"
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v) \
                or not lo <= v <= hi:
            raise RecipeError(f"{where}: tune.{k} must be {meaning}, from {lo:g} to {hi:g}; got {v!r}")
        _check_accuracy_drop(k, v, "tune", where)
        out[k] = int(v) if integer else float(v)
    return out


def _no_unknown_keys(table: dict[str, Any], config: type, section: str, where: str) -> None:
    known = [f.name for f in fields(config)]
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{where}: unknown key {section}.{key}{hint}; [{section}] accepts "
                              f"{', '.join(known)}")


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with slimfx."""
    root = resources.files("slimfx") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_recipe(spec: str | Path) -> Recipe:
    """Load a built-in recipe by name (`"cleanup"`) or a TOML file by path (`"my.toml"`, `"./mine"`).

    Only a Path, or a string that ends in `.toml` or contains a path separator, is a file: a file or
    folder in the working directory never shadows a built-in recipe of the same name.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise RecipeError(f"recipe must be a built-in recipe name (e.g. 'int8'), a path to a .toml file or a "
                          f"slimfx.Recipe, got {type(spec).__name__} {spec!r}")
    text_spec = str(spec)
    seps = [sep for sep in (os.sep, os.altsep, "/") if sep]
    is_path = isinstance(spec, Path) or text_spec.endswith(".toml") or any(sep in text_spec for sep in seps)
    if is_path:
        path = Path(text_spec)
        if not path.is_file():
            what = "is a folder, not a TOML file" if path.is_dir() else "does not exist"
            raise RecipeError(f"recipe file {text_spec} {what}; give a .toml file or a built-in recipe "
                              f"({', '.join(builtin_recipes())})")
        name, source = path.stem, path
        from slimfx.output import note_input

        note_input(path, "recipe file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RecipeError(f"recipe file {text_spec} cannot be read: {e.strerror or e}") from e
    else:
        res = resources.files("slimfx") / "recipes" / f"{text_spec}.toml"
        if not text_spec or not res.is_file():
            names = builtin_recipes()
            close = difflib.get_close_matches(text_spec, names, n=2)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            local = next((c for c in (f"{text_spec}.toml", text_spec) if text_spec and Path(c).is_file()), None)
            also = f"; to use the file {local} here, write ./{local}" if local else ""
            raise RecipeError(f"unknown recipe {text_spec!r}{hint}; built-in recipes: {', '.join(names)} "
                              f"(or give a path to a .toml file){also}")
        name, source = text_spec, Path(str(res))
        data = res.read_bytes()
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {source}: not valid TOML: {e}") from e
    except RecursionError as e:
        raise RecipeError(f"recipe {source}: nested too deeply to read (arrays or tables inside each other "
                          "hundreds of levels deep); a recipe needs only [[passes]], [export], [validate] and [tune]") from e
    return Recipe.from_dict(parsed, name=name, source=source)


__all__ = ["Recipe", "TuneConfig", "load_recipe", "builtin_recipes"]
