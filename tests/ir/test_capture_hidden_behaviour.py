"""What a model does outside its forward's code, which torch.fx tracing does not see: forward hooks and
pre-hooks (on the top module, on leaf modules, global ones) and torch.autocast regions. Capture must either
reproduce it (torch.export runs hooks) or refuse it by name; never return a graph that computes something else."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx import ir
from slimfx.ir.errors import CaptureError
from tests.generators import random_model


def _close(graph: ir.Graph, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ir.lower(graph)(x), model(x), rtol=1e-5, atol=1e-5)


def _hook(kind: str, scale: float):
    if kind == "pre":
        return lambda mod, args: tuple(a * scale if isinstance(a, torch.Tensor) else a for a in args)
    return lambda mod, args, out: out * scale


@settings(max_examples=12, deadline=None)
@given(model_inputs=random_model(), where=st.integers(0, 50), kind=st.sampled_from(["pre", "post"]),
       scale=st.sampled_from([0.5, 2.0, -1.0]))
def test_hooks_on_any_module_are_part_of_the_captured_model(model_inputs, where, kind, scale):
    model, inputs = model_inputs
    model.eval()
    modules = list(model.modules())  # [0] is the top module, whose hooks fx never runs
    target = modules[where % len(modules)]
    (target.register_forward_pre_hook if kind == "pre" else target.register_forward_hook)(_hook(kind, scale))
    graph = ir.capture(model, inputs)
    _close(graph, model, torch.randn_like(inputs[0]))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_hook_fx_would_skip_is_named_when_fx_is_asked_for():
    model = _Net().eval()
    model.a.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(CaptureError, match=r"torch.fx does not capture a forward hook .*test_capture_hidden_behaviour.py:\d+\) on 'a' \(Linear\)"
                                           r".*method='export'.*handle.remove\(\)"):
        ir.capture(model, (torch.randn(2, 8),), method="fx")


def test_global_forward_hooks_are_captured():
    model = _Net().eval()
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: out + 1 if isinstance(mod, nn.Linear) else None)
    try:
        graph = ir.capture(model, (torch.randn(2, 8),))
        _close(graph, model, torch.randn(3, 8))
    finally:
        handle.remove()


def test_pruning_hooks_keep_the_fx_capture_and_read_the_current_weights():
    """torch.nn.utils.prune's pre-hook recomputes `weight = weight_orig * weight_mask` on each call; weights
    changed after pruning (fine-tuning, a loaded state dict) are read as the hook would compute them."""
    model = _Net().eval()
    prune.l1_unstructured(model.a, "weight", amount=0.5)
    with torch.no_grad():
        model.a.weight_orig.mul_(3)  # no call since: the module's `weight` attribute is stale
    graph = ir.capture(model, (torch.randn(2, 8),))
    assert graph.capture_method == "fx"
    _close(graph, model, torch.randn(3, 8))


class _Autocast(_Net):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.a(x)
        return self.b(h.float())


def test_autocast_in_forward_is_refused_by_line():
    with pytest.raises(CaptureError, match=r"torch.autocast \(at .*test_capture_hidden_behaviour.py:\d+ \(`h = "
                                           r"self.a\(x\)`\)\).*Remove the autocast region"):
        ir.capture(_Autocast().eval(), (torch.randn(2, 8),))


class _AutocastOff(_Net):
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            h = self.a(x)
        return self.b(h)


def test_autocast_disabled_changes_nothing_and_is_captured_by_fx():
    model = _AutocastOff().eval()
    graph = ir.capture(model, (torch.randn(2, 8),))
    assert graph.capture_method == "fx"
    _close(graph, model, torch.randn(3, 8))


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel, lambda m: nn.DataParallel(torch.compile(m))],
                         ids=["torch.compile", "DataParallel", "both"])
def test_wrappers_that_compute_what_they_wrap_are_captured_as_the_model(wrap):
    model = _Net().eval()
    graph = ir.capture(wrap(model), (torch.randn(2, 8),))
    assert graph.capture_method == "fx" and set(graph.params) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    _close(graph, model, torch.randn(3, 8))


class _Lazy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LazyLinear(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_lazy_modules_never_called_are_shaped_on_the_example_and_captured():
    model = _Lazy().eval()
    graph = ir.capture(model, (torch.randn(2, 8),))  # its forward pre-hook (shape inference) is gone after the call
    assert graph.capture_method == "fx" and graph.params["a.weight"].shape == (16, 8)
    _close(graph, model, torch.randn(3, 8))
