"""slimfx's graph IR: capture a torch model into canonical ops, inspect, rewrite, and lower it back."""

from slimfx.ir.analysis import count_macs, count_params, is_depthwise, node_macs, node_table, propagate_shapes
from slimfx.ir.capture import capture, register_converter
from slimfx.ir.compare import graph_diff
from slimfx.ir.errors import CaptureError
from slimfx.ir.graph import Graph, Node, Param, TensorMeta, iter_refs, map_refs
from slimfx.ir.lower import lower
from slimfx.ir.ops import (
    OPS,
    OpDef,
    OpQuery,
    Weighted,
    canonical_weight,
    from_canonical_weight,
    get_op,
    ops_with,
    register_op,
    trait,
)
from slimfx.ir.parser import ParseError, parse
from slimfx.ir.printer import format_graph, format_node
from slimfx.ir.verify import VerifyError, verify

__all__ = [
    "Graph", "Node", "Param", "TensorMeta", "iter_refs", "map_refs",
    "capture", "register_converter", "lower", "verify", "VerifyError", "CaptureError",
    "OPS", "OpDef", "OpQuery", "Weighted", "canonical_weight", "from_canonical_weight", "get_op", "register_op",
    "trait", "ops_with",
    "count_macs", "count_params", "is_depthwise", "node_macs", "node_table", "propagate_shapes",
    "format_graph", "format_node", "parse", "ParseError", "graph_diff",
]
