"""The emission context: ONNX nodes and initializers being built, names, and shape knowledge.

Emitters (one per canonical op, registered with `register_emitter`) read IR operands through
the context and add ONNX nodes to it. Shape values (`size`, `shape`, integer arithmetic on
them) are evaluated symbolically: a value that does not depend on a symbolic dim (batch, seq, ...) is
folded to a Python constant, and only the others become Shape/Gather/Concat subgraphs. Which dims depend
on the symbolic ones is learnt by running the graph at two sizes of each (`probe`).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from slimfx.ir.analysis import ran_on_meta as _ran
from slimfx.ir.analysis import shapes_on_meta
from slimfx.ir.errors import ExportError
from slimfx.ir.graph import Graph, Node, Param, TensorMeta
from slimfx.ir.lower import ir_name
from slimfx.ir.ops import SCALAR_FNS, trait
from slimfx.ir.symdims import at_sizes, describe, graph_dims, probe_sizes, symbol_sizes

Emitter = Callable[["EmitContext", Node], Any]
EMITTERS: dict[str, Emitter] = {}


def register_emitter(*ops: str) -> Callable[[Emitter], Emitter]:
    """Register `fn(ctx, node) -> onnx name | list of names` as the ONNX emitter of the given ops."""
    def deco(fn: Emitter) -> Emitter:
        for op in ops:
            EMITTERS[op] = fn
        return fn
    return deco


TORCH_TO_ONNX: dict[torch.dtype, int] = {
    torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE, torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
}
TORCH_TO_NUMPY: dict[torch.dtype, Any] = {
    torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.int64: np.int64,
    torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
}


def onnx_dtype(dtype: torch.dtype) -> int:
    try:
        return TORCH_TO_ONNX[dtype]
    except KeyError:
        raise ExportError(f"dtype {dtype} has no ONNX equivalent") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise ExportError("bfloat16 initializers are not supported by the ONNX emitter; cast the graph to float32")
    return t.contiguous().numpy()


@dataclass(frozen=True)
class Dyn:
    """A shape value that depends on a symbolic dim: an ONNX tensor of shape [1] (int64 or float32)."""

    name: str
    dtype: torch.dtype = torch.int64


def is_static(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(is_static(x) for x in v)
    return not isinstance(v, Dyn)


# Python functions on shape values that capture keeps as opaque nodes (x.size(-1) // heads, ...).
_SYM_BINARY: dict[Any, str] = {operator.add: "add", operator.sub: "sub", operator.mul: "mul",
                               operator.floordiv: "floordiv", operator.truediv: "div", operator.mod: "mod",
                               operator.pow: "pow"}
_SYM_STATIC_ONLY = (math.sqrt, math.floor, math.ceil, int, float, operator.neg, abs, max, min)


def _summary(v: Any) -> Any:
    """What the probe keeps of a value: shapes of tensors, the value of anything else."""
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape))
    if isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
        return ("TT", tuple(tuple(x.shape) for x in v))
    if isinstance(v, torch.Size):
        return tuple(v)
    if isinstance(v, (int, float, bool, tuple)):
        return v
    return None


PROBE_BATCHES = (2, 3)

# What a user can do about a batch size the model fixes, from either interface.
FIXED_BATCH_ADVICE = ("compile or export with a fixed batch size: `--fixed-batch` on the command line (slimfx "
                      "compile, slimfx export), dynamic_batch=False in Python (slimfx.compile, export_onnx)")


def probe(graph: Graph, inputs: tuple, dims: list[dict[int, str]] | None = None
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the graph at two sizes of every symbolic dim (`dims`, one {dim: symbol} per input; default: the
    graph inputs' own, see ir.symdims) and record every node's shape (or value) in each run. The sizes of
    each symbol in the two runs are in `probe.sizes` of the result's first dict under "__sizes__"."""
    from slimfx.ir.lower import lower

    dims = graph_dims(graph) if dims is None else dims
    first, second, _ = probe_sizes(inputs, dims)
    gm = lower(graph).eval()

    class _Rec(fx.Interpreter):
        def __init__(self, module: fx.GraphModule, rec: dict[str, Any]):
            super().__init__(module)
            self.rec = rec
            self.current: fx.Node | None = None

        def run_node(self, n: fx.Node) -> Any:
            self.current = n
            out = super().run_node(n)
            self.rec[ir_name(n)] = _summary(out)
            return out

    runs = []
    meta_gm = shapes_on_meta(graph)  # heavy graphs: shapes on the meta device, no arithmetic
    for sizes in (first, second):
        rec: dict[str, Any] = {}
        run_inputs = at_sizes(inputs, dims, sizes)
        if meta_gm is None or not _ran(_Rec(meta_gm, rec), run_inputs):
            rec.clear()
            interp = _Rec(gm, rec)
            try:
                with torch.no_grad():
                    interp.run(*run_inputs)
            except Exception as e:  # noqa: BLE001 - a model that only runs at one batch size
                raise ExportError(_size_message(graph, gm, inputs, dims, sizes, interp.current, e)) from e
        rec["__sizes__"] = dict(sizes)
        runs.append(rec)
    return runs[0], runs[1]


def _size_message(graph: Graph, gm: fx.GraphModule, inputs: tuple, dims: list[dict[int, str]],
                  sizes: dict[str, int], failed: fx.Node | None, error: Exception) -> str:
    """Why the graph does not run at other sizes of its dynamic dims: the node that fails, the dim whose size
    the model fixes there, and what to do about it."""
    first = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    try:
        with torch.no_grad():
            gm(*inputs)
    except Exception as e:  # noqa: BLE001 - the inputs given to the export do not fit the graph at all
        return (f"graph {graph.name} does not run on the inputs given to the export "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass inputs of the shapes "
                "the model was captured with")
    node = None
    if failed is not None:
        try:
            node = graph.node(ir_name(failed))
        except (KeyError, ValueError):
            node = None
    where = f"%{node.name} (op '{node.op}', {node.where()})" if node is not None else \
        (f"%{ir_name(failed)}" if failed is not None else "the graph")
    culprit = _culprit(gm, inputs, dims, sizes)
    example = symbol_sizes(inputs, dims)
    if culprit in (None, "batch"):
        b0 = example.get("batch", "?")
        batch = sizes.get("batch", "?")
        return (f"{graph.name} runs at the example's batch size {b0} but not at batch size {batch}: {where} fails "
                f"({first}). The model fixes its batch size there (a literal batch size in a reshape or view, a "
                "flatten over the batch dimension, or a shape captured for the example's batch). Make that line "
                "follow the batch (x.size(0) or -1), give example inputs with the batch size you deploy (from your "
                f"model factory, or example_inputs= in Python), or {FIXED_BATCH_ADVICE}.")
    names = [n.name for n in graph.inputs]
    kept = [{d: s for d, s in per.items() if s != culprit} for per in dims]
    return (f"{graph.name} runs at the example's {culprit} size {example.get(culprit)} but not at {culprit} size "
            f"{sizes[culprit]}: {where} fails ({first}). The model fixes that size there (a literal size in a "
            f"reshape or view, a table of positions as long as the example). Make that line follow the input's "
            f"size, or keep {culprit!r} fixed: dynamic dims {describe(kept, names)} (`--dynamic-dims "
            f"{_cli_dims(kept, names)}` on the command line, dynamic_dims= in Python).")


def _cli_dims(dims: list[dict[int, str]], names: list[str]) -> str:
    parts = [f"{n}=" + ",".join(f"{i}:{s}" for i, s in d.items()) for n, d in zip(names, dims) if d]
    return ";".join(parts) if parts else "none"


def _culprit(gm: fx.GraphModule, inputs: tuple, dims: list[dict[int, str]], sizes: dict[str, int]) -> str | None:
    """The symbol whose size alone makes the graph fail (batch first), or None."""
    for s in sorted(sizes, key=lambda k: k != "batch"):
        try:
            with torch.no_grad():
                gm(*at_sizes(inputs, dims, {s: sizes[s]}))
        except Exception:  # noqa: BLE001 - this size is one the model fixes
            return s
    return None


class EmitContext:
    """ONNX graph under construction for one IR graph."""

    def __init__(self, graph: Graph, *, opset: int, probes: tuple[dict, dict] | None):
        self.graph = graph
        self.opset = opset
        self.probes = probes
        self.nodes: list[onnx.NodeProto] = []
        self.domains: set[str] = set()  # operator domains besides the default one (com.microsoft)
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._names: set[str] = set()
        self._env: dict[Node, Any] = {}
        self._sym: dict[Node, Any] = {}
        self._const_cache: dict[tuple, str] = {}
        self._param_cache: dict[tuple, str] = {}
        self._shape_cache: dict[tuple, str] = {}
        self.memo: dict[tuple, Any] = {}  # emitters' values built once per graph (e.g. a shared weight dequantized)
        self._counter = 0
        self.current: Node | None = None

    # -- names -----------------------------------------------------------------------------------
    def reserve(self, name: str) -> str:
        if name in self._names:
            raise ExportError(f"ONNX name {name!r} is used twice")
        self._names.add(name)
        return name

    def fresh(self, base: str) -> str:
        base = base or "t"
        name = base
        while name in self._names:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._names.add(name)
        return name

    # -- building --------------------------------------------------------------------------------
    def emit(self, op_type: str, inputs: Sequence[str | None], *, outputs: int | Sequence[str] = 1,
             name: str | None = None, domain: str | None = None, **attrs: Any) -> Any:
        """Add one ONNX node (of `domain`, e.g. onnxruntime's com.microsoft; default: ONNX's own); returns its
        output name (or list of names when several)."""
        # Values are named after the IR node that makes them (a suffix only when one node emits several
        # ONNX ops); ONNX node names are optional and left out: at int8, names are a large part of a file.
        base = name or (self.current.name if self.current is not None else op_type.lower())
        if isinstance(outputs, int):
            outs = [self.fresh(base if outputs == 1 else f"{base}_{i}") for i in range(outputs)]
        else:
            outs = list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        if domain:
            self.domains.add(domain)
        self.nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs], outs, domain=domain,
                                           **attrs))
        return outs[0] if len(outs) == 1 and isinstance(outputs, int) else outs

    def const(self, value: Any, dtype: torch.dtype | np.dtype | type, *, name: str = "const") -> str:
        """An initializer holding `value` (deduplicated for small constants)."""
        npdt = TORCH_TO_NUMPY[dtype] if isinstance(dtype, torch.dtype) else dtype
        arr = np.asarray(value, dtype=npdt)
        key = None
        if arr.size <= 256:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._const_cache:
                return self._const_cache[key]
        nm = self.fresh(name)
        self.initializers[nm] = numpy_helper.from_array(arr, nm)
        if key is not None:
            self._const_cache[key] = nm
        return nm

    def ints(self, values: Sequence[int], *, name: str = "ints") -> str:
        return self.const(list(values), np.int64, name=name)

    def param(self, ref: Param, *, key: str = "", transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
              dtype: torch.dtype | None = None) -> str:
        """The initializer for a graph param (optionally transformed, e.g. transposed), created once."""
        name = self.param_alias.get(ref.name, ref.name)
        cache_key = (name, key, dtype)
        if cache_key in self._param_cache:
            return self._param_cache[cache_key]
        t = self.graph.params[name]
        if transform is not None:
            t = transform(t)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        nm = self.fresh(name + (f".{key}" if key else ""))
        self.initializers[nm] = numpy_helper.from_array(to_numpy(t), nm)
        self._param_cache[cache_key] = nm
        return nm

    def param_tensor(self, ref: Param) -> torch.Tensor:
        return self.graph.params[ref.name]

    @functools.cached_property
    def param_alias(self) -> dict[str, str]:
        """Each param's canonical name (Graph.param_aliases: a tied weight fx capture names twice), so its
        initializer is written once."""
        return self.graph.param_aliases()

    @functools.cached_property
    def shared_params(self) -> frozenset[str]:
        """Params more than one node reads, under any of their names (a token table tied to the LM head):
        emitters that would store a transformed copy read the one initializer through an op instead, which
        onnxruntime folds at load."""
        return frozenset(name for name, users in self.graph.param_users(tied=True).items() if len(users) > 1)

    # -- IR operands -----------------------------------------------------------------------------
    def bind(self, node: Node, value: Any) -> None:
        self._env[node] = value

    def bound(self, node: Node) -> bool:
        return node in self._env

    def value(self, v: Any, *, dtype: torch.dtype | None = None) -> str:
        """ONNX name of an operand: a node's output, a param's initializer, or a scalar constant.

        With `dtype`, tensors of another dtype are cast and constants are made in that dtype.
        """
        if isinstance(v, Node):
            if v in self._env:
                name = self._env[v]
                if isinstance(name, list):
                    raise ExportError(f"%{v.name} ({v.op}) has several outputs; index it with getitem")
                if dtype is not None and isinstance(v.meta, TensorMeta) and v.meta.dtype != dtype:
                    return self.cast(name, dtype)
                return name
            s = self.sym(v)
            return self.sym_tensor(s, dtype or (torch.float32 if isinstance(s, float) else torch.int64))
        if isinstance(v, Param):
            t = self.graph.params[v.name]
            return self.param(v, dtype=dtype if dtype is not None and t.dtype != dtype else None)
        if isinstance(v, Dyn):
            return self.sym_tensor(v, dtype or v.dtype)
        if isinstance(v, torch.Tensor):
            return self.const(to_numpy(v.to(dtype) if dtype is not None else v), v.dtype if dtype is None else dtype)
        if isinstance(v, (bool, int, float)):
            if dtype is None:
                dtype = torch.float32 if isinstance(v, float) else torch.int64
            return self.const(v, dtype)
        raise ExportError(f"operand {v!r} of %{self.current.name if self.current else '?'} cannot be expressed "
                          "as an ONNX tensor")

    def cast(self, name: str, dtype: torch.dtype) -> str:
        return self.emit("Cast", [name], to=onnx_dtype(dtype))

    def meta(self, v: Any) -> TensorMeta:
        """TensorMeta of a node or param operand."""
        if isinstance(v, Node):
            if isinstance(v.meta, TensorMeta):
                return v.meta
            raise ExportError(self.no_meta_message(v))
        if isinstance(v, Param):
            return TensorMeta.of(self.graph.params[v.name])
        if isinstance(v, torch.Tensor):
            return TensorMeta.of(v)
        raise ExportError(f"operand {v!r} is not a tensor")

    def rank(self, v: Any) -> int:
        return len(self.meta(v).shape)

    # -- shape knowledge ---------------------------------------------------------------------------
    def dynamic_dims(self, v: Any, index: int | None = None) -> tuple[bool, ...]:
        """Which dims of a tensor operand change with a symbolic dim (all False when every input dim is fixed)."""
        if not isinstance(v, Node):
            return tuple(False for _ in self.meta(v).shape)
        meta = v.meta if index is None else v.meta[index]
        if self.probes is None:
            return tuple(False for _ in meta.shape)
        a, b = self.probes[0].get(v.name), self.probes[1].get(v.name)
        if a is None or b is None:
            return tuple(False for _ in meta.shape)
        if a[0] == "TT":
            a, b = a[1][index or 0], b[1][index or 0]
        else:
            a, b = a[1], b[1]
        if len(a) != len(b):
            raise ExportError(f"%{v.name} ({v.op}, {v.where()}) changes rank with the batch size, which ONNX "
                              f"cannot express with a dynamic batch; {FIXED_BATCH_ADVICE}")
        return tuple(x != y for x, y in zip(a, b))

    def symbol_of(self, v: Node, dim: int) -> str | None:
        """The symbolic dim (batch, seq, ...) that dim `dim` of `v` is exactly, or None (fixed, or derived
        from one: batch * heads)."""
        if self.probes is None or not isinstance(v, Node):
            return None
        a, b = self.probes[0].get(v.name), self.probes[1].get(v.name)
        if a is None or a[0] != "T":
            return None
        got = (a[1][dim], b[1][dim])
        s0, s1 = self.probes[0]["__sizes__"], self.probes[1]["__sizes__"]
        return next((s for s in s0 if (s0[s], s1[s]) == got), None)

    def is_batch_dim(self, v: Node, dim: int) -> bool:
        """True when dim `dim` of `v` is exactly the batch size (not a multiple of it)."""
        return self.symbol_of(v, dim) == "batch"

    def probe_dims(self, v: Node) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        if self.probes is None or not isinstance(v, Node):
            return None
        a, b = self.probes[0].get(v.name), self.probes[1].get(v.name)
        if a is None or a[0] != "T":
            return None
        return a[1], b[1]

    def dim(self, v: Any, d: int) -> int | Dyn:
        """Dim `d` of a tensor operand: an int when it does not depend on the batch size, else a Dyn."""
        meta = self.meta(v)
        d = d % len(meta.shape)
        if not self.dynamic_dims(v)[d]:
            return meta.shape[d]
        key = (self.value(v), d)
        if key not in self._shape_cache:
            self._shape_cache[key] = self.emit("Shape", [key[0]], start=d, end=d + 1,
                                               name=f"{getattr(v, 'name', 'x')}_dim{d}")
        return Dyn(self._shape_cache[key])

    def shape_of(self, v: Any) -> tuple[int | Dyn, ...]:
        return tuple(self.dim(v, d) for d in range(self.rank(v)))

    def sym_tensor(self, v: Any, dtype: torch.dtype = torch.int64) -> str:
        """A 1-D int64 (or `dtype`) tensor from a static/dynamic scalar or a tuple of them."""
        if isinstance(v, Dyn):
            return v.name if v.dtype == dtype else self.cast(v.name, dtype)
        if isinstance(v, (tuple, list)):
            flat = list(v)
            if is_static(flat):
                return self.const(flat, dtype)
            parts: list[str] = []
            run: list[Any] = []
            for x in flat:
                if isinstance(x, Dyn):
                    if run:
                        parts.append(self.const(run, dtype))
                        run = []
                    parts.append(self.sym_tensor(x, dtype))
                else:
                    run.append(x)
            if run:
                parts.append(self.const(run, dtype))
            return parts[0] if len(parts) == 1 else self.emit("Concat", parts, axis=0)
        if isinstance(v, (bool, int, float)):
            return self.const(v, dtype)
        raise ExportError(f"{v!r} is not a shape value")

    # -- symbolic evaluation of non-tensor nodes ---------------------------------------------------
    def sym(self, v: Any) -> Any:
        """Value of a non-tensor operand: Python constants where static, Dyn where batch-dependent."""
        if isinstance(v, (tuple, list)):
            return type(v)(self.sym(x) for x in v)
        if not isinstance(v, Node):
            return v
        if v in self._sym:
            return self._sym[v]
        saved, self.current = self.current, v
        try:
            val = self._eval_sym(v)
        finally:
            self.current = saved
        self._sym[v] = val
        return val

    def _eval_sym(self, n: Node) -> Any:
        op = n.op
        if op in ("size", "shape"):
            x = n.inputs[0]
            dim = n.attrs.get("dim") if op == "size" else None
            return self.shape_of(x) if dim is None else self.dim(x, dim)
        if op == "getitem":
            base = n.inputs[0]
            if isinstance(base, Node) and isinstance(base.meta, tuple) and base in self._env:
                raise ExportError(f"%{n.name}: getitem of a tensor tuple used as a shape value")
            return self.sym(base)[n.attrs["index"]]
        fn = None
        impl = trait(op, "impl")
        if op == "scalar":  # Python arithmetic on shape values, kept by capture where a dim is dynamic
            fn = SCALAR_FNS.get(n.attrs.get("fn"))
            if fn in (int, float) and len(n.inputs) == 1:
                a = self.sym(n.inputs[0])
                if isinstance(a, Dyn):
                    want = torch.float32 if fn is float else torch.int64
                    return a if a.dtype == want else Dyn(self.cast(a.name, want), want)
        elif impl in _SYM_BINARY or impl is operator.neg:  # canonical ops that are Python's operators: add, ..., neg
            fn = impl
        elif op == "opaque" and n.attrs.get("kind") == "call_function":
            target = n.attrs["target"]
            if target in _SYM_BINARY or target in _SYM_STATIC_ONLY:
                fn = target
        if fn is None or n.attrs.get("kwargs"):
            raise ExportError(self.unsupported_message(n))
        args = [self.sym(a) for a in n.inputs]
        if any(isinstance(a, torch.Tensor) or (isinstance(a, Node)) for a in args):
            raise ExportError(self.unsupported_message(n))
        if is_static(args):
            return fn(*args)
        return self._dyn_arith(n, fn, args)

    def _dyn_arith(self, n: Node, fn: Any, args: list[Any]) -> Dyn:
        name = _SYM_BINARY.get(fn) or ("neg" if fn is operator.neg else None)
        if name == "neg" and len(args) == 1:
            a = args[0]
            return Dyn(self.emit("Neg", [a.name]), a.dtype)
        if name is None or len(args) != 2:
            if fn is math.sqrt and len(args) == 1:
                return Dyn(self.emit("Sqrt", [self.sym_tensor(args[0], torch.float32)]), torch.float32)
            raise ExportError(f"%{n.name} ({n.where()}): {getattr(fn, '__name__', fn)} of a batch-dependent "
                              f"shape value cannot be exported with a dynamic batch; {FIXED_BATCH_ADVICE}")
        is_float = name in ("div", "pow") or any(
            isinstance(a, float) or (isinstance(a, Dyn) and a.dtype.is_floating_point) for a in args)
        dt = torch.float32 if is_float else torch.int64
        a, b = (self.sym_tensor(x, dt) for x in args)
        onnx_op = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "floordiv": "Div", "mod": "Mod",
                   "pow": "Pow"}[name]
        out = self.emit(onnx_op, [a, b], fmod=0 if onnx_op == "Mod" and not is_float else None)
        if name == "floordiv" and is_float:
            out = self.emit("Floor", [out])
        return Dyn(out, dt)

    def no_meta_message(self, v: Node) -> str:
        """A tensor operand without a recorded shape: an opaque op (say which and what to do), else a bug."""
        root = v
        while root.op == "getitem" and isinstance(root.inputs[0], Node):
            root = root.inputs[0]
        if root.op == "opaque":
            return self.unsupported_message(root)
        return (f"%{v.name} ({v.op}, {v.where()}) has no recorded tensor shape. A graph from ir.capture always "
                "has one, so a pass dropped it (passes must set node meta; ir.propagate_shapes(graph, *inputs) "
                "refreshes every shape); please report this with the graph (print(graph)).")

    def unsupported_message(self, n: Node) -> str:
        if n.op == "mask":  # not the model's line: a pass's node, baked in by another pass
            return (f"cannot export %{n.name} (a pruning mask of prune-weights, {n.where()}) to ONNX: an ONNX file "
                    "holds the masked weights, not masks; run materialize-masks after prune-weights (in a recipe: "
                    "[[passes]] name = \"materialize-masks\", as sparse50 does), or export TorchScript instead")
        mod = n.attrs.get("module") if n.op == "opaque" else None
        within = n.attrs.get("within") if n.op == "opaque" else None
        where = n.where() + (f"; part of {within}, which capture decomposed" if within else "")
        if isinstance(mod, torch.nn.Module):
            what = f"%{n.name} ({_module_class(mod)} at {where})"
        else:
            what = f"%{n.name} (op {n.op!r}"
            if n.op == "opaque":
                tgt = n.attrs.get("target")
                what += f", {n.attrs.get('kind')} {getattr(tgt, '__qualname__', None) or tgt}"
            what += f", {where})"
        why = n.attrs.get("why") if n.op == "opaque" else None
        why = f" Capture could not decompose it into canonical ops: {why}." if why else ""
        alternatives = ("or export TorchScript instead (`--format torchscript` on the command line, "
                        "formats=(\"torchscript\",) in slimfx.compile)")
        if isinstance(mod, torch.nn.Module):
            return (f"cannot export {what} to ONNX: slimfx does not support {_module_class(mod)} modules yet "
                    f"(capture keeps them opaque: they run, but have no ONNX form).{why} Replace that module in the "
                    f"model with layers slimfx supports, {alternatives}.")
        # what capture could not follow is the news, not the op list (its line is what to rewrite)
        supported = "" if why else " Supported ops: " + ", ".join(sorted(op for op in EMITTERS if op != "opaque")) + "."
        rewrite = ("Rewrite that line so torch.fx or torch.export can follow it (a branch on tensor values: "
                   "torch.where or torch.cond), " if why else "Rewrite that line of the model so capture sees one "
                   "of these ops, ")
        return (f"cannot export {what} to ONNX: no emitter for this op.{why}{supported} {rewrite}"
                f"{alternatives}; a plugin file (`--plugin my_ops.py`; in Python, any import) can teach slimfx "
                "the op: ir.register_converter maps it onto a canonical op, register_emitter of slimfx's ONNX "
                "exporter adds an emitter.")


def _module_class(mod: torch.nn.Module) -> str:
    cls = type(mod)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else f"{cls.__module__}.{cls.__qualname__}"
