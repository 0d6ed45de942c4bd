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


def test_a_tie_survives_copies_and_model_files_and_counts_once(tmp_path):
    """fx names the tied weight twice; every path that clones or writes params keeps the two names one tensor,
    so later passes and exports see the tie whatever happened to the graph before them."""
    import slimfx
    from slimfx.errors import SlimfxError
    from tests.slimfx.test_persist import _json_edit, _rewrite

    torch.manual_seed(0)
    m = TiedLm().eval()
    ids = torch.randint(0, 40, (2, 7))
    g = ir.capture(m, (ids,))
    assert g.param_aliases()["head.weight"] == "wte.weight"
    readers = g.param_users(tied=True)
    assert sorted(n.op for n in readers["head.weight"]) == sorted(n.op for n in readers["wte.weight"]) == [
        "embedding", "linear"]
    assert [n.op for n in g.param_users()["head.weight"]] == ["linear"]  # per name without `tied`
    assert ir.count_params(g) == 40 * 32 + 32 * 32 + 32  # the table once
    c = g.copy()
    assert c.params["head.weight"] is c.params["wte.weight"] and c.params["wte.weight"] is not g.params["wte.weight"]
    # lowered, the tie is one nn.Parameter: an optimizer steps it once with both readers' gradients
    gm = ir.lower(g)
    assert gm.get_parameter("head.weight") is gm.get_parameter("wte.weight")
    assert sum(p.numel() for p in gm.parameters()) == ir.count_params(g)
    assert ir.count_params(c) == ir.count_params(g)
    assert ir.count_params(ir.capture(Untied().eval(), (ids,))) == 2 * 40 * 32 + 32 * 32 + 32
    path = tmp_path / "m.slimfx"
    slimfx.save(g, path)
    loaded = slimfx.load(path)
    assert loaded.param_aliases()["head.weight"] == "wte.weight"
    torch.testing.assert_close(ir.lower(loaded)(ids), m(ids))
    # the file holds the table once
    import zipfile

    from safetensors.torch import load as st_load
    assert "head.weight" not in st_load(zipfile.ZipFile(path).read("weights.safetensors"))
    # a hand-edited tie to a weight the file does not hold is refused with what to do
    _rewrite(path, "meta.json", _json_edit(lambda meta: next(
        p for p in meta["params"] if p["name"] == "head.weight").update(tied_to="nowhere")))
    with pytest.raises(SlimfxError, match="tied to 'nowhere'.*save the model again"):
        slimfx.load(path)


@pytest.mark.parametrize("scheme", ["int8-static", "int8-dynamic"])
def test_quantize_stores_a_tied_table_the_same_way_whichever_capture_named_it(scheme):
    """int8: the table once, as the head's int8 weight its lookup gathers rows of, whether the tie is one param
    name (torch.export) or two (fx)."""
    import onnx

    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.passes import PassContext, create_pass

    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    stored = {}
    for method in ("fx", "export"):
        torch.manual_seed(0)
        g = ir.capture(TiedLm().eval(), (ids,), method=method)
        res = create_pass("quantize", {"scheme": scheme}).run(g, PassContext((ids,), calibration_data=[(ids,)]))
        assert res.stats["embeddings"] == 1, res.stats
        model = to_onnx_model(g, inputs=(ids,))
        tables = [(t.data_type, sorted(t.dims)) for t in model.graph.initializer if sorted(t.dims) == [32, 40]]
        stored[method] = sorted(tables)
    assert stored["fx"] == stored["export"] == [(onnx.TensorProto.INT8, [32, 40])]


def test_finetuning_a_tied_lm_keeps_the_tie():
    from slimfx.passes import PassContext, create_pass

    class Scorer(TiedLm):  # one prediction per sequence, as finetune's classification loss expects
        def forward(self, ids):
            return super().forward(ids).mean(dim=1)

    torch.manual_seed(0)
    ids = torch.randint(0, 40, (64, 7))
    target = ids[:, 0]
    g = ir.capture(Scorer().eval(), (ids[:2],))
    before = g.params["wte.weight"].clone()
    batches = [(ids[i:i + 16], target[i:i + 16]) for i in range(0, 64, 16)]
    create_pass("finetune", {"epochs": 2, "lr": 0.01}).run(g, PassContext(example_inputs=(ids[:2],), train_data=batches))
    assert g.param_aliases()["head.weight"] == "wte.weight"  # still one tensor, moved by both readers
    assert not torch.equal(g.params["wte.weight"], before)


def test_channel_pruning_a_tied_lm_keeps_one_table(tmp_path):
    """fx names the tie twice; channel analysis treats the names as one param, so the width the table and the head
    share is one group (as under torch.export's one name), sliced once: the pruned file holds one narrower table."""
    import onnx

    from slimfx.passes import PassContext, PassManager, create_pass

    torch.manual_seed(0)
    m = TiedLm(vocab=300, d=32).eval()
    ids = torch.randint(0, 300, (2, 7))
    g = ir.capture(m, (ids,))
    g = PassManager([create_pass("prune-channels", {"sparsity": 0.5})]).run(g, PassContext((ids,), quiet=True)).graph
    assert g.params["wte.weight"].shape == (300, 16) and g.param_aliases()["head.weight"] == "wte.weight"
    assert ir.count_params(g) == 300 * 16 + 16 * 16 + 16
    out = export_onnx(g, tmp_path / "m.onnx", inputs=(ids,))
    assert len([t for t in onnx.load(str(out.path)).graph.initializer if sorted(t.dims) == [16, 300]]) == 1
