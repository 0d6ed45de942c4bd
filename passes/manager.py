"""PassManager: run a pipeline of passes, with instrumentations checking each one.

    pm = PassManager(["remove-identity", "fold-batchnorm", "dce"], check_numerics=1e-5)
    run = pm.run(graph, PassContext(example_inputs=(x,)))
    graph = run.graph          # the graph after the last pass (a pass may return a new one)
    for record in run: ...     # one PassRecord per pass (`run` is a list of them)

What runs around each pass is a list of instrumentations (passes/instrument.py), chosen by the keywords:
the verifier (ir.verify after every pass, incremental; on by default), the numerics check (`check_numerics=tol`:
a pass that preserves outputs must keep the outputs on the context's example inputs, whatever it reports;
these two run once after a run of consecutive output-preserving rewrites, see `check_every_pass`),
the interface guard (every pass keeps the graph's inputs and output structure), the analysis guard (an analysis
must leave the graph as it was), IR printing (only when asked: `print_ir`,
`dump_dir`), and on a failure, dumps of the IR before and after the pass and a reproducer (the pass's input
as a .slimfx file and a `slimfx run-pass` command that replays it). Your own go in `instrumentations=`.

A failing pass, whatever failed (an error raised inside it, a SlimfxError or not, a wrong result, a check),
is named in the error with its step ("step 3 of 5") and the files written for it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from slimfx.ir import Graph
from slimfx.ir.errors import PassCrash, PassError, SlimfxError
from slimfx.ir.graph import Checkpoint
from slimfx.ir.metrics import check_close
from slimfx.passes.base import Pass, PassContext, PassResult, parse_pass_spec
from slimfx.passes.instrument import (
    CheckNumerics,
    Failure,
    FailureDumps,
    FreezeHeap,
    GuardAnalyses,
    KeepInterface,
    PassFailure,
    PrintIR,
    Reproducer,
    VerifyEach,
)


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


compare_outputs = check_close  # the numerics check's rule, under its older name


class PassManager:
    """Runs passes in order with instrumentations around each (see the module docstring).

    passes: Pass objects, pass specs (`"dce"`, `"prune-channels{sparsity=0.5}"`) or registered classes.
    verify_each: run ir.verify after every pass (default True).
    check_numerics: None, or a relative tolerance; then every pass that preserves outputs (all but
        those declaring `preserves_outputs = False`: pruning, quantization, training) must keep the outputs
        on ctx.example_inputs within it (eval mode), whether or not it reports a change.
    check_every_pass: run those two checks after every single pass. By default a run of consecutive
        output-preserving rewrites (dce, cse, fold-batchnorm, ...) is checked once, after its last pass,
        and a failure replays those passes one at a time with the checks after each, so the error names
        the same pass either way; the difference is cost (each check costs about what a cleanup pass does).
    print_ir: print the IR after every pass that changed it (to `stream`, default stdout); `print_after_each`
        is its older name.
    dump_dir: where to write the files of a failing pass (default: a fresh temporary directory); when
        given, the IR before the first pass and after every pass that changed it is also written there
        (`00-input.txt`, `03-dce.txt`).
    failure_dumps: on a failure, write the IR before and after the pass and a reproducer (default True;
        costs a cheap checkpoint of each pass's input graph).
    instrumentations: objects with any of the hooks `before_pass(step, pass, graph)`,
        `after_pass(step, pass, graph, record)`, `on_failure(failure)` and `after_run(graph)`
        (passes/instrument.py), called after the built-in ones.
    """

    def __init__(self, passes: Sequence[Pass | str | type[Pass]], *, verify_each: bool = True,
                 check_numerics: float | None = None, print_ir: bool = False, print_after_each: bool = False,
                 dump_dir: str | Path | None = None, stream: TextIO | None = None, failure_dumps: bool = True,
                 instrumentations: Sequence[Any] = (), check_every_pass: bool = False):
        if isinstance(passes, (str, Pass)):
            passes = [passes]
        self.passes: list[Pass] = _set_options_of([_as_pass(p) for p in passes])
        if check_numerics is not None and (isinstance(check_numerics, bool) or
                                           not isinstance(check_numerics, (int, float)) or check_numerics < 0):
            raise PassError(f"check_numerics must be None or a non-negative tolerance, got {check_numerics!r}")
        self.verify_each = verify_each
        self.check_numerics = check_numerics
        self.print_ir = print_ir or print_after_each
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.stream = stream
        self.failure_dumps = failure_dumps
        self.instrumentations = list(instrumentations)
        self.check_every_pass = check_every_pass

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(str(p) for p in self.passes)}])"

    def instrumentations_for(self, ctx: PassContext) -> list[Any]:
        """The instrumentations of one run, in the order their hooks are called (fresh state per run)."""
        out: list[Any] = [KeepInterface(), GuardAnalyses()]
        if self.verify_each:
            out.append(VerifyEach())
        if self.check_numerics is not None:
            out.append(CheckNumerics(float(self.check_numerics), ctx.example_inputs))
        if self.print_ir or self.dump_dir is not None:
            out.append(PrintIR(stream=self.stream, print_ir=self.print_ir, dump_dir=self.dump_dir))
        if self.failure_dumps:
            out += [FailureDumps(), Reproducer(self.check_numerics)]
        return [FreezeHeap(), *out, *self.instrumentations]

    # -- running ---------------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext | None = None) -> PipelineResult:
        """Run every pass on `graph`; returns the records (one PassRecord per pass) and, as `.graph`, the
        graph after the last pass (see PipelineResult: `graph` itself unless a pass returned a new one)."""
        ctx = ctx if ctx is not None else PassContext()
        insts = self.instrumentations_for(ctx)
        records: list[PassRecord] = []
        try:
            for steps in self._groups():
                run_group = self._run_steps if len(steps) == 1 else self._run_deferred
                graph = run_group(graph, ctx, insts, steps, records)
        finally:  # also on Ctrl-C
            _call(insts, "after_run", graph)
        return PipelineResult(records, graph)

    def _groups(self) -> list[list[int]]:
        """Step numbers in groups whose checks run together: a run of consecutive output-preserving
        rewrites (CheckNumerics.applies) is one group, unless `check_every_pass`; any other pass is a
        group of its own."""
        groups: list[list[int]] = []
        for step, p in enumerate(self.passes, 1):
            if (groups and not self.check_every_pass and CheckNumerics.applies(p)
                    and CheckNumerics.applies(self.passes[groups[-1][-1] - 1])):
                groups[-1].append(step)
            else:
                groups.append([step])
        return groups

    def _step(self, p: Pass, graph: Graph, ctx: PassContext) -> tuple[Graph, PassRecord]:
        t0 = time.perf_counter()
        result = p.run(graph, ctx)
        seconds = time.perf_counter() - t0
        graph = _graph_after(p, result, graph)
        ctx.logger.debug("pass %s: %.3fs changed=%s %s", p.name, seconds, result.changed, result.stats)
        return graph, PassRecord(p.name, seconds, dict(result.stats), bool(result.changed), str(p))

    def _run_steps(self, graph: Graph, ctx: PassContext, insts: list[Any], steps: list[int],
                   records: list[PassRecord]) -> Graph:
        """Run the steps with every instrumentation around each."""
        checkpoint = any(getattr(i, "needs_input", False) for i in insts)
        for step in steps:
            p = self.passes[step - 1]
            before = graph.checkpoint() if checkpoint else None
            try:
                _call(insts, "before_pass", step, p, graph)
                graph, record = self._step(p, graph, ctx)
                _call(insts, "after_pass", step, p, graph, record)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - every failure inside a step is named and dumped
                # (sys.exit in a pass too: it would end the process with its code and no word of the pass)
                f = Failure(step, len(self.passes), p, "", graph, before, self.dump_dir)
                raise self._failure(insts, f, e) from e
            records.append(record)
        return graph

    def _run_deferred(self, graph: Graph, ctx: PassContext, insts: list[Any], steps: list[int],
                      records: list[PassRecord]) -> Graph:
        """Run consecutive output-preserving rewrites with the deferrable checks (verifier, numerics) once,
        after the last of them: on a large graph each check costs about as much as a cleanup pass. On any
        failure the steps are replayed from their input with every check after each one, so the error
        still names the first pass that broke the graph, with its dumps and reproducer."""
        saved = graph.checkpoint()
        now = [i for i in insts if not getattr(i, "deferrable", False)]
        later = [i for i in insts if getattr(i, "deferrable", False)]
        done: list[PassRecord] = []
        marks: list[dict[str, tuple[int, int]]] = []  # each step's input params (identity, version): who edited
        step, checking = steps[0], False                # one in place, should the group fail and not replay
        try:
            _call(later, "before_pass", step, self.passes[step - 1], graph)
            for step in steps:
                p = self.passes[step - 1]
                marks.append(_param_marks(graph))
                _call(now, "before_pass", step, p, graph)
                graph, record = self._step(p, graph, ctx)
                _call(now, "after_pass", step, p, graph, record)
                done.append(record)
            together = dataclasses.replace(done[-1], changed=any(r.changed for r in done))
            checking = True
            _call(later, "after_pass", step, self.passes[step - 1], graph, together)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - replayed to name the pass that failed
            marks.append(_param_marks(graph))
            raise self._replay(saved, ctx, insts, steps[:steps.index(step) + 1], graph, e, checking, marks) from e
        records += done
        return graph

    def _replay(self, saved: Checkpoint, ctx: PassContext, insts: list[Any], steps: list[int], graph: Graph,
                error: Exception, checking: bool, marks: list[dict[str, tuple[int, int]]]) -> Exception:
        """The error for a failure in a group of deferred steps. The steps before the one that failed (all of
        them when the deferred checks failed) run again from the group's input, one at a time with fresh
        built-in checks after each: a failure there is the error (it names the first pass that broke the
        graph). Otherwise the failure is reported as seen, at its step, with that step's input for the dumps."""
        before = None
        stale = saved.modified_params()  # changed in place: a replay would not start from the same weights
        if not stale:
            checks = [i for i in self.instrumentations_for(ctx)
                      if i not in self.instrumentations and not isinstance(i, PrintIR)]
            replayed = saved.restore()
            try:
                replayed = self._run_steps(replayed, ctx, checks, steps if checking else steps[:-1], [])
            except (Exception, SystemExit) as e:  # noqa: BLE001 - the failure, named with its step
                return e
            finally:
                _call(checks, "after_run", replayed)
            before = None if checking else replayed.checkpoint()
        last = steps[-1]
        f = Failure(last, len(self.passes), self.passes[last - 1], "", graph, before, self.dump_dir)
        e = self._failure(insts, f, error)
        if not (checking or stale):
            return e
        message = e.args[0]
        if checking:  # no single pass is to blame: name the group
            head = f"pass '{f.pass_.name}' (step {last} of {f.steps}: {f.pass_})"
            names = ", ".join(f"'{self.passes[s - 1].name}'" for s in steps)
            message = message.replace(head, f"passes {names} (steps {steps[0]}-{last} of {f.steps}, checked "
                                             "together)", 1)
        why = "each of them alone passed the checks when replayed"
        if stale:
            why = f"params changed in place ({', '.join(stale[:3])}) prevent replaying the steps one at a time"
            editors = [(s, _edited_in_place(a, b)) for s, a, b in zip(steps, marks, marks[1:])]
            editors = [(s, names) for s, names in editors if names]
            if editors:  # name who did it: passes must put new tensors in graph.params
                why += "; " + "; ".join(f"pass '{self.passes[s - 1].name}' (step {s}) edited "
                                        f"{', '.join(names[:3])} in place" for s, names in editors)
                why += " (a pass must put a new tensor in graph.params instead)"
        e.args = (f"{message}\n  ({why})", *e.args[1:])
        return e

    def _failure(self, insts: list[Any], f: Failure, e: Exception) -> Exception:
        """The error to raise for a failed step: the pass named with its step, the files written for it. An
        error from inside the pass keeps its class (a SlimfxError stays one the CLI reports as such)."""
        p, head = f.pass_, f"pass '{f.pass_.name}' (step {f.step} of {f.steps}"
        if isinstance(e, SlimfxError) and str(e).startswith(f"pass '{p.name}' (step "):
            return e  # named already (a pipeline run inside a pass)
        if isinstance(e, PassFailure):
            f.what, f.cause, message = e.what, e.__cause__, f"{head}: {p}) {e.what}"
        elif isinstance(e, SlimfxError):
            f.what, f.cause, message = str(e), e, f"{head}): {e}"
        else:
            f.what, f.cause = f"crashed: {type(e).__name__}: {e}", e
            message = f"{head}: {p}) {f.what}"
        lines = [line for inst in insts if hasattr(inst, "on_failure") for line in inst.on_failure(f) or ()]
        message += "".join(f"\n  {line}" for line in lines)
        if isinstance(e, SlimfxError) and not isinstance(e, PassFailure):
            try:
                return type(e)(message)
            except TypeError:
                return PassError(message)
        if not isinstance(e, PassFailure):  # a crash: slimfx's bug in a built-in pass, the user's in a plugin
            return PassCrash(message, builtin=type(p).__module__.startswith("slimfx."))
        return PassError(message)


def _set_options_of(passes: list[Pass]) -> list[Pass]:
    """Steps that are an option of an earlier pass (`Pass.option_of`) switch that option on there."""
    out = list(passes)
    for i, p in enumerate(out):
        if p.option_of is None:
            continue
        target, option = p.option_of
        j = next((j for j in range(i - 1, -1, -1) if out[j].name == target), None)
        if j is None:
            raise PassError(f"pass '{p.name}' is the option {option} of '{target}' and must come after a "
                            f"'{target}' in the pipeline; or set {target}{{{option}=true}} instead")
        out[j] = dataclasses.replace(out[j], **{option: True})
    return out


def _param_marks(graph: Graph) -> dict[str, tuple[int, int]]:
    return {k: (id(t), t._version) for k, t in graph.params.items()}


def _edited_in_place(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Params that are the same tensor before and after a step, with a newer version: written in place."""
    return [k for k, (i, v) in before.items() if k in after and after[k][0] == i and after[k][1] != v]


def _call(insts: list[Any], hook: str, *args: Any) -> None:
    for inst in insts:
        fn = getattr(inst, hook, None)
        if fn is not None:
            fn(*args)


def _graph_after(p: Pass, result: Any, graph: Graph) -> Graph:
    """The graph after a pass: the one it returned, else the given one; PassFailure for a wrong result."""
    if not isinstance(result, PassResult):
        raise PassFailure(f"returned {type(result).__name__}, not a PassResult")
    if result.graph is None:
        return graph
    if p.is_analysis:
        raise PassFailure("returned a new graph, but it is an analysis (is_analysis = True): analyses only report")
    if not isinstance(result.graph, Graph):
        raise PassFailure(f"returned a {type(result.graph).__name__} as its new graph")
    return result.graph


__all__ = ["PassManager", "PassRecord", "PipelineResult", "compare_outputs"]
