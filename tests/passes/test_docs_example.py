"""docs/passes.md shows docs/examples/custom_pass.py verbatim; this runs it and checks what it claims."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch

from slimfx import ir
from slimfx.passes import PassContext

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "custom_pass.py"


def test_the_docs_show_the_example_verbatim():
    doc = (ROOT / "docs" / "passes.md").read_text()
    assert "```python\n" + EXAMPLE.read_text() + "```" in doc


def test_the_example_runs_and_does_what_it_says(capsys):
    ns = runpy.run_path(str(EXAMPLE))
    graph, records = ns["main"]()
    assert [r.name for r in records] == ["fuse-silu", "cse", "dce", "clip-linear-weights"]
    assert records[0].stats == {"rewritten": 1} and records[3].stats == {"clipped": 2}
    assert [n.op for n in graph if n.op not in ("input", "output")] == ["linear", "silu", "linear"]
    assert all(float(graph.params[k].abs().max()) <= 0.1 + 1e-7 for k in ("fc1.weight", "fc2.weight"))
    out = capsys.readouterr().out
    assert "silu(%fc1)" in out
    printed = out[out.index("graph Net("):].rstrip()  # the graph docs/passes.md shows as the output, verbatim
    assert printed + "\n```" in (ROOT / "docs" / "passes.md").read_text()

    # the rewrite kept the numbers (before clipping): compare with an unclipped run of the pattern pass
    net = ns["Net"]().eval()
    x = torch.randn(3, 8)
    g = ir.capture(net, (x,))
    g = ns["FuseSilu"]().run(g, PassContext()).graph_after(g)
    torch.testing.assert_close(ir.lower(g)(x), net(x))


def test_the_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert "```python\n" + EXAMPLE.read_text() + "```" in readme
