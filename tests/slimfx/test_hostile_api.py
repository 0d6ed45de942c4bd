"""slimfx.compile refuses bad input from Python with a SlimfxError naming the cause, before any work and
without writing anything (the CLI's rows are in test_hostile_cli.py and tests/ir/test_hostile_inputs.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

import slimfx
from slimfx.errors import DataError, RecipeError, SlimfxError
from slimfx.recipe import Recipe
from tests.slimfx.fixtures.user_models import small


def _recipe(*passes: dict) -> Recipe:
    return Recipe.from_dict({"passes": list(passes)}, name="t")


ROWS = [
    ("eval_fn returns a string", dict(recipe=_recipe({"name": "finetune", "epochs": 1}),
                                      train_data=((torch.randn(8, 3, 8, 8),), torch.zeros(8, dtype=torch.long)),
                                      eval_fn=lambda m: "great"),
     DataError, "eval_fn returned 'great'; it must return the accuracy as a number in [0, 1]"),
    ("test labels of the wrong length", dict(test_data=((torch.randn(6, 3, 8, 8),), torch.zeros(5, dtype=torch.long))),
     DataError, "5 targets for 6 inputs"),
    ("empty train data", dict(recipe=_recipe({"name": "finetune"}), train_data=[]),
     DataError, "data.train is empty"),
    ("a format string is one format", dict(formats="tflite"), SlimfxError, "unknown export format 'tflite'"),
    ("required distill without data", dict(recipe=_recipe({"name": "distill", "required": True})),
     RecipeError, "passes[0] (name = 'distill') cannot run: distill needs train data and none was given"),
    ("bias-correction before quantize", dict(recipe=_recipe({"name": "bias-correction"}, {"name": "quantize"})),
     RecipeError, "passes[0] (name = 'bias-correction') must run after 'quantize'"),
    ("distill-subgraph without data", dict(recipe=_recipe({"name": "distill-subgraph", "module": "conv",
                                                           "width": 0.5})),
     RecipeError, "distill-subgraph trains the student block"),
    ("quantize skip naming nothing", dict(recipe=_recipe({"name": "quantize", "skip": ["convv"]})),
     RecipeError, "'convv'"),
    ("data and the older keywords together", dict(data=slimfx.Data(), train_data=[((torch.randn(2, 3, 8, 8),),
                                                                                    torch.zeros(2))]),
     DataError, "not both"),
    ("a seed out of range", dict(seed=2 ** 70), SlimfxError, "seed must be an integer"),
    ("bench seconds NaN", dict(bench_seconds=float("nan")), SlimfxError, "bench_seconds must be a finite number"),
    ("a model that is not a module", dict(model=lambda x: x), SlimfxError, "takes a torch.nn.Module"),
    ("recipe None", dict(recipe=None), RecipeError, "recipe must be a built-in recipe name (e.g. 'int8'), a path to "
                                                    "a .toml file or a slimfx.Recipe, got NoneType None"),
    ("force as a string", dict(force="yes"), SlimfxError, "force must be True or False, got 'yes'"),
    ("keep_rejected as a string", dict(keep_rejected="no"), SlimfxError, "keep_rejected must be True or False"),
    ("no formats", dict(formats=[]), SlimfxError, "formats is empty; give at least one of onnx"),
    ("eval_fn not callable", dict(eval_fn=3), SlimfxError, "eval_fn must be a function module -> accuracy"),
    ("name not a string", dict(name=5), SlimfxError, "name must be a string"),
    ("example inputs with NaN", dict(example=(torch.full((2, 3, 8, 8), float("nan")),)), DataError,
     "the example inputs: input 0 holds 384 NaN/Inf values (in 2 rows"),
]


@pytest.mark.parametrize("kwargs, error, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_before_any_work(tmp_path, kwargs, error, words):
    model, example = small()
    calls = []
    # counts runs on real tensors: capture runs the hook too (torch.export traces it, on fake tensors)
    model.register_forward_hook(lambda m, args, out: calls.append(1) if type(out) is torch.Tensor else None)
    kwargs = {"recipe": "cleanup", **kwargs}
    model, example = kwargs.pop("model", model), kwargs.pop("example", example)
    with pytest.raises(error) as e:
        slimfx.compile(model, example, out_dir=tmp_path / "out", quiet=True, bench_seconds=kwargs.pop("bench_seconds", 0),
                       **kwargs)
    assert words in str(e.value)
    assert not list(tmp_path.iterdir())
    if error is not DataError or "eval_fn" not in words:
        assert not calls  # refused before the model ever ran


def test_a_full_disk_is_found_before_any_work(tmp_path, monkeypatch):
    model, example = small()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(SlimfxError, match=r"has 0.0 MiB free; the outputs need about"):
        slimfx.compile(model, example, "cleanup", out_dir=tmp_path / "out", quiet=True)
    assert not list(tmp_path.iterdir())


def test_an_unwritable_out_is_found_before_any_work(tmp_path, monkeypatch):
    import os

    real_mkdir = os.mkdir

    def refuse(path, *a, **k):  # a read-only folder (the suite runs as root, so chmod cannot show it)
        if ".out.slimfx-" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_mkdir(path, *a, **k)
    model, example = small()
    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(SlimfxError, match=r"cannot write into .* \(out_dir .*out\): Permission denied"):
        slimfx.compile(model, example, "cleanup", out_dir=tmp_path / "out", quiet=True)


def test_the_users_module_keeps_its_mode(tmp_path):
    """compile runs the model in eval mode and hands it back in the mode it came in (it set train mode off). A
    model without mode-dependent layers is accepted in train mode (one with them is refused: test_capture)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).train()
    slimfx.compile(model, (torch.randn(2, 8),), recipe="cleanup", out_dir=tmp_path / "out", quiet=True,
                   bench_seconds=0)
    assert model.training and all(m.training for m in model.modules())
