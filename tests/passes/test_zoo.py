"""Acceptance on the zoo: every built-in pass keeps every model's outputs and leaves a verified graph;
fold-batchnorm removes every batch norm that follows a conv in resnet20 and mobilenetv2."""

from __future__ import annotations

import pytest
import torch

from slimfx import ir, models
from slimfx.passes import PassContext, PassManager
from tests.passes.nets import randomize_bn

BUILTINS = ["remove-identity", "fold-constants", "cse", "fold-batchnorm", "dce"]


@pytest.fixture(scope="module", params=models.names())
def zoo_case(request):
    spec = models.get(request.param)
    model = randomize_bn(spec.build(seed=0), seed=1).eval()  # untrained stats are identity: randomize them
    x = spec.example_inputs(batch=2, seed=0)
    x = x if isinstance(x, tuple) else (x,)
    return request.param, model, x


@pytest.mark.parametrize("pass_name", BUILTINS)
def test_each_builtin_pass_preserves_zoo_outputs(zoo_case, pass_name):
    name, model, x = zoo_case
    g = ir.capture(model, x)
    g = PassManager([pass_name], verify_each=True, check_numerics=1e-5).run(g, PassContext(example_inputs=x)).graph
    ir.verify(g)
    with torch.no_grad():
        ref, out = model(*x), ir.lower(g).eval()(*x)
    scale = float(ref.abs().max())
    assert float((out - ref).abs().max()) <= 1e-5 * scale, name


def test_the_cleanup_pipeline_on_the_zoo(zoo_case):
    name, model, x = zoo_case
    g = ir.capture(model, x)
    followed_by_conv = [n for n in g.find("batch_norm") if n.inputs[0].op in ("conv1d", "conv2d")]
    recs = PassManager(BUILTINS, check_numerics=1e-5).run(g, PassContext(example_inputs=x))
    stats, g = {r.name: r.stats for r in recs}, recs.graph
    if name in ("resnet20", "mobilenetv2"):
        assert followed_by_conv and stats["fold-batchnorm"]["folded"] == len(followed_by_conv)
        assert not g.find("batch_norm")
    assert not g.find("dropout") and not g.find("identity")
    assert ir.count_params(g) <= ir.count_params(ir.capture(model, x))
