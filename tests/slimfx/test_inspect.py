"""`slimfx inspect`'s numbers: the per-node params column adds up to the total, which is torch's parameter count
(batch-norm running statistics are buffers, a tied weight counts once), and shapes read as in the IR text."""

from __future__ import annotations

import json

import torch
import torch.nn as nn
from hypothesis import given, settings

from slimfx import ir
from slimfx.cli import main
from slimfx.commands.inspect import format_table, to_json
from tests.generators import random_model


class TiedChunkNet(nn.Module):
    """A token table tied to the head, a batch norm, and a tuple-valued chunk."""

    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.bn = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        a, b = self.wte(ids).mean(1).chunk(2, dim=-1)
        return self.head(self.bn(torch.cat([b, a], dim=-1)))


def _torch_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied parameter once


def test_the_params_column_adds_up_to_torchs_count_and_tuple_shapes_read_as_ir_text():
    model = TiedChunkNet().eval()
    g = ir.capture(model, (torch.randint(0, 20, (2, 5)),))
    rows = ir.node_table(g)
    assert sum(r["params"] for r in rows) == ir.count_params(g) == _torch_params(model) == 20 * 8 + 16
    by = {r["name"]: r for r in rows}
    assert by["bn"]["params"] == 16  # weight and bias; running mean/var and the counter are buffers
    assert by["wte"]["params"] == 160 and by["head"]["params"] == 0  # the tied table, once, at its first reader
    assert by["chunk"]["shape"] == "(f32[2, 4], f32[2, 4])"  # before: TensorMeta(shape=..., ...) reprs
    table = format_table(g)
    assert "TensorMeta(" not in table and table.endswith(f"total: {len(rows)} nodes, 176 params, 320 MACs")
    doc = to_json(g)
    assert sum(n["params"] for n in doc["nodes"]) == doc["params"] == 176


@settings(max_examples=15, deadline=None)
@given(random_model())
def test_the_params_column_adds_up_on_random_models(case):
    model, inputs = case
    g = ir.capture(model.eval(), inputs)  # (torch's count differs when some module is unused in forward)
    assert sum(r["params"] for r in ir.node_table(g)) == ir.count_params(g)


def test_inspect_json_of_a_users_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "net.py").write_text(
        "import torch, torch.nn as nn\n"
        "def make():\n"
        "    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),\n"
        "                      nn.Linear(8 * 8 * 8, 10))\n"
        "    return m.eval(), (torch.randn(1, 1, 8, 8),)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "net.py:make", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    conv, bn, lin = 8 * 9 + 8, 16, 512 * 10 + 10
    assert doc["params"] == sum(n["params"] for n in doc["nodes"]) == conv + bn + lin
    assert doc["macs"] == 8 * 8 * 8 * 9 + 512 * 10  # conv: every output element sums over 1x3x3; linear 512x10


def test_a_quantized_graph_has_the_params_of_the_float_one():
    # int8 weights and int32 biases are stored weights (params); scales and zero points are not. Before, int8
    # zero points counted and int32 biases did not (1,322 for a 1,338-param model: a
    # zero-point param shared by layers of the same width counts once, their biases each).
    from slimfx.passes import PassContext, PassManager

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # two layers of 8 channels
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),       # share one zero-point param
                          nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.randn(4, 1, 6, 6)
    folded = PassManager(["fold-batchnorm"]).run(ir.capture(model, (x,))).graph
    floats = ir.count_params(folded)
    assert floats == 8 * 9 + 8 + 8 * 8 * 9 + 8 + 288 * 10 + 10
    q = PassManager(["quantize{speed_guard=false}"]).run(
        folded.copy(), PassContext(example_inputs=(x,), calibration_data=[(x,)])).graph
    assert q.find("dequantize") and any(t.dtype == torch.int8 for t in q.params.values())
    assert ir.count_params(q) == floats == sum(r["params"] for r in ir.node_table(q))
