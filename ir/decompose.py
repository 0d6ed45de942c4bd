"""Decomposition: a call that capture has no converter for becomes canonical ops instead of one opaque node.

The torch.fx front end keeps some calls whole: functions libraries mark with `torch.fx.wrap`
(torchvision's stochastic depth, helpers that index a relative-position-bias table), modules fx does
not trace into (`torch.nn` ones such as `nn.MultiheadAttention`), tensor methods and torch functions
without a converter. Each such call is captured again on its own, with its example operands (recorded
while capture ran the model) and nothing else:

1. traced through with torch.fx, when it is Python code outside torch (a wrapped helper): its body is
   converted like the model's, so module converters, source lines and eval-mode no-ops (stochastic
   depth is the identity in eval) come out as they would in forward;
2. else (or when fx cannot trace it) captured with `torch.export` and its ATen ops mapped onto the
   canonical ops by the export front end (ir.capture_export), with the dims that follow the batch (and
   sequence) size dynamic, so the reshapes it makes follow them too.

The result is spliced into the graph in place of the call, its nodes named after it
(`%mha_linear`) and placed in the call's module. A call stays `opaque` only when both fail; the
node's `why` attr then says why, and the exporters repeat it. Nothing here is specific to a library:
one mechanism covers the long tail of helpers.
"""

from __future__ import annotations

import linecache
import logging
import os
import time
import traceback
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.ir.graph import Node, Param, iter_refs, map_refs

if TYPE_CHECKING:
    from slimfx.ir.capture import _Converter, _Scope

_log = logging.getLogger(__name__)
MAX_DEPTH = 8  # calls decomposed inside decomposed calls


class NotDecomposed(Exception):
    """The call cannot be decomposed; the message says why (it ends up on the opaque node, `why`)."""


class _Call(nn.Module):
    """One call as a module of its own: `forward(xs)` makes the call with its tensor (and shape-value)
    operands taken from `xs`, everything else as it was. A called module is the submodule `inner`."""

    def __init__(self, kind: str, target: Any, args: Any, kwargs: Any, slots: dict[Any, int],
                 module: nn.Module | None = None):
        super().__init__()
        if module is not None:
            self.inner = module
        self._kind, self._target, self._args, self._kwargs, self._slots = kind, target, args, kwargs, slots

    def forward(self, xs):
        args, kwargs = map_refs((self._args, self._kwargs), lambda r: xs[self._slots[r]])
        if self._kind == "call_module":
            return self.inner(*args, **kwargs)
        if self._kind == "call_method":
            return getattr(args[0], self._target)(*args[1:], **kwargs)
        return self._target(*args, **kwargs)


def _first_line(e: BaseException) -> str:
    """`TypeName: first line of the message`, and the model's line it failed on (`helpers.py:12 (`code`)`)."""
    from slimfx.ir.capture import _user_frame

    text = str(e).strip()
    where = ""
    frame = _user_frame(traceback.extract_tb(e.__traceback__))
    if frame is not None and frame.lineno:
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno}" + (f" (`{line}`)" if line else "")
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}{where}"


def _target_name(kind: str, target: Any, module: nn.Module | None) -> str:
    if module is not None:
        cls = type(module)
        return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__qualname__
    if kind == "call_method":
        return f".{target}()"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _is_python(kind: str, target: Any, module: nn.Module | None) -> bool:
    """Python code outside torch (a user's or a library's), which torch.fx can trace through."""
    from slimfx.ir.capture import is_internal_file

    if kind == "call_method":
        return False
    fn = type(module).forward if module is not None else target
    code = getattr(fn, "__code__", None)
    return code is not None and not is_internal_file(code.co_filename)


def decompose_call(cv: _Converter, n: fx.Node, args: Any, kwargs: Any, scope: _Scope) -> Any:
    """The value of fx call `n` (its operands `args`/`kwargs` already in the IR) as canonical nodes added to
    `cv.graph`: a node, an operand it passes through, or a tuple/list/dict of them. Raises NotDecomposed."""
    from slimfx.ir.capture import _source_of

    module = None
    qual = None
    if n.op == "call_module":
        qual = scope.qual(n.target)
        module = cv.modules[qual]
        if cv.user_leaf(module, qual):
            raise NotDecomposed("leaf_modules keeps it as one call")
    what = _target_name(n.op, n.target, module)
    if cv.depth >= MAX_DEPTH:
        raise NotDecomposed(f"{what} calls more than {MAX_DEPTH} levels of calls capture has no converter for")
    value = cv.values.get(n)
    if isinstance(value, tuple) and hasattr(value, "_fields") and any(
            u.op == "call_function" and u.target is getattr for u in n.users):
        raise NotDecomposed(f"the model reads fields of its result ({type(value).__name__}) by name")
    leaves: list[Node | Param] = []
    slots: dict[Any, int] = {}
    for r in iter_refs((args, kwargs)):
        if r not in slots:
            slots[r] = len(leaves)
            leaves.append(r)
    ex = [cv.value_of(r) for r in leaves]
    if any(v is None for v in ex):
        raise NotDecomposed("an operand has no recorded value")
    pr = [cv.value_of(r, at_probe=True) for r in leaves]
    probe = pr if cv.probe is not None and all(p is not None for p in pr) else None
    name = n.name if not scope.name else f"{scope.name}_{n.name}"
    source = _source_of(n) or scope.source
    mpath = qual if module is not None else scope.where(n.meta.get("slimfx_module_path"))
    call = _Call(n.op, n.target, args, kwargs, slots, module)
    call.training = module.training if module is not None else cv.model.training  # never .train(): it recurses
    from slimfx.ir.capture import _Scope

    sub = _Scope(qual, module_path=mpath, source=source, name=name)
    t0 = time.perf_counter()
    last = cv.graph._root._prev  # the nodes after it are the call's
    fx_error = None
    out, how = None, None
    if _is_python(n.op, n.target, module):
        try:
            out, how = _by_fx(cv, call, module, leaves, ex, probe, sub), "torch.fx"
        except NotDecomposed as e:
            fx_error = str(e)
    if how is None:
        try:
            out, how = _by_export(cv, call, leaves, ex, probe, sub), "torch.export"
        except NotDecomposed as e:
            raise NotDecomposed(f"{what}: {e}" + (f"; torch.fx: {fx_error}" if fx_error else "")) from None
    node, made = last._next, []
    while node is not cv.graph._root:
        made.append(node)
        node = node._next
    if len(made) == 1:  # one call for another (torch.cumsum: aten.cumsum) keeps its name
        if made[0].name != name and not cv.graph.has_node(name):
            cv.graph.rename(made[0], name)
    else:
        for node in made:  # what is left opaque inside says where it came from
            if node.op == "opaque" and "within" not in node.attrs:
                node.attrs = {**node.attrs, "within": what}
    _log.debug("decomposed %s (%s) with %s in %.3fs", what, name, how, time.perf_counter() - t0)
    return out


def _by_fx(cv: _Converter, call: _Call, module: nn.Module | None, leaves: list, ex: list, probe: list | None,
           sub: _Scope) -> Any:
    from slimfx.ir.capture import _record, _Tracer

    tracer = _Tracer((), inner=module)
    tracer.is_user_leaf = lambda m, q: cv.user_leaf(m, sub.qual(q))  # the user's leaf_modules, by model names
    try:
        gm = _trace_call(tracer, call)
        cv.values.update(_record(gm, [tuple(ex)]))
    except Exception as e:  # noqa: BLE001 - any failure: torch.export may still capture it
        raise NotDecomposed(_first_line(e)) from None
    if probe is not None and cv.probe is not None:
        try:
            cv.probe.update(_record(gm, [tuple(probe)]))
        except Exception as e:  # noqa: BLE001 - shape values in it then count as fixed
            _log.debug("decompose: %s does not run at the probe size: %s", sub.name, _first_line(e))
    sub.gm = gm
    placeholder = next(p for p in gm.graph.nodes if p.op == "placeholder")
    cv.depth += 1
    try:
        return cv.convert(gm, {placeholder: tuple(leaves)}, sub)
    finally:
        cv.depth -= 1


def _trace_call(tracer: Any, call: _Call) -> fx.GraphModule:
    from slimfx.ir.capture import no_trace_residue

    with no_trace_residue(call):
        return fx.GraphModule(call, tracer.trace(call), type(call).__name__)


def _register_trace_entry() -> None:
    from slimfx.ir.capture import TRACE_ENTRIES

    TRACE_ENTRIES.add(_trace_call.__code__)


_register_trace_entry()


def _by_export(cv: _Converter, call: _Call, leaves: list, ex: list, probe: list | None, sub: _Scope) -> Any:
    from slimfx.ir import capture_export

    if not all(isinstance(v, torch.Tensor) for v in ex):
        raise NotDecomposed("torch.export cannot take its shape-value operand that changes with the batch size")
    specs: list[Any] = []
    small = False
    for r, e, p in zip(leaves, ex, probe or [None] * len(ex)):
        dyn = {}
        if not isinstance(r, Param) and isinstance(p, torch.Tensor) and p.dim() == e.dim():
            dyn = {d: torch.export.Dim.AUTO for d in range(e.dim()) if e.shape[d] != p.shape[d]}
            small = small or any(e.shape[d] < 2 for d in dyn)
        specs.append(dyn or None)
    # a dim of size 1 would be specialized (torch.export's 0/1 rule): export at the probe size instead
    sample = probe if small and probe is not None and all(
        p.shape[d] >= 2 for p, s in zip(probe, specs) if s for d in s) else ex
    dynamic = {"xs": tuple(specs)} if any(specs) else None
    try:
        with capture_export.quiet_export():  # its notes on the module's internals are not the user's
            ep = torch.export.export(call, (tuple(sample),), dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # noqa: BLE001 - reported on the opaque node
        raise NotDecomposed(f"torch.export cannot capture it ({_first_line(e)})") from None
    state = dict(call.named_parameters(remove_duplicate=False))
    state.update(call.named_buffers(remove_duplicate=False))
    values = capture_export._run_program(ep, list(ex), state)
    probe_values = {}
    if probe is not None:
        try:
            probe_values = capture_export._run_program(ep, list(probe), state)
        except Exception as e:  # noqa: BLE001 - its shapes then count as fixed
            _log.debug("decompose: the program of %s does not run at the probe size: %s", sub.name, _first_line(e))
    splice = capture_export.Splice(cv.graph, list(leaves), sub.qual, sub.where, sub.source, sub.name)
    out = capture_export._convert_program(ep, call, values, list(ex), splice)
    for fx_node, ir_node in splice.env.items():
        if isinstance(ir_node, Node) and fx_node.op != "placeholder" and ir_node not in cv.fx_of:
            cv.spliced.setdefault(ir_node, (values.get(fx_node), probe_values.get(fx_node)))
    return out


__all__ = ["MAX_DEPTH", "NotDecomposed", "decompose_call"]
