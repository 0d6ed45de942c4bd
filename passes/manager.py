"""PassManager: run a pipeline of passes, checking the graph after each one.

    pm = PassManager(["remove-identity", "fold-batchnorm", "dce"], check_numerics=1e-5)
    run = pm.run(graph, PassContext(example_inputs=(x,)))
    graph = run.graph          # the graph after the last pass (a pass may return a new one)
    for record in run: ...     # one PassRecord per pass (`run` is a list of them)

After every pass the manager verifies the IR (on by default) and, with
`check_numerics=tol`, lowers the graph and compares its outputs on the context's
example inputs with those before the pass. The first pass that breaks the IR or
the numerics is named in a PassError, with the IR before and after it written
to files whose paths the message gives. Analyses (`is_analysis = True`) must
leave the graph exactly as it was; the manager checks that too.
"""

from __future__ import annotations

import gc
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from slimfx.ir import Graph, lower, verify
from slimfx.ir.errors import PassError, SlimfxError
from slimfx.passes.base import Pass, PassContext, PassResult, parse_pass_spec


@dataclass
class PassRecord:
    """What one pass did in a pipeline run: its name, wall time, stats, and whether it changed the graph."""

    name: str
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    changed: bool = False
    spec: str = ""  # the pass with its options, e.g. "prune-channels{sparsity=0.5}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": self.seconds, "stats": dict(self.stats), "changed": self.changed}


class PipelineResult(list):
    """What `PassManager.run` returns: the PassRecords of the run, one per pass (it is a list of them),
    and `graph`, the graph after the last pass. That is the graph given to `run`, edited in place,
    unless a pass returned a new graph (`PassResult(graph=...)`, e.g. prune-channels): then it is the
    last graph returned, and the caller must go on with `result.graph`."""

    def __init__(self, records: list[PassRecord], graph: Graph):
        super().__init__(records)
        self.graph = graph


def _as_pass(p: Pass | str | type[Pass]) -> Pass:
    if isinstance(p, Pass):
        return p
    if isinstance(p, str):
        return parse_pass_spec(p)
    if isinstance(p, type) and issubclass(p, Pass):
        return p.create()
    raise PassError(f"PassManager takes passes, pass specs ('dce', 'prune-channels{{sparsity=0.5}}') "
                    f"or pass classes; got {p!r} ({type(p).__name__})")


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for k in value for x in _flatten(value[k])]
    return [value]


def compare_outputs(before: list[Any], after: list[Any], tol: float) -> str | None:
    """None when `after` matches `before` within `tol`, else what differs.

    Float tensors: max |a - b| must be at most tol * max(max |a|, 1e-6) (relative to the output's
    magnitude, so the check means the same for logits of size 1 and of size 1000). Other values must
    be equal.
    """
    if len(before) != len(after):
        return f"the graph now returns {len(after)} values instead of {len(before)}"
    for i, (a, b) in enumerate(zip(before, after)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                return (f"output {i} is now {b.dtype}{list(b.shape)}, was {a.dtype}{list(a.shape)}")
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    return f"output {i} (integer) changed in {int((a != b).sum())} elements"
                continue
            if a.numel() == 0:
                continue
            a64, b64 = a.double(), b.double()
            nan_a, nan_b = torch.isnan(a64), torch.isnan(b64)
            if not torch.equal(nan_a, nan_b):
                return f"output {i} has NaNs in {int((nan_a != nan_b).sum())} positions where it had none"
            diff = (a64 - b64).abs().masked_fill(nan_a, 0.0)
            inf_mismatch = torch.isinf(a64) | torch.isinf(b64)
            if bool((inf_mismatch & (a64 != b64)).any()):
                return f"output {i} changed an infinite value"
            diff = diff.masked_fill(inf_mismatch, 0.0)
            scale = max(float(a64.abs().masked_fill(nan_a | torch.isinf(a64), 0.0).max()), 1e-6)
            worst = float(diff.max())
            if worst > tol * scale:
                return (f"output {i} max abs diff {worst:.3g} exceeds {tol:g} x output magnitude {scale:.3g} "
                        f"(relative error {worst / scale:.3g})")
        elif isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor) or a != b:
            return f"output {i} changed from {a!r} to {b!r}"
    return None


def _snapshot(graph: Graph) -> tuple[str, dict[str, tuple[int, int]], frozenset[str], bool, str]:
    """What an analysis must leave untouched: the IR text, each param's identity and version, buffers,
    mode, and the output structure."""
    params = {k: (id(v), v._version) for k, v in graph.params.items()}
    return str(graph), params, frozenset(graph.buffers), graph.training, repr(graph.outputs)


class PassManager:
    """Runs passes in order, verifying the graph after each (see the module docstring).

    passes: Pass objects, pass specs (`"dce"`, `"prune-channels{sparsity=0.5}"`) or registered classes.
    verify_each: run ir.verify after every pass (default True).
    check_numerics: None, or a relative tolerance; then every pass that preserves outputs (all but
        those declaring `preserves_outputs = False`: pruning, quantization, training) must keep the
        outputs on ctx.example_inputs within it (eval mode).
    instrumentations: objects with any of the hooks `before_pass(index, pass, graph)` and
        `after_pass(index, pass, graph, record)`, called around every pass (index counts from 1).
    print_after_each: print the IR after every pass that changed it (to `stream`, default stdout).
    dump_dir: where to write IR dumps of a failing pass (default: a fresh temporary directory); when
        given, the IR after every pass that changed it is also written there (`03-dce.txt`).
    """

    def __init__(self, passes: Sequence[Pass | str | type[Pass]], *, verify_each: bool = True,
                 check_numerics: float | None = None, print_after_each: bool = False,
                 dump_dir: str | Path | None = None, stream: TextIO | None = None,
                 instrumentations: Sequence[Any] = ()):
        if isinstance(passes, (str, Pass)):
            passes = [passes]
        self.passes: list[Pass] = [_as_pass(p) for p in passes]
        if check_numerics is not None and (not isinstance(check_numerics, (int, float)) or check_numerics < 0):
            raise PassError(f"check_numerics must be None or a non-negative tolerance, got {check_numerics!r}")
        self.verify_each = verify_each
        self.check_numerics = check_numerics
        self.print_after_each = print_after_each
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.stream = stream
        self.instrumentations = list(instrumentations)

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(str(p) for p in self.passes)}])"

    # -- helpers ---------------------------------------------------------------------------------------
    def _outputs(self, graph: Graph, ctx: PassContext) -> list[Any]:
        gm = lower(graph).eval()
        with torch.no_grad():
            return _flatten(gm(*ctx.example_inputs))

    def _dump(self, index: int, p: Pass, before: str | None, graph: Graph) -> tuple[Path, Path]:
        d = self.dump_dir or Path(tempfile.mkdtemp(prefix="slimfx-passes-"))
        d.mkdir(parents=True, exist_ok=True)
        stem = f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', p.name or type(p).__name__)}"
        b, a = d / f"{stem}.before.txt", d / f"{stem}.after.txt"
        b.write_text((before if before is not None else "(not recorded)") + "\n")
        try:
            a.write_text(str(graph) + "\n")
        except Exception as e:  # noqa: BLE001 - a graph broken enough not to print still gets a file
            a.write_text(f"(the graph cannot be printed: {type(e).__name__}: {e})\n")
        return b, a

    def _fail(self, index: int, p: Pass, what: str, before: str | None, graph: Graph,
              cause: BaseException | None = None) -> PassError:
        b, a = self._dump(index, p, before, graph)
        err = PassError(f"pass '{p.name}' (step {index} of {len(self.passes)}: {p}) {what}\n"
                        f"  IR before the pass: {b}\n  IR after the pass:  {a}")
        err.__cause__ = cause
        return err

    # -- running ---------------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext | None = None) -> PipelineResult:
        """Run every pass on `graph`; returns the records (one PassRecord per pass) and, as `.graph`, the
        graph after the last pass (see PipelineResult: `graph` itself unless a pass returned a new one)."""
        ctx = ctx if ctx is not None else PassContext()
        if self.check_numerics is not None and not ctx.example_inputs:
            raise PassError("check_numerics needs example inputs: pass PassContext(example_inputs=(x, ...))")
        need_before = self.verify_each or self.check_numerics is not None
        reference = None  # outputs before the next pass that must preserve them; computed when needed
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00-input.txt").write_text(str(graph) + "\n")
        records: list[PassRecord] = []
        for i, p in enumerate(self.passes, 1):
            checked = self.check_numerics is not None and p.preserves_outputs and not p.is_analysis
            if checked and reference is None:
                reference = self._outputs(graph, ctx)
            for inst in self.instrumentations:
                if hasattr(inst, "before_pass"):
                    inst.before_pass(i, p, graph)
            snap = _snapshot(graph) if p.is_analysis else None
            before = snap[0] if snap is not None else (str(graph) if need_before else None)
            # Objects alive before the pass (the graph, the model, ...) are frozen out of the cyclic
            # collector while it runs: a full collection would otherwise walk the whole heap, which
            # doubled cse's time on a 50k-node graph. Skipped if the caller froze objects already.
            freeze = gc.isenabled() and gc.get_freeze_count() == 0
            if freeze:
                gc.freeze()
            t0 = time.perf_counter()
            try:
                result = p.run(graph, ctx)
            except SlimfxError as e:  # a user-actionable error from inside the pass: same class, step named
                if str(e).startswith(f"pass '{p.name}' (step "):
                    raise
                try:
                    named = type(e)(f"pass '{p.name}' (step {i} of {len(self.passes)}): {e}")
                except TypeError:
                    raise e from None
                raise named from e
            except Exception as e:  # noqa: BLE001 - a crashing pass is named, with the IR it crashed on
                raise self._fail(i, p, f"crashed: {type(e).__name__}: {e}", before, graph, e) from e
            finally:
                if freeze:
                    gc.unfreeze()
            seconds = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                raise self._fail(i, p, f"returned {type(result).__name__}, not a PassResult", before, graph)
            if result.graph is not None:
                if not isinstance(result.graph, Graph) or p.is_analysis:
                    what = (f"a {type(result.graph).__name__} as its new graph" if not p.is_analysis else
                            "a new graph, but it is an analysis (is_analysis = True): analyses only report")
                    raise self._fail(i, p, f"returned {what}", before, graph)
                graph = result.graph
            if snap is not None:
                after = _snapshot(graph)
                if after != snap:
                    what = ("IR" if after[0] != snap[0] else "params" if after[1] != snap[1] else
                            "buffers/mode/outputs")
                    raise self._fail(i, p, f"is an analysis (is_analysis = True) but changed the graph's "
                                     f"{what}; analyses must only report", before, graph)
            if self.verify_each:
                try:
                    verify(graph)
                except SlimfxError as e:
                    raise self._fail(i, p, f"left an invalid graph: {e}", before, graph, e) from e
            if checked:
                try:
                    now = self._outputs(graph, ctx)
                except Exception as e:  # noqa: BLE001
                    raise self._fail(i, p, f"left a graph that no longer runs on the example inputs: "
                                     f"{type(e).__name__}: {e}", before, graph, e) from e
                problem = compare_outputs(reference, now, float(self.check_numerics))  # type: ignore[arg-type]
                if problem:
                    raise self._fail(i, p, f"changed the outputs beyond check_numerics={self.check_numerics}: "
                                     f"{problem}", before, graph)
                reference = now
            elif result.changed:
                reference = None
            records.append(PassRecord(p.name, seconds, dict(result.stats), bool(result.changed), str(p)))
            for inst in self.instrumentations:
                if hasattr(inst, "after_pass"):
                    inst.after_pass(i, p, graph, records[-1])
            ctx.logger.debug("pass %s: %.3fs changed=%s %s", p.name, seconds, result.changed, result.stats)
            if result.changed:
                if self.print_after_each:
                    print(f"// IR after {p} ({seconds * 1e3:.1f} ms, {result.stats})\n{graph}",
                          file=self.stream or sys.stdout)
                if self.dump_dir is not None:
                    (self.dump_dir / f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', p.name)}.txt").write_text(
                        str(graph) + "\n")
        return PipelineResult(records, graph)


__all__ = ["PassManager", "PassRecord", "PipelineResult", "compare_outputs"]
