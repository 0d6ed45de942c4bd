"""PassManager: runs pipelines, records them, and names the pass that breaks the IR or the numerics."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

from slimfx import ir
from slimfx.ir.errors import PassCrash, PassError
from slimfx.passes import (
    Pass,
    PassContext,
    PassManager,
    PassRecord,
    PassResult,
    compare_outputs,
    register_pass,
)
from tests.passes.nets import ConvBnNet, make


@register_pass("test-sigmoid-for-relu")
class SigmoidForRelu(Pass):
    """Deliberately wrong: swaps relu for sigmoid (shapes stay valid, numbers do not)."""

    def run(self, graph, ctx):
        for n in graph.find("relu"):
            n.op = "sigmoid"
        return PassResult(changed=True)


@register_pass("test-use-before-def")
class UseBeforeDef(Pass):
    """Deliberately wrong: moves the last compute node to the front, before its inputs."""

    def run(self, graph, ctx):
        nodes = [n for n in graph if n.op not in ("input", "output")]
        graph.move_before(nodes[-1], nodes[0])
        return PassResult(changed=True)


@register_pass("test-bad-meta")
class BadMeta(Pass):
    """Deliberately wrong: records a shape the node does not compute."""

    def run(self, graph, ctx):
        n = graph.find("relu")[0]
        n.meta = ir.TensorMeta((1, 2, 3), torch.float32)
        return PassResult(changed=True)


@register_pass("test-crash")
class Crash(Pass):
    def run(self, graph, ctx):
        raise ZeroDivisionError("oops")


@register_pass("test-sneaky-analysis")
class SneakyAnalysis(Pass):
    """An analysis that scales a weight in place: the manager must notice."""

    is_analysis = True

    def run(self, graph, ctx):
        graph.params["c1.weight"].mul_(1.0001)
        return PassResult(changed=False)


@register_pass("test-renaming-analysis")
class RenamingAnalysis(Pass):
    is_analysis = True

    def run(self, graph, ctx):
        n = graph.find("relu")[0]
        graph.rename(n, "renamed")
        return PassResult(changed=False)


@register_pass("test-honest-analysis")
class HonestAnalysis(Pass):
    """Counts nodes."""

    is_analysis = True

    def run(self, graph, ctx):
        return PassResult(changed=False, stats={"nodes": len(graph)})


@register_pass("test-rebuild")
class Rebuild(Pass):
    """Returns a copy with every relu made a clamp(min=0): a new graph, the given one untouched."""

    def run(self, graph, ctx):
        new = graph.copy()
        for n in new.find("relu"):
            n.op, n.attrs = "clamp", {"min": 0.0, "max": None}
        return PassResult(changed=True, stats={"relus": len(new.find("clamp"))}, graph=new)


@register_pass("test-analysis-with-graph")
class AnalysisWithGraph(Pass):
    is_analysis = True

    def run(self, graph, ctx):
        return PassResult(changed=False, graph=graph.copy())


@register_pass("test-not-a-graph")
class NotAGraph(Pass):
    def run(self, graph, ctx):
        return PassResult(changed=True, graph=str(graph))


@pytest.fixture
def case():
    m = make(ConvBnNet)
    x = torch.randn(2, 3, 8, 8)
    return m, x, ir.capture(m, (x,))


def test_runs_specs_and_records_each_pass(case):
    m, x, g = case
    pm = PassManager(["remove-identity", "fold-batchnorm", "test-honest-analysis", "dce"], check_numerics=1e-5)
    recs = pm.run(g, PassContext(example_inputs=(x,)))
    assert recs.graph is g  # every pass edited it in place
    assert [r.name for r in recs] == ["remove-identity", "fold-batchnorm", "test-honest-analysis", "dce"]
    assert all(isinstance(r, PassRecord) and r.seconds >= 0 for r in recs)
    fold = recs[1]
    assert fold.changed and fold.stats["folded"] == 4
    assert recs[2].stats["nodes"] == len(g) and not recs[2].changed
    assert recs[1].to_dict() == {"name": "fold-batchnorm", "seconds": fold.seconds, "stats": fold.stats,
                                 "changed": True}
    assert not g.find("batch_norm")
    torch.testing.assert_close(ir.lower(g)(x), m(x), rtol=1e-5, atol=1e-5)


def test_a_pass_may_return_a_new_graph_and_the_run_goes_on_with_it(case, tmp_path):
    m, x, g = case
    before, held = str(g), g.find("relu")[0]
    seen = []

    class Watch:
        def after_pass(self, index, p, graph, record):
            seen.append((p.name, graph))

    run = PassManager(["fold-batchnorm", "test-rebuild", "dce"], check_numerics=1e-5, dump_dir=tmp_path,
                      instrumentations=[Watch()]).run(g, PassContext(example_inputs=(x,)))
    new = run.graph
    assert new is not g and [r.name for r in run] == ["fold-batchnorm", "test-rebuild", "dce"]
    assert run[1].stats == {"relus": len(g.find("relu"))} and not new.find("relu") and not new.find("batch_norm")
    assert [graph is new for _, graph in seen] == [False, True, True]  # later passes and hooks see the new one
    assert held.graph is g and g.find("relu") and str(g) != before  # fold-batchnorm edited g; g keeps its relus
    assert "clamp(" in (tmp_path / "02-test-rebuild.txt").read_text()
    torch.testing.assert_close(ir.lower(new)(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, what", [("test-analysis-with-graph", "a new graph, but it is an analysis"),
                                       ("test-not-a-graph", "returned a str as its new graph")])
def test_a_new_graph_from_an_analysis_or_not_a_graph_is_refused(case, bad, what):
    _, x, g = case
    with pytest.raises(PassError, match=rf"pass '{bad}' \(step 1 of 1.*{what}"):
        PassManager([bad]).run(g, PassContext(example_inputs=(x,)))


@pytest.mark.parametrize("bad, words", [
    ("test-use-before-def", ["left an invalid graph", "before it is defined"]),
    ("test-bad-meta", ["left an invalid graph", "records f32[1, 2, 3]"]),
])
def test_a_pass_that_breaks_the_ir_is_named_with_dumps(case, tmp_path, bad, words):
    _, x, g = case
    pm = PassManager(["remove-identity", bad, "dce"], dump_dir=tmp_path)
    with pytest.raises(PassError) as e:
        pm.run(g, PassContext(example_inputs=(x,)))
    msg = str(e.value)
    assert msg.startswith(f"pass '{bad}' (step 2 of 3")
    for w in words:
        assert w in msg
    before, after = re.findall(r"IR (?:before|after) the pass:\s+(\S+)", msg)
    assert Path(before).read_text() != Path(after).read_text()
    assert Path(before).parent == tmp_path


def test_a_pass_that_changes_numbers_is_named(case):
    _, x, g = case
    with pytest.raises(PassError) as e:
        PassManager(["fold-batchnorm", "test-sigmoid-for-relu"], check_numerics=1e-4).run(
            g, PassContext(example_inputs=(x,)))
    msg = str(e.value)
    assert "pass 'test-sigmoid-for-relu' (step 2 of 2" in msg and "changed the outputs" in msg
    before, after = re.findall(r"IR (?:before|after) the pass:\s+(\S+)", msg)
    assert "relu(" in Path(before).read_text() and "sigmoid(" in Path(after).read_text()
    assert "relu(" not in Path(after).read_text()


def test_wrong_numerics_pass_the_ir_check_without_check_numerics(case):
    _, x, g = case
    run = PassManager(["test-sigmoid-for-relu"]).run(g, PassContext(example_inputs=(x,)))  # verify cannot tell
    assert run.graph.find("sigmoid")


def test_a_crashing_pass_is_named(case):
    _, x, g = case
    with pytest.raises(PassError, match=r"pass 'test-crash' \(step 1 of 1.*crashed: ZeroDivisionError: oops") as e:
        PassManager(["test-crash"]).run(g, PassContext(example_inputs=(x,)))
    assert isinstance(e.value, PassCrash) and not e.value.builtin  # a pass of the user's: their error to fix


@pytest.mark.parametrize("bad, what", [("test-sneaky-analysis", "params"), ("test-renaming-analysis", "IR")])
def test_an_analysis_that_changes_the_graph_is_named(case, bad, what):
    _, x, g = case
    with pytest.raises(PassError, match=rf"pass '{bad}'.*is an analysis .* changed the graph's {what}"):
        PassManager([bad]).run(g, PassContext(example_inputs=(x,)))


def test_print_after_each_prints_only_changed_graphs(case, tmp_path):
    _, x, g = case
    out = io.StringIO()
    PassManager(["fold-batchnorm", "cse", "dce"], print_after_each=True, stream=out, dump_dir=tmp_path).run(
        g, PassContext(example_inputs=(x,)))
    text = out.getvalue()
    assert text.count("// IR after") == 1 and "// IR after fold-batchnorm" in text
    assert "batch_norm" not in text.split("// IR after fold-batchnorm")[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.txt", "01-fold-batchnorm.txt"]


def test_check_numerics_needs_inputs_and_valid_tolerance(case):
    _, _, g = case
    with pytest.raises(PassError, match="needs example inputs"):
        PassManager(["dce"], check_numerics=1e-5).run(g, PassContext())
    with pytest.raises(PassError, match="tolerance"):
        PassManager(["dce"], check_numerics=-1)
    with pytest.raises(PassError, match="got 3"):
        PassManager(["dce", 3])


def test_compare_outputs_is_relative_to_output_magnitude():
    a = torch.tensor([1000.0, -2000.0])
    assert compare_outputs([a], [a + 0.01], 1e-5) is None            # 0.01 / 2000 = 5e-6
    assert "exceeds" in compare_outputs([a], [a + 0.1], 1e-5)
    small = torch.tensor([1e-3, 2e-3])
    assert "exceeds" in compare_outputs([small], [small + 1e-7], 1e-5)
    assert "NaN" in compare_outputs([a], [torch.tensor([float("nan"), 1.0])], 1.0)
    assert "now" in compare_outputs([a], [a[:1]], 1.0)
    assert "integer" in compare_outputs([torch.tensor([1, 2])], [torch.tensor([1, 3])], 1.0)
    assert "2 values" in compare_outputs([a], [a, a], 1.0)
