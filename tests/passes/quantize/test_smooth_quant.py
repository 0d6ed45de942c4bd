"""SmoothQuant (issue #17, item 4): activation outliers moved into the weights before static int8."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.errors import PassError
from slimfx.passes import PassContext, create_pass


class PreLN(nn.Module):
    """x -> LayerNorm (a few channels with large gains: outliers) -> q/k linears; a second LayerNorm also feeds a
    residual add (not smoothable)."""

    def __init__(self, d=64):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        with torch.no_grad():
            self.ln.weight[:3] = 40.0  # outlier channels

    def forward(self, x):
        h = self.ln(x)
        y = self.q(h) * torch.sigmoid(self.k(h))
        z = self.ln2(y)
        return self.fc(z) + z


def _sqnr(ref, y):
    return float(10 * torch.log10((ref ** 2).mean() / ((y - ref) ** 2).mean()))


def test_smooth_quant_keeps_the_function_and_raises_static_int8_sqnr():
    torch.manual_seed(0)
    m = PreLN().eval()
    x = torch.randn(4, 16, 64)
    cal = [(torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    ctx = PassContext((x,), calibration_data=cal, quiet=True)
    g = ir.capture(m, (x,))
    smoothed = g.copy()
    res = create_pass("smooth-quant", {"alpha": 0.5}).run(smoothed, ctx)
    assert res.stats["smoothed"] == 1 and res.stats["linears"] == 2  # ln2 also feeds the add: left alone
    assert res.stats["max_scale_spread"] > 5
    assert torch.equal(smoothed.params["ln2.weight"], g.params["ln2.weight"])
    with torch.no_grad():
        assert torch.allclose(ir.lower(smoothed)(x), m(x), atol=1e-4, rtol=1e-4)
    sqnr = {}
    for label, graph in (("plain", g.copy()), ("smooth", smoothed)):
        create_pass("quantize", {}).run(graph, ctx)
        with torch.no_grad():
            sqnr[label] = _sqnr(m(x), ir.lower(graph)(x))
    assert sqnr["smooth"] > sqnr["plain"] + 3, sqnr


def test_smooth_quant_alpha_is_checked_and_a_graph_without_layer_norms_is_left_alone():
    with pytest.raises(PassError, match="alpha"):
        create_pass("smooth-quant", {"alpha": 1.5})
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 8)
    g = ir.capture(m, (x,))
    res = create_pass("smooth-quant", {}).run(g, PassContext((x,), calibration_data=[(x,)], quiet=True))
    assert not res.changed and res.stats["smoothed"] == 0
