"""Fuzz: random models x every built-in recipe, with and without data. Each compile either succeeds, and then
onnxruntime runs the written file like the compiled module at another batch size, or is refused cleanly: a
SlimfxError (exit 2/3 on the CLI) and nothing in the output directory. Never an internal error."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimfx
from slimfx.exporters import validate_onnx, with_batch
from slimfx.recipe import builtin_recipes, load_recipe
from tests.generators import random_model


def _labelled(model: torch.nn.Module, example: tuple, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *example[0].shape[1:], generator=gen)
    with torch.no_grad():
        y = model(x).argmax(-1)
    return x, y


@settings(max_examples=16, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=random_model(), recipe=st.sampled_from(builtin_recipes()), with_data=st.booleans())
def test_every_builtin_recipe_compiles_or_refuses_cleanly(case, recipe, with_data):
    model, example = case
    data = None
    if with_data:
        data = slimfx.Data(train=_labelled(model, example, 96, 1), validation=_labelled(model, example, 64, 2),
                           test=_labelled(model, example, 64, 3))
    work = Path(tempfile.mkdtemp(prefix="slimfx-fuzz-"))
    out = work / "out"
    try:
        try:
            result = slimfx.compile(model, example, recipe, data=data, out_dir=out, formats="onnx", bench_seconds=0,
                                    quiet=True)
        except slimfx.SlimfxError:
            assert not out.exists() and [p.name for p in work.iterdir()] in ([], ["out.rejected"])
            return
        assert result.report["gate"]["passed"]
        rec = load_recipe(recipe)
        atol = rec.validate.atol if rec.validate.atol is not None else 1e-4
        rtol = rec.validate.rtol if rec.validate.rtol is not None else 1e-4
        report = validate_onnx(out / "model.onnx", result.module, with_batch(example, 3), atol=atol, rtol=rtol)
        assert report.passed, report.summary()
    finally:
        shutil.rmtree(work, ignore_errors=True)
