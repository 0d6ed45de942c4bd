"""PassManager instrumentations: failures named with their step and dumped, a reproducer whose command replays
the failure, the numerics check only where it applies, IR printing only when asked, the incremental checks."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

from slimfx import ir
from slimfx.cli import main
from slimfx.ir.errors import PassError, RecipeError
from slimfx.ir.evaluate import Evaluator
from slimfx.ir.verify import Verifier, VerifyError
from slimfx.passes import Pass, PassContext, PassManager, PassResult, create_pass, option, register_pass
from slimfx.plugins import load_plugin
from tests.passes.nets import ConvBnNet, make

PLUGIN = '''
from slimfx.ir.errors import RecipeError
from slimfx.passes import Pass, PassResult, option, register_pass


@register_pass("test-replay-relu-to-sigmoid")
class ReluToSigmoid(Pass):
    """Deliberately wrong (numbers only): relu becomes sigmoid; `report` is what it says it did."""

    report: bool = option(True, help="whether it reports the change")

    def run(self, graph, ctx):
        for n in graph.find("relu"):
            n.op = "sigmoid"
        return PassResult(changed=self.report)


@register_pass("test-replay-raises")
class Raises(Pass):
    """Raises a user error from inside the pass after editing the graph (half done)."""

    limit: int = option(3, help="a number the message names")

    def run(self, graph, ctx):
        graph.find("relu")[0].op = "sigmoid"
        raise RecipeError(f"limit {self.limit} is too small")
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_passes.py"
    path.write_text(PLUGIN)
    load_plugin(str(path))
    return path


@pytest.fixture
def case():
    m = make(ConvBnNet)
    x = torch.randn(2, 3, 8, 8)
    return m, x, ir.capture(m, (x,))


def _files(message: str) -> dict[str, Path]:
    return {k: Path(v) for k, v in re.findall(r"(IR before the pass|IR after the pass|input graph):\s+(\S+)", message)}


def _replay(message: str) -> list[str]:
    (command,) = re.findall(r"replay: (.*)", message)
    words = shlex.split(command)
    assert words[:2] == ["slimfx", "run-pass"]
    return words[1:]


def test_an_error_inside_a_pass_is_named_dumped_and_replays(case, plugin, tmp_path, capsys):
    _, x, g = case
    pm = PassManager(["fold-batchnorm", "test-replay-raises{limit=7}", "dce"], dump_dir=tmp_path)
    with pytest.raises(RecipeError) as e:  # the error keeps its class (the CLI reports it as a user error)
        pm.run(g, PassContext(example_inputs=(x,)))
    msg = str(e.value)
    assert msg.startswith("pass 'test-replay-raises' (step 2 of 3): limit 7 is too small")
    files = _files(msg)
    assert "relu(" in files["IR before the pass"].read_text()  # the input, not the half-edited graph
    assert "sigmoid(" in files["IR after the pass"].read_text()
    saved = ir.Graph.load(files["input graph"])
    assert not saved.find("sigmoid") and not saved.find("batch_norm")  # after step 1, before step 2
    args = _replay(msg)
    assert args == ["run-pass", "test-replay-raises", "--options", '{"limit": 7}', "--plugin", str(plugin),
                    str(files["input graph"])]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pass 'test-replay-raises' (step 1 of 1): limit 7 is too small" in err


def test_a_numerics_failure_replays_with_its_tolerance(case, plugin, tmp_path, capsys):
    _, x, g = case
    with pytest.raises(PassError) as e:
        PassManager(["fold-batchnorm", "test-replay-relu-to-sigmoid"], check_numerics=1e-4,
                    dump_dir=tmp_path).run(g, PassContext(example_inputs=(x,)))
    msg = str(e.value)
    assert "step 2 of 2" in msg and "changed the outputs beyond check_numerics=0.0001" in msg
    args = _replay(msg)
    assert args[args.index("--check-numerics") + 1] == "0.0001"
    capsys.readouterr()
    assert main(args) == 2
    assert "changed the outputs beyond check_numerics=0.0001" in capsys.readouterr().err
    # without the check the same command succeeds: the failure was the numbers, and run-pass writes --out
    out = tmp_path / "after.slimfx"
    i = args.index("--check-numerics")
    assert main(args[:i] + args[i + 2:] + ["--out", str(out)]) == 0
    assert ir.Graph.load(out).find("sigmoid")


def test_a_crash_in_a_builtin_pass_replays_without_plugin(case, tmp_path, monkeypatch, capsys):
    _, x, g = case
    from slimfx.passes.cleanup import DeadCodeElimination

    monkeypatch.setattr(DeadCodeElimination, "run", lambda self, graph, ctx: 1 / 0)
    with pytest.raises(PassError, match=r"pass 'dce' \(step 1 of 1: dce\) crashed: ZeroDivisionError") as e:
        PassManager(["dce"], dump_dir=tmp_path).run(g, PassContext(example_inputs=(x,)))
    args = _replay(str(e.value))
    assert args == ["run-pass", "dce", str(_files(str(e.value))["input graph"])]
    capsys.readouterr()
    assert main(args) == 1  # a crash in a built-in pass is a bug in slimfx: traceback, exit 1 (it was 2)
    err = capsys.readouterr().err
    assert "Traceback" in err and "1 / 0" in err and "crashed: ZeroDivisionError" in err
    assert "slimfx: internal error: pass 'dce'" in err and "This is a bug in slimfx" in err


def test_run_pass_runs_a_builtin_pass_and_refuses_bad_options(case, tmp_path, capsys):
    _, x, g = case
    path = tmp_path / "g.slimfx"
    g.save(path)
    assert main(["run-pass", "fold-batchnorm", str(path), "--check-numerics", "1e-4", "--out",
                 str(tmp_path / "o.slimfx")]) == 0
    assert "fold-batchnorm: changed the graph" in capsys.readouterr().out
    assert not ir.Graph.load(tmp_path / "o.slimfx").find("batch_norm")
    assert main(["run-pass", "dce", str(path), "--options", "[1]"]) == 2
    assert "--options must be a JSON object" in capsys.readouterr().err
    assert main(["run-pass", "prune-channels", str(path), "--options", '{"sparsity": 2}']) == 2
    assert "option 'sparsity' must be in [0, 1)" in capsys.readouterr().err
    # --out naming the input (a failure's saved graph, say) is refused before the pass runs: it would be lost
    before = path.read_bytes()
    assert main(["run-pass", "fold-batchnorm", str(path), "--out", str(path)]) == 2
    assert "is the saved model this run reads" in capsys.readouterr().err and path.read_bytes() == before


@pytest.mark.parametrize("every", [False, True])
@pytest.mark.parametrize("liar", ["test-replay-relu-to-sigmoid{report=False}",
                                  "test-scale-weights{in_place=true, reports=false}",
                                  "test-scale-weights{reports=false}"])
def test_a_pass_that_changes_the_outputs_but_reports_no_change_is_the_one_named(case, plugin, liar, every):
    # The check does not trust PassResult.changed: before, the lie went unchecked and the next pass checked
    # (a built-in rewrite that did its job) was blamed for the changed outputs.
    _, x, g = case
    with pytest.raises(PassError) as e:
        PassManager([liar, "remove-identity", "fold-batchnorm"], check_numerics=1e-4, check_every_pass=every,
                    failure_dumps=False).run(g, PassContext(example_inputs=(x,)))
    name, message = liar.split("{")[0], str(e.value)
    if "in_place" in liar and not every:  # its in-place edit makes the group's replay impossible: named as such
        assert message.startswith(f"passes '{name}', 'remove-identity', 'fold-batchnorm' (steps 1-3 of 3")
        assert "params changed in place (c1.weight) prevent replaying" in message
        return
    assert message.startswith(f"pass '{name}' (step 1 of 3")
    assert "changed the outputs beyond check_numerics=0.0001 (it reported changed=False)" in message


def test_a_lossy_pass_that_reports_no_change_does_not_leave_a_stale_reference(case, plugin):
    _, x, g = case
    lossy = "test-scale-weights{reports=false, lossy=true}"
    run = PassManager(["remove-identity", lossy, "fold-batchnorm"], check_numerics=1e-4).run(
        g, PassContext(example_inputs=(x,)))  # the rewrite after it is checked against its outputs
    assert [r.name for r in run] == ["remove-identity", "test-scale-weights", "fold-batchnorm"]


def test_the_ir_is_printed_only_when_asked(case, monkeypatch):
    _, x, g = case
    calls = []
    real = ir.Graph.__str__
    monkeypatch.setattr(ir.Graph, "__str__", lambda self: calls.append(1) or real(self))
    PassManager(["remove-identity", "fold-batchnorm", "cse", "dce"], check_numerics=1e-5).run(
        g, PassContext(example_inputs=(x,)))
    assert calls == []  # no text before or after any pass (failure dumps restore a checkpoint instead)


def test_custom_instrumentations_see_every_pass_and_can_fail_one(case):
    _, x, g = case
    seen = []

    class Budget:
        def before_pass(self, step, p, graph):
            seen.append(("before", step, p.name))

        def after_pass(self, step, p, graph, record):
            seen.append(("after", step, p.name, record.changed))
            if p.name == "cse":
                from slimfx.passes.instrument import PassFailure
                raise PassFailure("took too long")

        def on_failure(self, f):
            seen.append(("failure", f.step, f.what))
            return ["see the budget"]

    with pytest.raises(PassError) as e:
        PassManager(["fold-batchnorm", "cse", "dce"], instrumentations=[Budget()]).run(
            g, PassContext(example_inputs=(x,)))
    assert str(e.value).startswith("pass 'cse' (step 2 of 3: cse) took too long") and "see the budget" in str(e.value)
    assert seen == [("before", 1, "fold-batchnorm"), ("after", 1, "fold-batchnorm", True), ("before", 2, "cse"),
                    ("after", 2, "cse", False), ("failure", 2, "took too long")]


def test_the_heap_is_frozen_only_while_a_step_runs(case, plugin):
    import gc

    _, x, g = case
    seen = []

    class Probe:
        def after_pass(self, step, p, graph, record):
            seen.append(gc.get_freeze_count() > 0)

    PassManager(["fold-batchnorm", "cse"], instrumentations=[Probe()]).run(g, PassContext(example_inputs=(x,)))
    assert seen == [True, True] and gc.get_freeze_count() == 0
    with pytest.raises(RecipeError):
        PassManager(["test-replay-raises"]).run(g, PassContext(example_inputs=(x,)))
    assert gc.get_freeze_count() == 0


def test_failure_dumps_can_be_switched_off(case, plugin):
    _, x, g = case
    with pytest.raises(RecipeError) as e:
        PassManager(["test-replay-raises"], failure_dumps=False).run(g, PassContext(example_inputs=(x,)))
    assert "IR before" not in str(e.value) and "replay:" not in str(e.value)


# --- checks deferred over a run of output-preserving rewrites ----------------------------------------------

@register_pass("test-wrong-meta")
class WrongMeta(Pass):
    """Leaves an invalid graph: the first relu records a shape it does not compute."""

    def run(self, graph, ctx):
        graph.find("relu")[0].meta = ir.TensorMeta((1, 2, 3), torch.float32)
        return PassResult(changed=True)


@register_pass("test-scale-weights")
class ScaleWeights(Pass):
    """Scales the first weight by `factor` (a new tensor, or in place): changes the outputs."""

    factor: float = option(2.0, help="the scale")
    in_place: bool = option(False, help="edit the tensor in place")
    reports: bool = option(True, help="whether it reports the change")
    lossy: bool = option(False, help="whether it says it changes the outputs (preserves_outputs = False)")

    @property
    def preserves_outputs(self):  # the class flag, per object here
        return not self.lossy

    def run(self, graph, ctx):
        name = next(k for k in graph.params if k.endswith("weight"))  # c1.weight (read through a mask or not)
        if self.in_place:
            with torch.no_grad():
                graph.params[name].mul_(self.factor)
        else:
            graph.params[name] = graph.params[name] * self.factor
        return PassResult(changed=self.reports)


def _count_checks(monkeypatch) -> dict[str, int]:
    calls = {"verify": 0, "evaluate": 0}
    real_v, real_e = Verifier.__call__, Evaluator.__call__

    def verify(self, graph):
        calls["verify"] += 1
        return real_v(self, graph)

    def evaluate(self, graph):
        calls["evaluate"] += 1
        return real_e(self, graph)

    monkeypatch.setattr(Verifier, "__call__", verify)
    monkeypatch.setattr(Evaluator, "__call__", evaluate)
    return calls


@pytest.mark.parametrize("every, verified, evaluated", [(False, 3, 4), (True, 5, 6)])
def test_checks_run_once_after_each_run_of_preserving_rewrites(case, monkeypatch, every, verified, evaluated):
    _, x, g = case
    calls = _count_checks(monkeypatch)
    same = "test-scale-weights{factor=1.0}"  # changes the graph (a new weight tensor), not its outputs
    run = PassManager([same, same, "prune-weights{sparsity=0.5}", same, same], check_numerics=1e-5,
                      check_every_pass=every).run(g, PassContext(example_inputs=(x,)))
    assert len(run) == 5 and all(r.changed for r in run)
    # deferred: groups [1, 2], [3] (lossy: checked alone), [4, 5]; verified after each group, outputs computed
    # before and after each group of rewrites. Every pass: verified 5 times, outputs before and after each pass
    # (the reference starts again after the lossy pass).
    assert calls == {"verify": verified, "evaluate": evaluated}


def _strip_paths(message: str) -> str:
    return re.sub(r"/\S+", "PATH", message)


@pytest.mark.parametrize("pipeline, step, what", [
    (["fold-batchnorm", "test-replay-relu-to-sigmoid", "cse", "dce"], 2, "changed the outputs beyond"),
    (["remove-identity", "fold-batchnorm", "test-wrong-meta", "dce"], 3, "left an invalid graph"),
    (["fold-batchnorm", "test-scale-weights", "dce"], 2, "changed the outputs beyond"),
])
def test_a_failure_inside_a_group_names_the_pass_as_if_each_was_checked(case, plugin, tmp_path, pipeline, step,
                                                                          what):
    _, x, g = case
    messages = []
    for every in (False, True):
        with pytest.raises(PassError) as e:
            PassManager(pipeline, check_numerics=1e-4, check_every_pass=every, dump_dir=tmp_path / str(every)).run(
                g.copy(), PassContext(example_inputs=(x,)))
        messages.append(str(e.value))
    deferred, each = messages
    name = pipeline[step - 1]
    assert deferred.startswith(f"pass '{name}' (step {step} of {len(pipeline)}") and what in deferred
    assert _strip_paths(deferred) == _strip_paths(each)  # the same error, dumps and reproducer either way
    before = _files(deferred)["IR before the pass"].read_text()
    assert "batch_norm(" not in before  # the input of the failing step: after fold-batchnorm


def test_a_crash_caused_by_an_earlier_pass_is_blamed_on_that_pass(case, monkeypatch):
    _, x, g = case
    from slimfx.passes.cleanup import DeadCodeElimination

    monkeypatch.setattr(DeadCodeElimination, "run", lambda self, graph, ctx: 1 / 0)
    with pytest.raises(PassError) as e:
        PassManager(["fold-batchnorm", "test-wrong-meta", "dce"]).run(g, PassContext(example_inputs=(x,)))
    assert str(e.value).startswith("pass 'test-wrong-meta' (step 2 of 3") and "left an invalid graph" in str(e.value)


def test_a_group_failure_no_single_pass_reproduces_says_so(case):
    _, x, g = case
    # each scaling moves the outputs by ~1e-4 of their magnitude: each alone within 1.5e-4, both together not
    pipeline, ctx = ["test-scale-weights{factor=1.01}"] * 2, PassContext(example_inputs=(x,))
    PassManager(pipeline, check_numerics=1.5e-4, check_every_pass=True).run(g.copy(), ctx)
    with pytest.raises(PassError) as e:
        PassManager(pipeline, check_numerics=1.5e-4).run(g, ctx)
    msg = str(e.value)
    assert msg.startswith("passes 'test-scale-weights', 'test-scale-weights' (steps 1-2 of 2, checked together) "
                          "changed the outputs beyond check_numerics=0.00015")
    assert "(each of them alone passed the checks when replayed)" in msg


def test_params_changed_in_place_are_named_when_they_prevent_a_replay(case):
    m, x, g = case
    with pytest.raises(PassError) as e:
        PassManager(["test-scale-weights{in_place=true}", "fold-batchnorm", "dce"], check_numerics=1e-4).run(
            g, PassContext(example_inputs=(x,)))
    msg = str(e.value)
    assert msg.startswith("passes 'test-scale-weights', 'fold-batchnorm', 'dce' (steps 1-3 of 3, checked together) "
                          "changed the outputs beyond")
    # and who edited it in place (before: only the group was named)
    assert ("(params changed in place (c1.weight) prevent replaying the steps one at a time; pass "
            "'test-scale-weights' (step 1) edited c1.weight in place (a pass must put a new tensor in graph.params "
            "instead))") in msg
    # after fold-batchnorm the weight is a new tensor: an in-place edit then does not stop the replay
    with pytest.raises(PassError, match=r"^pass 'test-scale-weights' \(step 2 of 3"):
        PassManager(["fold-batchnorm", "test-scale-weights{in_place=true}", "dce"], check_numerics=1e-4).run(
            ir.capture(m, (x,)), PassContext(example_inputs=(x,)))


# --- the incremental verifier and evaluator --------------------------------------------------------------------

def _break(g: ir.Graph, how: str) -> None:
    relu = g.find("relu")[0]
    if how == "use-before-def":
        g.move_before(relu, relu.inputs[0])
    elif how == "meta":
        relu.meta = ir.TensorMeta((1, 2, 3), torch.float32)
    elif how == "users":
        relu._inputs = (g.inputs[0],)  # bypasses the use lists
    elif how == "param":
        conv = g.find("conv2d")[0]
        del g.params[conv.inputs[1].name]
    elif how == "param-shape":
        conv = g.find("conv2d")[0]
        g.params[conv.inputs[1].name] = torch.zeros(1, 1, 1, 1)
    elif how == "attr":
        g.find("max_pool2d")[0].attrs["kernel_size"] = (99, 99)


@pytest.mark.parametrize("how", ["use-before-def", "meta", "users", "param", "param-shape", "attr"])
def test_the_incremental_verifier_catches_what_verify_catches(how):
    m = make(ConvBnNet)
    x = torch.randn(2, 3, 8, 8)
    g = ir.capture(m, (x,))
    if how == "attr" and not g.find("max_pool2d"):
        g = ir.capture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2)), (x,))
    v = Verifier()
    v(g)
    v(g)
    _break(g, how)
    with pytest.raises(VerifyError) as full:
        ir.verify(g)
    with pytest.raises(VerifyError) as inc:
        v(g)
    assert str(inc.value) == str(full.value)


def test_the_evaluator_matches_lowering_and_recomputes_only_what_changed():
    m = make(ConvBnNet)
    x = torch.randn(2, 3, 8, 8)
    g = ir.capture(m, (x,))
    ev = Evaluator((x,))
    torch.testing.assert_close(ev(g), ir.lower(g).eval()(x), rtol=0, atol=0)
    assert ev.computed == len(g) - 2  # every op node (not the input and output)
    ev(g)
    assert ev.computed == 0
    create_pass("fold-batchnorm").run(g, PassContext())
    out = ev(g)
    assert 0 < ev.computed < len(g)
    torch.testing.assert_close(out, ir.lower(g).eval()(x), rtol=0, atol=0)
    g.params[g.find("linear")[0].inputs[1].name].mul_(2)  # in place: the version tells
    torch.testing.assert_close(ev(g), ir.lower(g).eval()(x), rtol=0, atol=0)
    assert ev.computed >= 1


@register_pass("test-checkpoint-probe")
class CheckpointProbe(Pass):
    """Edits everything it can reach, then fails: the checkpoint must restore the input exactly."""

    def run(self, graph, ctx):
        for n in graph.find("relu"):
            n.op, n.attrs = "clamp", {"min": 0.0, "max": None}
        graph.find("conv2d")[0].meta = None
        raise ValueError("probe")


def test_the_checkpoint_restores_the_input_exactly(case, tmp_path):
    _, x, g = case
    want = g.copy()
    with pytest.raises(PassError) as e:
        PassManager(["test-checkpoint-probe"], dump_dir=tmp_path).run(g, PassContext(example_inputs=(x,)))
    saved = ir.Graph.load(_files(str(e.value))["input graph"])
    assert ir.graph_diff(want, saved, locations=False) is None, textwrap.shorten(str(e.value), 300)


@register_pass("test-extra-output")
class ExtraOutput(Pass):
    """Returns its output twice (lossy: no numerics check would see it)."""

    preserves_outputs = False

    def run(self, graph, ctx):
        graph.set_outputs((graph.outputs, graph.outputs))
        return PassResult(changed=True)


@register_pass("test-extra-input")
class ExtraInput(Pass):
    """Adds a second graph input nothing reads (lossy)."""

    preserves_outputs = False

    def run(self, graph, ctx):
        x = graph.inputs[0]
        graph.create_node("input", (), {}, name="y", meta=x.meta, after=x)
        return PassResult(changed=True)


@pytest.mark.parametrize("name, what", [
    ("test-extra-output", "changed the graph's outputs from (output) to (output[0], output[1])"),
    ("test-extra-input", "changed the graph's inputs from (x) to (x, y)"),
])
@pytest.mark.parametrize("numerics", [None, 1e-5])
def test_a_pass_that_changes_the_graphs_inputs_or_outputs_is_named(case, name, what, numerics):
    _, x, g = case
    with pytest.raises(PassError) as e:
        PassManager(["remove-identity", name, "dce"], check_numerics=numerics, failure_dumps=False).run(
            g, PassContext(example_inputs=(x,)))
    assert str(e.value).startswith(f"pass '{name}' (step 2 of 3: {name}) {what}; a pass may change what")


@register_pass("test-calls-exit")
class CallsExit(Pass):
    """Calls sys.exit (e.g. a script's main() pasted into a pass)."""

    def run(self, graph, ctx):
        import sys

        sys.exit(5)


@pytest.mark.parametrize("every", [False, True])
def test_a_pass_calling_sys_exit_is_a_named_pass_error_not_the_end_of_the_process(case, every):
    # before: SystemExit went through the manager, and the CLI ended with exit code 5 and no message
    _, x, g = case
    with pytest.raises(PassError) as e:
        PassManager(["remove-identity", "test-calls-exit", "dce"], check_every_pass=every, failure_dumps=False).run(
            g, PassContext(example_inputs=(x,)))
    assert str(e.value).startswith("pass 'test-calls-exit' (step 2 of 3: test-calls-exit) crashed: SystemExit: 5")
