"""Rewrite rules as values, applied to a fixed point.

    from slimfx.passes import Rule, RuleSet, apply_rules, call

    rules = RuleSet([
        Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), name="silu"),
        Rule(lambda x: call("identity", x), lambda x: x, name="identity"),
    ])
    counts = apply_rules(graph, rules)          # {"silu": 2, "identity": 5}

A `Rule` is a pattern (a plain torch function, see `passes/rewrite.py`), a replacement written the
same way (a plain function of the pattern's arguments, by name), and an optional
`condition(match) -> bool`. The replacement is traced once; applying it to a match builds its ops
before the match's output node, with its arguments bound to what the pattern's arguments matched:

- a replacement may return one of its arguments (`lambda x: x`: the matched value replaces the output);
- an op that the pattern has exactly once (`F.conv2d` in `bn(conv(x))` -> `conv(x)`) is that matched
  node rebuilt: attributes the replacement leaves at their defaults are the matched node's (stride,
  padding, ...), and it keeps the matched node's name, module path and source line;
- `@precompute` functions run at rewrite time on the matched tensors; their results become params
  (see `precompute`).

What a function cannot say, `Rule(pattern, replace=fn)` says with code: `fn(graph, match)` builds nodes
(`match.insert(op, inputs, attrs)`) and returns the value that takes the output's place, or None to
leave the match alone.

`apply_rules` visits every node whose op is the output op of some rule (in graph order; rules of a
set in their order), rewrites the first match, and looks again at what a rewrite touched: the nodes it
created, the readers of the new value down to the deepest pattern's depth, and the readers of match
inputs that lost a reader. It stops when nothing matches any more, so work stays linear in the graph;
a rule set that keeps rewriting (rules undoing each other, a replacement that recreates its pattern)
stops at a bound with a PassError naming the rules. Params that only the rewritten nodes read are
dropped.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from slimfx.ir import Graph, Node, Param, iter_refs, map_refs
from slimfx.ir.errors import PassError
from slimfx.ir.ops import OPS
from slimfx.ir.verify import infer_meta
from slimfx.passes.base import Pass, PassContext, PassResult
from slimfx.passes.rewrite import Match, Pattern, _default_attr_keys, precompute, trace

Condition = Callable[[Match], bool]
Replace = Callable[[Graph, Match], Any]


class Rule:
    """A pattern, its replacement and an optional condition (see the module docstring).

    pattern: a plain torch function (or a `Pattern`).
    replacement: a plain function of the pattern's arguments (any subset, by name).
    condition: `condition(match) -> bool`; a match it rejects is left alone.
    name: how counts and errors name the rule (default: the pattern function's name).
    replace: instead of `replacement`, `replace(graph, match)` building the new value with code.
    exclusive: True (default): every value computed inside a match except its output must be read only
        inside it. False: inner values may have other readers; they stay for them.
    """

    def __init__(self, pattern: Callable | Pattern, replacement: Callable | None = None,
                 condition: Condition | None = None, *, name: str | None = None, replace: Replace | None = None,
                 exclusive: bool = True, exact_attrs: bool = False):
        self.pattern = pattern if isinstance(pattern, Pattern) else Pattern(pattern, exact_attrs=exact_attrs)
        pname = self.pattern.name
        self.name = name or (pname if pname != "<lambda>" else f"{self.pattern.anchor_op}-rule")
        if (replacement is None) == (replace is None):
            raise PassError(f"rule {self.name!r}: give a replacement function (what the match becomes, written "
                            "like the pattern) or replace=fn(graph, match), not both or neither")
        self.condition = condition
        self.replace = replace
        self.exclusive = exclusive
        self.template = _Template(replacement, self.pattern, self.name) if replacement is not None else None

    def match(self, node: Node) -> Match | None:
        """The match anchored at `node` that the condition accepts, or None."""
        m = self.pattern._attempt(node, node.graph, self.exclusive)  # type: ignore[arg-type]
        return m if m is not None and (self.condition is None or self.condition(m)) else None

    def find(self, graph: Graph) -> list[Match]:
        """Every match the condition accepts (they may overlap); nothing is rewritten."""
        return [m for n in graph.find(self.pattern.anchor_op) if (m := self.match(n)) is not None]

    def explain(self, graph: Graph) -> str:
        """Why the rule does (not) match: see `Pattern.explain`; named after the rule (its pattern is often a
        lambda, which Pattern.explain could only call '<lambda>')."""
        text = self.pattern.explain(graph, condition=self.condition, exclusive=self.exclusive)
        head = f"pattern {self.pattern.name!r}"
        if self.name != self.pattern.name and text.startswith(head):
            text = f"rule {self.name!r}" + text[len(head):]
        return text

    def with_(self, **changes: Any) -> Rule:
        """A copy with other `condition`, `replace` or `name` (the traced pattern and replacement are shared)."""
        new = object.__new__(Rule)
        new.__dict__.update(self.__dict__)
        for k, v in changes.items():
            if k not in ("condition", "replace", "name"):
                raise TypeError(f"Rule.with_() takes condition, replace or name, not {k!r}")
            setattr(new, k, v)
        return new

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, anchored at {self.pattern.anchor_op!r})"


class RuleSet:
    """An ordered collection of rules with unique names; `apply_rules(graph, rule_set)` runs it."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules: tuple[Rule, ...] = tuple(rules)
        for r in self.rules:
            if not isinstance(r, Rule):
                raise PassError(f"a RuleSet holds Rule values, got {r!r} ({type(r).__name__})")
        dup = [n for n, c in Counter(r.name for r in self.rules).items() if c > 1]
        if dup:
            raise PassError(f"rule names must be unique in a RuleSet (they key the counts); repeated: "
                            f"{', '.join(dup)}; give the rules name=...")
        by_op: dict[str, list[Rule]] = {}
        for r in self.rules:
            by_op.setdefault(r.pattern.anchor_op, []).append(r)
        #: anchor op -> the rules anchored there, in set order
        self.by_op: dict[str, tuple[Rule, ...]] = {k: tuple(v) for k, v in by_op.items()}
        self.depth = max((r.pattern.depth for r in self.rules), default=0)
        #: ops of the pattern nodes below the output: a value of such an op that loses readers may complete
        #: a match further down
        self.inner_ops = frozenset(p.op for r in self.rules for p in r.pattern.ops if p is not r.pattern.output)
        self.max_ops = max((len(r.pattern.ops) for r in self.rules), default=0)

    @classmethod
    def of(cls, rules: RuleSet | Rule | Iterable[Rule]) -> RuleSet:
        if isinstance(rules, RuleSet):
            return rules
        return cls([rules] if isinstance(rules, Rule) else rules)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: RuleSet | Iterable[Rule]) -> RuleSet:
        return RuleSet([*self.rules, *RuleSet.of(other).rules])

    def __getitem__(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule {name!r}; rules: {', '.join(r.name for r in self.rules)}")

    def explain(self, graph: Graph) -> str:
        return "\n".join(r.explain(graph) for r in self.rules)

    def __repr__(self) -> str:
        return f"RuleSet([{', '.join(r.name for r in self.rules)}])"


# --- replacement templates ----------------------------------------------------------------------------

class _Template:
    """A replacement function traced once; `_Run.instantiate` builds it for each match."""

    def __init__(self, fn: Callable, pattern: Pattern, rule: str):
        graph, fx_nodes, args = trace(fn, "replacement")
        names = [name for name, _ in pattern.args.values()]
        unknown = [name for name, _ in args.values() if name not in names]
        if unknown:
            raise PassError(f"rule {rule!r}: the replacement's argument(s) {', '.join(unknown)} are not arguments "
                            f"of the pattern ({', '.join(names)}); a replacement takes the pattern's arguments "
                            "by name")
        self.args = {n: name for n, (name, _) in args.items()}
        out = graph.outputs
        if not isinstance(out, Node):
            raise PassError(f"rule {rule!r}: the replacement must return one value, got {out!r}")
        self.output = out
        once = {op for op, c in Counter(p.op for p in pattern.ops).items() if c == 1}
        self.steps: list[tuple[str, Node]] = []  # ("pre" | "index" | "op", template node)
        self.counterpart: dict[Node, str] = {}   # op node -> name of the pattern node of the same op
        self.literal: dict[Node, dict[str, Any]] = {}  # op node -> attrs to set (the rest: the counterpart's)
        self.roles: dict[Node, list[str]] = {}
        computed: set[Node] = set()
        for n in graph:
            if n.op in ("input", "output"):
                continue
            target = n.attrs.get("target") if n.op == "opaque" else None
            if isinstance(target, precompute):
                self.steps.append(("pre", n))
                computed.add(n)
            elif n.op in ("getitem", "slice") and n.inputs and n.inputs[0] in computed:
                self.steps.append(("index", n))
                computed.add(n)
            elif n.op == "opaque":
                raise PassError(f"rule {rule!r}: the replacement calls {target!r}, which is no canonical op; write "
                                "it with torch ops, call(op, ...), or compute params with a @precompute function")
            else:
                self.steps.append(("op", n))
                if n.op in once:
                    self.counterpart[n] = next(p.name for p in pattern.ops if p.op == n.op)
                    wild = _default_attr_keys(fx_nodes[n.name], n, graph) if n.name in fx_nodes else set()
                    self.literal[n] = {k: v for k, v in n.attrs.items() if k not in wild}
                self.roles[n] = _operand_names(n.op)
        if out in computed:
            raise PassError(f"rule {rule!r}: the replacement returns a precomputed tensor; return a value computed "
                            "by a torch op on it, or one of the arguments")
        self.precomputes = any(kind == "pre" for kind, _ in self.steps)
        #: the arguments that op nodes read as they are (a param among them keeps its tensor)
        self.direct = {r for kind, n in self.steps if kind == "op" for r in iter_refs((n.inputs, n.attrs))
                       if r in self.args}
        #: the argument the replacement returns as it is (`lambda x: x`), else None
        self.passthrough: str | None = self.args.get(out)


@functools.cache
def _operand_names(op: str) -> list[str]:
    """Positional parameter names of the op's implementation (conv2d: x, weight, bias)."""
    try:
        sig = inspect.signature(OPS[op].impl)
    except (KeyError, TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


# --- the driver --------------------------------------------------------------------------------------------

class _Run:
    """One application of a rule set to a graph: rewrites, param bookkeeping, what to look at again."""

    def __init__(self, graph: Graph, rules: RuleSet, drop_params: bool = True):
        self.graph = graph
        self.rules = rules
        self.drop_params = drop_params
        self.counts = dict.fromkeys((r.name for r in rules), 0)
        self.readers: Counter[str] | None = None  # param name -> nodes reading it, built when first needed
        self.unread: set[str] = set()             # params a rewrite took a reader from

    # -- params -------------------------------------------------------------------------------------------
    def _readers(self) -> Counter[str]:
        if self.readers is None:
            readers: Counter[str] = Counter()
            for n in self.graph:
                for p in _params(n):
                    readers[p.name] += 1
            self.readers = readers
        return self.readers

    def _count(self, node: Node) -> None:
        if self.readers is not None:
            for p in _params(node):
                self.readers[p.name] += 1

    def _forget(self, node: Node) -> None:
        if self.readers is None and not self.drop_params:
            return
        params = _params(node)
        if params:
            readers = self.readers
            for p in params:
                self.unread.add(p.name)
                if readers is not None:
                    readers[p.name] -= 1

    def _store(self, m: Match, like: Node | None, k: int, role: str, value: torch.Tensor,
               keep: set[str], inside: dict[str, int]) -> Param:
        """A precomputed tensor as a param: in place of the param the matched node `like` read at operand
        `k` when only the match reads it (and the replacement does not read it too), else a new param.
        `inside`: how often the matched nodes read each param (filled on first use)."""
        graph = self.graph
        old = like.inputs[k] if like is not None and k < len(like.inputs) else None
        if isinstance(old, Param) and old.name not in keep:
            if not inside:
                for t in m.nodes.values():
                    for p in _params(t):
                        inside[p.name] = inside.get(p.name, 0) + 1
            if self._readers()[old.name] == inside.get(old.name, 0):
                graph.params[old.name] = value.detach()  # a new tensor: the old one may be the user's
                keep.add(old.name)
                return old
        if isinstance(old, Param):
            base = old.name
        else:
            owner = like if like is not None else m.anchor
            base = f"{owner.module_path or owner.name}.{role}"
        return graph.add_param(base, value)

    # -- one rewrite ----------------------------------------------------------------------------------------
    def instantiate(self, rule: Rule, m: Match) -> tuple[Any, list[Node]]:
        """Build the rule's replacement for `m`: the value replacing the output, and the nodes created (or
        rebuilt)."""
        tpl = rule.template
        assert tpl is not None
        if tpl.passthrough is not None:
            return m.values[tpl.passthrough], []
        env: dict[Node, Any] = {n: m.values[name] for n, name in tpl.args.items()}
        if tpl.precomputes:
            self._readers()  # counted before this rewrite adds readers
        keep = {v.name for n in tpl.direct for v in (env[n],) if type(v) is Param}  # params it reads as they are
        inside: dict[str, int] = {}
        reused: set[Node] = set()
        created: list[Node] = []
        for kind, t in tpl.steps:
            if kind == "pre":
                env[t] = _precompute(rule, t, _bind_all(t.inputs, env), _bind_all(t.attrs["kwargs"], env), self.graph)
                continue
            if kind == "index":
                env[t] = env[t.inputs[0]][t.attrs["index"]]
                continue
            like = m.nodes.get(tpl.counterpart[t]) if t in tpl.counterpart else None
            ins = list(_bind_all(t.inputs, env))
            for k, v in enumerate(ins):
                if isinstance(v, torch.Tensor):
                    role = tpl.roles[t][k] if k < len(tpl.roles[t]) else f"arg{k}"
                    ins[k] = self._store(m, like, k, role, v, keep, inside)
                elif type(v) in _CONTAINERS and any(isinstance(x, torch.Tensor) for x in _leaves(v)):
                    raise PassError(f"rule {rule.name!r}: a precomputed tensor must be a whole operand of "
                                    f"{t.op}, not part of one")
            meta = m.anchor.meta if t is tpl.output else None
            literal = _bind_all(tpl.literal[t], env) if like is not None else None
            if like is not None and like not in reused and _rebuildable(like, t is tpl.output, m, rule.exclusive):
                # the matched node itself, rebuilt: moved before the anchor and given its new operands (it
                # keeps its name, module path and source)
                reused.add(like)
                self._forget(like)
                if like is not m.anchor:
                    self.graph.move_before(like, m.anchor)
                like.inputs = ins
                if literal:
                    like.attrs = {**like.attrs, **literal}
                like.meta = meta if meta is not None else infer_meta(like)
                env[t] = like
                created.append(like)
                self._count(like)
                continue
            attrs = {**like.attrs, **literal} if like is not None else _bind_all(t.attrs, env)
            owner = like if like is not None else m.anchor
            node = self.graph.create_node(t.op, ins, attrs, before=m.anchor, module_path=owner.module_path,
                                          source=owner.source, meta=meta)
            if meta is None:
                node.meta = infer_meta(node)
            env[t] = node
            created.append(node)
            self._count(node)
        return env[tpl.output], created

    def apply(self, rule: Rule, m: Match) -> list[Node] | None:
        """Rewrite one match; returns the nodes to look at again (None: the replacement declined)."""
        graph, anchor = self.graph, m.anchor
        if rule.template is not None:
            new, created = self.instantiate(rule, m)
        else:
            new = rule.replace(graph, m)  # type: ignore[misc]
            if new is None:
                return None
            created = m.created
            self.readers = None  # the code may have made or dropped readers anywhere
        former = list(anchor.users)
        if new is not anchor:
            if isinstance(new, Node) and new.meta is None:
                new.meta = anchor.meta
            graph.replace_all_uses(anchor, new)
        survivors = []
        for p in reversed(rule.pattern.ops):  # users before producers
            t = m.nodes.get(p.name)
            if t is None or t.graph is not graph:
                continue
            if t.users:
                survivors.append(t)
                continue
            self._forget(t)
            graph.erase(t)
        self.counts[rule.name] += 1
        return self._touched(new, former, created, m, survivors)

    def _touched(self, new: Any, former: list[Node], created: list[Node], m: Match,
                 survivors: list[Node]) -> list[Node]:
        """What a rewrite may have made matchable: the new nodes, the readers of the new value down to the
        deepest pattern's depth, and the readers of match inputs (or kept inner nodes) that lost a reader
        and may now be the inner node of a match further down."""
        depth, rs = self.rules.depth, self.rules
        out = [*created, *former]
        if new is m.anchor:  # edited in place
            out.append(new)
        level = former
        for _ in range(depth - 1):
            level = [u for n in level for u in n.users]
            out += level
        if not rs.inner_ops:
            return out
        inner_ops, max_ops = rs.inner_ops, rs.max_ops
        for x in (*m.values.values(), *survivors):
            if type(x) is not Node or x.graph is not self.graph or x.op not in inner_ops or len(x.users) > max_ops:
                continue
            out.append(x)
            level = list(x.users)
            for _ in range(depth - 1):
                out += level
                level = [u for n in level for u in n.users]
        return out

    def finish(self) -> None:
        """Drop the params whose last readers the rewrites removed."""
        graph = self.graph
        unread = self.unread & graph.params.keys()
        if not unread or not self.drop_params:
            return
        if self.readers is not None:
            gone = {name for name in unread if self.readers[name] <= 0}
        else:  # operands first (cheap); attrs only for what no operand reads
            gone = set(unread)
            for n in graph:
                for p in _operand_params(n):
                    gone.discard(p.name)
            if gone:
                gone.difference_update(p.name for n in graph for p in _attr_params(n))
        for name in gone:
            del graph.params[name]
            graph.buffers.discard(name)


def _rebuildable(like: Node, is_output: bool, m: Match, exclusive: bool) -> bool:
    """Whether a replacement node may be the matched node of its op, edited: only the match reads that
    node, and it goes away with it (so no one sees its old value change). The anchor can only become the
    replacement's output (a node reading it would be redirected to itself)."""
    if like is m.anchor:
        return is_output
    matched = m.nodes.values()
    return all(u in matched and (exclusive or u is m.anchor) for u in like.users)


def _params(node: Node) -> list[Param]:
    """Every param reference of a node, in its operands and attrs (a param read twice: twice)."""
    return _operand_params(node) + _attr_params(node)


def _operand_params(node: Node) -> list[Param]:
    out = []
    for v in node.inputs:
        if type(v) is Param:
            out.append(v)
        elif type(v) in _CONTAINERS:
            out += (r for r in iter_refs(v) if isinstance(r, Param))
    return out


def _attr_params(node: Node) -> list[Param]:
    out = []
    for v in node.attrs.values():
        if type(v) is Param:
            out.append(v)
        elif type(v) in _CONTAINERS and not _plain(v):
            out += (r for r in iter_refs(v) if isinstance(r, Param))
    return out


_CONTAINERS = frozenset({tuple, list, dict, slice})
_PLAIN = frozenset({int, float, bool, str, type(None), torch.dtype})  # never hold a reference


def _plain(v: Any) -> bool:
    """A tuple/list of plain constants (a stride, a shape): no reference inside."""
    if type(v) is not tuple and type(v) is not list:
        return False
    for e in v:
        if type(e) not in _PLAIN:
            return False
    return True


def _bind_all(value: Any, env: dict[Node, Any]) -> Any:
    """A template operand or attr structure with each template node replaced by what it stands for."""
    if type(value) is tuple:
        return tuple(env[v] if type(v) is Node else _bind_all(v, env) if type(v) in _CONTAINERS else v
                     for v in value)
    if type(value) is dict:
        return {k: env[v] if type(v) is Node else _bind_all(v, env) if type(v) in _CONTAINERS else v
                for k, v in value.items()}
    return map_refs(value, lambda r: env[r] if type(r) is Node else r)


def _leaves(v: Any) -> list[Any]:
    if isinstance(v, (tuple, list)):
        return [x for e in v for x in _leaves(e)]
    return [v]


def _precompute(rule: Rule, t: Node, args: Any, kwargs: Any, graph: Graph) -> Any:
    fn = t.attrs["target"]

    def tensor(r: Node | Param) -> Any:
        if type(r) is Param:
            return graph.params[r.name]
        raise PassError(f"rule {rule.name!r}: {fn!r} computes params at rewrite time, but the match bound the "
                        f"computed value %{r.name} ({r.op}) to one of its arguments; give the rule a condition "
                        "that requires params there (isinstance(match['w'], Param))")

    args = [graph.params[r.name] if type(r) is Param else tensor(r) if type(r) is Node else
            map_refs(r, tensor) if type(r) in _CONTAINERS else r for r in args]
    return fn.fn(*args, **map_refs(kwargs, tensor))  # params are detached tensors: no autograd


def apply_rules(graph: Graph, rules: RuleSet | Rule | Iterable[Rule], *, max_rewrites: int | None = None,
                drop_params: bool = True) -> dict[str, int]:
    """Rewrite `graph` with `rules` until none matches; returns how often each rule fired (by name).

    max_rewrites: the safety bound (default 10 x the graph's nodes + 100); a rule set still rewriting
    after that many rewrites does not converge, and a PassError names its busiest rules.
    drop_params: drop the params that only rewritten nodes read (one scan of the graph when a rewritten
    node read params); a caller that sweeps unused params itself right after may skip it.
    """
    rs = RuleSet.of(rules)
    run = _Run(graph, rs, drop_params)
    by_op = rs.by_op
    bound = max_rewrites if max_rewrites is not None else 10 * len(graph) + 100
    queue = [n for n in graph if n.op in by_op]
    pending = set(queue)
    total = i = 0
    while i < len(queue):
        node = queue[i]
        i += 1
        pending.discard(node)
        if node.graph is not graph or node.op not in by_op:  # erased, or edited into another op
            continue
        for rule in by_op[node.op]:
            m = rule.pattern._attempt(node, graph, rule.exclusive)
            if m is None or (rule.condition is not None and not rule.condition(m)):
                continue
            if total >= bound:
                run.finish()
                raise _not_converging(graph, rs, run.counts, node, bound)
            touched = run.apply(rule, m)
            if touched is None:
                continue
            total += 1
            for t in touched:
                if t not in pending and t.graph is graph and t.op in by_op:
                    pending.add(t)
                    queue.append(t)
            break
    run.finish()
    return run.counts


def _not_converging(graph: Graph, rs: RuleSet, counts: dict[str, int], node: Node, bound: int) -> PassError:
    busy = ", ".join(f"'{k}' ({v} rewrites)" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v)
    names = ", ".join(r.name for r in rs)
    return PassError(f"rules [{names}] do not converge on graph '{graph.name}': still matching after {bound} "
                     f"rewrites (busiest: {busy}; next at %{node.name}, {node.where()}). A replacement recreates what a "
                     "rule matches, or two rules undo each other: make a condition reject what a replacement "
                     "produces, or the pattern's attributes literal (left at their defaults they match any value: "
                     "F.gelu(x) matches a tanh gelu too; `exact_attrs = True` on a PatternPass, "
                     "Pattern(fn, exact_attrs=True) in a Rule) (a pass in a recipe: leave it out and report it)")


def rewrite(graph: Graph, pattern: Pattern | Callable, replacement: Replace, *,
            condition: Condition | None = None) -> int:
    """One sweep of one pattern: replace every (non-overlapping) match; returns how many were replaced.

    `replacement(graph, match)` builds new nodes (use `match.insert(...)` to place them before the
    anchor) and returns the value that takes the place of the pattern's output: a new node, an existing
    value (e.g. `match["x"]`), the anchor itself after editing it in place, or None to leave the match
    alone. Matched nodes left without users are erased. Nodes created by replacements are not matched
    again (`apply_rules` rewrites to a fixed point).
    """
    rule = Rule(pattern, replace=replacement, condition=condition)
    run = _Run(graph, RuleSet([rule]))
    for node in graph.find(rule.pattern.anchor_op):
        if node.graph is graph and (m := rule.match(node)) is not None:
            run.apply(rule, m)
    run.finish()
    return run.counts[rule.name]


# --- passes made of rules -------------------------------------------------------------------------------------

class RulePass(Pass):
    """A pass that applies a rule set to a fixed point.

        @register_pass("my-cleanup")
        class MyCleanup(RulePass):
            '''One line saying what it does.'''
            def rule_set(self) -> RuleSet:
                return MY_RULES            # build rules once (e.g. functools.cache), not per run

    Stats: `rewritten` (total) and each rule's count; override `summarize(counts, graph)` for others.
    When nothing matched, the rules' `explain` is logged at DEBUG level.
    """

    def rule_set(self) -> RuleSet:  # pragma: no cover - abstract
        raise NotImplementedError(f"rule pass '{self.name}' must define rule_set(self) -> RuleSet")

    def summarize(self, counts: dict[str, int], graph: Graph) -> dict[str, Any]:
        return {"rewritten": sum(counts.values()), **{k: v for k, v in counts.items() if v}}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        rules = self.rule_set()
        counts = apply_rules(graph, rules)
        n = sum(counts.values())
        if not n and ctx.logger.isEnabledFor(logging.DEBUG):  # say why nothing matched
            ctx.logger.debug(rules.explain(graph))
        return PassResult(changed=n > 0, stats=self.summarize(counts, graph))


_COMPILED: dict[type, Rule] = {}


class PatternPass(RulePass):
    """A pass made of one pattern and its replacement (a one-rule RulePass).

        @register_pass("fuse-silu")
        class FuseSilu(PatternPass):
            '''Rewrites x * sigmoid(x) as silu(x).'''
            pattern = staticmethod(lambda x: x * torch.sigmoid(x))
            replacement = staticmethod(lambda x: F.silu(x))      # or: def replace(self, graph, match)
            def condition(self, match): return True              # optional; may read the options

    Stats: {"rewritten": n}.
    """

    pattern: ClassVar[Callable]
    replacement: ClassVar[Callable | None] = None
    exact_attrs: ClassVar[bool] = False

    @classmethod
    def compiled_rule(cls) -> Rule:
        if cls not in _COMPILED:
            fn, rep = (_static(cls, k) for k in ("pattern", "replacement"))
            if fn is None:
                raise PassError(f"pattern pass '{cls.name}' ({cls.__qualname__}) defines no `pattern`")
            if rep is None and cls.replace is PatternPass.replace:
                raise PassError(f"pattern pass '{cls.name}' ({cls.__qualname__}) defines neither `replacement` "
                                "(a plain function) nor replace(self, graph, match)")
            pattern = Pattern(fn, exact_attrs=cls.exact_attrs)
            _COMPILED[cls] = Rule(pattern, rep, name=cls.name or cls.__name__,
                                  replace=None if rep is not None else lambda g, m: None)
        return _COMPILED[cls]

    @classmethod
    def compiled_pattern(cls) -> Pattern:
        return cls.compiled_rule().pattern

    def condition(self, match: Match) -> bool:
        return True

    def replace(self, graph: Graph, match: Match) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"pattern pass '{self.name}' must define replace(graph, match)")

    def rule_set(self) -> RuleSet:
        rule = self.compiled_rule()
        changes: dict[str, Any] = {}
        if type(self).condition is not PatternPass.condition:
            changes["condition"] = self.condition
        if rule.template is None:
            changes["replace"] = self.replace
        return RuleSet([rule.with_(**changes) if changes else rule])

    def summarize(self, counts: dict[str, int], graph: Graph) -> dict[str, Any]:
        return {"rewritten": sum(counts.values())}


def _static(cls: type, key: str) -> Any:
    fn = inspect.getattr_static(cls, key, None)
    return fn.__func__ if isinstance(fn, staticmethod) else fn


__all__ = ["Rule", "RuleSet", "apply_rules", "rewrite", "RulePass", "PatternPass"]
