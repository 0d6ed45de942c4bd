"""ONNX-level rewrites after emission: byte savings that change how constants are stored, never what they hold.

The emitters map IR nodes to ONNX nodes one to one; what makes a small file is decided here, on the emitted
nodes and initializers, where the bytes are known:

- fold_constant_muls: a Mul of two float32 initializers (e.g. an int32 bias's scale, s_x * s_w, which the
  quantize pass keeps as that product) becomes one stored initializer where that is no bigger than the Mul
  node (a few channels); larger products stay a Mul, which onnxruntime folds when it loads the model.
- compact_int32: an int32 initializer that DequantizeLinear reads (a quantized bias) and whose values fit in
  int16 is stored as int16 and cast back (half the bytes) where that saves more than the Cast node costs; one
  that only Casts to float read (a bias in the foldable dequantize form) is stored as int16 in place.

Both produce constant subgraphs or constants that onnxruntime folds before its QDQ fusion, so
QLinearConv/QGemm fusion and results are unchanged. Float32 products are computed in float32, as onnxruntime
computes them.

One rewrite is for onnxruntime's sake, not the bytes': `transposes_before_dequantize` (opset 21 and later)
moves a Transpose that reads an int8 DequantizeLinear to the integer side (exact: it only moves values).
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper


def rewrite(nodes: list[NodeProto], initializers: dict[str, TensorProto], outputs: set[str], opset: int
            ) -> tuple[list[NodeProto], dict[str, TensorProto]]:
    """Every rewrite of this module, in order; returns the new nodes and initializers (in file order)."""
    nodes, initializers = fold_constant_muls(nodes, initializers, outputs)
    nodes, initializers = compact_int32(nodes, initializers)
    return transposes_before_dequantize(nodes, initializers, opset), initializers


def _node_bytes(op_type: str, inputs: list[str], outputs: list[str], **attrs: object) -> int:
    return helper.make_node(op_type, inputs, outputs, **attrs).ByteSize()


def _insert_after(items: dict[str, TensorProto], anchor: str | None, name: str, value: TensorProto
                  ) -> dict[str, TensorProto]:
    if anchor not in items:
        return {**items, name: value}
    out: dict[str, TensorProto] = {}
    for k, v in items.items():
        out[k] = v
        if k == anchor:
            out[name] = value
    return out


def fold_constant_muls(nodes: list[NodeProto], initializers: dict[str, TensorProto], outputs: set[str]
                       ) -> tuple[list[NodeProto], dict[str, TensorProto]]:
    """Mul(initializer, initializer) in float32 -> one initializer, where it is no bigger than the node. The
    constant is placed after the initializer its first reader takes just before it (its place had the
    emitter stored it there)."""
    kept: list[NodeProto] = []
    for n in nodes:
        ins = list(n.input)
        if n.op_type != "Mul" or len(ins) != 2 or n.output[0] in outputs or not all(
                i in initializers and initializers[i].data_type == TensorProto.FLOAT for i in ins):
            kept.append(n)
            continue
        a, b = (numpy_helper.to_array(initializers[i]) for i in ins)
        product = numpy_helper.from_array(np.multiply(a, b, dtype=np.float32), n.output[0])
        if product.ByteSize() > n.ByteSize():
            kept.append(n)
            continue
        reader = next((m for m in nodes if n.output[0] in m.input), None)
        anchor = None
        if reader is not None:
            before = list(reader.input)[:list(reader.input).index(n.output[0])]
            anchor = next((i for i in reversed(before) if i in initializers), None)
        initializers = _insert_after(initializers, anchor, n.output[0], product)
    return kept, initializers


def transposes_before_dequantize(nodes: list[NodeProto], initializers: dict[str, TensorProto], opset: int
                                 ) -> list[NodeProto]:
    """Transpose(DequantizeLinear(x: int8, scale, zero point)) -> DequantizeLinear(Transpose(x)), the axis of a
    per-channel scale following its dim. From opset 21 onnxruntime's transpose optimizer rewrites the first
    form into a QuantizeLinear whose output_dtype disagrees with its zero point, and the session fails to
    load ("output_dtype INT8 does not match y_zero_point type UINT8"): an int8 lookup table feeding a
    batch_first GRU or a permute did. The integer side needs no such rewrite (and moves a quarter of the
    bytes). Blocked scales stay as they are; the original DequantizeLinear stays for its other readers."""
    if opset < 21:
        return nodes
    dequantized = {n.output[0]: n for n in nodes if n.op_type == "DequantizeLinear" and len(n.input) == 3
                   and n.input[2] in initializers and initializers[n.input[2]].data_type == TensorProto.INT8
                   and not any(a.name == "block_size" for a in n.attribute)}
    if not dequantized:
        return nodes
    out = []
    for n in nodes:
        dq = dequantized.get(n.input[0]) if n.op_type == "Transpose" and n.input else None
        if dq is None:
            out.append(n)
            continue
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        scale = initializers.get(dq.input[1])
        if perm is None or scale is None:  # reversed dims, or a scale computed in the graph: left alone
            out.append(n)
            continue
        if len(scale.dims) == 1 and scale.dims[0] > 1:  # per channel: the axis moves with its dim
            attrs["axis"] = perm.index(attrs.get("axis", 1) % len(perm))
        moved = f"{n.output[0]}_int"
        out.append(helper.make_node("Transpose", [dq.input[0]], [moved], name=moved, perm=perm))
        out.append(helper.make_node("DequantizeLinear", [moved, *dq.input[1:]], list(n.output), name=n.name,
                                    **attrs))
    return out


def compact_int32(nodes: list[NodeProto], initializers: dict[str, TensorProto]
                  ) -> tuple[list[NodeProto], dict[str, TensorProto]]:
    """An int32 initializer read by DequantizeLinear whose values fit int16: stored as `NAME.i16` and cast
    back to NAME just before its first reader (ahead of the nodes that make that reader's other operands)."""
    names = list(dict.fromkeys(n.input[0] for n in nodes if n.op_type == "DequantizeLinear" and n.input
                               and n.input[0] in initializers
                               and initializers[n.input[0]].data_type == TensorProto.INT32))
    initializers = _narrow_float_casts(nodes, initializers)
    for name in names:
        t = numpy_helper.to_array(initializers[name])
        cast = {"to": TensorProto.INT32}
        if t.size == 0 or np.abs(t.astype(np.int64)).max() > np.iinfo(np.int16).max \
                or 2 * t.size <= _node_bytes("Cast", [f"{name}.i16"], [name], **cast) + len(".i16"):
            continue
        small = numpy_helper.from_array(t.astype(np.int16), f"{name}.i16")
        initializers = {(small.name if k == name else k): (small if k == name else v) for k, v in initializers.items()}
        first = next(i for i, n in enumerate(nodes) if name in n.input)
        reads = set(nodes[first].input)
        while first > 0 and set(nodes[first - 1].output) <= reads:
            first -= 1
        nodes = [*nodes[:first], helper.make_node("Cast", [small.name], [name], **cast), *nodes[first:]]
    return nodes, initializers


def _narrow_float_casts(nodes: list[NodeProto], initializers: dict[str, TensorProto]) -> dict[str, TensorProto]:
    """An int32 initializer that only Casts to float32 read (a bias dequantized in the foldable form) and whose
    values fit int16: stored as int16 under its name, which the same Casts read (no node added)."""
    readers: dict[str, list[NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            if i in initializers and initializers[i].data_type == TensorProto.INT32:
                readers.setdefault(i, []).append(n)
    for name, rs in readers.items():
        if not all(r.op_type == "Cast" and r.attribute[0].i == TensorProto.FLOAT for r in rs):
            continue
        t = numpy_helper.to_array(initializers[name])
        if t.size and np.abs(t.astype(np.int64)).max() <= np.iinfo(np.int16).max:
            initializers = {**initializers, name: numpy_helper.from_array(t.astype(np.int16), name)}
    return initializers


__all__ = ["rewrite", "fold_constant_muls", "compact_int32", "transposes_before_dequantize"]
