"""The export probe (shapes at two batch sizes) gives the same answer on the meta device as on real tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx import ir, models
from slimfx.exporters.onnx import context
from slimfx.ir import analysis as ir_analysis


def _probe(graph, inputs, monkeypatch, *, meta: bool):
    monkeypatch.setattr(ir_analysis, "META_MIN_MACS", -1 if meta else float("inf"))
    used = []
    real_ran = context._ran
    monkeypatch.setattr(context, "_ran", lambda i, x: used.append(real_ran(i, x)) or used[-1])
    return context.probe(graph, inputs), used


@pytest.mark.parametrize("name", models.names())
def test_meta_probe_equals_the_real_one_on_the_zoo(name, monkeypatch):
    zoo = models.get(name)
    model, inputs = zoo.build(0).eval(), zoo.example_inputs()
    g = ir.capture(model, inputs)
    real, _ = _probe(g, inputs, monkeypatch, meta=False)
    params = {k: v.clone() for k, v in g.params.items()}
    meta, used = _probe(g, inputs, monkeypatch, meta=True)
    assert used == [True, True] and meta == real
    assert all(torch.equal(params[k], v) and v.device.type == "cpu" for k, v in g.params.items())  # left as it was


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return torch.relu(self.inner(x))


def test_a_graph_the_meta_device_cannot_run_is_probed_for_real(monkeypatch):
    x = torch.randn(1, 4)
    g = ir.capture(WithLeaf(), (x,), leaf_modules=[Inner])  # an opaque module with real weights inside
    assert g.find("opaque")
    real, _ = _probe(g, (x,), monkeypatch, meta=False)
    meta, used = _probe(g, (x,), monkeypatch, meta=True)
    assert meta == real and used == [False, False]


_RAN_ON_META = ir_analysis.ran_on_meta


def _symbols(graph) -> dict[str, tuple]:
    return {n.name: n.meta.sym for n in graph if isinstance(n.meta, ir.TensorMeta)}


def _named(graph, inputs, monkeypatch, *, meta: bool) -> tuple[dict[str, tuple], list[bool]]:
    """Every node's symbol names after `propagate_symbols`, with the meta device forced on or off."""
    from slimfx.ir.symdims import propagate_symbols

    monkeypatch.setattr(ir_analysis, "META_MIN_MACS", -1 if meta else float("inf"))
    used: list[bool] = []
    monkeypatch.setattr(ir_analysis, "ran_on_meta", lambda i, x: used.append(_RAN_ON_META(i, x)) or used[-1])
    for n in graph:
        if isinstance(n.meta, ir.TensorMeta) and n.op != "input":
            n.meta = n.meta.with_sym(None)
    assert propagate_symbols(graph, inputs)
    return _symbols(graph), used


@pytest.mark.parametrize("name", models.names())
def test_symbol_naming_on_the_meta_device_equals_the_real_one_on_the_zoo(name, monkeypatch):
    zoo = models.get(name)
    model, inputs = zoo.build(0).eval(), zoo.example_inputs()
    g = ir.capture(model, inputs)
    real, used_real = _named(g, inputs, monkeypatch, meta=False)
    params = {k: v.clone() for k, v in g.params.items()}
    meta, used = _named(g, inputs, monkeypatch, meta=True)
    assert used_real == [] and used == [True, True] and meta == real
    assert any(s and "batch" in s for s in meta.values())  # it named something
    assert all(torch.equal(params[k], v) and v.device.type == "cpu" for k, v in g.params.items())


def test_symbol_naming_of_spatial_dims_on_meta_and_real_agree(monkeypatch):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 64, 64)
    g = ir.capture(net, (x,), dynamic_dims="batch,height,width")
    real, _ = _named(g, (x,), monkeypatch, meta=False)
    meta, used = _named(g, (x,), monkeypatch, meta=True)
    assert used == [True, True] and meta == real
    assert real[g.nodes[1].name] == ("batch", None, None, None)  # strided: follows height, is not it
    assert real[g.inputs[0].name] == ("batch", None, "height", "width")


def test_symbol_naming_of_a_graph_meta_cannot_run_runs_for_real(monkeypatch):
    x = torch.randn(2, 4)
    g = ir.capture(WithLeaf(), (x,), leaf_modules=[Inner])  # an opaque module with real weights inside
    real, _ = _named(g, (x,), monkeypatch, meta=False)
    meta, used = _named(g, (x,), monkeypatch, meta=True)
    assert used == [False, False] and meta == real and real[g.nodes[-2].name][0] == "batch"
