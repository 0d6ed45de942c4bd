"""Outputs that are not [batch, classes]: where top-1 agreement and accuracy read their classes.

Segmentation logits [batch, classes, H, W] were 'not shaped like class scores', so every quantizing recipe
failed its gate on a U-Net and labelled masks were refused; a waveform [batch, 1, time] was scored by the
argmax over time; token-level accuracy ([batch, tokens, classes] with [batch, tokens] targets) was hits per
row, up to tokens x 100%.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimfx
from slimfx import ir
from slimfx.data import accuracy
from slimfx.ir.metrics import SHAPE_RULE, Comparison


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.seg = nn.Conv2d(8, 4, 1)
        self.wave = nn.Conv1d(3, 1, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.vocab = nn.Linear(3, 11)

    def forward(self, img, seq):
        h = F.relu(self.conv(img))
        return (F.softmax(self.seg(h) + 1.0, dim=1),         # segmentation probabilities, per pixel
                torch.tanh(self.wave(seq)),                    # a waveform: one channel
                self.fc(h.mean((2, 3))),                       # class scores
                self.vocab(seq.transpose(1, 2)))               # token scores [batch, tokens, vocab]


def test_the_graph_says_where_each_output_holds_its_classes():
    g = ir.capture(Heads().eval(), (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 10)))
    assert ir.analysis.output_class_dims(g) == {"output[0]": 1, "output[1]": None, "output[2]": SHAPE_RULE,
                                                "output[3]": SHAPE_RULE}


def test_top1_agreement_reads_the_class_dim_it_is_given():
    ref = torch.zeros(2, 3, 4, 4)
    ref[:, 1] = 1.0  # class 1 everywhere
    cand = ref.clone()
    cand[0, 2, 0, :] = 2.0  # 4 of 32 pixels flip to class 2
    assert Comparison().top1_agreement is None
    shape_only = Comparison()
    shape_only.update(ref, cand)
    assert shape_only.top1_agreement is None  # 4-D: no classes by shape alone
    dense = Comparison(class_dims={"output": 1})
    dense.update(ref, cand)
    assert dense.top1_agreement == pytest.approx(28 / 32)
    wave = Comparison(class_dims={"output": None})
    wave.update(torch.randn(2, 1, 50), torch.randn(2, 1, 50))
    assert wave.top1_agreement is None


def test_accuracy_counts_positions_tokens_and_pixels_not_rows():
    x = torch.randn(4, 5, 7)
    y = x.argmax(-1)
    y[0, 0] = (y[0, 0] + 1) % 7
    assert accuracy(lambda t: t, [((x,), y)]) == pytest.approx(19 / 20)  # was 19/4
    img = torch.randn(2, 3, 4, 4)
    mask = img.argmax(1)
    mask[1, 0, :2] = (mask[1, 0, :2] + 1) % 3
    assert accuracy(lambda t: t, [((img,), mask)]) == pytest.approx(30 / 32)


class SegNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_segmentation_net_with_masks_compiles_int8_and_reports_pixel_accuracy(tmp_path):
    torch.manual_seed(0)
    model = SegNet().eval()
    x = torch.randn(96, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        masks = model(x).argmax(1)
    masks[:, 0, 0] = 0  # the model is wrong on some pixels: accuracy below 100%
    data = slimfx.Data(train=(x[:48], masks[:48]), validation=(x[48:72], masks[48:72]), test=(x[72:], masks[72:]))
    result = slimfx.compile(model, (x[:2],), "int8", data=data, out_dir=tmp_path / "o", bench_seconds=0,
                            quiet=True, formats="onnx")
    report = result.report
    agreement = report["validation"]["top1_agreement"]
    assert report["gate"]["passed"] and 0.99 <= agreement <= 1.0
    with torch.no_grad():
        want = float((model(x[72:]).argmax(1) == masks[72:]).float().mean())
    assert report["baseline"]["accuracy"] == pytest.approx(want) and want < 1.0
    assert abs(report["compressed"]["accuracy"] - want) < 0.02


class Vocoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(4, 16, 5, padding=2), nn.Conv1d(16, 1, 5, padding=2)

    def forward(self, x):
        return torch.tanh(self.b(F.leaky_relu(self.a(x), 0.1)))


def test_a_one_channel_output_fails_a_top1_gate_with_advice_that_works(tmp_path, capsys, monkeypatch):
    """A waveform has no classes: the int8 gate (top-1 agreement) cannot judge it, and says how to gate by SQNR
    from the command line; following that advice passes."""
    from slimfx.cli import main

    (tmp_path / "voc.py").write_text(
        "import torch\nfrom tests.slimfx.test_dense_outputs import Vocoder\n\n\n"
        "def make():\n    torch.manual_seed(0)\n    return Vocoder().eval(), (torch.randn(2, 4, 64),)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert main(["compile", "voc.py:make", "--recipe", "int8", "-o", "o", "--no-bench", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "no output holds class scores (shapes output [batch, 1, 64])" in err
    assert "`slimfx recipes int8 > my.toml`, replace min_top1_agreement with min_sqnr_db (e.g. 25)" in err
    assert main(["recipes", "int8"]) == 0
    text = capsys.readouterr().out.replace("min_top1_agreement = 0.99", "min_sqnr_db = 25")
    (tmp_path / "my.toml").write_text(text)
    assert main(["compile", "voc.py:make", "--recipe", "my.toml", "-o", "o", "--no-bench", "--quiet"]) == 0


def test_validate_of_a_quantized_segmentation_file_points_at_the_numbers_it_shows(tmp_path, capsys, monkeypatch):
    from slimfx.cli import main

    (tmp_path / "seg.py").write_text(
        "import torch\nfrom tests.slimfx.test_dense_outputs import SegNet\n\n\n"
        "def make():\n    torch.manual_seed(0)\n    return SegNet().eval(), (torch.randn(2, 3, 12, 12),)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert main(["compile", "seg.py:make", "--recipe", "int8", "-o", "o", "--no-bench", "--quiet",
                 "--format", "onnx"]) == 0
    assert main(["validate", "o/model.onnx", "--model", "seg.py:make"]) == 3
    err = capsys.readouterr().err
    assert "judge it by the SQNR above" in err and "top-1 agreement above" not in err  # none is shown for it
