"""The Pass API: a registered name, typed options (dataclass fields) and run(graph, ctx).

    @register_pass("fold-batchnorm")
    @dataclass
    class FoldBatchNorm(Pass):
        '''Folds an eval-mode batch_norm into the conv2d or linear that feeds it.'''
        def run(self, graph, ctx) -> PassResult:
            ...
            return PassResult(changed=True, stats={"folded": n})

Options are the dataclass's fields, each declared once with `option(...)`: its type (the annotation; a
Literal is the set of accepted values), default, accepted range and help text:

    sparsity: float = option(0.5, ge=0, lt=1, help="fraction of each layer's weights to zero")
    criterion: Literal["l1", "l2"] = option("l2", help="weight norm ranking the channels")

A pass is checked once, when it is built (`__post_init__`, whichever way it is built): every option's
type (ints become floats where a float is declared), its range, then `validate()`, which holds only rules
that tie options together (a pass defining its own `__post_init__` calls `super().__post_init__()`). `create_pass(name, options)` builds a registered pass from a dict (recipes),
`parse_pass_spec("prune-channels{sparsity=0.5}")` from text. Unknown names and options, values of the
wrong type and out-of-range values raise PassError naming them and saying what is accepted.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import logging
import math
import random
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from slimfx.ir import Graph
from slimfx.ir.errors import PassError

_REGISTRY: dict[str, type[Pass]] = {}


# --- option declarations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bounds:
    """The numbers an option accepts: ge/gt (lower bound, inclusive/exclusive), le/lt (upper). For a list
    they hold for every item, for a dict for every value; None is never out of range."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, v: Any) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))

    def __str__(self) -> str:
        lo, lo_open = (self.gt, True) if self.gt is not None else (self.ge, False)
        hi, hi_open = (self.lt, True) if self.lt is not None else (self.le, False)
        if lo is not None and hi is not None:
            return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        if lo is not None:
            return f"{'>' if lo_open else '>='} {lo:g}"
        return f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else "any"


def option(default: Any = dataclasses.MISSING, *, help: str, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """Declare a pass option: a dataclass field whose metadata holds its help text and accepted range.

    The type and the set of accepted values come from the annotation (`Literal["a", "b"]` accepts exactly
    those); `ge`/`gt`/`le`/`lt` bound numbers (each item of a list, each value of a dict). A list or dict
    default is copied for each pass, so `option([], help=...)` is safe. `slimfx passes NAME` prints all of it.
    """
    if default_factory is dataclasses.MISSING and isinstance(default, (list, dict, set)):
        default_factory = functools.partial(copy.deepcopy, default)
        default = dataclasses.MISSING
    bounds = Bounds(ge, gt, le, lt) if any(b is not None for b in (ge, gt, le, lt)) else None
    return field(default=default, default_factory=default_factory, metadata={"help": help, "bounds": bounds})


@dataclass(frozen=True)
class OptionInfo:
    """One option as declared: what `slimfx passes NAME` prints and `Pass.__post_init__` checks."""

    name: str
    type: Any
    default: Any  # dataclasses.MISSING when the option is required
    help: str
    bounds: Bounds | None

    @property
    def type_name(self) -> str:
        return _type_name(self.type)

    @property
    def choices(self) -> tuple | None:
        """The accepted values when the type is a Literal (or an optional one)."""
        tp = self.type
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


@functools.cache
def _option_infos(cls: type) -> tuple[OptionInfo, ...]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation naming something local to a function
        hints = {f.name: _resolve_annotation(cls, f.type) for f in dataclasses.fields(cls)}
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        out.append(OptionInfo(f.name, hints.get(f.name, Any), default, f.metadata.get("help", ""),
                              f.metadata.get("bounds")))
    return tuple(out)


def _resolve_annotation(cls: type, annotation: Any) -> Any:
    """One field's type when the class's hints cannot all be resolved; Any (unchecked) if it cannot be."""
    if not isinstance(annotation, str):
        return annotation
    import sys

    namespace = dict(vars(sys.modules.get(cls.__module__, typing)))
    try:
        return eval(annotation, namespace)  # noqa: S307 - an annotation of the user's own class
    except Exception:  # noqa: BLE001
        return Any


def _check_bounds(pass_name: str, key: str, value: Any, bounds: Bounds) -> None:
    if isinstance(value, dict):
        items = [(f" (entry {k!r})", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f" (item {i})", v) for i, v in enumerate(value)]
    else:
        items = [("", value)]
    for where, v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in bounds:
            raise PassError(f"pass '{pass_name}': option {key!r}{where} must be {_bounds_text(bounds)}, got {v!r}")


def _bounds_text(bounds: Bounds) -> str:
    text = str(bounds)
    return f"in {text}" if text[0] in "[(" else text


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, and numbers worth reporting.

    graph: a new graph that replaces the one the pass was given (a pass that rebuilds rather than edits,
    e.g. prune-channels); None when the pass edited the given graph in place. Whoever runs a pass goes on
    with `result.graph_after(graph)`; the PassManager does so and returns the final graph.
    """

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    graph: Graph | None = None

    def graph_after(self, given: Graph) -> Graph:
        """The graph to use after the pass: the new one it returned, else `given` (edited in place)."""
        return self.graph if self.graph is not None else given


@dataclass
class PassContext:
    """What passes may use besides the graph.

    example_inputs: inputs the graph was captured with (a tuple of tensors).
    calibration_data: iterable of input tuples (quantization, block-wise distillation).
    train_data: iterable of (inputs_tuple, target) batches for fine-tuning and distillation.
    eval_fn: callable(module) -> float accuracy in [0, 1], when the user gave one.
    teacher: the original model (or graph), for distillation-based recovery.
    measure_ms: callable(graph, [inputs, ...], budget_s) -> median milliseconds of one call of `graph` on the
        deployment runtime for each inputs tuple (slimfx.compile: onnxruntime, 1 thread,
        `exporters.graph_latency_ms`); None: no runtime to time on (quantize's speed guard is then skipped).
    """

    example_inputs: tuple = ()
    calibration_data: Iterable | None = None
    train_data: Iterable | None = None
    eval_fn: Callable[[torch.nn.Module], float] | None = None
    teacher: Any = None
    measure_ms: Callable[[Any, list[tuple], float], list[float]] | None = None
    seed: int = 0
    quiet: bool = False
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("slimfx"))

    def __post_init__(self) -> None:
        if not isinstance(self.example_inputs, tuple):
            self.example_inputs = (self.example_inputs,) if isinstance(self.example_inputs, torch.Tensor) \
                else tuple(self.example_inputs)
        self.rng = random.Random(self.seed)
        self.torch_rng = torch.Generator().manual_seed(self.seed)

    def calibration_batches(self) -> list[tuple]:
        """Calibration inputs as a list of tuples; the example inputs when none were given."""
        data = self.calibration_data if self.calibration_data is not None else [self.example_inputs]
        return [b if isinstance(b, tuple) else (tuple(b) if isinstance(b, list) else (b,)) for b in data]


class Pass:
    """Base class of all passes. Subclasses are dataclasses whose fields are the options."""

    name: ClassVar[str] = ""
    #: analyses report but never change the graph; the PassManager checks that they do not.
    is_analysis: ClassVar[bool] = False
    #: a pass keeps the graph's outputs (within float rounding) unless it says otherwise: the
    #: PassManager's numeric check (`check_numerics`) holds every pass to that. Lossy passes (pruning,
    #: quantization, training) set this False and are not checked.
    preserves_outputs: ClassVar[bool] = True
    #: passes that read ctx.calibration_data (the driver warns when only example inputs are there).
    needs_calibration: ClassVar[bool] = False
    #: passes that must run after one of these in the same pipeline (checked before any work).
    runs_after: ClassVar[tuple[str, ...]] = ()
    #: (pass name, option): this step is that option of the last such pass before it in the pipeline; the
    #: PassManager sets the option to True there when it is built (bias-correction: quantize's bias_correction).
    option_of: ClassVar[tuple[str, str] | None] = None

    def check_context(self, ctx: PassContext) -> str | None:
        """Before any work: return what is missing from `ctx` for this pass to run (None when fine)."""
        return None

    def check_graph(self, graph: Graph) -> str | None:
        """Before any work, after capture: what in this pass's options does not fit the graph (an option
        naming nodes, modules or layers that it does not have), or None when all fits."""
        return None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self) -> None:
        """Rules tying options together (each option's type and range are checked before, from its
        declaration); raise PassError naming the options and what to change."""

    def __post_init__(self) -> None:
        """Check every option once, when the pass is built: type (converting gently), range, validate()."""
        for info in _option_infos(type(self)):
            value = _coerce(self.name, info.name, getattr(self, info.name), info.type)
            if info.bounds is not None:
                _check_bounds(self.name, info.name, value, info.bounds)
            object.__setattr__(self, info.name, value)
        self.validate()

    # -- construction from dicts and text -------------------------------------------------
    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []

    @classmethod
    def option_infos(cls) -> tuple[OptionInfo, ...]:
        """Each option as declared: name, type, default, help and range."""
        return _option_infos(cls) if dataclasses.is_dataclass(cls) else ()

    @classmethod
    def describe(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def create(cls, options: dict[str, Any] | None = None) -> Pass:
        """Build the pass from an options dict (checked once, by the constructor)."""
        options = dict(options or {})
        fields = {f.name: f for f in cls.options()}
        unknown = [k for k in options if k not in fields]
        if unknown:
            raise PassError(f"pass '{cls.name}' has no option {unknown[0]!r}; "
                            f"accepted options: {', '.join(fields) or '(none)'}")
        try:
            return cls(**options)
        except TypeError as e:
            raise PassError(f"pass '{cls.name}': {e}") from e

    def option_values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.options()}

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.option_values().items())
        return f"{self.name}{{{opts}}}" if opts else self.name


def _type_name(tp: Any) -> str:
    """`float`, `list[str]`, `float | None`, `'l1' | 'l2'` (a Literal lists its values)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "").replace("NoneType", "None")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(pass_name: str, key: str, value: Any, tp: Any, where: str = "") -> Any:
    """Check (and gently convert) an option value against its annotation; `where` names an item of a list or
    dict option (" (item 1)", as the range check does)."""
    def fail() -> PassError:
        return PassError(f"pass '{pass_name}': option {key!r}{where} must be {_type_name(tp)}, "
                         f"got {value!r} ({type(value).__name__})")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(pass_name, key, value, a, where)
            except PassError:
                continue
        raise fail()
    if origin is typing.Literal:
        if value in args:
            return value
        raise PassError(f"pass '{pass_name}': option {key!r}{where} must be one of "
                        f"{', '.join(repr(a) for a in args)}; got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise fail()
        inner = args[0] if args else Any
        items = [_coerce(pass_name, key, v, inner, f" (item {i})") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        kt, vt = args if args else (Any, Any)
        return {_coerce(pass_name, key, k, kt, f" (key {k!r})"): _coerce(pass_name, key, v, vt, f" (entry {k!r})")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type) and not isinstance(value, tp):
        raise fail()
    return value


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: register a Pass subclass under `name` (makes it a dataclass if it is not)."""
    def deco(cls: type[Pass]) -> type[Pass]:
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            cls = dataclass(cls)
        if name in _REGISTRY and not _same_definition(_REGISTRY[name], cls):
            old = _REGISTRY[name]
            raise PassError(f"a pass named '{name}' is already registered ({old.__qualname__} from "
                            f"{_definition(old)[1] or old.__module__}); give {cls.__qualname__} another name")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _definition(cls: type) -> tuple[str, str | None]:
    """(qualname, source file): the same class body loaded again (a file imported twice, a module reloaded)
    may replace its own registration; any other class under a taken name is refused."""
    # the class body's own functions: a staticmethod's function, a wrapper's wrapped one (dataclass's __repr__
    # is wrapped in dataclasses.py, so a class whose body has no plain method would seem defined there)
    fns = [inspect.unwrap(getattr(v, "__func__", v)) for v in vars(cls).values()]
    files = [f.__code__.co_filename for f in fns if hasattr(f, "__code__")]
    path = next((f for f in files if not f.startswith("<")), None)  # not dataclass's generated methods
    if path is None:
        try:
            path = inspect.getfile(cls)  # through sys.modules: gone for a file run by runpy
        except (TypeError, OSError):
            path = None
    return cls.__qualname__, (str(Path(path).resolve()) if path else None)


def _same_definition(a: type, b: type) -> bool:
    (qa, fa), (qb, fb) = _definition(a), _definition(b)
    return qa == qb and (fa == fb or fa is None or fb is None)


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (built-in passes are imported by `passes`)."""
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass registered as `name`; PassError naming the closest names and how to register one of your own."""
    try:
        return _REGISTRY[name]
    except KeyError:
        names = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise PassError(f"unknown pass {name!r}; {hint}registered passes: {', '.join(names)}. A pass of your own "
                        "is known once the file that registers it is loaded: --plugin my_passes.py on the command "
                        "line, plugins = [\"my_passes.py\"] in a recipe (relative to it), an import in Python") \
            from None


def create_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    """Build a registered pass from its name and an options dict."""
    return get_pass(name).create(options)


def parse_pass_spec(spec: str) -> Pass:
    """Build a pass from text: `name` or `name{key=value, key=value}`.

    Values are Python literals (numbers, strings, lists, True/False; also true/false/null as in
    TOML); other bare words are strings, so `criterion=l2` works.
    """
    spec = spec.strip()
    if "{" not in spec:
        return create_pass(spec)
    if not spec.endswith("}"):
        raise PassError(f"pass spec {spec!r}: options must be enclosed in {{...}}, e.g. 'dce' or "
                        "'prune-channels{sparsity=0.5, criterion=l2}'")
    name, body = spec[:-1].split("{", 1)
    options: dict[str, Any] = {}
    for part in _split_top_level(body):
        if not part.strip():
            continue
        if "=" not in part:
            raise PassError(f"pass spec {spec!r}: option {part.strip()!r} needs a value (key=value)")
        key, raw = part.split("=", 1)
        raw = raw.strip()
        if raw.lower() in _BARE_WORDS:  # TOML/JSON spellings, as recipes use them
            value = _BARE_WORDS[raw.lower()]
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        options[key.strip()] = value
    return create_pass(name.strip(), options)


_BARE_WORDS = {"true": True, "false": False, "null": None, "none": None}


def _split_top_level(body: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts
