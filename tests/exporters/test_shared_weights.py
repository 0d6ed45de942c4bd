"""A weight two modules share (a token table tied to the LM head) is written to the ONNX file once, however
capture named it: torch.export keeps one param read twice, fx one param name per module holding it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.exporters import export_onnx


class TiedLm(nn.Module):
    """Token embedding tied to the LM head, as GPT-2 and most decoders have it."""

    def __init__(self, vocab=40, d=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.wte(ids))))


class Untied(TiedLm):
    def __init__(self):
        super().__init__()
        self.head.weight = nn.Parameter(self.wte.weight.detach().clone())


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_tied_table_is_stored_once_and_the_file_matches_eager(method, tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    m = TiedLm().eval()
    ids = torch.randint(0, 40, (2, 7))
    g = ir.capture(m, (ids,), method=method)
    out = export_onnx(g, tmp_path / "m.onnx", inputs=(ids,))
    model = onnx.load(str(out.path))
    tables = [t.name for t in model.graph.initializer if sorted(t.dims) == [32, 40]]
    assert len(tables) == 1, tables
    y = ort.InferenceSession(str(out.path)).run(None, {model.graph.input[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(y, m(ids).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_equal_but_separate_weights_stay_separate(tmp_path):
    import onnx

    torch.manual_seed(0)
    m = Untied().eval()
    ids = torch.randint(0, 40, (2, 7))
    out = export_onnx(ir.capture(m, (ids,)), tmp_path / "m.onnx", inputs=(ids,))
    assert len([t for t in onnx.load(str(out.path)).graph.initializer if sorted(t.dims) == [32, 40]]) == 2
