"""PassManager instrumentations: what runs around every pass of a pipeline.

An instrumentation is any object with some of these hooks (the PassManager calls them in list order):

    before_pass(step, p, graph)              before pass number `step` (from 1) runs on `graph`
    after_pass(step, p, graph, record)       after it returned; `graph` is the graph it left (or returned),
                                             `record` its PassRecord (changed, stats, seconds). Raise
                                             PassFailure("what went wrong") to fail the pass.
    on_failure(failure) -> list[str]         the pass failed (it raised, returned something wrong, or an
                                             instrumentation failed it): lines for the error message, e.g.
                                             the files written for it
    after_run(graph)                         the run ended (finished, failed or interrupted); `graph`
                                             is the last graph

The built-in ones, which PassManager's keywords switch on: VerifyEach (ir.verify, incrementally), CheckNumerics
(outputs on the example inputs, for passes that preserve outputs, whatever they report), KeepInterface (the
graph's inputs and output structure stay), GuardAnalyses (an analysis must leave the graph as it was), PrintIR (the IR after every pass that changed it, when asked),
FailureDumps (the IR before and after a failing pass) and Reproducer (the failing pass's input as a .slimfx
file, its options, and one command that replays the failure), FreezeHeap (the cyclic garbage collector
leaves the objects alive before a step alone while it runs).
"""

from __future__ import annotations

import gc
import inspect
import json
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from slimfx.ir import Graph
from slimfx.ir.errors import PassError, SlimfxError
from slimfx.ir.evaluate import Evaluator
from slimfx.ir.graph import Checkpoint
from slimfx.ir.metrics import check_close, named_leaves
from slimfx.ir.verify import Verifier
from slimfx.passes.base import Pass


class PassFailure(Exception):
    """Raised by an instrumentation's after_pass: the pass failed a check; `what` says how."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


@dataclass
class Failure:
    """A failed pass, as on_failure hooks see it."""

    step: int
    steps: int
    pass_: Pass
    what: str
    graph: Graph  # as the pass left it (possibly half edited)
    before: Checkpoint | None  # the graph the pass was given (when some instrumentation asked for it)
    dump_dir: Path | None
    cause: BaseException | None = None
    _dir: Path | None = field(default=None, repr=False)

    @property
    def stem(self) -> str:
        return f"{self.step:02d}-{_safe(self.pass_.name or type(self.pass_).__name__)}"

    def directory(self) -> Path:
        """Where this failure's files go: the manager's dump_dir, else one fresh temporary directory."""
        if self._dir is None:
            self._dir = self.dump_dir or Path(tempfile.mkdtemp(prefix="slimfx-passes-"))
            self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class VerifyEach:
    """ir.verify after every pass; nodes that did not change since the last check are not re-checked."""

    deferrable = True  # may run once after a run of output-preserving rewrites (PassManager.check_every_pass)

    def __init__(self) -> None:
        self.verifier = Verifier()

    def after_pass(self, step: int, p: Pass, graph: Graph, record: Any) -> None:
        try:
            self.verifier(graph)
        except SlimfxError as e:
            raise PassFailure(f"left an invalid graph: {e}") from e


class CheckNumerics:
    """A pass that preserves outputs (`preserves_outputs`, not an analysis) must keep the outputs on the example
    inputs within `tol` x the output's magnitude (eval mode; ir.metrics.check_close).
    Values are kept between passes (ir.Evaluator): only what a pass changed is computed again."""

    deferrable = True

    def __init__(self, tol: float, example_inputs: tuple):
        if not example_inputs:
            raise PassError("check_numerics needs example inputs: pass PassContext(example_inputs=(x, ...))")
        self.tol = tol
        self.evaluator = Evaluator(example_inputs)
        self.reference: Any = None  # the outputs of the graph as it is now, when known
        self.checking = False

    @staticmethod
    def applies(p: Pass) -> bool:
        return p.preserves_outputs and not p.is_analysis

    def before_pass(self, step: int, p: Pass, graph: Graph) -> None:
        if not self.applies(p):
            return
        if self.reference is None:  # else: the outputs after the last pass, which left the graph as it is now
            self.reference = self._outputs(graph, "before the pass, the graph")
        self.checking = True

    def after_pass(self, step: int, p: Pass, graph: Graph, record: Any) -> None:
        # `record.changed` is the pass's own word, not trusted here: a pass that says it changed nothing but
        # edited the graph (or a param in place) would otherwise leave a stale reference, and the next pass
        # checked would be blamed for its change. The evaluator recomputes only what changed, so checking a
        # graph that did not change costs one walk over it.
        checking, self.checking = self.checking, False
        if not checking:  # a lossy pass may have changed the outputs: the next check starts from its graph
            self.reference = None
            return
        now = self._outputs(graph, "left a graph that")
        problem = check_close(self.reference, now, self.tol)
        if problem:
            said = "" if record.changed else " (it reported changed=False)"
            raise PassFailure(f"changed the outputs beyond check_numerics={self.tol:g}{said}: {problem}")
        self.reference = now

    def _outputs(self, graph: Graph, who: str) -> Any:
        try:
            return self.evaluator(graph)
        except Exception as e:  # noqa: BLE001 - named as the pass's failure
            raise PassFailure(f"{who} no longer runs on the example inputs: {type(e).__name__}: {e}") from e


class KeepInterface:
    """Every pass must leave the graph's interface as it was: the inputs (their names, in order) and the
    output structure (ir.metrics.named_leaves). A pass changes what the model computes, never what it takes
    or returns; a lossy pass (not numerically checked) that adds an output or an input would otherwise fail
    much later (the gate, an export) without naming it. Cheap, so checked after every pass."""

    def __init__(self) -> None:
        self.interface: tuple | None = None

    @staticmethod
    def _interface(graph: Graph) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(n.name for n in graph.inputs), tuple(name for name, _ in named_leaves(graph.outputs))

    def before_pass(self, step: int, p: Pass, graph: Graph) -> None:
        self.interface = self._interface(graph)

    def after_pass(self, step: int, p: Pass, graph: Graph, record: Any) -> None:
        (ins, outs), (now_ins, now_outs) = self.interface, self._interface(graph)
        if (ins, outs) == (now_ins, now_outs):
            return
        what, was, now = ("inputs", ins, now_ins) if ins != now_ins else ("outputs", outs, now_outs)
        raise PassFailure(f"changed the graph's {what} from ({', '.join(was)}) to ({', '.join(now)}); a pass may "
                          "change what the model computes, not the inputs it takes or the outputs it returns")


class GuardAnalyses:
    """An analysis (`is_analysis = True`) must leave the graph exactly as it was: IR text, each param's
    identity and version, buffers, mode, outputs."""

    def __init__(self) -> None:
        self.snapshot: tuple | None = None

    @staticmethod
    def _snapshot(graph: Graph) -> tuple:
        params = {k: (id(v), v._version) for k, v in graph.params.items()}
        return str(graph), params, frozenset(graph.buffers), graph.training, repr(graph.outputs)

    def before_pass(self, step: int, p: Pass, graph: Graph) -> None:
        self.snapshot = self._snapshot(graph) if p.is_analysis else None

    def after_pass(self, step: int, p: Pass, graph: Graph, record: Any) -> None:
        if self.snapshot is None:
            return
        after, snap = self._snapshot(graph), self.snapshot
        if after != snap:
            what = "IR" if after[0] != snap[0] else "params" if after[1] != snap[1] else "buffers/mode/outputs"
            raise PassFailure(f"is an analysis (is_analysis = True) but changed the graph's {what}; "
                              "analyses must only report")


class PrintIR:
    """The IR after every pass that changed it: printed to `stream` (when `print_ir`) and/or written to
    `dump_dir` as `NN-pass.txt` (with `00-input.txt` before the first pass)."""

    def __init__(self, *, stream: TextIO | None = None, print_ir: bool = False, dump_dir: Path | None = None):
        self.stream, self.print_ir, self.dump_dir = stream, print_ir, dump_dir

    def before_pass(self, step: int, p: Pass, graph: Graph) -> None:
        if step == 1 and self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00-input.txt").write_text(str(graph) + "\n")

    def after_pass(self, step: int, p: Pass, graph: Graph, record: Any) -> None:
        if not record.changed:
            return
        text = str(graph)
        if self.print_ir:
            print(f"// IR after {p} ({record.seconds * 1e3:.1f} ms, {record.stats})\n{text}",
                  file=self.stream or sys.stdout)
        if self.dump_dir is not None:
            (self.dump_dir / f"{step:02d}-{_safe(p.name)}.txt").write_text(text + "\n")


class FailureDumps:
    """On a failure: the IR before the pass and as the pass left it, as text files the message names."""

    needs_input = True  # the manager checkpoints each pass's input graph (cheaply) for this

    def on_failure(self, f: Failure) -> list[str]:
        d = f.directory()
        b, a = d / f"{f.stem}.before.txt", d / f"{f.stem}.after.txt"
        b.write_text((_text(f.before.restore()) if f.before is not None else "(not recorded)") + "\n")
        a.write_text(_text(f.graph) + "\n")
        return [f"IR before the pass: {b}", f"IR after the pass:  {a}"]


def _text(graph: Graph) -> str:
    try:
        return str(graph)
    except Exception as e:  # noqa: BLE001 - a graph broken enough not to print still gets a file
        return f"(the graph cannot be printed: {type(e).__name__}: {e})"


class Reproducer:
    """On a failure: the pass's input graph as `NN-pass.input.slimfx` and a command that runs that pass
    with its options on it again (`slimfx run-pass`), with the same checks."""

    needs_input = True

    def __init__(self, check_numerics: float | None = None):
        self.check_numerics = check_numerics

    def on_failure(self, f: Failure) -> list[str]:
        if f.before is None:
            return []
        path = f.directory() / f"{f.stem}.input.slimfx"
        try:
            f.before.restore().save(path)
        except Exception as e:  # noqa: BLE001 - say why there is no reproducer, keep the failure's message
            return [f"no reproducer: the input graph cannot be saved as a .slimfx file ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})"]
        try:
            options = json.dumps(f.pass_.option_values(), sort_keys=True)
        except (TypeError, ValueError):
            return [f"the pass's input graph: {path} (its options are not JSON, so there is no replay command)"]
        lines = [f"the pass's input graph: {path}", f"replay: {replay_command(f.pass_, options, path, self.check_numerics)}"]
        changed = f.before.modified_params()
        if changed:
            lines.append(f"note: the pass changed params in place ({', '.join(changed[:3])}"
                         f"{', ...' if len(changed) > 3 else ''}); the saved input holds their changed values")
        return lines


def replay_command(p: Pass, options_json: str, path: Path, check_numerics: float | None) -> str:
    """`slimfx run-pass NAME --options JSON [--check-numerics TOL] [--plugin FILE] INPUT.slimfx`."""
    words = ["slimfx", "run-pass", p.name]
    if options_json != "{}":
        words += ["--options", options_json]
    if check_numerics is not None and CheckNumerics.applies(p):
        words += ["--check-numerics", f"{check_numerics:g}"]
    module = type(p).__module__
    if not module.startswith("slimfx."):  # a pass of the user's: load its file (or module) first
        try:
            words += ["--plugin", inspect.getfile(type(p))]
        except (TypeError, OSError):
            words += ["--plugin", module]
    return " ".join(shlex.quote(w) for w in [*words, str(path)])


class FreezeHeap:
    """Objects alive before a step (the graph, the model, the checks' kept values, ...) are frozen out of the
    cyclic garbage collector from the start of the step (before the other instrumentations) until the start
    of the next one or the end of the run: a full collection would otherwise walk the whole heap, which
    doubled cse's time on a 50k-node graph and is a third of the numerics check's. Nothing is done when the
    caller froze objects already or collection is off."""

    def __init__(self) -> None:
        self.frozen = False

    def before_pass(self, step: int, p: Pass, graph: Graph) -> None:
        self.unfreeze()
        self.frozen = gc.isenabled() and gc.get_freeze_count() == 0
        if self.frozen:
            gc.freeze()

    def after_run(self, graph: Graph) -> None:
        self.unfreeze()

    def on_failure(self, f: Failure) -> list[str]:
        self.unfreeze()
        return []

    def unfreeze(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False


__all__ = ["PassFailure", "Failure", "VerifyEach", "CheckNumerics", "KeepInterface", "GuardAnalyses", "PrintIR", "FailureDumps",
           "Reproducer", "FreezeHeap", "replay_command"]
