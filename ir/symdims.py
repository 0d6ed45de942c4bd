"""Symbolic dimensions: which input dims a compiled model keeps dynamic, and under which names.

A spec maps each graph input to `{dim: name}` (names like "batch", "seq", "height", "width", or a user's);
the same name on two inputs is one size (input_ids and attention_mask share "batch" and "seq"). Capture puts
it on the graph inputs' `TensorMeta.sym`; the exporters read it back from there (ONNX dim_param names, a
torch.export Dim per name) and run the graph at other sizes of each name to learn which inner dims follow.

`resolve_dynamic_dims` reads what users write (`slimfx.compile(dynamic_dims=...)`, `--dynamic-dims`):

- None: the defaults. Dim 0 of every tensor input is "batch"; integer [batch, sequence] inputs (token ids,
  masks) also have "seq" at dim 1, kept only when the model runs at another length (else fixed, quietly).
- names, as a string "batch,seq" or a sequence ("batch", "height", "width"): each put where it
  conventionally sits: batch at dim 0 of every input; seq at dim 1 of integer inputs of rank >= 2 and float
  inputs of rank 3 ([batch, seq, features]); height and width at dims -2 and -1 of rank-4 float inputs.
  "none" (or an empty string/sequence): every dim fixed.
- per input, like torch.onnx.export's dynamic_axes: `{"input_ids": {0: "batch", 1: "seq"}}` or
  `{"x": [0, 2, 3]}` (dims named batch (dim 0) or <input>_dim<k>); inputs left out are fixed. As a string:
  "input_ids=0:batch,1:seq;attention_mask=0:batch,1:seq".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slimfx.ir.errors import SlimfxError

# The names with a conventional place (dim of an input).
CONVENTIONAL = ("batch", "seq", "height", "width")
# How the option is reached from each interface, for messages.
WHERE = "(`--dynamic-dims` on the command line, dynamic_dims= in Python)"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Spec = dict[str, dict[int, str]]


class DynamicDimsError(SlimfxError):
    """A dynamic-dims value that does not fit the model's inputs (bad form, name, dim or size)."""


@dataclass
class DimPlan:
    """A resolved spec: per input name its {dim: symbol}, and the (input, dim) pairs that are only defaults
    (dropped, not refused, when the model runs at no other size there)."""

    dims: Spec
    optional: set[tuple[str, int]] = field(default_factory=set)
    examples: list[Any] = field(default_factory=list, repr=False)  # the example inputs, in graph order

    def symbols(self) -> list[str]:
        return list(dict.fromkeys(s for d in self.dims.values() for s in d.values()))

    def optional_symbols(self) -> set[str]:
        """Symbols named only where they are defaults."""
        return {s for s in self.symbols()
                if all((k, d) in self.optional for k, v in self.dims.items() for d, x in v.items() if x == s)}


def _is_token(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() and not x.is_complex()


def default_dims(x: Any) -> dict[int, str]:
    """The default symbolic dims of an example input: batch, and seq for token inputs."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return {}
    return {0: "batch", 1: "seq"} if _is_token(x) else {0: "batch"}


def _conventional_dim(name: str, x: Any) -> int | None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    if name == "batch":
        return 0
    if name == "seq":
        if (not x.is_floating_point() and x.dim() >= 2) or (x.is_floating_point() and x.dim() == 3):
            return 1
        return None
    if name in ("height", "width") and x.is_floating_point() and x.dim() == 4:
        return 2 if name == "height" else 3
    return None


def parse_dynamic_dims(text: str) -> Any:
    """The string form (CLI and API) as a names tuple or a per-input dict; DynamicDimsError on bad syntax."""
    if not isinstance(text, str):
        raise DynamicDimsError(f"dynamic dims must be a string here, got {type(text).__name__}")
    t = text.strip()
    if t.lower() in ("", "none"):
        return ()
    if "=" not in t:
        names = tuple(p.strip() for p in t.split(","))
        if any(not p for p in names):
            raise DynamicDimsError(f"dynamic dims {text!r} has an empty name; write names separated by commas, "
                                   f"e.g. batch,seq {WHERE}")
        for name in names:
            _check_name(name, f"in {text!r}")
            if name not in CONVENTIONAL:
                raise DynamicDimsError(f"dynamic dim {name!r} in {text!r} has no conventional place; the names that "
                                       f"do are {', '.join(CONVENTIONAL)}. Name another dim per input: INPUT=DIM:NAME,"
                                       f"... (e.g. x=0:batch,2:{name}) {WHERE}")
        return names
    spec: dict[str, dict[int, str]] = {}
    for part in filter(None, (p.strip() for p in t.split(";"))):
        inp, eq, rest = part.partition("=")
        inp = inp.strip()
        if not eq or not inp:
            raise DynamicDimsError(f"dynamic dims {text!r}: {part!r} is not INPUT=DIM:NAME,...; e.g. "
                                   f"x=0:batch,2:height,3:width {WHERE}")
        dims: dict[int, str] = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            d, colon, name = item.partition(":")
            try:
                dim = int(d.strip())
            except ValueError:
                raise DynamicDimsError(f"dynamic dims {text!r}: {item!r} of input {inp!r} is not DIM:NAME (a dim "
                                       f"number, a colon, a name), e.g. 0:batch {WHERE}") from None
            if dim in dims:
                raise DynamicDimsError(f"dynamic dims {text!r} name dim {dim} of input {inp!r} twice {WHERE}")
            dims[dim] = _check_name(name.strip(), f"for dim {dim} of input {inp!r}") if colon else \
                ("batch" if dim == 0 else f"{inp}_dim{dim}")
        if inp in spec:
            raise DynamicDimsError(f"dynamic dims {text!r} names input {inp!r} twice {WHERE}")
        spec[inp] = dims
    return spec


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DynamicDimsError(f"dynamic dim name {name!r} {where} is not a name (letters, digits and _, not "
                               f"starting with a digit), e.g. batch or seq {WHERE}")
    return name


def resolve_dynamic_dims(value: Any, names: Sequence[str], inputs: Sequence[Any], *,
                         dynamic_batch: bool = True) -> DimPlan:
    """The spec for graph inputs `names` with example `inputs` (see the module docstring for `value`).
    DynamicDimsError names what does not fit and how to write it instead."""
    names = list(names)
    by_name = dict(zip(names, inputs))
    if isinstance(value, str):
        value = parse_dynamic_dims(value)
    optional: set[tuple[str, int]] = set()
    if value is None:
        dims = _default_plan(by_name)
        optional = {(n, d) for n, v in dims.items() for d, s in v.items() if s == "seq"}
    elif isinstance(value, Mapping):
        dims = _per_input_plan(value, names, by_name)
    elif isinstance(value, (list, tuple)):
        dims = _named_plan(value, names, by_name)
    else:
        raise DynamicDimsError(f"dynamic_dims must be None, names (\"batch,seq\" or a tuple of names) or "
                               f"{{input: {{dim: name}}}}, got {type(value).__name__} {value!r}")
    if not dynamic_batch:
        if value is not None and any(s == "batch" for v in dims.values() for s in v.values()):
            raise DynamicDimsError("a fixed batch (--fixed-batch / dynamic_batch=False) and dynamic dims that name "
                                   "'batch' contradict each other; give one of them")
        dims = {n: {d: s for d, s in v.items() if s != "batch"} for n, v in dims.items()}
        optional = {(n, d) for n, d in optional if d in dims[n]}
    _check_sizes(dims, by_name)
    return DimPlan(dims, optional, list(inputs))


def _default_plan(by_name: dict[str, Any]) -> dict[str, dict[int, str]]:
    dims = {n: default_dims(x) for n, x in by_name.items()}
    # one name is one size: an input whose dim 0 differs from the first input's (a weight passed as an
    # input) keeps it fixed; so does a sequence of another length
    for sym, d in (("batch", 0), ("seq", 1)):
        first = next((by_name[n].shape[d] for n, v in dims.items() if v.get(d) == sym), None)
        for n, v in dims.items():
            if v.get(d) == sym and by_name[n].shape[d] != first:
                del v[d]
    return dims


def _per_input_plan(value: Mapping, names: list[str], by_name: dict[str, Any]) -> dict[str, dict[int, str]]:
    dims = {}
    for key, per in value.items():
        if key not in by_name:
            raise DynamicDimsError(f"dynamic dims name input {key!r}, which the model does not have; its "
                                   f"inputs: {', '.join(names) or '(none)'} {WHERE}")
        x = by_name[key]
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise DynamicDimsError(f"dynamic dims name input {key!r}, which is not a tensor with dims {WHERE}")
        if per is None:
            per = {}
        if isinstance(per, (list, tuple, set)):
            per = {d: ("batch" if d == 0 else f"{key}_dim{d}") for d in per}
        if not isinstance(per, Mapping):
            raise DynamicDimsError(f"dynamic dims of input {key!r} must be {{dim: name}} or a list of dims, "
                                   f"got {per!r} {WHERE}")
        out: dict[int, str] = {}
        for d, sym in per.items():
            if isinstance(d, bool) or not isinstance(d, int) or not -x.dim() <= d < x.dim():
                raise DynamicDimsError(f"dynamic dims of input {key!r} name dim {d!r}, but it has dims "
                                       f"0..{x.dim() - 1} (shape {list(x.shape)}) {WHERE}")
            d %= x.dim()
            sym = _check_name(sym, f"for dim {d} of input {key!r}")
            if d in out and out[d] != sym:
                raise DynamicDimsError(f"dynamic dims give dim {d} of input {key!r} two names, {out[d]!r} and "
                                       f"{sym!r} {WHERE}")
            out[d] = sym
        dims[key] = dict(sorted(out.items()))
    return {n: dims.get(n, {}) for n in names}


def _named_plan(value: Sequence, names: list[str], by_name: dict[str, Any]) -> dict[str, dict[int, str]]:
    wanted = [_check_name(s, "in the list") for s in value]
    unknown = [s for s in wanted if s not in CONVENTIONAL]
    if unknown:
        raise DynamicDimsError(
            f"dynamic dim {unknown[0]!r} has no conventional place; the names that do are "
            f"{', '.join(CONVENTIONAL)}. Name another dim per input, e.g. `--dynamic-dims "
            f"{names[0] if names else 'x'}=0:batch,2:{unknown[0]}` on the command line, "
            f"dynamic_dims={{{(names[0] if names else 'x')!r}: {{0: 'batch', 2: {unknown[0]!r}}}}} in Python")
    dims: dict[str, dict[int, str]] = {n: {} for n in names}
    for s in dict.fromkeys(wanted):
        placed = False
        for n, x in by_name.items():
            d = _conventional_dim(s, x)
            if d is not None:
                dims[n][d] = s
                placed = True
        if not placed:
            shapes = ", ".join(f"{n} {_sig(x)}" for n, x in by_name.items())
            raise DynamicDimsError(
                f"dynamic dim {s!r} fits none of the model's inputs ({shapes}): {_WHERE_CONV[s]}. Leave it "
                f"out, or name the dim per input (e.g. `--dynamic-dims {names[0] if names else 'x'}=0:batch,"
                f"1:{s}`; dynamic_dims={{input: {{dim: name}}}} in Python)")
    return {n: dict(sorted(v.items())) for n, v in dims.items()}


def _check_sizes(dims: dict[str, dict[int, str]], by_name: dict[str, Any]) -> None:
    """One name is one size, and a dynamic dim is at least 1 in the example."""
    sizes: dict[str, tuple[int, str]] = {}
    for n, v in dims.items():
        for d, s in v.items():
            size = int(by_name[n].shape[d])
            if s in sizes and sizes[s][0] != size:
                raise DynamicDimsError(f"dynamic dim {s!r} names dims of different sizes in the example: "
                                       f"{sizes[s][1]} is {sizes[s][0]}, dim {d} of {n!r} is {size}; one name is one "
                                       f"size. Give them different names {WHERE}")
            if size == 0:
                raise DynamicDimsError(f"dim {d} of input {n!r} is 0 in the example; a dynamic dim needs an example "
                                       "of size 1 or more")
            sizes.setdefault(s, (size, f"dim {d} of {n!r}"))


def _sig(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


_WHERE_CONV = {"batch": "batch is dim 0 of a tensor input",
               "seq": "seq is dim 1 of an integer input of rank 2+ (token ids) or of a float [batch, seq, features] "
                      "input",
               "height": "height is dim 2 of a float [batch, channels, height, width] input",
               "width": "width is dim 3 of a float [batch, channels, height, width] input"}


# --- the spec on a graph -------------------------------------------------------------------------------------

def graph_dims(graph: Any) -> list[dict[int, str]]:
    """{dim: symbol} of each graph input, from its meta's `sym`; an input without names known gets the old
    default (batch at dim 0), so a hand-built or parsed graph exports as it always did."""
    out = []
    for node in graph.inputs:
        meta = node.meta
        shape = getattr(meta, "shape", None)
        if shape is None:
            out.append({})
        elif meta.sym is None:
            out.append({0: "batch"} if shape else {})
        else:
            out.append({d: s for d, s in enumerate(meta.sym) if s})
    return out


def set_graph_dims(graph: Any, dims: Sequence[Mapping[int, str]]) -> None:
    """Put `dims` (one {dim: symbol} per graph input) on the input metas."""
    for node, d in zip(graph.inputs, dims):
        meta = node.meta
        if hasattr(meta, "shape"):
            node.meta = meta.with_sym(tuple(d.get(i) for i in range(len(meta.shape))))


def symbol_sizes(inputs: Sequence[Any], dims: Sequence[Mapping[int, str]]) -> dict[str, int]:
    """Each symbol's size in `inputs`."""
    out: dict[str, int] = {}
    for x, d in zip(inputs, dims):
        for i, s in d.items():
            if isinstance(x, torch.Tensor) and i < x.dim():
                out.setdefault(s, int(x.shape[i]))
    return out


def _spatial(symbol: str, inputs: Sequence[Any], dims: Sequence[Mapping[int, str]]) -> bool:
    """A symbol on a float input's dims past the channels (images, audio): strided layers downsample it, so
    probes change it by a multiple of 32."""
    return any(s == symbol and i >= 2 and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 3
               for x, d in zip(inputs, dims) for i, s in d.items())


def probe_sizes(inputs: Sequence[Any], dims: Sequence[Mapping[int, str]]) -> tuple[dict[str, int], dict[str, int],
                                                                                    dict[str, int]]:
    """Three sizes per symbol, none equal to another symbol's: two probe runs (batch 2 and 3, another symbol
    at its example size and one step more) and a third for validation. A step is 1 (batch, sequence), or 32
    for spatial dims; pairs that would coincide with another symbol's get a larger step."""
    base = symbol_sizes(inputs, dims)
    first: dict[str, int] = {}
    second: dict[str, int] = {}
    third: dict[str, int] = {}
    taken: set[tuple[int, int]] = set()
    for s, size in base.items():
        step = 32 if _spatial(s, inputs, dims) else 1
        a = 2 if s == "batch" else max(size, 2)
        b = a + step
        while (a, b) in taken:
            b += step
        taken.add((a, b))
        first[s], second[s] = a, b
        third[s] = (1 if size != 1 else 3) if s == "batch" else b + step
    return first, second, third


def step_sizes(inputs: Sequence[Any], dims: Sequence[Mapping[int, str]]) -> dict[str, int]:
    """Each symbol one step past its size in `inputs` (1; 32 for spatial dims): capture's probe run."""
    return {s: n + (32 if _spatial(s, inputs, dims) else 1) for s, n in symbol_sizes(inputs, dims).items()}


def resize(x: Any, sizes: Mapping[int, int]) -> Any:
    """`x` with each dim d resized to sizes[d] by cycling through its entries along d."""
    if not isinstance(x, torch.Tensor):
        return x
    for d, n in sizes.items():
        if d < x.dim() and x.shape[d] > 0 and x.shape[d] != n:
            x = x.index_select(d, torch.arange(n) % x.shape[d])
    return x


def at_sizes(inputs: Sequence[Any], dims: Sequence[Mapping[int, str]], sizes: Mapping[str, int]) -> tuple:
    """The inputs with every symbolic dim at sizes[symbol] (symbols not in `sizes` kept)."""
    return tuple(resize(x, {i: sizes[s] for i, s in d.items() if s in sizes}) for x, d in zip(inputs, dims))


def describe(dims: Sequence[Mapping[int, str]], names: Sequence[str]) -> str:
    """`input_ids[batch, seq], x[batch, 3, height, width]`-like text for messages."""
    parts = [f"{n}: " + ", ".join(f"{i}={s}" for i, s in d.items()) for n, d in zip(names, dims) if d]
    return "; ".join(parts) or "none"


def propagate_symbols(graph: Any, inputs: Sequence[Any], *, only: str | None = None, check: bool = False) -> bool:
    """Name the symbolic dims of every node's meta (`TensorMeta.sym`) from the graph inputs' ones: run the
    graph at two other sizes of each symbol (probe_sizes; on the meta device for a graph over
    ir.analysis.META_MIN_MACS, where it runs there) and name a node's dim after the symbol it equals in every
    run. With `check`, only run (at sizes of symbol `only`, on real tensors) and say whether the graph runs
    there. False when the graph does not run at those sizes (metas are then left as they are)."""
    from slimfx.ir.analysis import ran_on_meta, shapes_on_meta
    from slimfx.ir.graph import TensorMeta
    from slimfx.ir.lower import ir_name, lower

    dims = graph_dims(graph)
    if only is not None:
        dims = [{d: s for d, s in per.items() if s == only} for per in dims]
    if not any(dims):
        if not check:
            for n in graph:
                if isinstance(n.meta, TensorMeta) and n.op != "input":
                    n.meta = n.meta.with_sym((None,) * len(n.meta.shape))
        return True
    first, second, _ = probe_sizes(inputs, dims)
    gm = None
    # naming needs shapes only: a heavy graph runs on the meta device. Whether the graph runs at a size at all
    # (`check`) is asked of real tensors (meta does not check values, e.g. indices past an embedding table).
    meta_gm = None if check else shapes_on_meta(graph)
    runs = []
    for sizes in ((second,) if check else (first, second)):
        rec: dict[str, Any] = {}

        class _Rec(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node, rec: dict[str, Any] = rec) -> Any:
                out = super().run_node(n)
                if isinstance(out, torch.Tensor):
                    rec[ir_name(n)] = tuple(out.shape)
                return out

        run_inputs = at_sizes(inputs, dims, sizes)
        if meta_gm is None or not ran_on_meta(_Rec(meta_gm), run_inputs):
            rec.clear()
            gm = gm or lower(graph).eval()
            try:
                with torch.no_grad():
                    _Rec(gm).run(*run_inputs)
            except Exception:  # noqa: BLE001 - the model fixes one of these sizes: the exporters say where
                return False
        runs.append(rec)
    if check:
        return True
    example = symbol_sizes(inputs, dims)
    for n in graph:
        meta = n.meta
        if n.op == "input" or not isinstance(meta, TensorMeta):
            continue
        a, b = runs[0].get(n.name), runs[1].get(n.name)
        if a is None or b is None or len(a) != len(meta.shape) or len(b) != len(meta.shape):
            n.meta = meta.with_sym(None) if meta.sym is not None else meta
            continue
        names = []
        for d, size in enumerate(meta.shape):
            names.append(next((s for s in first if (first[s], second[s], example[s]) == (a[d], b[d], size)), None))
        n.meta = meta.with_sym(tuple(names))
    return True
