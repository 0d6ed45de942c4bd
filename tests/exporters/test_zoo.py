"""Acceptance: every zoo model exports to ONNX and TorchScript and matches the original model within
1e-5 (absolute) at batch 1 and 7."""

from __future__ import annotations

import pytest

from slimfx import ir, models
from slimfx.exporters import export_onnx, export_torchscript, validate_onnx, with_batch
from slimfx.exporters.validate import validate_torchscript


@pytest.fixture(scope="module", params=models.names())
def zoo_case(request):
    spec = models.get(request.param)
    module = spec.build(seed=0).eval()  # exact-match numerics do not depend on trained weights
    x = tuple(spec.example_inputs(batch=2, seed=0))
    return request.param, module, x, ir.capture(module, x)


def test_zoo_onnx(zoo_case, tmp_path):
    name, module, x, graph = zoo_case
    res = export_onnx(graph, tmp_path / f"{name}.onnx", inputs=x)
    rep = validate_onnx(res.path, module, [with_batch(x, 1), with_batch(x, 7)], atol=1e-5, rtol=0.0)
    assert rep.passed and rep.max_abs_diff < 1e-5 and rep.batches == [1, 7], rep.summary()


@pytest.mark.slow
def test_zoo_torchscript(zoo_case, tmp_path):
    name, module, x, graph = zoo_case
    res = export_torchscript(graph, tmp_path / f"{name}.pt", inputs=x)
    rep = validate_torchscript(res.path, module, [with_batch(x, 1), with_batch(x, 7)], atol=1e-5, rtol=0.0)
    assert rep.passed and rep.max_abs_diff < 1e-5, rep.summary()
