"""slimfx's graph IR: capture a torch model into canonical ops, inspect, rewrite, and lower it back."""

from ir.analysis import count_macs, count_params, node_macs, node_table, propagate_shapes
from ir.capture import capture
from ir.errors import CaptureError
from ir.graph import Graph, Node, Param, TensorMeta, iter_refs, map_refs
from ir.lower import lower
from ir.ops import OPS, OpDef, get_op, register_op
from ir.printer import format_graph, format_node
from ir.verify import VerifyError, verify

__all__ = [
    "Graph", "Node", "Param", "TensorMeta", "iter_refs", "map_refs",
    "capture", "lower", "verify", "VerifyError", "CaptureError",
    "OPS", "OpDef", "get_op", "register_op",
    "count_macs", "count_params", "node_macs", "node_table", "propagate_shapes",
    "format_graph", "format_node",
]
