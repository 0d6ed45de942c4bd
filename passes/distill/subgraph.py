"""`distill-subgraph`: replace one block of the graph by a cheaper student trained to imitate it.

1. Select a teacher subgraph with one input and one output: a module path prefix (`module=layer3`), a node
   range (`nodes=layer3_0_conv1..layer3_2_relu2`) or a regex over module paths (`pattern=layer3\\.[12].*`).
2. Build the student: `depth` (keep that many of the repeated child blocks whose input and output shapes
   agree), `width` (keep that fraction of each block's hidden channels, chosen by BN-scaled filter norm),
   `low_rank` (factor each conv/linear by truncated SVD into a k x k conv to r channels and a 1 x 1 conv),
   or `student=pkg.mod:callable` (called with the teacher block as an nn.Module and an example input).
3. Train it with MSE to the block's output on calibration data, whose block inputs are read by making them
   extra graph outputs; optionally fine-tune the whole graph with KD from the original (`kd_epochs`).
4. Splice the student's nodes in place of the block, params named under the block's module path.
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable

import torch
from torch import nn

from slimfx import ir
from slimfx.ir import Graph, Node, Param, TensorMeta, map_refs
from slimfx.ir.errors import PassError
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.distill.trainer import distill, normalize_batch


def _per_channel(n: Node) -> bool:
    """Channel i in is channel i out (ir trait channels='same': activations, dropout, batch_norm), and no param
    to slice along with them other than batch_norm's (reduce_width slices those)."""
    return ir.trait(n.op, "channels") == "same" and (n.op == "batch_norm" or not n.params())


def _dense_layer(n: Node) -> bool:
    """A weighted layer (ir.Weighted: conv, linear; not transposed) with one group, reading a param weight."""
    layer = ir.trait(n.op, "weighted")
    return layer is not None and not layer.transposed and isinstance(n.inputs[1], Param) and (
        not layer.grouped or n.attrs.get("groups", 1) == 1)


# --- selection ------------------------------------------------------------------------------------------

def select_nodes(graph: Graph, *, module: str = "", nodes: str = "", pattern: str = "") -> list[Node]:
    """The nodes of a subgraph chosen by module path prefix, node range `a..b`, or module-path regex."""
    body = [n for n in graph if n.op not in ("input", "output")]
    given = [k for k, v in (("module", module), ("nodes", nodes), ("pattern", pattern)) if v]
    if len(given) != 1:
        raise PassError("distill-subgraph: give exactly one of module=PATH, nodes=FROM..TO, pattern=REGEX "
                        f"(got {', '.join(given) or 'none'})")
    if module:
        sel = [n for n in body if n.module_path and (n.module_path == module or n.module_path.startswith(module + "."))]
        if not sel:
            paths = sorted({n.module_path.split(".")[0] for n in body if n.module_path})
            raise PassError(f"distill-subgraph: no node lies in module {module!r}; top-level modules: {', '.join(paths)}")
    elif nodes:
        if ".." not in nodes:
            raise PassError(f"distill-subgraph: nodes={nodes!r} must be a range FROM..TO of node names")
        a, b = (s.strip() for s in nodes.split("..", 1))
        for name in (a, b):
            if not graph.has_node(name):
                raise PassError(f"distill-subgraph: nodes={nodes!r}: no node named %{name} in the graph")
        order = {n.name: i for i, n in enumerate(body)}
        if order[a] > order[b]:
            raise PassError(f"distill-subgraph: nodes={nodes!r}: %{a} comes after %{b} in the graph")
        sel = [n for n in body if order[a] <= order[n.name] <= order[b]]
    else:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise PassError(f"distill-subgraph: pattern={pattern!r} is not a valid regex: {e}") from e
        sel = [n for n in body if n.module_path and rx.fullmatch(n.module_path)]
        if not sel:
            raise PassError(f"distill-subgraph: pattern={pattern!r} matches no module path")
    return sel


def boundary(graph: Graph, sel: list[Node]) -> tuple[Node, Node]:
    """The single input node feeding the subgraph and its single output node; raises otherwise."""
    inside = set(sel)
    ins: dict[Node, None] = {}
    for n in sel:
        for r in n.input_nodes():
            if r not in inside:
                ins[r] = None
    outs = [n for n in sel if any(u not in inside for u in n.users)]
    desc = f"{sel[0].name}..{sel[-1].name}"
    if len(ins) != 1:
        raise PassError(f"distill-subgraph: the subgraph {desc} must read exactly one value from outside; it reads "
                        f"{', '.join('%' + n.name for n in ins) or 'nothing'}. Widen or narrow the selection")
    if len(outs) != 1:
        raise PassError(f"distill-subgraph: the subgraph {desc} must have exactly one output used outside; it has "
                        f"{', '.join('%' + n.name for n in outs) or 'none'}")
    inp, out = next(iter(ins)), outs[0]
    for n in (inp, out):
        if not isinstance(n.meta, TensorMeta):
            raise PassError(f"distill-subgraph: subgraph boundary %{n.name} is not a single tensor ({n.meta!r})")
    return inp, out


def extract(graph: Graph, sel: list[Node], inp: Node, out: Node) -> Graph:
    """The subgraph as a graph of its own: input `x`, the selected nodes, their params (cloned)."""
    g = Graph()
    g.name = f"{graph.name}.block"
    x = g.create_node("input", (), name="x", meta=inp.meta)
    mapping: dict[Node, Node] = {inp: x}
    remap = lambda r: mapping[r] if isinstance(r, Node) else r  # noqa: E731
    for n in sel:
        mapping[n] = g.create_node(n.op, map_refs(n.inputs, remap), map_refs(n.attrs, remap), name=n.name,
                                   meta=n.meta, source=n.source, module_path=n.module_path)
        for p in mapping[n].params():
            g.params[p.name] = graph.params[p.name].detach().clone()
            if p.name in graph.buffers:
                g.buffers.add(p.name)
    g.set_outputs(mapping[out])
    return g


# --- student construction -----------------------------------------------------------------------------

def reduce_depth(block: Graph, scope: str, keep: int) -> int:
    """Drop the last repeated child blocks (`scope.<i>`) whose input and output shapes agree; returns how many."""
    groups: dict[str, list[Node]] = {}
    for n in block:
        if n.module_path and scope and n.module_path.startswith(scope + "."):
            child = scope + "." + n.module_path[len(scope) + 1:].split(".")[0]
            groups.setdefault(child, []).append(n)
    removable = []
    for child, sel in groups.items():
        try:
            i, o = boundary(block, sel)
        except PassError:
            continue
        if i.meta == o.meta and len(sel) >= 2:
            removable.append((child, sel, i, o))
    # only repeats of one block structure count (not single layers that happen to keep their shape)
    if removable:
        sig = tuple(n.op for n in removable[-1][1])
        removable = [r for r in removable if tuple(n.op for n in r[1]) == sig]
    n_children = len(groups)
    drop = n_children - keep
    if drop <= 0:
        return 0
    if drop > len(removable):
        raise PassError(f"distill-subgraph: depth={keep} would drop {drop} of the {n_children} blocks under "
                        f"{scope!r}, but only {len(removable)} ({', '.join(c for c, *_ in removable)}) keep their "
                        "input shape and can be removed")
    for _child, sel, i, o in reversed(removable[-drop:]):
        block.replace_all_uses(o, i)
        for n in reversed(sel):
            block.erase(n)
    block.remove_unused_params()
    return drop


def _chain_to_consumer(block: Graph, prod: Node) -> tuple[list[Node], Node] | None:
    """Per-channel ops from `prod` to a single conv/linear consumer (hidden channels), else None."""
    chain, cur = [], prod
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if _per_channel(u) and u.inputs[0] is cur:
            chain.append(u)
            cur = u
            continue
        if _dense_layer(u) and u.inputs[0] is cur:
            return chain, u
        return None


def reduce_width(block: Graph, width: float) -> int:
    """Keep `width` of every hidden channel set (conv/linear -> per-channel ops -> conv/linear); returns count."""
    done = 0
    for prod in list(block):
        if not _dense_layer(prod):
            continue
        found = _chain_to_consumer(block, prod)
        if found is None:
            continue
        chain, cons = found
        w = block.params[prod.inputs[1].name]
        c = w.shape[0]
        k = max(1, int(round(c * width)))
        if k >= c:
            continue
        score = w.flatten(1).norm(dim=1)
        for n in chain:
            if n.op == "batch_norm" and isinstance(n.inputs[3], Param):
                gamma = block.params[n.inputs[3].name].abs()
                var = block.params[n.inputs[2].name]
                score = score * gamma / torch.sqrt(var + n.attrs.get("eps", 1e-5))
        idx = torch.sort(torch.topk(score, k).indices).values
        _slice_param(block, prod.inputs[1], 0, idx)
        if prod.inputs[2] is not None:
            _slice_param(block, prod.inputs[2], 0, idx)
        for n in chain:
            if n.op == "batch_norm":
                for p in n.inputs[1:5]:
                    if isinstance(p, Param):
                        _slice_param(block, p, 0, idx)
        _slice_param(block, cons.inputs[1], 1, idx)
        done += 1
    return done


def _slice_param(block: Graph, ref: Param, dim: int, idx: torch.Tensor) -> None:
    block.params[ref.name] = block.params[ref.name].index_select(dim, idx).contiguous()


def factorize(block: Graph, rank: float) -> int:
    """Replace each conv2d/linear by a rank-r pair initialised from its truncated SVD where that saves params."""
    done = 0
    for n in list(block):
        # the pair it builds is spelled as conv2d (1x1 second layer) or linear: only those two are factorized
        if n.op not in ("conv2d", "linear") or not _dense_layer(n):
            continue
        w = block.params[n.inputs[1].name]
        out_c, fan_in = w.shape[0], w[0].numel()
        r = max(1, int(round(rank * min(out_c, fan_in))))
        if r * (fan_in + out_c) >= out_c * fan_in:
            continue
        u, s, vh = torch.linalg.svd(w.flatten(1).double(), full_matrices=False)
        root = s[:r].sqrt()
        first = (root[:, None] * vh[:r]).float().reshape(r, *w.shape[1:])
        second = (u[:, :r] * root[None, :]).float()
        base = n.inputs[1].name.rsplit(".", 1)[0]
        p1 = block.add_param(f"{base}.lowrank_in.weight", first.contiguous())
        bias = n.inputs[2]
        mid_meta = None
        if isinstance(n.meta, TensorMeta):
            shape = list(n.meta.shape)
            shape[1 if n.op == "conv2d" else -1] = r
            mid_meta = TensorMeta(tuple(shape), n.meta.dtype)
        mid = block.create_node(n.op, (n.inputs[0], p1, None), dict(n.attrs), name=n.name + "_lr",
                                meta=mid_meta, before=n, source=n.source, module_path=n.module_path)
        if n.op == "conv2d":
            p2 = block.add_param(f"{base}.lowrank_out.weight", second.reshape(out_c, r, 1, 1).contiguous())
            n.attrs = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
        else:
            p2 = block.add_param(f"{base}.lowrank_out.weight", second.contiguous())
        n.inputs = (mid, p2, bias)
        done += 1
    block.remove_unused_params()
    return done


def _load_callable(spec: str) -> Callable:
    if ":" not in spec:
        raise PassError(f"distill-subgraph: student={spec!r} must be 'package.module:callable'")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise PassError(f"distill-subgraph: cannot load student={spec!r}: {e}") from e


# --- splicing -------------------------------------------------------------------------------------------

def splice(graph: Graph, sel: list[Node], inp: Node, out: Node, student: Graph, prefix: str = "") -> list[Node]:
    """Replace the nodes `sel` (input `inp`, output `out`) by the nodes of `student` (one input, one output).

    Student params get `prefix` prepended; they may reuse the names of the params they replace.
    """
    inside = set(sel)
    outside_params = {p.name for n in graph if n not in inside for p in n.params()}
    rename: dict[str, str] = {}
    for name in student.params:
        new = prefix + name
        if new in outside_params:  # a name still read by the rest of the graph: keep both
            i = 1
            while f"{new}_{i}" in graph.params or f"{new}_{i}" in outside_params:
                i += 1
            new = f"{new}_{i}"
        rename[name] = new
    s_in = student.inputs
    if len(s_in) != 1:
        raise PassError(f"distill-subgraph: the student must take one input, it takes {len(s_in)}")
    s_out = student.outputs
    if not isinstance(s_out, Node):
        raise PassError(f"distill-subgraph: the student must return one tensor, it returns {s_out!r}")
    mapping: dict[Node, Node] = {s_in[0]: inp}
    remap = lambda r: mapping[r] if isinstance(r, Node) else (Param(rename[r.name]) if isinstance(r, Param) else r)  # noqa: E731
    new_nodes, wanted = [], {}
    scope = prefix.rstrip(".")
    for n in student:
        if n.op in ("input", "output"):
            continue
        mpath = n.module_path
        if mpath is None and n.params():
            mpath = rename[n.params()[0].name].rsplit(".", 1)[0]
        elif mpath is not None and scope:
            mpath = f"{scope}.{mpath}"
        m = graph.create_node(n.op, map_refs(n.inputs, remap), map_refs(n.attrs, remap), name=f"_swap_{n.name}",
                              meta=n.meta, before=out, source=n.source, module_path=mpath or scope or None)
        mapping[n] = m
        wanted[m] = n.name
        new_nodes.append(m)
    new_out = mapping[s_out]
    for u in list(out.users):
        if u not in inside:
            u.replace_input(out, new_out)
    for n in reversed(sel):
        graph.erase(n)
    for name, t in student.params.items():
        graph.params[rename[name]] = t
        if name in student.buffers:
            graph.buffers.add(rename[name])
        else:
            graph.buffers.discard(rename[name])
    graph.remove_unused_params()
    for m in new_nodes:
        graph.rename(m, wanted[m])
    return new_nodes


# --- the pass ---------------------------------------------------------------------------------------------

@register_pass("distill-subgraph")
class DistillSubgraph(Pass):
    """Replace a one-input one-output block by a narrower / low-rank / shallower student trained to imitate it."""

    preserves_outputs = False

    module: str = option("", help="the block to replace, by module path prefix, e.g. 'layer3' (give exactly "
                                   "one of module, nodes, pattern)")
    nodes: str = option("", help="the block to replace, by a range of node names FROM..TO, e.g. "
                                 "'layer3_0_conv1..layer3_2_relu2'")
    pattern: str = option("", help="the block to replace, by a regular expression over module paths, "
                                   "e.g. 'layer3\\.[12].*'")
    width: float = option(1.0, gt=0, le=1, help="fraction of each inner layer's hidden channels the student "
                                                "keeps, chosen by BN-scaled filter norm; 1 keeps all (typical: 0.5)")
    low_rank: float = option(0.0, ge=0, lt=1, help="factor each conv/linear by truncated SVD to this fraction "
                                                   "of its rank where that saves params; 0 is off (typical: 0.25)")
    depth: int = option(0, ge=0, help="keep this many of the block's repeated child blocks whose input and "
                                      "output shapes agree; 0 keeps all")
    student: str = option("", help="your own student instead: 'pkg.mod:callable' or 'file.py:callable', called "
                                   "with the teacher block (an nn.Module) and an example input")
    epochs: int = option(30, ge=1, help="epochs training the student block to match the block's output (MSE)")
    lr: float = option(3e-3, gt=0, help="peak learning rate of the block training (one-cycle schedule)")
    batch_size: int = option(64, ge=1, help="samples per step, in block training and in the KD fine-tune")
    max_samples: int = option(8192, ge=1, help="block inputs and outputs recorded from the calibration data "
                                               "to train on (more: better fit, more memory)")
    holdout: float = option(0.1, ge=0, lt=1, help="fraction of the recorded samples held out to measure the "
                                                  "student's error (used when it is at least 16 samples)")
    kd_epochs: int = option(0, ge=0, help="after the swap, epochs of KD fine-tuning of the whole graph from "
                                          "the original on the train data; 0 is off")
    kd_lr: float = option(3e-4, gt=0, help="peak learning rate of the KD fine-tune")
    T: float = option(4.0, gt=0, help="KD temperature of the fine-tune (typical: 2-8)")
    alpha: float = option(0.9, ge=0, le=1, help="weight of the teacher term in the KD fine-tune")

    def validate(self) -> None:
        given = [k for k in ("module", "nodes", "pattern") if getattr(self, k)]
        if len(given) != 1:
            raise PassError(f"pass '{self.name}': give exactly one of module=PATH, nodes=FROM..TO, pattern=REGEX "
                            f"to choose the block (got {', '.join(given) or 'none'})")
        if self.student and (self.width < 1.0 or self.low_rank or self.depth):
            raise PassError(f"pass '{self.name}': a custom student= excludes width/low_rank/depth")
        if not self.student and self.width == 1.0 and not self.low_rank and not self.depth:
            raise PassError(f"pass '{self.name}': say how to shrink the block: width<1, low_rank in (0,1), "
                            "depth>=1, or student=pkg.mod:callable")

    def check_context(self, ctx: PassContext) -> str | None:
        from slimfx.passes.finetune import data_problem

        if data_problem(ctx.calibration_data, "calibration data") and data_problem(ctx.train_data):
            return (f"{self.name} trains the student block on the block's inputs, recorded from calibration or "
                    "train data, and there is none: give data (calibration or train)")
        return None

    def _inputs(self, ctx: PassContext) -> list[tuple]:
        if ctx.calibration_data is not None:
            return ctx.calibration_batches()
        if ctx.train_data is not None:
            return [normalize_batch(b)[0] for b in ctx.train_data]
        raise PassError(f"pass '{self.name}' needs calibration data (or training data) to train the student block")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        sel = select_nodes(graph, module=self.module, nodes=self.nodes, pattern=self.pattern)
        inp, out = boundary(graph, sel)
        scope = self.module or _common_path(sel)
        teacher_block = extract(graph, sel, inp, out)
        original = graph.copy()
        X_tr, (X_ho, Y_ho), n_hold, example = self._record(graph, inp, out, ctx)
        teacher_mod = ir.lower(teacher_block).eval()
        student_obj, changes = self._student(teacher_block, teacher_mod, example, scope, sel)
        res = distill(teacher_mod, student_obj, (X_tr, None), loss="mse", epochs=self.epochs, lr=self.lr,
                      batch_size=self.batch_size, example_inputs=(example,), seed=ctx.seed, quiet=ctx.quiet,
                      logger=ctx.logger)
        mse, rel = _block_error(res.module.eval(), X_ho, Y_ho)
        s_graph, prefix = self._student_graph(student_obj, example, scope)
        params_before, macs_before = ir.count_params(graph), ir.count_macs(graph)
        splice(graph, sel, inp, out, s_graph, prefix)
        ir.verify(graph)

        stats = {"scope": scope or f"{sel[0].name}..{sel[-1].name}", **changes,
                 "params_before": params_before, "params_after": ir.count_params(graph),
                 "macs_before": macs_before, "macs_after": ir.count_macs(graph),
                 "block_params_before": ir.count_params(teacher_block), "block_params_after": ir.count_params(s_graph),
                 "block_macs_before": ir.count_macs(teacher_block), "block_macs_after": ir.count_macs(s_graph),
                 "block_mse": mse, "block_rel_error": rel, "train_samples": len(X_tr), "holdout_samples": n_hold,
                 "block_epochs": self.epochs}
        if self.kd_epochs and ctx.train_data is not None:
            kd = distill(original, graph, ctx.train_data, loss="kd", loss_options={"T": self.T, "alpha": self.alpha},
                         epochs=self.kd_epochs, lr=self.kd_lr, batch_size=self.batch_size, eval_fn=ctx.eval_fn,
                         seed=ctx.seed, quiet=ctx.quiet, logger=ctx.logger)
            stats["kd_epochs"] = self.kd_epochs
            stats["kd_final_loss"] = kd.history[-1]["loss"]
        stats["top1_agreement_calib"] = _agreement(original, graph, self._inputs(ctx)[:64])
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return PassResult(changed=True, stats=stats)

    def _record(self, graph: Graph, inp: Node, out: Node, ctx: PassContext):
        """The block's inputs and outputs on the calibration data, read as extra graph outputs:
        (train inputs, (held-out inputs, held-out outputs), number held out, an example input)."""
        tap = graph.copy()
        tap.set_outputs((tap.node(inp.name), tap.node(out.name)))
        tap_mod = ir.lower(tap).eval()
        xs, ys, n = [], [], 0
        with torch.no_grad():
            for batch in self._inputs(ctx):
                a, b = tap_mod(*batch)
                xs.append(a)
                ys.append(b)
                n += len(a)
                if n >= self.max_samples:
                    break
        X, Y = torch.cat(xs)[: self.max_samples], torch.cat(ys)[: self.max_samples]
        n_hold = int(len(X) * self.holdout) if len(X) * self.holdout >= 16 else 0
        X_tr, X_ho, Y_ho = X[: len(X) - n_hold], X[len(X) - n_hold:], Y[len(Y) - n_hold:]
        if not n_hold:
            X_ho, Y_ho = X_tr, Y[: len(X_tr)]
        example = X[: inp.meta.shape[0]] if len(X) >= inp.meta.shape[0] else torch.randn(inp.meta.shape)
        return X_tr, (X_ho, Y_ho), n_hold, example

    def _student(self, teacher_block: Graph, teacher_mod: nn.Module, example: torch.Tensor, scope: str,
                 sel: list[Node]) -> tuple[nn.Module | Graph, dict]:
        """The student block (a user module, or a shrunk copy of the block's graph) and what was changed."""
        if self.student:
            custom = _load_callable(self.student)(teacher_mod, example)
            if not isinstance(custom, nn.Module):
                raise PassError(f"distill-subgraph: student={self.student!r} returned {type(custom).__name__}, "
                                "not an nn.Module")
            return custom, {"custom": self.student}
        block = teacher_block.copy()
        changes = {}
        if self.depth:
            changes["blocks_removed"] = reduce_depth(block, scope, self.depth)
        if self.width < 1.0:
            changes["layers_narrowed"] = reduce_width(block, self.width)
        if self.low_rank:
            changes["layers_factorized"] = factorize(block, self.low_rank)
        if not any(changes.values()):
            raise PassError(f"distill-subgraph: nothing in the block {scope or sel[0].name} could be shrunk with "
                            f"width={self.width}, low_rank={self.low_rank}, depth={self.depth}")
        ir.propagate_shapes(block, example)
        ir.verify(block)
        return block, changes

    def _student_graph(self, student: nn.Module | Graph, example: torch.Tensor, scope: str) -> tuple[Graph, str]:
        """The trained student as a graph to splice in, and the prefix of its param names."""
        if isinstance(student, Graph):
            return student, ""
        s_graph = ir.capture(student.eval(), (example,))
        for nd in s_graph:  # a captured eval-mode batch norm should follow the graph's mode, as the block's did
            if nd.op == "batch_norm" and nd.attrs.get("training") is False:
                nd.attrs = {**nd.attrs, "training": None}
        return s_graph, f"{scope}." if scope else "distilled."


@torch.no_grad()
def _block_error(student: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float]:
    """(MSE, relative L2 error) of the student block's outputs against the teacher block's."""
    pred = torch.cat([student(X[i:i + 256]) for i in range(0, len(X), 256)])
    return float(torch.mean((pred - Y) ** 2)), float((pred - Y).norm() / Y.norm().clamp_min(1e-12))


def _common_path(sel: list[Node]) -> str:
    paths = [n.module_path.split(".") for n in sel if n.module_path]
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


@torch.no_grad()
def _agreement(a: Graph, b: Graph, batches: list[tuple]) -> float | None:
    """Top-1 agreement of two graphs on input batches (None when the output is not [B, classes])."""
    ma, mb = ir.lower(a).eval(), ir.lower(b).eval()
    same = total = 0
    for batch in batches:
        ya, yb = ma(*batch), mb(*batch)
        if not isinstance(ya, torch.Tensor) or ya.dim() != 2:
            return None
        same += int((ya.argmax(1) == yb.argmax(1)).sum())
        total += len(ya)
    return same / total if total else None


__all__ = ["DistillSubgraph", "select_nodes", "boundary", "extract", "reduce_depth", "reduce_width", "factorize",
           "splice"]
