"""Feature taps: intermediate activations made extra graph outputs (a graph rewrite, not forward hooks).

A feature is named by IR node name (`layer3_2_relu2`) or by module path (`layer3`, `layer3.2`): a module
path means the value the module returns, i.e. the last node (in graph order) inside that module.
Hooks would be dropped by TorchScript and break under torch.compile; extra outputs lower and export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from slimfx import ir
from slimfx.ir import Graph, Node
from slimfx.ir.errors import PassError


def as_graph(model: nn.Module | Graph, example_inputs: tuple) -> Graph:
    """The model as an ir.Graph: captured when it is an nn.Module, itself when already a graph."""
    if isinstance(model, Graph):
        return model
    if not isinstance(model, nn.Module):
        raise PassError(f"expected an nn.Module or ir.Graph, got {type(model).__name__}")
    return ir.capture(model, tuple(example_inputs))


def _in_module(node: Node, path: str) -> bool:
    mp = node.module_path or ""
    return mp == path or mp.startswith(path + ".")


def resolve_feature(graph: Graph, name: str, *, role: str = "model") -> Node:
    """The node that a feature name denotes: an IR node name, else the output of a module path."""
    if graph.has_node(name):
        node = graph.node(name)
    else:
        inside = [n for n in graph if n.op not in ("input", "output") and _in_module(n, name)]
        if not inside:
            paths = sorted({n.module_path for n in graph if n.module_path})
            shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
            raise PassError(f"{role} feature {name!r} is neither a node name nor a module path of the graph; "
                            f"module paths include: {shown}")
        node = inside[-1]
    if not isinstance(node.meta, ir.TensorMeta):
        raise PassError(f"{role} feature {name!r} (%{node.name}, {node.op}) is not a single tensor: {node.meta!r}")
    return node


def with_features(graph: Graph, names: Sequence[str], *, role: str = "model") -> Graph:
    """A copy of `graph` whose outputs are `(original_outputs, feature_1, ..., feature_n)`."""
    if not names:
        return graph.copy()
    g = graph.copy()
    feats = [resolve_feature(g, n, role=role) for n in names]
    g.set_outputs((g.outputs, *feats))
    return g


def check_pairs(student: Graph, teacher: Graph, pairs: Sequence[tuple[str, str]]) -> list[tuple[Node, Node]]:
    """Resolve (student_name, teacher_name) pairs and check their shapes can be compared by attention maps.

    Batch and spatial sizes must agree (channels may differ); a mismatch raises naming the pair.
    """
    out = []
    for s_name, t_name in pairs:
        s = resolve_feature(student, s_name, role="student")
        t = resolve_feature(teacher, t_name, role="teacher")
        ss, ts = s.tensor_meta.shape, t.tensor_meta.shape
        if len(ss) < 3 or len(ts) < 3:
            raise PassError(f"feature pair ({s_name!r}, {t_name!r}): attention transfer needs feature maps "
                            f"[B, C, H, W]; got student {list(ss)} and teacher {list(ts)}")
        if ss[2:] != ts[2:]:
            raise PassError(f"feature pair ({s_name!r}, {t_name!r}) does not match in spatial size: student "
                            f"%{s.name} is {list(ss)}, teacher %{t.name} is {list(ts)}; pair layers with the "
                            "same H x W (e.g. the ends of corresponding stages)")
        out.append((s, t))
    return out


def stage_ends(graph: Graph) -> dict[tuple[int, ...], Node]:
    """The last node (graph order) of each spatial size: {(H, W): node} over float feature maps [B, C, H, W...].

    These are the ends of the network's stages (the value handed to the next resolution). Graph inputs and
    1 x 1 maps (after global pooling: an attention map of one pixel carries nothing) are left out.
    """
    ends: dict[tuple[int, ...], Node] = {}
    for n in graph:
        meta = n.meta
        if n.op in ("input", "output") or not isinstance(meta, ir.TensorMeta) or len(meta.shape) < 3:
            continue
        if not meta.dtype.is_floating_point or math.prod(meta.shape[2:]) <= 1:
            continue
        size = tuple(meta.shape[2:])
        ends.pop(size, None)  # re-inserted: the dict keeps the order in which the stages end
        ends[size] = n
    return ends


def computed_sizes(graph: Graph) -> set[tuple[int, ...]]:
    """The spatial sizes (H, W...) at which a weighted layer (conv: `ir.trait(op, "weighted")`) writes a feature map.

    A stage end of another size holds a map no layer of the network computes at that size: the previous stage,
    pooled (digits_cnn's 2x2 map is its 4x4 stage max-pooled).
    """
    return {tuple(n.meta.shape[2:]) for n in graph
            if ir.trait(n.op, "weighted") and isinstance(n.meta, ir.TensorMeta) and len(n.meta.shape) >= 3}


def auto_pairs(student: Graph, teacher: Graph) -> list[tuple[str, str]]:
    """Attention-transfer pairs chosen by spatial size: for every H x W that both networks have, the student's
    last feature map of that size with the teacher's (node names, in the order the stages end), when the two maps
    mean the same: both networks compute at that size (`computed_sizes`), or neither does (both maps are an
    earlier stage pooled). A pooled map is never paired with a computed one: a one-stage student's pooled 8x8
    map paired with a teacher's third conv stage at 4x4 cost accuracy (docs/distillation.md, round 4)."""
    s_ends, t_ends = stage_ends(student), stage_ends(teacher)
    shared = [size for size in s_ends if size in t_ends]
    s_comp, t_comp = computed_sizes(student), computed_sizes(teacher)
    pairs = [(s_ends[size].name, t_ends[size].name) for size in shared if (size in s_comp) == (size in t_comp)]
    if not pairs:
        def sizes(ends) -> str:
            return ", ".join("x".join(map(str, k)) for k in ends) or "none"
        what = (f"feature maps of the same spatial size in the student (sizes {sizes(s_ends)}) and the teacher "
                f"(sizes {sizes(t_ends)})") if not shared else (
            f"feature maps of the same spatial size and kind: at the sizes both have ({sizes(shared)}) one network "
            f"computes (a conv writes maps of sizes {sizes(sorted(s_comp & set(shared)))} in the student, "
            f"{sizes(sorted(t_comp & set(shared)))} in the teacher) where the other only pools an earlier stage")
        raise PassError(f"attention transfer found no {what}; name pairs yourself (features / --features "
                        "student_feature:teacher_feature), or use a logit loss (kd, logit-std) without attention "
                        "transfer")
    return pairs


class LogitsOnly(nn.Module):
    """Wraps a module whose forward returns (logits, *features) so callers that want logits get them."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.module(*args)
        return out[0] if isinstance(out, (tuple, list)) else out
