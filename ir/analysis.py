"""Analyses: functions of the graph (params, MACs, shape propagation), never state kept on it."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from slimfx.ir.graph import Graph, Node, Param, TensorMeta, meta_of
from slimfx.ir.metrics import SHAPE_RULE, named_leaves
from slimfx.ir.ops import OPS, trait


def count_params(graph: Graph, *, include_buffers: bool = False) -> int:
    """Number of elements in the params table that are read by some node (trainable ones by default); a tied
    param (one tensor under two names, Graph.param_aliases) counts once."""
    return sum(_params_by_node(graph, include_buffers=include_buffers).values())


def _params_by_node(graph: Graph, *, include_buffers: bool = False) -> dict[Node, int]:
    """The elements count_params counts, each given to the first node reading it (a tied param once), so
    the per-node numbers (node_table) add up to the total. The stored weights of a quantized layer (integer
    buffers read where an op's `stored_weights` trait says: codes, int8 weights and tables, int32 biases) are
    parameters; their scales and zero points are not."""
    alias = graph.param_aliases()
    stored = set()
    for n in graph:
        op = OPS.get(n.op)
        for i in op.stored_weights if op is not None else ():
            t = graph.params.get(n.inputs[i].name) if i < len(n.inputs) and isinstance(n.inputs[i], Param) else None
            if t is not None and not t.is_floating_point():
                stored.add(alias.get(n.inputs[i].name, n.inputs[i].name))
    seen: set[str] = set()
    out: dict[Node, int] = {}
    for n in graph:
        for p in n.params():
            k = alias.get(p.name, p.name)
            if k in seen or k not in graph.params:
                continue
            seen.add(k)
            if include_buffers or k not in graph.buffers or k in stored:
                out[n] = out.get(n, 0) + graph.params[k].numel()
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def node_macs(node: Node) -> int:
    """Multiply-accumulates of one node on the example input shapes (0 for ops that do none)."""
    op = OPS.get(node.op)
    if op is None or node.meta is None:
        return 0
    if op.macs is not None:
        return op.macs(node)
    m = node.meta
    if op.weighted is not None and hasattr(m, "shape"):
        # y = x ⊛ W: each output element sums over W's input channels (per group) x kernel
        wmeta = _param_shape(node, node.inputs[1])
        return _numel(m.shape) * _numel(wmeta[1:]) if wmeta is not None else 0
    return 0


def _param_shape(node: Node, ref: Any) -> tuple[int, ...] | None:
    from slimfx.ir.graph import Param

    if isinstance(ref, Param) and node.graph is not None and ref.name in node.graph.params:
        return tuple(node.graph.params[ref.name].shape)
    if isinstance(ref, Node) and hasattr(ref.meta, "shape"):
        return ref.meta.shape
    return None


def is_depthwise(graph: Graph, node: Node) -> bool:
    """A grouped layer with one input and one output channel per group (MobileNet's, ConvNeXt's 7x7)."""
    op = OPS.get(node.op)
    layer = op.weighted if op is not None else None
    if layer is None or not layer.grouped or layer.transposed:
        return False
    w, groups = _param_shape(node, node.inputs[1]), node.attrs.get("groups", 1)
    return w is not None and groups > 1 and w[1] == 1 and groups == w[0]


def count_macs(graph: Graph) -> int:
    """Total multiply-accumulates at the example input shapes."""
    return sum(node_macs(n) for n in graph)


def output_class_dims(graph: Graph) -> dict[str, int | str | None]:
    """Where each output of the graph (named as ir.metrics.named_leaves names them) holds class scores, for
    top-1 agreement, when the graph tells: an output computed channels-first (a conv, or a pool, norm,
    activation, softmax or residual add after one), with at least 3 dims, is dense prediction: dim 1 when
    it has more than one channel (segmentation logits per pixel, scores per frame), None with one (a mask, a
    waveform). Other outputs get SHAPE_RULE (ir.metrics: [batch, classes], [batch, tokens, classes])."""
    dims: dict[str, int | str | None] = {}
    for name, ref in named_leaves(graph.outputs):
        shape = ref.meta.shape if isinstance(ref, Node) and isinstance(ref.meta, TensorMeta) else None
        if shape is None or len(shape) < 3 or not ref.meta.dtype.is_floating_point:
            dims[name] = SHAPE_RULE
            continue
        n = ref
        while trait(n.op, "channels") in ("same", "reduce", "broadcast"):
            same = [r for r in n.inputs if isinstance(r, Node) and isinstance(r.meta, TensorMeta)
                    and r.meta.shape == n.meta.shape]
            if not same:
                break
            n = same[0]
        weighted = trait(n.op, "weighted")
        channels_first = (weighted is not None and weighted.channel_dim == 1) or trait(n.op, "channels") == "spatial"
        dims[name] = (1 if shape[1] > 1 else None) if channels_first else SHAPE_RULE
    return dims


def propagate_shapes(graph: Graph, *inputs: torch.Tensor) -> Graph:
    """Run the graph on `inputs` and refresh every node's TensorMeta (and the inputs' metas), keeping the
    names of symbolic dims (`TensorMeta.sym`)."""
    from slimfx.ir.lower import ir_name, lower

    gm = lower(graph)
    gm.eval()
    by_name = {n.name: n for n in graph}
    values: dict[str, Any] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[ir_name(n)] = out
            return out

    with torch.no_grad():
        _Rec(gm).run(*inputs)
    for name, v in values.items():
        node = by_name.get(name)
        if node is not None and node.op != "output":
            node.meta = _keep_sym(node.meta, meta_of(v))
    return graph


def _keep_sym(old: Any, new: Any) -> Any:
    """`new` with the symbolic dim names of `old` (the sizes change, the names stay: ir.symdims)."""
    if isinstance(old, TensorMeta) and isinstance(new, TensorMeta) and old.sym is not None \
            and len(old.shape) == len(new.shape):
        return new.with_sym(old.sym)
    return new


def _int_input_high(graph: Graph, node: Node) -> int:
    """Exclusive upper bound for random integer inputs: the smallest embedding table they index."""
    def rows(table: Any) -> int | None:  # a table param, or one computed (the row scales of an int8 table)
        if isinstance(table, Param):
            return graph.params[table.name].shape[0]
        return table.meta.shape[0] if isinstance(table, Node) and isinstance(table.meta, TensorMeta) else None

    highs = [rows(u.inputs[1]) for u in node.users if u.op == "embedding" and u.inputs[0] is node]
    highs = [h for h in highs if h is not None]
    return min(highs) if highs else 2


# Runs that only need shapes (symbolic-dim naming, the ONNX exporter's probe) run on the meta device when
# the graph is heavier than this: meta costs a few ms per op whatever the sizes, real runs cost arithmetic.
META_MIN_MACS = 100_000_000


def lower_on_meta(graph: Graph) -> fx.GraphModule | None:
    """The graph's lowering (eval mode) with every param on the meta device: it computes shapes without
    arithmetic. None when it cannot be built. `graph` is left as it was."""
    from slimfx.ir.lower import lower

    real = graph.params
    try:
        graph.params = {k: v.to("meta") for k, v in real.items()}
        return lower(graph).eval()
    except Exception:  # noqa: BLE001 - e.g. a param type without meta support: run for real
        return None
    finally:
        graph.params = real


def shapes_on_meta(graph: Graph) -> fx.GraphModule | None:
    """`lower_on_meta(graph)` when the graph is heavy enough (count_macs > META_MIN_MACS) for meta runs to
    cost less than real ones; None otherwise (run for real)."""
    return lower_on_meta(graph) if count_macs(graph) > META_MIN_MACS else None


def ran_on_meta(interp: fx.Interpreter, inputs: tuple) -> bool:
    """Run `interp` (over a `lower_on_meta` module) on meta copies of `inputs`; False when some op needs real
    data (a value read from a tensor, a module with real weights, a kernel without a meta version), and the
    caller runs it for real."""
    try:
        with torch.no_grad():
            interp.run(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs))
    except Exception:  # noqa: BLE001 - not computable on shapes alone: run for real
        return False
    return True


def example_inputs(graph: Graph, *, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs that fit the graph's input metas (batch dim 0 replaced by `batch` when given).

    Float inputs are standard normal; integer inputs are in range for the embeddings they feed.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for node in graph.inputs:
        meta = node.meta
        if not isinstance(meta, TensorMeta):
            raise ValueError(f"graph input %{node.name} has no tensor meta; pass inputs explicitly")
        shape = list(meta.shape)
        if batch is not None and shape:
            shape[0] = batch
        if meta.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(meta.dtype))
        elif meta.dtype == torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        else:
            out.append(torch.randint(0, _int_input_high(graph, node), shape, generator=gen, dtype=meta.dtype))
    return tuple(out)


def node_table(graph: Graph) -> list[dict[str, Any]]:
    """One row a node: name, op, output shape (as the IR text writes it), params, MACs. A node's params are
    those count_params counts that it is the first to read (trainable ones; a tied param once), so the
    column adds up to count_params(graph)."""
    from slimfx.ir.printer import format_meta

    params = _params_by_node(graph)
    rows = []
    for n in graph:
        if n.op in ("output",):
            continue
        rows.append({"name": n.name, "op": n.op, "shape": format_meta(n.meta),
                     "params": params.get(n, 0), "macs": node_macs(n), "module": n.module_path or ""})
    return rows
