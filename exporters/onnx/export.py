"""IR graph -> ONNX model (in memory with `to_onnx_model`, validated on disk with `export_onnx`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

import slimfx.exporters.onnx.aten  # noqa: F401 - registers the emitters of ATen ops kept opaque by export capture
import slimfx.exporters.onnx.emitters  # noqa: F401 - registers the emitters
from slimfx.exporters._common import (
    ExportResult,
    as_tuple,
    atomic_path,
    example_inputs,
    onnx_tolerance,
    raise_if_invalid,
    runs_integer_kernels,
    validation_sets,
)
from slimfx.exporters.onnx.context import EMITTERS, EmitContext, onnx_dtype, probe
from slimfx.exporters.onnx.rewrites import rewrite
from slimfx.ir.errors import ExportError
from slimfx.ir.graph import Graph, Node, Param, TensorMeta, iter_refs
from slimfx.ir.symdims import describe, graph_dims, symbol_sizes

DEFAULT_OPSET = 17
EXAMPLE_SIZES_PROP = "slimfx.example_sizes"  # metadata_props key: {symbol: size in the example}
MIN_OPSET, MAX_OPSET = 17, 23


def _output_names(outputs: Any) -> list[str]:
    """ONNX names of the flattened outputs, after the model's own: a dict's keys (`logits` of a transformers
    ModelOutput; `aux_0`, `aux_1` for a tuple under key `aux`), else `output` / `output_0`, `output_1`..."""
    keyed: list[str | None] = []

    def walk(v: Any, path: list[str], keys: bool) -> None:
        if isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                walk(x, [*path, str(i)], keys)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, [*path, str(k)], True)
        elif isinstance(v, (Node, Param)):  # the leaves graph inputs/outputs flatten to (iter_refs)
            keyed.append("_".join(path) if keys else None)

    walk(outputs, [], False)
    n = len(keyed)
    names = [k if k else ("output" if n == 1 else f"output_{i}") for i, k in enumerate(keyed)]
    seen: set[str] = set()
    for i, name in enumerate(names):  # never two outputs of one name (a key `output_1` beside a position)
        while names[i] in seen:
            names[i] = f"{name}_{i}" if names[i] == name else names[i] + "_"
        seen.add(names[i])
    return names


def _value_info(ctx: EmitContext, name: str, node: Node) -> onnx.ValueInfoProto:
    meta = node.meta
    if not isinstance(meta, TensorMeta):
        raise ExportError(f"graph output %{node.name} ({node.op}, {node.where()}) is not a tensor; ONNX "
                          "outputs must be tensors")
    dyn = ctx.dynamic_dims(node)
    dims: list[Any] = []
    for i, (s, d) in enumerate(zip(meta.shape, dyn)):
        if not d:
            dims.append(s)
        else:
            dims.append(ctx.symbol_of(node, i) or f"{name}_dim{i}")
    return helper.make_tensor_value_info(name, onnx_dtype(meta.dtype), dims)


def _rename(ctx: EmitContext, old: str, new: str) -> None:
    for n in ctx.nodes:
        for seq in (n.input, n.output):
            for i, v in enumerate(seq):
                if v == old:
                    seq[i] = new


def _dead_code(ctx: EmitContext, outputs: list[str]) -> None:
    """Drop nodes and initializers nothing reaches from the outputs (unused shape chains, folded aliases)."""
    live = set(outputs)
    kept = []
    for n in reversed(ctx.nodes):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(i for i in n.input if i)
    ctx.nodes = kept[::-1]
    ctx.initializers = {k: v for k, v in ctx.initializers.items() if k in live}


def export_dims(graph: Graph, dynamic_batch: bool = True) -> list[dict[int, str]]:
    """The symbolic dims an export keeps: the graph inputs' (`TensorMeta.sym`, see ir.symdims), without
    batch for a fixed batch."""
    dims = graph_dims(graph)
    return dims if dynamic_batch else [{d: s for d, s in per.items() if s != "batch"} for per in dims]


def needed_opset(graph: Graph) -> int:
    """The lowest opset (at least DEFAULT_OPSET) that can express `graph`: 21 for 4-bit weights (ONNX INT4)
    and blocked weight scales (DequantizeLinear's block_size), and for 4-bit codes in matmul_nbits' folded
    form (ONNX INT4)."""
    if any(n.op == "dequantize" and ((n.attrs.get("bits") or 8) <= 4 or n.attrs.get("block_size"))
           or n.op == "matmul_nbits" and n.attrs.get("form") == "folded" and int(n.attrs["bits"]) <= 4
           for n in graph):
        return max(DEFAULT_OPSET, 21)
    return DEFAULT_OPSET


def to_onnx_model(graph: Graph, *, dynamic_batch: bool = True, opset: int | None = None,
                  inputs: Any = None, check: bool = True) -> onnx.ModelProto:
    """Emit `graph` as an ONNX model (no file). Raises ExportError naming any node it cannot express.

    Every symbolic dim of the graph inputs (batch, seq, ...: their metas' `sym`) is a dim_param of that
    name; `dynamic_batch=False` fixes the batch. `inputs` (example inputs; default: random ones from the
    input metas) are run at other sizes of those dims to learn which inner dims follow them. `opset` None:
    DEFAULT_OPSET, or the lowest the graph needs (`needed_opset`).
    """
    opset = needed_opset(graph) if opset is None else opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    inputs = as_tuple(inputs) if inputs is not None else example_inputs(graph)
    dims_spec = export_dims(graph, dynamic_batch)
    probes = probe(graph, inputs, dims_spec) if graph.inputs and any(dims_spec) else None
    ctx = EmitContext(graph, opset=opset, probes=probes)

    out_nodes = list(iter_refs(graph.outputs))
    if not out_nodes or not all(isinstance(o, Node) for o in out_nodes):
        raise ExportError(f"graph {graph.name} returns {graph.outputs!r}; ONNX outputs must be tensors")
    out_names = _output_names(graph.outputs)
    in_names: list[str] = []
    for node in graph.inputs:
        in_names.append(ctx.reserve(node.name) if node.name not in out_names else ctx.fresh(node.name))
    for name in out_names:
        ctx.reserve(name)
    for node, name in zip(graph.inputs, in_names):
        ctx.bind(node, name)

    for node in graph:
        if node.op in ("input", "output"):
            continue
        if node.meta is None:
            if node.op == "opaque" and node.attrs.get("kind") == "call_module":
                raise ExportError(ctx.unsupported_message(node))  # a module never computes a shape value
            continue  # a shape value (size, shape, arithmetic on them): evaluated on demand by ctx.sym
        fn = EMITTERS.get(node.op)
        if fn is None:
            raise ExportError(ctx.unsupported_message(node))
        ctx.current = node
        ctx.bind(node, fn(ctx, node))
    ctx.current = None

    renamed: dict[str, str] = {}
    produced = {o for n in ctx.nodes for o in n.output}
    for node, name in zip(out_nodes, out_names):
        src = ctx._env.get(node)
        if src is None:
            src = ctx.value(node)
        if isinstance(src, list):
            raise ExportError(f"graph output %{node.name} is a tuple of tensors; return its items instead")
        if src in produced and src not in renamed:
            _rename(ctx, src, name)
            renamed[src] = name
        else:
            ctx.emit("Identity", [renamed.get(src, src)], outputs=[name], name=name)
    ctx.nodes, ctx.initializers = rewrite(ctx.nodes, ctx.initializers, set(out_names), ctx.opset)
    _dead_code(ctx, out_names)

    graph_inputs = []
    for node, name, per in zip(graph.inputs, in_names, dims_spec):
        meta = node.tensor_meta
        dims: list[Any] = [per.get(i, s) for i, s in enumerate(meta.shape)]
        graph_inputs.append(helper.make_tensor_value_info(name, onnx_dtype(meta.dtype), dims))
    graph_outputs = [_value_info(ctx, name, node) for node, name in zip(out_nodes, out_names)]
    g = helper.make_graph(ctx.nodes, graph.name or "graph", graph_inputs, graph_outputs,
                          initializer=list(ctx.initializers.values()))
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(g, opset_imports=opsets + [helper.make_opsetid(d, 1) for d in sorted(ctx.domains)],
                              producer_name="slimfx", producer_version="0.1.0")
    model.ir_version = helper.find_min_ir_version_for(opsets)
    if probes is not None:  # the example's size of each symbolic dim: what `slimfx bench` runs a `seq` at
        helper.set_model_props(model, {EXAMPLE_SIZES_PROP: json.dumps(symbol_sizes(inputs, dims_spec))})
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise ExportError(f"the emitted ONNX model of {graph.name} fails onnx.checker: {e}. This is a bug "
                              "in an emitter; please report it with the graph (print(graph)).") from e
    return model


def export_onnx(graph: Graph, path: str | os.PathLike, *, dynamic_batch: bool = True, opset: int | None = None,
                validate: bool = True, inputs: Any = None, atol: float | None = None, rtol: float | None = None,
                keep_invalid: bool = False) -> ExportResult:
    """Emit `graph` to an ONNX file, check it, and compare onnxruntime with the IR's lowering (within atol +
    rtol x |reference|; default `onnx_tolerance`: float32's, looser for a graph onnxruntime runs with integer
    kernels).

    The file appears only when complete and valid: it is written to a temporary name and renamed;
    on an emitter error or a ValidationError nothing is left (unless `keep_invalid`). With
    symbolic dims (batch, seq, ...; `dynamic_batch=False` fixes the batch), validation runs at the inputs' sizes
    and at other sizes of every symbolic dim.
    """
    from slimfx.exporters.validate import validate_onnx

    t0 = time.perf_counter()
    inputs = as_tuple(inputs) if inputs is not None else example_inputs(graph)
    opset = needed_opset(graph) if opset is None else opset
    model = to_onnx_model(graph, dynamic_batch=dynamic_batch, opset=opset, inputs=inputs)
    t_emit = time.perf_counter() - t0
    data = model.SerializeToString()
    report = None
    path = Path(path)
    with atomic_path(path, keep_on_error=keep_invalid) as tmp:
        tmp.write_bytes(data)
        if validate:
            atol, rtol = onnx_tolerance(graph, atol, rtol)
            report = validate_onnx(data, graph, validation_sets(inputs, dims=export_dims(graph, dynamic_batch)),
                                   atol=atol, rtol=rtol)
            raise_if_invalid(report, f"the ONNX export of {graph.name}", keep_invalid, runs_integer_kernels(graph))
    return ExportResult(path=path, validation=report, seconds=time.perf_counter() - t0, format="onnx",
                        size_bytes=len(data), details={"opset": opset, "dynamic_batch": dynamic_batch,
                                                       "dynamic_dims": describe(export_dims(graph, dynamic_batch),
                                                                                [n.name for n in graph.inputs]),
                                                       "emit_seconds": t_emit, "nodes": len(model.graph.node)})
