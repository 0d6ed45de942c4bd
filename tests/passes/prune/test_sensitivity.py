"""prune-sensitivity: an analysis (graph unchanged) with a table per group/layer and a PNG plot."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slimfx import ir
from slimfx.passes import PassContext, create_pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_sensitivity_table_plot_and_graph_untouched(tmp_path):
    x = torch.randn(4, 3, 6, 6)
    g = ir.capture(Net().eval(), (x,))
    text = str(g)
    params = {k: v.clone() for k, v in g.params.items()}
    p = create_pass("prune-sensitivity", {"sparsities": [0.0, 0.5, 0.875], "plot": str(tmp_path / "s.png")})
    assert p.is_analysis
    res = p.run(g, PassContext(example_inputs=(x,)))
    assert str(g) == text and all(torch.equal(g.params[k], v) for k, v in params.items())
    assert not res.changed and res.stats["metric"] == "sqnr_db" and res.stats["baseline"] == math.inf  # unpruned: exact
    rows = res.stats["table"]
    assert [(r["target"], r["sparsity"]) for r in rows] == [
        ("c1", 0.0), ("c1", 0.5), ("c1", 0.875), ("c2", 0.0), ("c2", 0.5), ("c2", 0.875)]
    for t in ("c1", "c2"):
        s = [r["sqnr_db"] for r in rows if r["target"] == t]
        assert s[0] == math.inf and s[0] > s[1] > s[2]  # more pruning, more output error
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    y = torch.randint(0, 4, (4,))
    res = create_pass("prune-sensitivity", {"mode": "weights", "sparsities": [0.5]}).run(
        g, PassContext(example_inputs=(x,), eval_fn=lambda m: float((m(x).argmax(-1) == y).float().mean())))
    assert res.stats["metric"] == "accuracy" and [r["target"] for r in res.stats["table"]] == ["c1", "c2", "fc"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in res.stats["table"])
