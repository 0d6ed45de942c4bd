"""Channel dependency analysis: which channels of which tensors must be removed together.

Every channel a conv/linear/embedding produces gets an integer *label*. The
analysis walks the graph in order and carries, for each tensor value, a label
tensor of the value's full shape: element `i` holds the label of the channel it
belongs to (0: no prunable channel). Shape ops (reshape, permute, flatten, cat,
split, ...) are simply run on the label tensors, so index offsets, `flatten`
(a channel becomes H*W features) and head splits fall out exactly. Ops that mix
positions *couple* labels (a union-find): residual `add`/`mul` branches,
matmul contractions (q/k per feature, q/k/v per head), grouped convolutions
(a depthwise channel, the same position of every group, or a whole group), channel
dims split over several dims (whole heads, or the same channel of every group). A label united with 0 is *blocked*: graph outputs,
ops the analysis cannot see through (named in `blocked` with the reason), and
features that combine with unprunable values.

How channels flow through each op is looked up by op name: a pruning rule registered with
`register_pruning_rule(op, rule)` (built-in ops register theirs: conv/linear, norms, matmul,
attention, indexing), else the rule for the op's `channels` trait (ir.ops: same, broadcast,
weighted, view, reduce, spatial, block). An op with neither (a user op registered without traits)
stops the channels that reach it, and `blocked` says which op lacks the trait.

Result (`analyze(graph) -> Dependencies`):
- units: classes of labels that are always removed together (a channel, a head, a conv group);
- groups: sets of channel spaces coupled by any unit (what a user calls "a group");
- members: every (param, axis) whose indices follow labels, sliced by `apply`;
- fixups: attrs that change with the channel count (conv groups, reshape sizes, split sizes,
  layer_norm/group_norm shapes, the default attention scale);
- unprunable: each layer none of whose channels can be removed, with the reasons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from slimfx.ir import Graph, Node, Param, TensorMeta, get_op, iter_refs, map_refs, trait

BLOCK = 0

# rule(analyzer, node) -> the labels of the node's output (see `register_pruning_rule`)
PruningRule = Callable[["Analyzer", Node], Any]
PRUNING_RULES: dict[str, PruningRule] = {}


def register_pruning_rule(op: str, rule: PruningRule | None = None) -> Any:
    """Register how channels flow through `op` for structured pruning (like Torch-Pruning's
    customized_pruners); usable as a decorator. It replaces the rule of the op's `channels` trait.

    `rule(an, node)` returns the channel labels of the node's output: a long tensor of the output's shape
    whose element i holds the label of the channel it belongs to (0: none). It reads its operands' labels
    with `an.value(x)` (or `an.channels_at(x, dim, node, what)`: the 1-D labels along one dim), declares
    every param axis that follows channels with `an.member(param, axis, labels, role, node)` (role weight |
    bias | norm | other: what importance criteria read), freezes the others (`an.freeze_params(node)`),
    stops channels it cannot follow with `an.block(labels, node, why)`, couples channels that must go
    together with `an.union_pairs(a, b, node, why)`, starts new channels with `an.new_space(node, size,
    weight)` and fixes attrs after pruning with `an.add_fixup(node, labels, fn)`; `an.opaque(node, why)`
    blocks everything the node reads (and returns all-zero labels). `rule_for(op)` gives the rule in use.
    """
    if rule is None:
        return lambda r: register_pruning_rule(op, r)
    PRUNING_RULES[op] = rule
    return rule


def rule_for(op: str) -> PruningRule | None:
    """The registered rule of `op`, else the rule of its `channels` trait, else None (unknown to pruning)."""
    rule = PRUNING_RULES.get(op)
    if rule is None:
        rule = CHANNEL_FLOW_RULES.get(trait(op, "channels"))
    return rule


def missing_trait_message(op: str) -> str:
    return (f"op '{op}' has no channel trait and no pruning rule, so pruning stops at it: declare how "
            f"channels flow (ir.register_op({op!r}, impl, elementwise=1 | shape_op=True | channels='same', ...)) "
            f"or register a rule (slimfx.passes.prune.register_pruning_rule({op!r}, rule))")


class _UnionFind:
    """Labels joined into units; label 0 (BLOCK) is the class of what cannot be removed.

    `shadow` joins the same labels but never with BLOCK, so that a unit blocked by one of its labels can still
    be traced to the layers it couples (which is how `unprunable` names why a layer kept its channels)."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]
        self.shadow: list[int] = [0]

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.shadow.extend(range(start, start + n))
        return start

    @staticmethod
    def _find(p: list[int], x: int) -> int:
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def find(self, x: int) -> int:
        return self._find(self.parent, x)

    def shadow_find(self, x: int) -> int:
        return self._find(self.shadow, x)

    def union(self, a: int, b: int) -> int:
        if a != BLOCK and b != BLOCK:
            sa, sb = self._find(self.shadow, a), self._find(self.shadow, b)
            if sa != sb:
                self.shadow[max(sa, sb)] = min(sa, sb)
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb == BLOCK or (ra != BLOCK and rb < ra):
            ra, rb = rb, ra  # keep BLOCK (0) and the oldest label as root
        self.parent[rb] = ra
        return ra

    def roots(self) -> torch.Tensor:
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)


@dataclass
class Space:
    """The output channels of one source op (conv/linear out-features, embedding columns)."""

    id: int
    node: str
    module_path: str
    op: str
    start: int  # first label
    size: int
    weight: str | None = None  # param name of the source weight


@dataclass
class Member:
    """One axis of one param whose indices follow channel labels."""

    param: str
    axis: int
    labels: torch.Tensor  # 1-D, size of the axis
    role: str  # weight | bias | norm | other
    node: str


@dataclass
class Group:
    """Channel spaces that shrink together, and the units (channels or heads) they are removed in."""

    id: int
    spaces: list[Space]
    units: list[int]  # prunable unit roots, in label order
    unit_labels: dict[int, list[int]]  # root -> labels of the unit (all spaces)
    channels: int  # channels of the primary space (the first source)
    blocked_channels: int  # channels of the primary space that cannot be removed
    kind: str  # channels | heads | groups

    @property
    def name(self) -> str:
        return self.spaces[0].module_path or self.spaces[0].node

    def sources(self) -> list[str]:
        return [s.module_path or s.node for s in self.spaces]


@dataclass
class Dependencies:
    """What `analyze` found: groups, members to slice, attrs to fix, and where analysis stopped."""

    groups: list[Group]
    members: dict[tuple[str, int], Member]
    fixups: list[tuple]
    blocked: list[dict[str, str]]
    roots: torch.Tensor  # label -> unit root
    spaces: list[Space]
    num_labels: int
    node_of_space: dict[int, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # op -> the trait it lacks (pruning stopped there)
    unprunable: list[dict[str, Any]] = field(default_factory=list)  # layers none of whose channels can go, and why

    def group_of_label(self) -> dict[int, int]:
        return {lab: g.id for g in self.groups for u in g.units for lab in g.unit_labels[u]}

    def report(self) -> list[dict[str, Any]]:
        return [{"group": g.id, "name": g.name, "kind": g.kind, "sources": g.sources(), "channels": g.channels,
                 "units": len(g.units), "blocked_channels": g.blocked_channels} for g in self.groups]


class Analyzer:
    """The channel-label walk; pruning rules (`register_pruning_rule`) call its helpers."""

    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.uf = _UnionFind()
        self.spaces: list[Space] = []
        self.space_of_label: list[int] = [-1]
        self.members: dict[tuple[str, int], Member] = {}
        self.alias = graph.param_aliases()  # a tied weight's names are one member: its readers' channels unite
        self.fixups: list[tuple] = []
        self.blocked: list[dict[str, str]] = []
        self.missing: dict[str, str] = {}  # op -> what it lacks (ops without a channel trait or rule)
        self._blocked_seen: set[tuple[str, int]] = set()
        self._blocked_index: dict[tuple[str, int], int] = {}
        self.block_causes: list[tuple[int, int]] = []  # (label, index into blocked): what blocked each label
        self.split_dims: dict[tuple, tuple[Node, torch.Tensor]] = {}  # channel dims split over several dims
        self.env: dict[Node, Any] = {}
        self.remaining: dict[Node, int] = {}

    # -- labels -----------------------------------------------------------------------------
    def new_space(self, node: Node, size: int, weight: str | None) -> torch.Tensor:
        start = self.uf.add(size)
        sp = Space(len(self.spaces), node.name, node.module_path or "", node.op, start, size, weight)
        self.spaces.append(sp)
        self.space_of_label.extend([sp.id] * size)
        return torch.arange(start, start + size, dtype=torch.long)

    def add_fixup(self, node: Node, labels: torch.Tensor, fn: Callable[[Node, torch.Tensor], None]) -> None:
        """After pruning, call `fn(node, keep)` with `keep` a bool tensor like `labels` (True: channel kept),
        to fix the node's attrs (a channel count, a group count)."""
        self.fixups.append(("call", node.name, labels.clone(), fn))

    def block(self, labels: torch.Tensor | Iterable[int], node: Node, why: str) -> None:
        vals = labels.unique().tolist() if isinstance(labels, torch.Tensor) else list(labels)
        for lab in vals:
            if lab <= 0:
                continue
            if self.uf.find(lab) != BLOCK:
                sp = self.space_of_label[lab]
                key = (node.name, sp)
                if key not in self._blocked_seen:
                    self._blocked_seen.add(key)
                    self._blocked_index[key] = len(self.blocked)
                    self.blocked.append({"node": node.name, "op": node.op, "source": self.spaces[sp].module_path
                                         or self.spaces[sp].node, "why": why})
                self.block_causes.append((lab, self._blocked_index[key]))
            self.uf.union(BLOCK, lab)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor, node: Node, why: str) -> None:
        """Unite labels position by position (a label meeting 0 gets blocked)."""
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        if not len(pairs):
            return
        for x, y in torch.unique(pairs, dim=0).tolist():
            if x == BLOCK or y == BLOCK:
                self.block([x + y], node, why)
            else:
                self.uf.union(x, y)

    def classes(self, t: torch.Tensor) -> torch.Tensor:
        return self.uf.roots()[t]

    def zeros(self, meta: Any) -> Any:
        if isinstance(meta, TensorMeta):
            return torch.zeros(meta.shape, dtype=torch.long)
        if isinstance(meta, tuple) and all(isinstance(m, TensorMeta) for m in meta):
            return tuple(torch.zeros(m.shape, dtype=torch.long) for m in meta)
        return None

    def value(self, v: Any) -> Any:
        """Label tensor (or python value) of an operand."""
        if isinstance(v, Node):
            return self.env.get(v)
        if isinstance(v, Param):
            t = self.g.params[v.name]
            return torch.zeros(t.shape, dtype=torch.long)
        return v

    def member(self, param: Param | str | None, axis: int, labels: torch.Tensor, role: str, node: Node) -> None:
        if param is None:
            return
        name = param.name if isinstance(param, Param) else param
        t = self.g.params[name]
        axis = axis % t.dim()
        if t.shape[axis] != labels.numel():
            self.block(labels, node, f"param @{name} axis {axis} has {t.shape[axis]} entries, "
                                     f"not the {labels.numel()} channels it follows")
            return
        key = (self.alias.get(name, name), axis)
        if key in self.members:
            self.union_pairs(self.members[key].labels, labels, node, f"@{name} is shared")
        else:
            self.members[key] = Member(name, axis, labels.clone(), role, node.name)

    def freeze_params(self, node: Node, skip: Iterable[str] = ()) -> None:
        """Params read in a way the analysis does not model: none of their axes may shrink."""
        for p in node.params():
            if p.name in skip:
                continue
            t = self.g.params[p.name]
            for ax in range(t.dim()):
                self.member(p, ax, torch.zeros(t.shape[ax], dtype=torch.long), "other", node)

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def varying(t: torch.Tensor) -> list[int]:
        return [d for d in range(t.dim()) if t.shape[d] > 1 and not bool((t == t.narrow(d, 0, 1)).all())]

    @staticmethod
    def along(t: torch.Tensor, d: int) -> torch.Tensor:
        """The 1-D labels along dim d (t must be constant along every other dim)."""
        return t.movedim(d, -1).reshape(-1, t.shape[d])[0].clone()

    def channels_at(self, x: Any, dim: int, node: Node, what: str) -> torch.Tensor | None:
        """1-D labels along `dim` of an operand, or None (after blocking) if they vary elsewhere too."""
        t = self.value(x)
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        dim = dim % t.dim()
        var = self.varying(t)
        if any(d != dim for d in var):
            self.block(t, node, f"{what}: channels are not along dim {dim} (they vary along dims {var})")
            return None
        return self.along(t, dim)

    def split_matrix(self, t: torch.Tensor) -> torch.Tensor | None:
        """The labels of a channel dim split over several dims (heads x head_dim, groups x channels), as a matrix:
        rows along the first dim the labels vary along, columns the rest; None when they vary along one dim."""
        if not bool((t > 0).any()):
            return None
        var = self.varying(t)
        if len(var) <= 1:
            return None
        m = t
        for d in reversed(range(t.dim())):
            if d not in var:
                m = m.select(d, 0)
        return m.reshape(m.shape[0], -1)

    def note_split_dims(self, t: torch.Tensor, node: Node) -> None:
        """Removing units of a split channel dim must leave a rectangle: whole rows (heads) or whole columns
        (the same channel of every group). Which one is decided when an op needs it (attention: heads; a slice
        that picks rows: columns) or at the end of the walk (`resolve_split_dims`)."""
        m = self.split_matrix(t)
        if m is not None:
            self.split_dims.setdefault((tuple(m.shape), m.flatten().tolist().__repr__()), (node, m.clone()))

    def merge_split_dims(self, t: torch.Tensor, node: Node, across: int | None = None) -> None:
        """Couple the labels of a split channel dim: `across=None` joins each slice of the outer dim into one
        unit (a head); `across=d` joins the labels at the same position of every slice along dim d (the same
        channel of each group), so the size along d never changes."""
        if not bool((t > 0).any()) or len(self.varying(t)) <= 1:
            return
        if across is not None:
            for i in range(1, t.shape[across]):
                self.union_pairs(t.select(across, 0), t.select(across, i), node,
                                 "a channel split over several dims whose positions are picked by index")
            return
        d = self.varying(t)[0]
        for i in range(t.shape[d]):
            row = t.select(d, i)
            labs = [x for x in row.unique().tolist() if x > 0]
            for x in labs[1:]:
                self.uf.union(labs[0], x)
            if labs and bool((row == 0).any()):
                self.block([labs[0]], node, "a head (slice of a split channel dim) mixes prunable and fixed channels")

    def resolve_split_dims(self) -> None:
        """Every split channel dim not coupled yet by an op: rows or columns, whichever gives more units."""
        changed = True
        while changed:
            changed = False
            for node, m in self.split_dims.values():
                c = torch.tensor([self.uf.find(x) for x in m.flatten().tolist()]).view(m.shape)
                if bool((c == c[:, :1]).all()) or bool((c == c[:1, :]).all()):
                    continue
                self.merge_split_dims(m, node, across=0 if m.shape[1] > m.shape[0] else None)
                changed = True

    def resolve_weight(self, w: Any) -> list[Param] | None:
        """Params that hold a conv/linear weight operand: the Param, or a mask node's weight and mask."""
        if isinstance(w, Param):
            return [w]
        if isinstance(w, Node) and w.op == "mask" and all(isinstance(p, Param) for p in w.inputs[:2]):
            return list(w.inputs[:2])
        return None

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> None:
        for n in self.g:
            self.remaining[n] = len(n.users)
        for n in self.g:
            out = self.visit(n)
            if isinstance(out, torch.Tensor):
                self.note_split_dims(out, n)
            self.env[n] = out
            for i in n.input_nodes():
                self.remaining[i] -= 1
                if self.remaining[i] <= 0 and trait(i.op, "result") != "value":
                    self.env.pop(i, None)
        self.resolve_split_dims()

    def visit(self, n: Node) -> Any:
        if n.op == "input":
            return self.zeros(n.meta)
        if n.op == "output":
            for r in iter_refs(n.inputs):
                if isinstance(r, Node) and isinstance(self.env.get(r), torch.Tensor):
                    self.block(self.env[r], n, "graph output (never pruned)")
                elif isinstance(r, Node) and isinstance(self.env.get(r), tuple):
                    for t in self.env[r]:
                        if isinstance(t, torch.Tensor):
                            self.block(t, n, "graph output (never pruned)")
            return None
        rule = rule_for(n.op)
        if rule is None:
            self.missing[n.op] = "channels"
            return self.opaque(n, missing_trait_message(n.op))
        return rule(self, n)

    # -- rules of ops (see register_pruning_rule) and of channel traits ------------------------------
    def mask(self, n: Node) -> Any:
        users = n.users
        if len(users) and all(trait(u.op, "weighted") is not None and u.inputs[1] is n for u in users):
            return None  # handled by the weighted layer that reads it
        self.freeze_params(n)
        return self.zeros(n.meta)

    def embedding(self, n: Node) -> Any:
        ids, w = n.inputs[0], n.inputs[1]
        self.block_node_inputs(n, only=[ids])
        if not isinstance(w, Param):
            return self.opaque(n, "weight is not a param")
        t = self.g.params[w.name]
        self.member(w, 0, torch.zeros(t.shape[0], dtype=torch.long), "other", n)  # rows are token ids
        labs = self.new_space(n, t.shape[1], w.name)
        self.member(w, 1, labs, "weight", n)
        return labs.expand(n.meta.shape).clone()

    def batch_norm(self, n: Node) -> Any:
        ins = n.inputs
        ch = self.channels_at(ins[0], 1, n, "batch_norm")
        if ch is None:
            self.freeze_params(n)
            return self.value(ins[0])
        for p, role in zip(ins[1:5], ("other", "other", "norm", "bias"), strict=False):
            if isinstance(p, Param):
                self.member(p, 0, ch, role, n)
        return self.value(ins[0])

    def same(self, n: Node) -> Any:
        """Channel i in is channel i out (relu, dropout, ...): labels pass through; params stay whole."""
        if n.params():
            self.freeze_params(n)
        return self.value(n.inputs[0])

    def getitem(self, n: Node) -> Any:
        src = self.value(n.inputs[0])
        return src[n.attrs["index"]] if isinstance(src, (tuple, list)) else self.zeros(n.meta)

    def blocks(self, n: Node) -> Any:
        return self.opaque(n, f"'{n.op}' stops channels (its channels trait is 'block')")

    def opaque_call(self, n: Node) -> Any:
        target = n.attrs.get("target")
        what = getattr(target, "__name__", None) or str(target)
        return self.opaque(n, f"opaque {n.attrs.get('kind', 'call')} {what} (capture kept it as a call; "
                              "ir.register_converter maps it to a canonical op)")

    def block_node_inputs(self, n: Node, why: str = "", only: Iterable[Any] | None = None) -> None:
        for r in iter_refs(list(only) if only is not None else (n.inputs, n.attrs)):
            if isinstance(r, Node):
                v = self.env.get(r)
                for t in (v if isinstance(v, (tuple, list)) else (v,)):
                    if isinstance(t, torch.Tensor):
                        self.block(t, n, why or f"'{n.op}' reads it")

    def opaque(self, n: Node, why: str) -> Any:
        self.block_node_inputs(n, why)
        self.freeze_params(n)
        return self.zeros(n.meta)

    def weighted(self, n: Node) -> torch.Tensor:
        """A layer y = x ⊛ W + b (ir.Weighted: conv, linear, conv_transpose): consumes x's channels, produces
        new ones. W is [out, in/groups, k...], or [in, out/groups, k...] for a transposed layer."""
        layer = get_op(n.op).weighted
        x, w = n.inputs[0], n.inputs[1]
        b = n.inputs[2] if len(n.inputs) > 2 else None
        ws = self.resolve_weight(w)
        if ws is None or (b is not None and not isinstance(b, Param)):
            return self.opaque(n, f"{n.op} weight/bias is not a param (or a mask of params)")
        groups = int(n.attrs.get("groups", 1)) if layer.grouped else 1
        wt = self.g.params[ws[0].name]
        if layer.transposed:
            cout, gi = wt.shape[1] * groups, wt.shape[0] // groups
        else:
            cout, gi = wt.shape[0], wt.shape[1]
        go = cout // groups
        ch = self.channels_at(x, layer.channel_dim, n, f"{n.op} input")
        out = self.new_space(n, cout, ws[0].name)
        self.member(b, 0, out, "bias", n)
        if groups > 1 and gi > 1 and go > 1 and not layer.transposed:
            self._grouped_by_position(n, ws, ch, out, groups, gi, go, layer)
        elif groups == 1:
            for p in ws:
                role = "weight" if p is ws[0] else "other"
                self.member(p, layer.out_axis, out, role, n)
                if ch is not None:
                    self.member(p, layer.in_axis, ch, role, n)
                else:
                    self.member(p, layer.in_axis, torch.zeros(self.g.params[p.name].shape[layer.in_axis],
                                                              dtype=torch.long), "other", n)
        else:
            # A group (its gi input and go output channels) is one unit; groups = kept channels // go
            # (a transposed layer's axis 0 holds every group's input channels: groups = kept // gi).
            for gidx in range(groups):
                labs = out[gidx * go:(gidx + 1) * go].tolist()
                ins = ch[gidx * gi:(gidx + 1) * gi].tolist() if ch is not None else [BLOCK]
                for lab in labs[1:] + [x for x in ins if x > 0]:
                    self.uf.union(labs[0], lab)
                if any(x == BLOCK for x in ins):
                    self.block([labs[0]], n, "grouped conv reads channels that cannot be removed")
            for p in ws:
                role = "weight" if p is ws[0] else "other"
                if not layer.transposed:
                    self.member(p, 0, out, role, n)
                else:  # the group's input channels (united with its outputs); out/groups stays
                    shape = self.g.params[p.name].shape
                    self.member(p, 0, ch if ch is not None else torch.zeros(shape[0], dtype=torch.long), role, n)
                    self.member(p, 1, torch.zeros(shape[1], dtype=torch.long), "other", n)
            self.fixups.append(("conv_groups", n.name, gi if layer.transposed else go))
        shape = [1] * len(n.meta.shape)
        shape[layer.channel_dim] = cout
        return out.view(shape).expand(n.meta.shape).clone()

    def _grouped_by_position(self, n: Node, ws: list[Param], ch: torch.Tensor | None, out: torch.Tensor,
                             groups: int, gi: int, go: int, layer: Any) -> None:
        """A grouped conv whose groups have several input and output channels (ResNeXt, RegNet) keeps its group
        count: a unit is the same position in every group, on each side, so the group width shrinks on both
        (halving both quarters its MACs; removing whole groups would only halve them)."""
        self.union_pairs(out.view(groups, go)[:1].expand(groups, go), out.view(groups, go), n,
                         "grouped conv: the same output position of every group")
        if ch is not None:
            self.union_pairs(ch.view(groups, gi)[:1].expand(groups, gi), ch.view(groups, gi), n,
                             "grouped conv: the same input position of every group")
        per_group_in = ch.view(groups, gi)[0] if ch is not None else torch.zeros(gi, dtype=torch.long)
        for p in ws:
            role = "weight" if p is ws[0] else "other"
            self.member(p, layer.out_axis, out, role, n)
            self.member(p, layer.in_axis, per_group_in, role if ch is not None else "other", n)

    def layer_norm(self, n: Node) -> torch.Tensor:
        x = self.value(n.inputs[0])
        ns = tuple(n.attrs["normalized_shape"])
        var = self.varying(x)
        nd = x.dim()
        normalized = set(range(nd - len(ns), nd))
        if not var or not (set(var) & normalized):
            self.freeze_params(n)
            return x
        if len(ns) != 1:
            self.block(x, n, "layer_norm over several dims mixes channels")
            self.freeze_params(n)
            return x
        ch = self.channels_at(n.inputs[0], -1, n, "layer_norm")
        if ch is None:
            self.freeze_params(n)
            return self.value(n.inputs[0])
        for p, role in zip(n.inputs[1:3], ("norm", "bias"), strict=False):
            if isinstance(p, Param):
                self.member(p, 0, ch, role, n)
        self.fixups.append(("layer_norm", n.name, ch))
        return x

    def group_norm(self, n: Node) -> torch.Tensor:
        x = self.value(n.inputs[0])
        ng = int(n.attrs["num_groups"])
        ch = self.channels_at(n.inputs[0], 1, n, "group_norm")
        if ch is None:
            self.freeze_params(n)
            return x
        cpg = ch.numel() // ng
        for gidx in range(ng):  # statistics are per group: remove whole groups
            labs = ch[gidx * cpg:(gidx + 1) * cpg].tolist()
            for lab in labs[1:]:
                if labs[0] == BLOCK or lab == BLOCK:
                    self.block([labs[0] + lab], n, "group_norm group mixes prunable and fixed channels")
                else:
                    self.uf.union(labs[0], lab)
        for p, role in zip(n.inputs[1:3], ("norm", "bias"), strict=False):
            if isinstance(p, Param):
                self.member(p, 0, ch, role, n)
        self.fixups.append(("group_norm", n.name, ch, cpg))
        return x

    def binary(self, n: Node) -> Any:
        out_shape = n.meta.shape if isinstance(n.meta, TensorMeta) else None
        if out_shape is None:
            return self.opaque(n, "non-tensor result")
        labeled: list[torch.Tensor] = []
        others: list[tuple[Any, tuple[int, ...]]] = []
        for v in n.inputs[:max(2, trait(n.op, "elementwise") or 0)]:  # where: condition and both branches
            if isinstance(v, Node):
                t = self.value(v)
                if not isinstance(t, torch.Tensor):
                    return self.opaque(n, "operand without tensor labels")
                if bool((t > 0).any()):
                    labeled.append(t.expand(out_shape) if t.dim() else t)
                else:
                    others.append((v, tuple(t.shape)))
            elif isinstance(v, Param):
                others.append((v, tuple(self.g.params[v.name].shape)))
        if not labeled:
            if any(isinstance(v, Param) for v, _ in others):
                self.freeze_params(n)
            return torch.zeros(out_shape, dtype=torch.long)
        base = labeled[0]
        for other in labeled[1:]:
            self.union_pairs(base, other, n, "residual branch")
            base = torch.where(base > 0, base, other)
        var = self.varying(base)
        nd = len(out_shape)
        for v, shape in others:
            # right-align the operand's shape with the output; a dim of size 1 broadcasts (no coupling)
            aligned = {nd - len(shape) + j: s for j, s in enumerate(shape)}
            coupled = [d for d in var if aligned.get(d, 1) > 1]
            if not coupled:
                if isinstance(v, Param):
                    self.freeze_params(n, skip=[p.name for p in n.params() if p.name != v.name])
                continue
            if isinstance(v, Param) and len(coupled) == 1 and len(var) == 1:
                d = coupled[0]
                axis = d - (nd - len(shape))
                t = self.g.params[v.name]
                self.member(v, axis, self.along(base, d), "other", n)
                for ax in range(t.dim()):
                    if ax != axis:
                        self.member(v, ax, torch.zeros(t.shape[ax], dtype=torch.long), "other", n)
            else:
                self.block(base, n, f"'{n.op}' combines channels with a fixed-size operand")
        return base.clone()

    def size(self, n: Node) -> Any:
        t = self.value(n.inputs[0])
        if not isinstance(t, torch.Tensor):
            return self.opaque(n, "size of a non-tensor")
        dim = n.attrs.get("dim") if n.op == "size" else None
        var = self.varying(t)
        if dim is None and var:
            # `b, c, h, w = x.size()` reads every dim, but only the ones used count (channel_shuffle uses b)
            read = [u.attrs.get("index") if u.op == "getitem" else None for u in n.users]
            if any(not isinstance(i, int) or i % t.dim() in var for i in read):
                self.block(t, n, "a channel count is read as a value")
        elif dim is not None and dim % t.dim() in var:
            self.block(t, n, "a channel count is read as a value")
        return t.shape if dim is None else t.shape[dim]

    def scalar(self, n: Node) -> Any:
        """Python arithmetic on shape values (`batch * heads`): computed on the sizes the walk knows."""
        args = [self.value(a) if isinstance(a, Node) else a for a in n.inputs]
        if not all(isinstance(a, (int, float, bool)) for a in args):
            return self.opaque(n, "shape arithmetic on a value the analysis does not know")
        return get_op("scalar").impl(*args, **n.attrs)

    def _replay(self, n: Node) -> tuple[Any, str | None]:
        """The op run on its operands' labels: data movement moves the labels as it would the values."""
        try:
            return get_op(n.op).impl(*map_refs(n.inputs, self.value), **map_refs(n.attrs, self.value)), None
        except Exception as e:  # noqa: BLE001 - anything the label replay cannot follow stops the group
            return None, f"shape replay failed: {type(e).__name__}: {e}"

    def view(self, n: Node) -> Any:
        """Data movement whose attrs name dims, never sizes (permute, flatten, cat, stack, squeeze, ...)."""
        out, err = self._replay(n)
        return self.opaque(n, err) if err else _clone(out)

    def reshape(self, n: Node) -> Any:
        """reshape/expand: a size in the attrs follows the channels it spans (fixed up after pruning)."""
        out, err = self._replay(n)
        if err:
            return self.opaque(n, err)
        key = "shape" if n.op == "reshape" else "size"
        var = self.varying(out) if isinstance(out, torch.Tensor) else []
        entries = list(n.attrs[key]) if isinstance(n.attrs[key], (tuple, list)) else [n.attrs[key]]
        if var and len(entries) == out.dim():
            bad = [d for d in var if not isinstance(entries[d], int)]
            if bad and (n.op != "reshape" or len(bad) > 1 or -1 in entries):
                self.block(out, n, f"{n.op} size of the channel dim {bad[0]} is computed at run time")
            else:  # a size computed at run time (batch * heads) becomes -1 when its channels shrink
                self.fixups.append(("reshape", n.name, key, out.clone()))
        elif var:
            self.block(out, n, f"{n.op} with a packed size argument")
        return _clone(out)

    def cat(self, n: Node) -> Any:
        """cat: offsets follow from replaying it on the labels. A learned tensor concatenated with features (ViT's
        class token, `cls_token.expand(B, -1, -1)`) takes their channels: its channel axis shrinks with them."""
        vals = [self.value(x) for x in n.inputs]
        nd = len(n.meta.shape)
        dim = int(n.attrs.get("dim", 0)) % nd
        labeled = [v for v in vals if isinstance(v, torch.Tensor) and bool((v > 0).any())]
        var = sorted({d for v in labeled for d in self.varying(v)} - {dim})
        if len(var) == 1 and len(labeled) < len(vals):
            d = var[0]
            ref = self.along(labeled[0], d)
            if all(self.varying(v) == [d] and torch.equal(self.along(v, d), ref) for v in labeled):
                vals = [self._learned_channels(x, v, d, ref, n) for x, v in zip(n.inputs, vals, strict=True)]
        try:
            out = get_op("cat").impl(*vals, **n.attrs)
        except Exception as e:  # noqa: BLE001 - as view(): what the replay cannot follow stops the group
            return self.opaque(n, f"shape replay failed: {type(e).__name__}: {e}")
        return out.clone()

    def _learned_channels(self, x: Any, v: Any, d: int, ref: torch.Tensor, n: Node) -> Any:
        """The labels `ref` along dim d for an unlabelled cat operand that is a param (or a param expanded), whose
        axis along d becomes a member; other operands are returned as they are."""
        if not isinstance(v, torch.Tensor) or bool((v > 0).any()):
            return v
        p = x if isinstance(x, Param) else (x.inputs[0] if isinstance(x, Node) and x.op == "expand"
                                            and len(x.users) == 1 else None)
        if not isinstance(p, Param):
            return v
        t = self.g.params[p.name]
        axis = d - (v.dim() - t.dim())
        if axis < 0 or t.shape[axis] != ref.numel():
            return v
        for ax in range(t.dim()):
            self.member(p, ax, ref if ax == axis else torch.zeros(t.shape[ax], dtype=torch.long), "other", n)
        if isinstance(x, Node) and isinstance(x.attrs["size"][d], int) and x.attrs["size"][d] != -1:
            def fix(node: Node, keep: torch.Tensor, d: int = d) -> None:  # a literal size of the channel dim
                size = list(node.attrs["size"])
                size[d] = int(keep.sum())
                node.attrs = {**node.attrs, "size": tuple(size)}
            self.add_fixup(x, ref, fix)
        shape = [1] * v.dim()
        shape[d] = ref.numel()
        return ref.view(shape).expand(v.shape)

    def split(self, n: Node) -> Any:
        """split/chunk: the section sizes follow the channels of each section (fixed up after pruning)."""
        out, err = self._replay(n)
        if err:
            return self.opaque(n, err)
        x = self.value(n.inputs[0])
        dim = n.attrs.get("dim", 0) % x.dim()
        if dim in self.varying(x):
            ch = self.channels_at(n.inputs[0], dim, n, f"{n.op} of a channel dim")
            if ch is not None:
                self.fixups.append(("split", n.name, dim, ch, [o.shape[dim] for o in out]))
        return _clone(out)

    def slice(self, n: Node) -> Any:
        """Indexing: positions picked along dims without channels pass the labels through; picking positions of
        a channel dim split over several dims (q, k, v of a packed projection) keeps every slice of that dim
        (the same channels go from each); picking positions of a plain channel dim blocks them."""
        x = self.value(n.inputs[0])
        attrs = map_refs(n.attrs, self.value)
        impl = get_op("slice").impl
        out = impl(x, **attrs)
        var = self.varying(x)
        if not isinstance(out, torch.Tensor) or out.numel() == x.numel() or not var:
            return _clone(out)
        picked = []
        for d in var:
            shape = [1] * x.dim()
            shape[d] = x.shape[d]
            probe = torch.arange(x.shape[d]).view(shape).expand(x.shape)
            if impl(probe, **attrs).unique().numel() != x.shape[d]:
                picked.append(d)
        if not picked:
            return out.clone()
        if len(var) == 1:
            self.block(x, n, "indexing selects fixed positions of a channel dim")
            return torch.zeros(out.shape, dtype=torch.long)
        for d in picked:
            self.merge_split_dims(x, n, across=d)
        return out.clone()

    def reduce(self, n: Node) -> torch.Tensor:
        """Combines positions along attr `dim` (mean, sum; softmax keeps the shape)."""
        x = self.value(n.inputs[0])
        var = self.varying(x)
        dim = n.attrs.get("dim")
        dims = list(range(x.dim())) if dim is None else [d % x.dim() for d in (dim if isinstance(dim, (tuple, list))
                                                                              else [dim])]
        if set(dims) & set(var):
            self.block(x, n, f"'{n.op}' reduces over the channel dim")
            return torch.zeros(n.meta.shape, dtype=torch.long)
        if tuple(n.meta.shape) == tuple(x.shape):  # normalizes along dim (softmax): the shape stays
            return x
        out = x
        keep = n.attrs.get("keepdim", False)
        for d in sorted(dims, reverse=True):
            out = out.narrow(d, 0, 1) if keep else out.select(d, 0)
        return out.reshape(n.meta.shape).clone()

    def spatial(self, n: Node) -> torch.Tensor:
        x = self.value(n.inputs[0])
        var = self.varying(x)
        if any(d >= 2 for d in var) or 0 in var:
            self.block(x, n, f"'{n.op}' mixes positions along a channel dim")
            return torch.zeros(n.meta.shape, dtype=torch.long)
        ch = self.along(x, 1) if x.dim() > 1 else x
        shape = [1] * len(n.meta.shape)
        shape[1] = ch.numel()
        return ch.view(shape).expand(n.meta.shape).clone()

    def matmul(self, n: Node) -> torch.Tensor:
        a, b = n.inputs[0], n.inputs[1]
        if isinstance(b, Param) and isinstance(a, Node):
            t = self.g.params[b.name]
            if t.dim() != 2:
                return self.opaque(n, "matmul with a batched param")
            ch = self.channels_at(a, -1, n, "matmul input")
            self.member(b, 0, ch if ch is not None else torch.zeros(t.shape[0], dtype=torch.long), "weight", n)
            out = self.new_space(n, t.shape[1], b.name)
            self.member(b, 1, out, "weight", n)
            return out.expand(n.meta.shape).clone()
        A, B = self.value(a), self.value(b)
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)) or A.dim() < 2 or B.dim() < 2:
            return self.opaque(n, "matmul with a param or a 1-D operand")
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        A = A.expand(*batch, *A.shape[-2:])
        B = B.expand(*batch, *B.shape[-2:])
        self.merge_split_dims(A, n)  # per-head operands (batch x heads x seq x head_dim): heads are the units
        self.merge_split_dims(B, n)
        CA, CB = self.classes(A), self.classes(B)
        va, vb = self.varying(CA), self.varying(CB)
        nd = A.dim()
        if nd - 2 in va or nd - 1 in vb:
            self.block(A, n, "matmul whose free dims carry channels")
            self.block(B, n, "matmul whose free dims carry channels")
            return torch.zeros(n.meta.shape, dtype=torch.long)
        self.union_pairs(A.select(-2, 0), B.select(-1, 0), n, "matmul contraction")
        CA, CB = self.classes(A), self.classes(B)
        if nd - 2 not in self.varying(B) and bool((B > 0).any()) and nd - 1 in self.varying(B):
            out = B.narrow(-2, 0, 1)
        elif nd - 1 not in self.varying(CA):
            out = CA.narrow(-1, 0, 1)
        elif nd - 2 not in self.varying(CB):
            out = CB.narrow(-2, 0, 1)
        else:
            out = torch.zeros(1, dtype=torch.long)
        return out.expand(n.meta.shape).clone()

    def sdpa(self, n: Node) -> torch.Tensor:
        q, k, v = (self.value(x) for x in n.inputs[:3])
        if len(n.inputs) > 3 and isinstance(n.inputs[3], Node):
            self.block_node_inputs(n, "attention mask", only=[n.inputs[3]])
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (q, k, v)):
            return self.opaque(n, "attention operands without labels")
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q, k, v = (t.expand(*batch, *t.shape[-2:]) for t in (q, k, v))
        for t in (q, k, v):
            self.merge_split_dims(t, n)  # heads are the units
        nd = q.dim()
        for t in (q, k, v):
            if nd - 2 in self.varying(self.classes(t)):
                self.block(q, n, "attention over a channel dim")
                self.block(k, n, "attention over a channel dim")
                self.block(v, n, "attention over a channel dim")
                return torch.zeros(n.meta.shape, dtype=torch.long)
        self.union_pairs(q.select(-2, 0), k.select(-2, 0), n, "attention q/k features")
        cq, cv = self.classes(q), self.classes(v)
        if nd - 1 not in self.varying(cq) and nd - 1 not in self.varying(cv):
            self.union_pairs(q[..., 0, 0], v[..., 0, 0], n, "attention heads")
        elif bool((v > 0).any()) or bool((q > 0).any()):
            self.block(q, n, "attention with per-feature q/v labels")
            self.block(v, n, "attention with per-feature q/v labels")
        if n.attrs.get("scale") is None:
            self.fixups.append(("sdpa_scale", n.name, q.shape[-1]))
        return v.narrow(-2, 0, 1).expand(n.meta.shape).clone()

    # -- ops real models use beyond conv/linear (issue 15) --------------------------------------------
    def pixel_shuffle(self, n: Node) -> Any:
        """Output channel c is input channels c*r*r .. c*r*r + r*r - 1 spread over space: those go together."""
        x = self.value(n.inputs[0])
        r = int(n.attrs["upscale_factor"])
        cdim = x.dim() - 3
        var = self.varying(x)
        if not var:
            return torch.zeros(n.meta.shape, dtype=torch.long)
        if var != [cdim]:
            self.block(x, n, "pixel_shuffle of a tensor whose channels are not along dim -3")
            return torch.zeros(n.meta.shape, dtype=torch.long)
        ch = self.along(x, cdim).view(-1, r * r)
        for j in range(1, r * r):
            self.union_pairs(ch[:, 0], ch[:, j], n, "pixel_shuffle packs r*r channels into one")
        first = ch[:, :1].expand(-1, r * r).reshape(-1)
        shape = [1] * x.dim()
        shape[cdim] = -1
        return get_op("pixel_shuffle").impl(first.view(shape).expand(x.shape).contiguous(), upscale_factor=r).clone()

    def index_select(self, n: Node) -> Any:
        """Positions picked along a dim that carries no channels: the other dims' labels pass through."""
        x = self.value(n.inputs[0])
        if not isinstance(x, torch.Tensor):
            return self.opaque(n, "index_select of a value without labels")
        dim = int(n.attrs["dim"]) % max(1, x.dim())
        var = self.varying(x)
        index = n.inputs[1]
        if isinstance(index, Node) and n.op == "index_select":
            self.block_node_inputs(n, "index_select index values", only=[index])
        if dim in var:
            self.block(x, n, f"'{n.op}' picks positions of a channel dim by index")
            return torch.zeros(n.meta.shape, dtype=torch.long)
        out = x
        for d in range(x.dim()):
            if d not in var:
                out = out.narrow(d, 0, 1)
        if any(out.shape[d] != n.meta.shape[d] and out.shape[d] != 1 for d in range(out.dim())):
            self.block(x, n, f"'{n.op}' output is smaller than its input along a channel dim")
            return torch.zeros(n.meta.shape, dtype=torch.long)
        out = out.expand(n.meta.shape).clone()
        if n.op == "gather" and isinstance(index, Node):
            # the index has the output's shape: it must lose the same channels
            idx = self.value(index)
            if isinstance(idx, torch.Tensor):
                self.union_pairs(out, idx.expand(out.shape), n, "gather index follows the channels it reads")
        return out

    def topk(self, n: Node) -> Any:
        x = self.value(n.inputs[0])
        dim = int(n.attrs.get("dim", -1)) % x.dim()
        if dim in self.varying(x):
            self.block(x, n, "topk ranks positions along a channel dim")
            return self.zeros(n.meta)
        lab = x.narrow(dim, 0, 1)
        return tuple(lab.expand(m.shape).clone() for m in n.meta)

    def einsum(self, n: Node) -> Any:
        return self.opaque(n, "einsum combines dims as its equation says, which pruning does not follow (spell "
                              "the contraction with matmul/permute/sum to prune through it)")

    def recurrent(self, n: Node) -> Any:
        """lstm/gru read x's channels (features, dim -1) through the first layer's input weights, which shrink
        with them; their hidden units (coupled across gates, directions and time) are never pruned."""
        a = n.attrs
        weights = n.inputs[2:]
        if not all(isinstance(p, Param) for p in weights):
            return self.opaque(n, f"{n.op} weights are not params")
        dirs = 2 if a.get("bidirectional") else 1
        per = len(weights) // (int(a.get("num_layers", 1)) * dirs)
        ch = self.channels_at(n.inputs[0], -1, n, f"{n.op} input")
        first = {weights[d * per].name for d in range(dirs)}  # w_ih of layer 0, each direction
        for p in weights:
            t = self.g.params[p.name]
            for ax in range(t.dim()):
                if p.name in first and ax == 1 and ch is not None:
                    self.member(p, 1, ch, "weight", n)
                else:
                    self.member(p, ax, torch.zeros(t.shape[ax], dtype=torch.long), "other", n)
        self.block_node_inputs(n, f"{n.op} initial state", only=[n.inputs[1]])
        return self.zeros(n.meta)


# The rule of each `channels` trait value (ir/ops.py).
CHANNEL_FLOW_RULES: dict[str | None, PruningRule] = {
    "same": Analyzer.same, "broadcast": Analyzer.binary, "weighted": Analyzer.weighted, "view": Analyzer.view,
    "reduce": Analyzer.reduce, "spatial": Analyzer.spatial, "block": Analyzer.blocks,
}

# Built-in ops whose channels follow rules of their own.
for _op, _rule in [
    ("mask", Analyzer.mask), ("embedding", Analyzer.embedding), ("batch_norm", Analyzer.batch_norm),
    ("layer_norm", Analyzer.layer_norm), ("group_norm", Analyzer.group_norm), ("size", Analyzer.size),
    ("shape", Analyzer.size), ("scalar", Analyzer.scalar), ("getitem", Analyzer.getitem), ("slice", Analyzer.slice),
    ("reshape", Analyzer.reshape), ("expand", Analyzer.reshape), ("cat", Analyzer.cat), ("split", Analyzer.split),
    ("chunk", Analyzer.split),
    ("matmul", Analyzer.matmul), ("scaled_dot_product_attention", Analyzer.sdpa), ("opaque", Analyzer.opaque_call),
    ("instance_norm", Analyzer.batch_norm), ("rms_norm", Analyzer.layer_norm), ("pixel_shuffle", Analyzer.pixel_shuffle),
    ("index_select", Analyzer.index_select), ("gather", Analyzer.index_select), ("topk", Analyzer.topk),
    ("einsum", Analyzer.einsum), ("lstm", Analyzer.recurrent), ("gru", Analyzer.recurrent),
]:
    register_pruning_rule(_op, _rule)


def analyze(graph: Graph) -> Dependencies:
    """Compute channel groups, param members and attr fixups of `graph` (which must have metas)."""
    an = Analyzer(graph)
    an.run()
    roots = an.uf.roots()
    n_labels = len(an.uf.parent)
    # groups: spaces joined by any unit
    space_uf = list(range(len(an.spaces)))

    def sfind(x: int) -> int:
        while space_uf[x] != x:
            space_uf[x] = space_uf[space_uf[x]]
            x = space_uf[x]
        return x

    unit_labels: dict[int, list[int]] = {}
    for lab in range(1, n_labels):
        r = int(roots[lab])
        if r == BLOCK:
            continue
        unit_labels.setdefault(r, []).append(lab)
        a, b = sfind(an.space_of_label[lab]), sfind(an.space_of_label[r])
        if a != b:
            space_uf[max(a, b)] = min(a, b)
    by_group: dict[int, list[Space]] = {}
    for sp in an.spaces:
        by_group.setdefault(sfind(sp.id), []).append(sp)
    units_by_group: dict[int, list[int]] = {}
    for r in sorted(unit_labels):
        units_by_group.setdefault(sfind(an.space_of_label[r]), []).append(r)
    groups = []
    for key, spaces in sorted(by_group.items()):
        units = units_by_group.get(key, [])
        if not units:
            continue
        prim = spaces[0]
        prim_roots = roots[prim.start:prim.start + prim.size]
        blocked = int((prim_roots == BLOCK).sum())
        sizes = {sum(1 for lab in unit_labels[u] if an.space_of_label[lab] == prim.id) for u in units}
        kind = "channels" if sizes <= {1} else ("heads" if any(_ungrouped_layer(graph.node(s.node).op)
                                                              for s in spaces) else "groups")
        groups.append(Group(len(groups), spaces, units, {u: unit_labels[u] for u in units}, prim.size, blocked,
                            kind))
    return Dependencies(groups, an.members, an.fixups, an.blocked, roots, an.spaces, n_labels, missing=an.missing,
                        unprunable=_unprunable(an, roots))


def _unprunable(an: Analyzer, roots: torch.Tensor, most: int = 3) -> list[dict[str, Any]]:
    """Each layer (channel space) none of whose channels can be removed, with the reasons: the blocks that hit
    any label coupled with its channels (a residual stream blocked at the graph output names the output)."""
    causes: dict[int, dict[int, None]] = {}  # shadow root -> blocked entries (ordered, no repeats)
    for lab, idx in an.block_causes:
        causes.setdefault(an.uf.shadow_find(lab), {})[idx] = None
    out = []
    for sp in an.spaces:
        if sp.size == 0 or bool((roots[sp.start:sp.start + sp.size] != BLOCK).any()):
            continue
        hits: dict[int, None] = {}
        for r in sorted({an.uf.shadow_find(lab) for lab in range(sp.start, sp.start + sp.size)}):
            hits.update(causes.get(r, {}))
        found = list(hits)
        why = [f"%{an.blocked[i]['node']} ({an.blocked[i]['op']}): {an.blocked[i]['why']}" for i in found[:most]]
        if len(found) > most:
            why.append(f"and {len(found) - most} more (stats['blocked'])")
        out.append({"layer": sp.module_path or sp.node, "node": sp.node, "op": sp.op, "channels": sp.size,
                    "why": why or ["coupled with channels that cannot be removed"]})
    return out


def _clone(out: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(o.clone() for o in out)
    return out.clone() if isinstance(out, torch.Tensor) else out


def _ungrouped_layer(op: str) -> bool:
    layer = trait(op, "weighted")
    return layer is not None and not layer.grouped


def _kept(labels: torch.Tensor, roots: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    return ~removed[roots[labels]]


def keep_every_axis(deps: Dependencies, removed: Iterable[int], scores: torch.Tensor | None = None) -> list[int]:
    """`removed` minus what would empty a sliced param axis (a split chunk, a cat segment, a one-channel branch).

    For each axis that would lose every channel, the unit with the best score (the first, without scores) is given
    back; `apply` refuses a removal that empties an axis.
    """
    removed = list(removed)
    rm = set(removed)
    changed = True
    while changed:
        changed = False
        for m in deps.members.values():
            r = deps.roots[m.labels].tolist()
            if r and all(x in rm for x in r):
                best = max(set(r), key=lambda u: float(scores[u]) if scores is not None else 0.0)
                rm.discard(best)
                changed = True
    return [u for u in removed if u in rm]


def apply(graph: Graph, deps: Dependencies, removed_units: Iterable[int]) -> dict[str, int]:
    """Remove the given units in place: slice every member param, fix attrs. Shapes are left to the caller.

    Returns {param name: new size of its first sliced axis} for reporting.
    """
    removed = torch.zeros(deps.num_labels, dtype=torch.bool)
    for r in removed_units:
        if r == BLOCK:
            raise ValueError("the blocked unit cannot be removed")
        removed[r] = True
    roots = deps.roots
    sizes: dict[str, int] = {}
    alias = graph.param_aliases()
    names_of: dict[str, list[str]] = {}  # every name of a (tied) tensor, sliced as one
    for n, canonical in alias.items():
        names_of.setdefault(canonical, []).append(n)
    for (name, axis), m in deps.members.items():
        keep = _kept(m.labels, roots, removed)
        if bool(keep.all()):
            continue
        if not bool(keep.any()):
            raise ValueError(f"removing these units empties axis {axis} of {name}; filter them with keep_every_axis")
        idx = keep.nonzero().flatten()
        sliced = graph.params[name].index_select(axis, idx).contiguous()
        for n in names_of.get(alias.get(name, name), [name]):
            graph.params[n] = sliced
        sizes[f"{name}[{axis}]"] = int(idx.numel())
    for fx in deps.fixups:
        kind, node = fx[0], graph.node(fx[1])
        if kind == "conv_groups":
            w = node.inputs[1]
            wname = w.name if isinstance(w, Param) else w.inputs[0].name
            node.attrs = {**node.attrs, "groups": graph.params[wname].shape[0] // fx[2]}
        elif kind == "layer_norm":
            node.attrs = {**node.attrs, "normalized_shape": (int(_kept(fx[2], roots, removed).sum()),)}
        elif kind == "group_norm":
            node.attrs = {**node.attrs, "num_groups": int(_kept(fx[2], roots, removed).sum()) // fx[3]}
        elif kind == "reshape":
            key, labels = fx[2], fx[3]
            keep = _kept(labels, roots, removed)
            if bool(keep.all()):
                continue
            entries = list(node.attrs[key])
            for d in range(labels.dim()):
                if isinstance(entries[d], int) and entries[d] == -1:
                    continue
                other = [i for i in range(labels.dim()) if i != d]
                size = int(keep.any(dim=other).sum()) if other else int(keep.sum())
                if not isinstance(entries[d], int):  # computed at run time: inferred (the analysis allows one)
                    entries[d] = -1 if size != labels.shape[d] else entries[d]
                    continue
                entries[d] = size
            node.attrs = {**node.attrs, key: tuple(entries)}
        elif kind == "split":
            dim, labels, old = fx[2], fx[3], fx[4]
            keep = _kept(labels, roots, removed)
            new, pos = [], 0
            for s in old:
                new.append(int(keep[pos:pos + s].sum()))
                pos += s
            if new != old:
                node.op = "split"
                node.attrs = {"split_size": tuple(new), "dim": dim}
        elif kind == "sdpa_scale":
            node.attrs = {**node.attrs, "scale": 1.0 / math.sqrt(fx[2])}
        elif kind == "call":
            fx[3](node, _kept(fx[2], roots, removed))
    return sizes
