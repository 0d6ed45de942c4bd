"""The export probe (shapes at two batch sizes) gives the same answer on the meta device as on real tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx import ir, models
from slimfx.exporters.onnx import context


def _probe(graph, inputs, monkeypatch, *, meta: bool):
    monkeypatch.setattr(context, "META_PROBE_MIN_MACS", -1 if meta else float("inf"))
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
