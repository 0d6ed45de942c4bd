"""Pass.check_graph: before any work, options that name graph things are checked against the captured graph.

quantize's `skip` and prune's `protect` / `skip` / `overrides` used to be silently ignored (quantize) or
caught only when the pass ran (prune) when they matched nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.passes import create_pass, registered_passes


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn1(self.conv1(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(), Block())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.layer1(torch.relu(self.stem(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.fixture(scope="module")
def graph():
    return ir.capture(Net().eval(), (torch.randn(2, 3, 8, 8),))


def test_every_pass_has_the_hook_and_it_defaults_to_nothing_to_say(graph):
    for name, cls in registered_passes().items():
        if name in ("quantize", "prune-channels", "prune-weights"):
            continue
        try:
            p = cls.create({})
        except Exception:  # passes whose options have no defaults (e.g. distill-subgraph) are not built bare
            continue
        assert p.check_graph(graph) is None, name


@pytest.mark.parametrize("skip", [[], ["fc"], ["stem", "layer1.0.conv1"], ["layer1.*"], ["conv2d"], ["add"],
                                  ["matmul"], ["embedding"], ["layer1.?.conv2"]])
def test_quantize_skip_entries_that_name_quantized_things_fit(graph, skip):
    assert create_pass("quantize", {"skip": skip}).check_graph(graph) is None


@pytest.mark.parametrize("skip, fragments", [
    (["fc1"], ["'fc1' matches no node name, op or module path", "close: fc"]),
    (["layer1.0.conv3"], ["'layer1.0.conv3'", "close: ", "layer1.0.conv1", "layer1.0.conv2"]),
    (["layer1"], ["'layer1' matches no node", "layer1.* matches every op under a module"]),
    (["Conv2d"], ["'Conv2d' matches no node", "close: conv2d"]),
    (["relu"], ["'relu' is an op the pass never quantizes", "conv2d", "linear"]),
    (["layer1.0.bn1"], ["'layer1.0.bn1' matches only 1 batch_norm node(s)", "never quantizes", "layer1.0.conv1"]),
    (["fc", "nothing_here"], ["'nothing_here'"]),
])
def test_quantize_skip_entries_that_match_nothing_quantized_are_named_with_close_names(graph, skip, fragments):
    msg = create_pass("quantize", {"skip": skip}).check_graph(graph)
    assert msg and msg.startswith("pass 'quantize': skip entry")
    for f in fragments:
        assert f in msg, (f, msg)


def test_the_skip_that_check_graph_accepts_is_the_one_quantize_applies(graph):
    """What check_graph calls a match is what the pass skips (one matcher): a glob keeps every conv under it."""
    from slimfx.passes import PassContext

    g = graph.copy()
    x = torch.randn(2, 3, 8, 8)
    p = create_pass("quantize", {"skip": ["layer1.1.*"]})
    assert p.check_graph(g) is None
    res = p.run(g, PassContext((x,), calibration_data=[(x,)], quiet=True))
    assert sorted(res.stats["skipped"]) == ["layer1_1_conv1", "layer1_1_conv2"]
    assert create_pass("quantize", {"skip": ["layer1"]}).check_graph(g)  # no glob: nothing would be skipped
    res = create_pass("quantize", {"skip": ["layer1"]}).run(graph.copy(), PassContext((x,), calibration_data=[(x,)],
                                                                                       quiet=True))
    assert res.stats["skipped"] == []


@pytest.mark.parametrize("name, options, fragment", [
    ("prune-channels", {"protect": ["stem2"]}, "protect pattern 'stem2' names no module"),
    ("prune-channels", {"overrides": {"layer2.*": 0.3}}, "overrides pattern 'layer2.*' names no module"),
    ("prune-weights", {"skip": ["head"]}, "skip pattern 'head' names no module"),
    ("prune-weights", {"overrides": {"fcc": 0.2}}, "overrides pattern 'fcc' names no module"),
])
def test_prune_options_that_name_no_layer_are_reported_before_any_work(graph, name, options, fragment):
    p = create_pass(name, options)
    msg = p.check_graph(graph)
    assert msg and f"pass '{name}'" in msg and fragment in msg and "layer1.0.conv1" in msg
    ok = {k: (["stem"] if isinstance(v, list) else {"layer1.*": 0.3}) for k, v in options.items()}
    assert create_pass(name, ok).check_graph(graph) is None
