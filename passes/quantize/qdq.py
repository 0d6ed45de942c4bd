"""Planning and inserting quantize/dequantize nodes; folding weights into integer params.

Placement follows what onnxruntime fuses into integer kernels: every activation
that a quantized op reads goes through quantize→dequantize, weights are integer
params followed by dequantize (per output channel), biases are int32 with
scale s_x * s_w. A conv always ends in a quantize node (op trait `quant_output`:
QLinearConv exists only with integer output), also before a float op such as
SiLU or LayerNorm; a linear/matmul ends in one when a quantized op reads it
(QGemm and MatMulIntegerToFloat also write float). A ReLU/ReLU6 before a
quantize with zero point at the bottom of the range is absorbed by onnxruntime.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from dataclasses import dataclass, field

import torch

from slimfx.ir import Graph, Node, Param, TensorMeta, canonical_weight, ops_with, trait
from slimfx.ir.errors import PassError
from slimfx.passes.graph_utils import erase_dead, runs_in_training
from slimfx.passes.quantize.observers import QRANGE, SCALE_FLOOR, QParams
from slimfx.passes.rewrite import Match, call
from slimfx.passes.rules import Rule, RuleSet, apply_rules

# The quantize pass's view of the op table: each op's `quant` trait (ir/ops.py), read at each use, so an op
# registered with a trait is treated like the built-in ones.
# conv/linear: integer weight per output channel, input quantized, int32 bias
WEIGHT_OPS = ops_with(quant="weight")
# ops whose activation operands are quantized whenever the op is (integer kernels exist for them)
ACT_OPS = ops_with(quant="operands")
# ops that get an integer kernel only when their output is quantized too (QLinearAdd, QLinearAveragePool, ...)
OUTPUT_QUANT_OPS = ops_with(quant="output")
# data-movement ops: a quantized value passes through unchanged, so they share their input's params
TRANSPARENT_OPS = ops_with(quant="transparent")
# activations that a following quantize with zero point at the range's bottom absorbs
CLIPPING_ACTS = ops_with(quant="clipping")
# integer lookup tables (embedding)
TABLE_OPS = ops_with(quant="table")

def matches(node: Node, patterns: list[str]) -> bool:
    """True when a skip pattern names the node, its op, or its module path (fnmatch globs)."""
    for p in patterns:
        if node.op == p or fnmatch.fnmatchcase(node.name, p) or (
                node.module_path and fnmatch.fnmatchcase(node.module_path, p)):
            return True
    return False


# every op the quantize pass may quantize (what a skip entry can usefully name)
QUANTIZABLE_OPS = WEIGHT_OPS | ACT_OPS | OUTPUT_QUANT_OPS | TABLE_OPS


def check_skip(graph: Graph, patterns: list[str], *, pass_name: str = "quantize", option: str = "skip") -> str | None:
    """What is wrong with the skip entries for `graph` (None when every entry names something to keep float).

    An entry must match a node name or module path (fnmatch) of an op the pass quantizes, or be the name of
    such an op (an op name is fine on a model that has no such op: recipes are shared between models).
    """
    from slimfx.ir import OPS

    quantizable = [n for n in graph if n.op in QUANTIZABLE_OPS]
    for p in patterns:
        if p in OPS:
            if p in QUANTIZABLE_OPS:
                continue
            return (f"pass '{pass_name}': {option} entry {p!r} is an op the pass never quantizes (it stays float "
                    f"anyway); the pass quantizes {', '.join(sorted(QUANTIZABLE_OPS))}: name those ops, or "
                    "layers by node name or module path")
        hits = [n for n in graph if matches(n, [p])]
        if any(n.op in QUANTIZABLE_OPS for n in hits):
            continue
        names = list(dict.fromkeys([x for n in quantizable for x in (n.module_path, n.name) if x]))
        if hits:
            ops = sorted({n.op for n in hits})
            return (f"pass '{pass_name}': {option} entry {p!r} matches only {len(hits)} {'/'.join(ops)} node(s), "
                    f"which the pass never quantizes; name the layers to keep float, e.g. "
                    f"{', '.join(names[:8]) or '(the graph has none)'}")
        candidates = {c.lower(): c for c in [*sorted(QUANTIZABLE_OPS), *[n.name for n in graph], *names]}
        close = [candidates[c] for c in difflib.get_close_matches(p.lower(), list(candidates), n=5, cutoff=0.5)]
        glob = f" ({p}.* matches every op under a module)" if any(x.startswith(p + ".") for x in names) else ""
        return (f"pass '{pass_name}': {option} entry {p!r} matches no node name, op or module path of the graph; "
                f"{'close: ' + ', '.join(close) if close else 'layers are e.g. ' + (', '.join(names[:8]) or '(none)')}"
                f"{glob} (entries are node names, op names or module paths; fnmatch globs such as 'layer1.*')")
    return None


def is_float_tensor(n: object) -> bool:
    return isinstance(n, Node) and isinstance(n.meta, TensorMeta) and n.meta.dtype.is_floating_point


@dataclass
class Plan:
    """What to quantize: weight ops, activation ops, and the tensors that get quantize→dequantize."""

    weight_ops: list[Node] = field(default_factory=list)
    act_ops: list[Node] = field(default_factory=list)
    # tensor node name -> name of the node whose observed range gives its params (itself or the start of
    # a chain of transparent ops)
    tensors: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(self.tensors.values()))


def layer_weight(n: Node, w: torch.Tensor) -> torch.Tensor:
    """`n`'s weight `w` as [out, in/groups, k...] (ir.canonical_weight): row i holds output channel i's fan-in,
    also for a transposed layer, whose own weight is [in, out/groups, k...]."""
    layer = trait(n.op, "weighted")
    if layer is None:
        return w
    return canonical_weight(w, layer, int(n.attrs.get("groups", 1)) if layer.grouped else 1)


def weight_axis(n: Node) -> int | None:
    """The axis of `n`'s weight that holds its output channels (per-channel scales go along it); None when no
    single axis does: a grouped conv_transpose ([in, out/groups, k...]) is quantized per tensor."""
    layer = trait(n.op, "weighted")
    if layer is None or not layer.transposed:
        return 0
    return layer.out_axis if not layer.grouped or int(n.attrs.get("groups", 1)) == 1 else None


def through_noops(n: object) -> object:
    """Walk back through identity and inference-mode dropout: they vanish on export, so a quantize→dequantize
    belongs on their input (one pair, not a second one after the no-op)."""
    while isinstance(n, Node) and n.inputs and isinstance(n.inputs[0], Node) and (
            n.op == "identity" or (n.op == "dropout" and not runs_in_training(n))):
        n = n.inputs[0]
    return n


def _range_source(n: Node) -> Node:
    """Walk back through data-movement ops to the tensor whose range a transparent chain shares."""
    while n.op in TRANSPARENT_OPS and n.inputs and is_float_tensor(n.inputs[0]):
        n = n.inputs[0]
    return n


def _after_clipping(n: Node) -> Node:
    """The value a node's output becomes after a sole-user relu/relu6 (what gets quantized)."""
    while len(n.users) == 1:
        u = next(iter(n.users))
        if u.op in CLIPPING_ACTS or u.op in TRANSPARENT_OPS:
            n = u
        else:
            break
    return n


def clipped(n: Node) -> Node:
    """The value a node's output becomes after sole-user relu/relu6 ops (no data movement): where the
    quantize goes that onnxruntime fuses with the op before it (ReluQuantFusion, ClipQuantFusion)."""
    while len(n.users) == 1 and next(iter(n.users)).op in CLIPPING_ACTS:
        n = next(iter(n.users))
    return n


def make_plan(graph: Graph, *, skip: list[str], only: set[str] | None = None,
              weight_only: bool = False) -> Plan:
    """Choose the ops to quantize and the activation tensors that need quantize→dequantize."""
    plan = Plan()
    for n in graph:
        if n.op in WEIGHT_OPS and len(n.inputs) >= 2 and isinstance(n.inputs[1], Param) \
                and graph.params[n.inputs[1].name].is_floating_point():
            chosen = plan.weight_ops
        elif n.op in ACT_OPS and not weight_only:
            chosen = plan.act_ops
        else:
            continue
        if (only is not None and n.name not in only) or matches(n, skip):
            plan.skipped.append(n.name)
            continue
        chosen.append(n)
    if weight_only:
        return plan
    wanted: dict[str, Node] = {}

    def want(t: object) -> bool:
        t = through_noops(t)
        if not is_float_tensor(t) or t.name in wanted:  # type: ignore[union-attr]
            return False
        wanted[t.name] = t  # type: ignore[union-attr]
        return True

    for n in plan.weight_ops:
        want(n.inputs[0])
        # an integer kernel that writes integers (QLinearConv) needs the quantize right after it, even
        # when the next op stays float (SiLU, GELU, LayerNorm): else onnxruntime runs the conv in float
        if trait(n.op, "quant_output"):
            want(clipped(n))
    for n in plan.act_ops:
        for a in n.inputs[:2]:
            want(a)
    # add / average pooling: quantized when their (clipped) output is, which may cascade backwards
    changed = True
    while changed:
        changed = False
        for n in graph:
            if n.op not in OUTPUT_QUANT_OPS or matches(n, skip) or (only is not None and n.name not in only):
                continue
            out = through_noops(_after_clipping(n))
            if out.name not in wanted:
                continue
            ins = [a for a in n.inputs if is_float_tensor(a)]
            if trait(n.op, "elementwise") == 2 and len(ins) != 2:  # QLinearAdd/Mul: two activations
                continue
            for a in ins:
                changed |= want(a)
    for name, t in wanted.items():
        plan.tensors[name] = _range_source(t).name
        if plan.tensors[name] != name:
            src = plan.tensors[name]
            plan.tensors.setdefault(src, src)
    return plan


def _silu(x):
    return call("silu", x)


def _mul_sigmoid(x):
    return call("mul", x, call("sigmoid", x))


@functools.cache
def expand_rules() -> RuleSet:
    """Ops onnxruntime has no integer kernel for, written as ops it has: silu(x) = x * sigmoid(x)
    (QLinearSigmoid, QLinearMul). The ONNX file of a float silu is Sigmoid + Mul either way."""
    return RuleSet([Rule(_silu, _mul_sigmoid, name="silu")])


def expand_for_integer_kernels(graph: Graph) -> int:
    """Rewrite `graph` with `expand_rules`; the number of ops expanded."""
    return sum(apply_rules(graph, expand_rules()).values())


# --- graph edits --------------------------------------------------------------------------------------

def _safe(name: str) -> str:
    return name.replace(".", "_")


# Suffixes of the params the pass creates: `<name>_s` (scale), `<name>_z` (zero point), `<weight>_q` (integer
# values). Short because every name is stored twice in an ONNX file (initializer and node input), which
# adds up to several percent of a small int8 model.
SCALE, ZERO_POINT, QUANTIZED = "_s", "_z", "_q"


def add_qparams(graph: Graph, base: str, qp: QParams) -> tuple[Param, Param]:
    s = graph.add_param(f"{base}{SCALE}", qp.scale.to(torch.float32), buffer=True)
    return s, zero_point_param(graph, base, qp.zero_point)


def zero_point_param(graph: Graph, base: str, zp: torch.Tensor) -> Param:
    """The zero point as a param; all-zero ones (symmetric weights, post-ReLU activations) are one shared
    param per dtype and shape (`zero_<dtype>[_<n>]`), stored once instead of once per tensor."""
    if zp.any():
        return graph.add_param(f"{base}{ZERO_POINT}", zp, buffer=True)
    name = "zero_" + str(zp.dtype).removeprefix("torch.") + "".join(f"_{d}" for d in zp.shape)
    have = graph.params.get(name)
    if have is not None and have.dtype == zp.dtype and have.shape == zp.shape and not have.any():
        return Param(name)
    return graph.add_param(name, zp.clone(), buffer=True)


def insert_qdq(graph: Graph, t: Node, qp: QParams, users: list[Node] | None = None) -> Node:
    """Insert quantize→dequantize after `t`; `users` (default: all) read the dequantized value."""
    users = list(t.users) if users is None else users
    anchor = t
    if t.op == "input":
        anchor = graph.inputs[-1]
    s, z = add_qparams(graph, _safe(t.name), qp)
    attrs = {"dtype": qp.dtype, "axis": qp.axis}
    q = graph.create_node("quantize", (t, s, z), attrs, name=f"{t.name}_q", after=anchor,
                          meta=TensorMeta(t.meta.shape, qp.dtype), module_path=t.module_path)
    dq = graph.create_node("dequantize", (q, s, z), {"axis": qp.axis}, name=f"{t.name}_dq", after=q,
                           meta=TensorMeta(t.meta.shape, torch.float32), module_path=t.module_path)
    for u in users:
        if u is not q:
            u.replace_input(t, dq)
    return dq


def blocked_qparams(w: torch.Tensor, block: int, qmax: int) -> QParams:
    """Symmetric int8 params for a weight [out, in/groups, k...] with one scale per `block` consecutive input
    channels of each output channel and kernel position (ONNX blocked quantization along axis 1: the scale is
    [out, ceil(in / block), k...]); the last block may be shorter."""
    cin = w.shape[1]
    blocks = -(-cin // block)
    padded = torch.nn.functional.pad(w.abs().movedim(1, -1), (0, blocks * block - cin)).movedim(-1, 1)
    amax = padded.reshape(w.shape[0], blocks, block, *w.shape[2:]).amax(dim=2)
    scale = (amax / qmax).clamp(min=SCALE_FLOOR).to(torch.float32)
    return QParams(scale, torch.zeros(scale.shape, dtype=torch.int8), torch.int8, 1, block)


def quantize_tensor(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer values of `x` under `qp` (ONNX QuantizeLinear semantics)."""
    from slimfx.ir.ops import _quantize

    return _quantize(x, qp.scale, qp.zero_point, dtype=qp.dtype, axis=qp.axis, block_size=qp.block_size)


def fold_weight(graph: Graph, node: Node, index: int, qp: QParams, qmin: int | None = None,
                qmax: int | None = None, values: torch.Tensor | None = None, bits: int | None = None) -> Node:
    """Replace param operand `index` of `node` by dequantize(integer param): the weight is stored as
    integers, so nothing recomputes its quantization at run time. `bits` 4 (values in [-8, 7]): the
    dequantize says the integers are stored in 4 bits (ONNX INT4)."""
    ref = node.inputs[index]
    assert isinstance(ref, Param)
    w = graph.params[ref.name]
    if values is None:
        values = quantize_tensor(w, qp)
        if qmin is not None or qmax is not None:
            values = values.clamp(qmin, qmax)
    s, z = add_qparams(graph, ref.name, qp)
    qref = graph.add_param(f"{ref.name}{QUANTIZED}", values.to(qp.dtype), buffer=True)
    attrs = {"axis": qp.axis, **({"block_size": qp.block_size} if qp.block_size else {}),
             **({"bits": 4} if bits is not None and bits <= 4 else {})}
    if "bits" in attrs and not (-8 <= int(values.min()) and int(values.max()) <= 7):  # pragma: no cover
        raise PassError(f"quantize: {bits}-bit values of @{ref.name} outside [-8, 7]")
    dq = graph.create_node("dequantize", (qref, s, z), attrs, name=f"{node.name}_{_role(index)}_dq",
                           before=node, meta=TensorMeta(tuple(w.shape), torch.float32),
                           module_path=node.module_path)
    ins = list(node.inputs)
    ins[index] = dq
    node.inputs = tuple(ins)
    return dq


def quantizable_embeddings(graph: Graph, *, skip: list[str], only: set[str] | None = None,
                           tied_heads: bool = False) -> list[Node]:
    """Embedding lookups whose float table no other op reads, under any of its names (Graph.param_aliases: a
    tied table stays float here, an int8 copy next to the float one would grow the file); with `tied_heads`,
    also tables linears read as their weight (LM heads, for a pass that stores such a table once for both)."""
    users, alias = graph.param_users(tied=True), graph.param_aliases()

    def head(u: Node, table: str) -> bool:  # a linear whose weight is the table
        return tied_heads and u.op == "linear" and isinstance(u.inputs[1], Param) and alias[u.inputs[1].name] == table

    out = []
    for n in graph:
        if n.op not in TABLE_OPS or len(n.inputs) < 2 or not isinstance(n.inputs[1], Param) \
                or n.attrs.get("max_norm") is not None:
            continue
        w = n.inputs[1]
        readers_ok = all(u.op in TABLE_OPS or head(u, alias[w.name]) for u in users[w.name])
        if not graph.params[w.name].is_floating_point() or not readers_ok:
            continue
        if (only is not None and n.name not in only) or matches(n, skip):
            continue
        out.append(n)
    return out


def tables_to_store(graph: Graph, plan: Plan, *, skip: list[str], only: set[str] | None = None) -> list[Node]:
    """The lookups whose tables quantize stores as int8: untied tables, and a table tied to LM heads when the plan
    gives every such head int8 weights of its own (two int8 copies are half one float table; a head left float
    keeps the table float, which serves both)."""
    planned = {n.name for n in plan.weight_ops}
    users, alias = graph.param_users(tied=True), graph.param_aliases()
    return [n for n in quantizable_embeddings(graph, skip=skip, only=only, tied_heads=True)
            if all(u.op != "linear" or u.name in planned for u in users[alias[n.inputs[1].name]])]


def tied_heads(graph: Graph, lookups: list[Node]) -> dict[str, Node]:
    """For each lookup whose table a linear also reads as its weight (an LM head, under any of the table's
    names: Graph.param_aliases), the first such linear. Read before quantize folds the heads' weights."""
    users, alias = graph.param_users(tied=True), graph.param_aliases()
    heads = {n.name: next((u for u in users[alias[n.inputs[1].name]] if u.op == "linear"), None) for n in lookups}
    return {k: h for k, h in heads.items() if h is not None}


def lookup_head_codes(graph: Graph, node: Node, head: Node) -> Node | None:
    """Look the rows of a table tied to an LM head up in the head's own integer weight, so the file stores the
    table once: `head`'s weight is then `dequantize(@codes, @scale, @zero_point)`, one scale for the tensor or one
    per output channel, which is one per row of the table. The rows are dequantized with that scale, or with the
    scales of the rows looked up (ONNX: Gather of the int8 codes and of the row scales, Cast, Mul). None, and the
    graph unchanged, when the codes cannot serve as the table (blocked, below 8 bits, another layout, per-row
    zero points that are not all 0)."""
    w = head.inputs[1]
    if not (isinstance(w, Node) and w.op == "dequantize" and isinstance(w.inputs[0], Param)
            and not w.attrs.get("block_size") and (w.attrs.get("bits") or 8) == 8 and w.attrs.get("axis") in (None, 0)):
        return None
    codes, scale, zero_point = w.inputs[:3]
    table = graph.params[node.inputs[1].name]
    if graph.params[codes.name].shape != table.shape or not isinstance(scale, Param) or not isinstance(
            zero_point, Param) or (w.attrs.get("axis") == 0 and graph.params[zero_point.name].any()):
        return None
    users, ids, meta = list(node.users), node.inputs[0], node.meta
    node.inputs = (ids, codes)
    node.meta = TensorMeta(tuple(meta.shape), graph.params[codes.name].dtype)
    float_rows = TensorMeta(tuple(meta.shape), meta.dtype)
    if w.attrs.get("axis") is None:
        out = graph.create_node("dequantize", (node, scale, zero_point), {"axis": None}, name=f"{node.name}_dq",
                                after=node, meta=float_rows, module_path=node.module_path)
    else:
        col = graph.create_node("unsqueeze", (scale,), {"dim": 1}, name=f"{node.name}_scale_table", after=node,
                                meta=TensorMeta((table.shape[0], 1), torch.float32), module_path=node.module_path)
        row_scale = graph.create_node("embedding", (ids, col), {}, name=f"{node.name}_row_scale", after=col,
                                      meta=TensorMeta((*meta.shape[:-1], 1), torch.float32),
                                      module_path=node.module_path)
        rows = graph.create_node("cast", (node,), {"dtype": torch.float32}, name=f"{node.name}_float",
                                 after=row_scale, meta=float_rows, module_path=node.module_path)
        out = graph.create_node("mul", (rows, row_scale), {}, name=f"{node.name}_dq", after=rows, meta=float_rows,
                                module_path=node.module_path)
    for u in users:
        u.replace_input(node, out)
    return out


def quantize_embedding(graph: Graph, node: Node, qp: QParams) -> Node:
    """Look up rows of an integer table and dequantize the rows (ONNX: Gather on an int8 initializer, then
    DequantizeLinear), so the table is stored as int8. `qp` must be per tensor: the gathered rows share it."""
    ref = node.inputs[1]
    assert isinstance(ref, Param) and qp.axis is None
    values = quantize_tensor(graph.params[ref.name], qp)
    s, z = add_qparams(graph, ref.name, qp)
    qref = graph.add_param(f"{ref.name}{QUANTIZED}", values.to(qp.dtype), buffer=True)
    users = list(node.users)
    ins = list(node.inputs)
    ins[1] = qref
    node.inputs = tuple(ins)
    meta = node.meta
    node.meta = TensorMeta(tuple(meta.shape), qp.dtype)
    dq = graph.create_node("dequantize", (node, s, z), {"axis": None}, name=f"{node.name}_dq", after=node,
                           meta=TensorMeta(tuple(meta.shape), meta.dtype), module_path=node.module_path)
    for u in users:
        u.replace_input(node, dq)
    return dq


def _role(index: int) -> str:
    return {1: "weight", 2: "bias"}.get(index, f"arg{index}")


def bias_limit(fan_in: int) -> int:
    """The largest |int32 bias| an integer kernel can add to its accumulator without overflow: the int32
    sum of `fan_in` products of 8-bit values (each |(x - zp) * w| < 2^15) needs the rest of the range."""
    return QRANGE[torch.int32][1] - min(fan_in * 2 ** 15, 2 ** 30)


def bias_scale(s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """The int32 bias scale s_x * s_w, in float32 as integer kernels (and the ONNX emitter) compute it."""
    return (s_x * s_w).to(torch.float32)


def fit_bias(qp: QParams, s_x: torch.Tensor, bias: torch.Tensor, fan_in: int, *,
             pow2: bool = False) -> tuple[QParams, list[int]]:
    """Weight params under which the int32 bias round(b / (s_x * s_w)) is exact.

    The bias scale is input scale x weight scale. When a weight row is all zero (its scale is tiny) or
    the layer's input was constantly 0 (s_x tiny), b / (s_x * s_w) is beyond int32 and the bias would
    saturate (a bias of 3.0 became 4.4e-5). For each such output channel (also where s_x * s_w is not a
    normal float32), raise that channel's weight scale until the bias is about half of `bias_limit`:
    the bias is then stored to 1 part in 2^29 (float32 keeps 2^24). The channel's weights, now on a
    coarser grid, change its output by at most fan_in x |bias| x 2^-21 over the input's calibrated
    range (an all-zero row: not at all), because the bias is 2^29 steps of s_x * s_w and an input is at
    most 255 steps of s_x. A per-tensor scale (fixed-point: a power of two) is raised for the whole
    tensor. Returns the params and the channels whose scale was raised.
    """
    limit = bias_limit(fan_in)
    sx = float(s_x)
    b = bias.detach().double().abs().reshape(-1)
    s_w = qp.scale.double().reshape(-1) if qp.scale.dim() else qp.scale.double().expand(b.numel())
    scale = bias_scale(s_x, s_w.float()).double()
    bad = (scale < SCALE_FLOOR) | (b > limit * scale)
    if not bool(bad.any()):
        return qp, []
    need = torch.maximum(b / (sx * (limit // 2)), torch.full_like(b, 2 * SCALE_FLOOR / sx))
    if qp.scale.dim():
        new = torch.where(bad, torch.maximum(s_w, need), s_w)
    else:
        new = torch.maximum(s_w.max(), need[bad].max()).reshape(())
    if pow2:
        new = 2.0 ** torch.ceil(torch.log2(new))
    new = new.to(torch.float32)
    if not bool(torch.isfinite(new * 128).all()):
        raise PassError(f"the int32 bias cannot be kept exact: |bias| up to {float(b.max()):.3g} with an input "
                        f"scale of {sx:.3g} needs a weight scale beyond float32")
    return QParams(new, qp.zero_point, qp.dtype, qp.axis), bad.nonzero().flatten().tolist()


def fold_bias(graph: Graph, node: Node, s_x: torch.Tensor, s_w: torch.Tensor, axis: int | None, *,
              factors: tuple[Param, Param] | None = None) -> Node | None:
    """Bias as int32 with scale s_x * s_w and zero point 0 (what integer kernels add to the accumulator).

    With `factors` (the input's and the weight's scale params), the scale is that product in the IR, a
    `mul` of the two (a constant subgraph), so what it is stays known to exporters (ONNX: a Mul of the two
    initializers, which exporters/onnx/rewrites.py folds where a stored vector is smaller).
    Fails closed: a bias that does not fit int32 (or a scale that is not a normal float32) is a PassError,
    never a silently saturated value; `fit_bias` chooses weight params under which it fits."""
    if len(node.inputs) < 3 or not isinstance(node.inputs[2], Param):
        return None
    b = graph.params[node.inputs[2].name]
    scale = bias_scale(s_x, s_w).reshape(-1) if s_w.dim() else bias_scale(s_x, s_w)
    if scale.dim() == 1 and scale.numel() == 1 and b.numel() > 1:
        scale = scale.expand(b.numel()).clone()
    lo, hi = QRANGE[torch.int32]
    exact = torch.round(b.double() / scale.double())
    if not bool((scale >= SCALE_FLOOR).all()) or not bool(((exact >= lo) & (exact <= hi)).all()):
        raise PassError(f"quantize: the bias of %{node.name} does not fit int32 at scale input x weight "
                        f"(|bias| up to {float(b.abs().max()):.3g}, scale down to {float(scale.min()):.3g}); "
                        f"keep the layer float with skip = [{node.name!r}]")
    qp = QParams(scale, torch.zeros_like(scale, dtype=torch.int32), torch.int32, 0 if scale.dim() else None)
    dq = fold_weight(graph, node, 2, qp, values=exact.to(torch.int32))
    if factors is not None and graph.params[factors[0].name].dim() == 0 \
            and tuple(graph.params[factors[1].name].shape) == tuple(scale.shape):
        stored = dq.inputs[1]
        product = graph.create_node("mul", factors, name=stored.name, before=dq, meta=TensorMeta.of(scale),
                                    module_path=node.module_path)
        dq.inputs = (dq.inputs[0], product, *dq.inputs[2:])
        del graph.params[stored.name]
        graph.buffers.discard(stored.name)
    return dq


def scale_value(graph: Graph, scale: object) -> torch.Tensor:
    """The value of a dequantize's scale operand: a param, or the product of two (an int32 bias's s_x * s_w)."""
    if isinstance(scale, Param):
        return graph.params[scale.name]
    if isinstance(scale, Node) and scale.op == "mul" and all(isinstance(f, Param) for f in scale.inputs):
        return bias_scale(*(graph.params[f.name] for f in scale.inputs))
    raise PassError(f"quantize: the scale of a dequantize is {scale!r}, neither a param nor a product of two")


def _requantize(q, s, z, s2, z2, axis=None, dtype=None):
    return call("quantize", call("dequantize", q, s, z, axis=axis), s2, z2, dtype=dtype, axis=axis)


def _same_grid(m: Match) -> bool:
    """The round trip is exact: same scale and zero point (by value), same dtype as the source."""
    q, graph = m["q"], m.graph
    return (isinstance(q, Node) and isinstance(q.meta, TensorMeta) and q.meta.dtype == m["dtype"]
            and _same_param(graph, m["s"], m["s2"]) and _same_param(graph, m["z"], m["z2"]))


@functools.cache
def requantize_rules() -> RuleSet:
    """quantize(dequantize(q, s, z), s, z) -> q; the dequantize stays while other ops read it."""
    return RuleSet([Rule(_requantize, lambda q: q, _same_grid, name="collapse-requantize", exclusive=False)])


def collapse_requantize(graph: Graph) -> int:
    """quantize(dequantize(q, s, z)) with the same s, z and dtype is q itself: drop the round trip.
    Params the round trips read stay (quantize sweeps unused params right after)."""
    return apply_rules(graph, requantize_rules(), drop_params=False)["collapse-requantize"]


def _same_param(graph: Graph, a: object, b: object) -> bool:
    if isinstance(a, Param) and isinstance(b, Param):
        ta, tb = graph.params[a.name], graph.params[b.name]
        return ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)
    return a is b


def weight_only(graph: Graph, through: str | None = None) -> int:
    """Drop the activations' quantize -> dequantize pairs of a quantized graph, keeping its integer weights
    and biases (dequantized from their stored integers): the same stored model, computed in float. What a
    storage scheme (fixed-point, sign) falls back to where onnxruntime's integer kernels are slower than float:
    the ONNX exporter writes such weights' dequantize in a form onnxruntime folds at load (see
    `exporters.onnx.emitters.dequantize_runs_in_float`), so the file stays small and runs at float speed.
    `through` (a layer's name): only the pairs read by nodes up to that layer, in graph order: a float prefix,
    the layers up to `through` computed in float and the activations quantized again where it ends.
    Returns how many activation quantizations were removed."""
    unalign_input_channels(graph)
    order = {n.name: i for i, n in enumerate(graph)}
    end = order[through] if through is not None else len(order)
    removed = 0
    for n in list(graph):
        q = n.inputs[0] if n.op == "dequantize" and n.inputs else None
        if isinstance(q, Node) and q.op == "quantize" and isinstance(q.inputs[0], Node) \
                and all(order[u.name] <= end for u in n.users):
            graph.replace_all_uses(n, q.inputs[0])
            removed += 1
    erase_dead(graph, graph.nodes)
    graph.remove_unused_params()
    return removed


#: onnxruntime's symmetric int8 conv on x86 (MLAS `MlasConvSymPackWSize`, AVX2/AVX-512): used for a conv with
#: int8 weights of zero point 0 only when its input channels are a multiple of 4 and its output channels a
#: multiple of 8 and at least 16; other convs run im2col and a general int8 GEMM, about twice the float
#: conv's time for a 3-channel stem (resnet20's 43.7 vs 21.9 us at batch 1; benchmarks/results/int8_profile.md)
SYM_CONV_IN_ALIGN, SYM_CONV_OUT_ALIGN, SYM_CONV_OUT_MIN = 4, 8, 16


def align_input_channels(graph: Graph) -> dict[str, str]:
    """Pad with zero channels the float model input a quantized conv reads, and its int8 weights with zero
    input channels, up to SYM_CONV_IN_ALIGN (a 3-channel image stem becomes 4 channels): onnxruntime then runs
    the conv in its symmetric int8 kernel instead of im2col + GEMM. The output is the same, bit for bit: the
    extra channel quantizes to the zero point (0 after dequantize) and meets zero weights. Only convs (groups 1,
    symmetric per-channel int8 weights, output channels the kernel takes) whose input quantize reads a model
    input, and is read by nothing else, and only where the padding adds at most a third (3 -> 4, 6 -> 8);
    returns {conv: "3 -> 4 input channels"}. The quantize pass runs it last, after its speed guard: the guard's
    candidates (`weight_only`, float prefixes) are built from the unpadded graph."""
    done: dict[str, str] = {}
    for n in list(graph):
        if n.op != "conv2d" or int(n.attrs.get("groups", 1)) != 1 or len(n.inputs) < 2:
            continue
        dq, wdq = n.inputs[0], n.inputs[1]
        if not (isinstance(dq, Node) and dq.op == "dequantize" and len(dq.users) == 1
                and isinstance(dq.inputs[0], Node) and dq.inputs[0].op == "quantize" and len(dq.inputs[0].users) == 1
                and isinstance(dq.inputs[0].inputs[0], Node) and dq.inputs[0].inputs[0].op == "input"):
            continue
        if not (isinstance(wdq, Node) and wdq.op == "dequantize" and isinstance(wdq.inputs[0], Param)
                and len(wdq.users) == 1):
            continue
        q, x = dq.inputs[0], dq.inputs[0].inputs[0]
        # a per-channel activation has no single fill value; int8 activations (fixed-point) read through a
        # Pad were not fused into QLinearConv by onnxruntime 1.32 (uint8 ones are)
        if q.attrs.get("axis") is not None or q.attrs.get("dtype") != torch.uint8:
            continue
        w = graph.params[wdq.inputs[0].name]
        zp = wdq.inputs[2] if len(wdq.inputs) > 2 else None
        if w.dtype != torch.int8 or w.dim() != 4 or (isinstance(zp, Param) and graph.params[zp.name].any()):
            continue
        cout, cin = w.shape[:2]
        extra = -cin % SYM_CONV_IN_ALIGN
        # at most a third more input (3 -> 4): a 1-channel 8x8 input padded to 4 (digits_cnn) made batch 1 slower
        if not extra or 3 * extra > cin or cout < SYM_CONV_OUT_MIN or cout % SYM_CONV_OUT_ALIGN \
                or x.meta.shape[1] != cin:
            continue
        shape = (x.meta.shape[0], cin + extra, *x.meta.shape[2:])
        zp_in = q.inputs[2] if len(q.inputs) > 2 else None
        fill = float(graph.params[zp_in.name].flatten()[0]) if isinstance(zp_in, Param) else 0.0
        # on the integers (a quarter of the float input's bytes), filled with the zero point: dequantized, 0
        pad = graph.create_node("pad", (q,), {"pad": (0, 0) * (len(shape) - 2) + (0, extra), "mode": "constant",
                                              "value": fill or None}, name=f"{x.name}_pad", after=q,
                                meta=TensorMeta(shape, q.meta.dtype, x.meta.sym), module_path=n.module_path)
        dq.replace_input(q, pad)
        dq.meta = TensorMeta(shape, dq.meta.dtype, x.meta.sym)
        padded = torch.cat([w, w.new_zeros(cout, extra, *w.shape[2:])], dim=1)
        wdq.replace_input(wdq.inputs[0], graph.add_param(f"{wdq.inputs[0].name}{cin + extra}", padded, buffer=True))
        wdq.meta = TensorMeta(tuple(padded.shape), wdq.meta.dtype)
        done[n.name] = f"{cin} -> {cin + extra} input channels"
    if done:
        graph.remove_unused_params()
    return done


def unalign_input_channels(graph: Graph) -> int:
    """Undo `align_input_channels` (the zero channels of a padded model input and of its conv's int8 weights),
    for a graph computed in float again (`weight_only`): a float conv gains nothing from them. Returns how many
    convs it restored."""
    undone = 0
    for p in list(graph):
        q = p.inputs[0] if p.op == "pad" and p.inputs else None
        if not (isinstance(q, Node) and q.op == "quantize" and p.users
                and all(u.op == "dequantize" for u in p.users)):
            continue
        extra = int(p.attrs["pad"][-1])
        convs = [c for dq in p.users for c in dq.users]
        if not all(c.op == "conv2d" and isinstance(c.inputs[1], Node) and c.inputs[1].op == "dequantize"
                   and isinstance(c.inputs[1].inputs[0], Param) for c in convs):
            continue
        for c in convs:
            wdq = c.inputs[1]
            w = graph.params[wdq.inputs[0].name]
            sliced = w[:, :w.shape[1] - extra].clone()
            wdq.replace_input(wdq.inputs[0], graph.add_param(wdq.inputs[0].name, sliced, buffer=True))
            wdq.meta = TensorMeta(tuple(sliced.shape), wdq.meta.dtype)
        for dq in list(p.users):
            dq.replace_input(p, q)
            dq.meta = TensorMeta(q.meta.shape, dq.meta.dtype, q.meta.sym)
        graph.erase(p)
        undone += 1
    if undone:
        graph.remove_unused_params()
    return undone
