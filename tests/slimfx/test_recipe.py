"""Recipes: loading built-ins and files, and RecipeError naming file, table and key for every mistake."""

from __future__ import annotations

import pytest
import torch

from slimfx import ir
from slimfx.ir.errors import RecipeError
from slimfx.passes import PassContext, PassManager
from slimfx.recipe import Recipe, builtin_recipes, load_recipe
from tests.passes.nets import ConvBnNet, make


def test_builtin_cleanup_recipe_builds_the_pipeline_and_runs():
    assert "cleanup" in builtin_recipes()
    r = load_recipe("cleanup")
    assert r.name == "cleanup" and r.description and r.source.name == "cleanup.toml"
    assert [n for n, _ in r.passes] == ["remove-identity", "fold-constants", "cse", "fold-batchnorm", "dce"]
    assert r.export.formats == ("onnx", "torchscript")
    pm = r.build_pipeline(check_numerics=1e-5)
    assert isinstance(pm, PassManager) and [p.name for p in pm.passes] == [n for n, _ in r.passes]
    m, x = make(ConvBnNet), torch.randn(2, 3, 8, 8)
    g = ir.capture(m, (x,))
    pm.run(g, PassContext(example_inputs=(x,)))
    assert not g.find("batch_norm")


def test_a_recipe_file_with_options(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('description = "mine"\n[[passes]]\nname = "fold-constants"\nmax_growth_numel = 10\n'
                 '[[passes]]\nname = "dce"\n[validate]\nmin_top1_agreement = 0.99\n')
    r = load_recipe(str(f))
    assert r.name == "mine" and r.passes == [("fold-constants", {"max_growth_numel": 10}), ("dce", {})]
    assert r.build_passes()[0].max_growth_numel == 10 and r.validate.min_top1_agreement == 0.99
    assert load_recipe(f).source == f


@pytest.mark.parametrize("text, words", [
    ('[[passes]]\nname = "dce"\n[[passes]]\nname = "nope"\n', ["passes[1]", "unknown pass 'nope'", "dce"]),
    ('[[passes]]\nname = "dce"\n[[passes]]\nname = "dce"\n[[passes]]\nname = "fold-constants"\nmax_growth = 3\n',
     ["passes[2]", "no option 'max_growth'", "max_growth_numel"]),
    ('[[passes]]\nname = "fold-constants"\nmax_growth_numel = "big"\n',
     ["passes[0]", "'max_growth_numel' must be int", "'big'"]),
    ('[[passes]]\nname = "dce"\npasses = 3 = 4\n', ["not valid TOML", "line 3"]),
    ('descripton = "typo"\n', ["unknown top-level key 'descripton'", "description, passes, export"]),
    ('[[passes]]\nnme = "dce"\n', ["passes[0] has no key 'name'", "nme"]),
    ('passes = ["dce"]\n', ["array of tables"]),
    ('[export]\nformats = ["onnx", "tflite"]\n', ["export.formats", "tflite"]),
    ('[validate]\nmin_top1_agreement = "high"\n', ["validate.min_top1_agreement must be a number"]),
    ('[validate]\nmin_sqrn_db = 30\n', ["unknown key validate.min_sqrn_db", "did you mean 'min_sqnr_db'"]),
    ('[validate]\nmin_top1_agreement = 2.0\n', ["validate.min_top1_agreement must be a number (a fraction"]),
    ('[validate]\natol = -1\n', ["validate.atol must be a number (an absolute tolerance >= 0)", "-1"]),
    ('[validate]\nmin_sqnr_db = nan\n', ["validate.min_sqnr_db must be a number", "nan"]),
    ('[export]\nopset = 99\n', ["export.opset must be an integer from 17 to 23", "99"]),
    ('[export]\nformat = ["onnx"]\n', ["unknown key export.format", "did you mean 'formats'"]),
])
def test_mistakes_name_file_table_and_key(tmp_path, text, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(f))
    msg = str(e.value)
    assert str(f) in msg
    for w in words:
        assert w in msg, msg


def test_unknown_names_and_missing_files():
    with pytest.raises(RecipeError, match="unknown recipe 'nope'; built-in recipes: .*cleanup"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("missing/recipe.toml")


def test_check_context_names_the_pass_that_lacks_data():
    from slimfx.passes import Pass, PassResult, register_pass

    @register_pass("test-needs-train-data")
    class NeedsData(Pass):
        """Needs training data."""

        def check_context(self, ctx):
            return None if ctx.train_data is not None else "it needs train_data"

        def run(self, graph, ctx):
            return PassResult(False)

    r = Recipe.from_dict({"passes": [{"name": "dce"}, {"name": "test-needs-train-data"}]}, name="t")
    with pytest.raises(RecipeError, match=r"passes\[1\] \(name = 'test-needs-train-data'\) cannot run: it needs"):
        r.check_context(r.build_passes(), PassContext())
