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
    g = pm.run(g, PassContext(example_inputs=(x,))).graph
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
    ('[validate]\nmin_top1_agreement = "high"\n', ["validate.min_top1_agreement must be a finite number from 0 to 1"]),
    ('[validate]\nmin_sqrn_db = 30\n', ["unknown key validate.min_sqrn_db", "did you mean 'min_sqnr_db'"]),
    ('[validate]\nmin_top1_agreement = 2.0\n', ["validate.min_top1_agreement must be a finite number from 0 to 1 (a fraction", "got 2.0"]),
    ('[validate]\natol = -1\n', ["validate.atol must be a finite number at least 0 (an absolute tolerance >= 0)", "-1"]),
    ('[validate]\nmin_sqnr_db = nan\n', ["validate.min_sqnr_db must be a finite number (decibels", "nan"]),
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


# The same mistake made in TOML and in Python (slimfx.Recipe(...), dicts or config objects) gives the same
# RecipeError at construction; only the "recipe <where>:" prefix differs.
SAME_MISTAKES = [
    ('[[passes]]\nname = "nope"\n', lambda: dict(passes=[("nope", {})])),
    ('[[passes]]\nname = "fold-constants"\nmax_growth = 3\n', lambda: dict(passes=[("fold-constants", {"max_growth": 3})])),
    ('[[passes]]\nname = "fold-constants"\nmax_growth = 3\n',
     lambda: dict(passes=[{"name": "fold-constants", "max_growth": 3}])),
    ('[[passes]]\nname = "fold-constants"\nmax_growth_numel = "big"\n',
     lambda: dict(passes=[("fold-constants", {"max_growth_numel": "big"})])),
    ('[[passes]]\nnme = "dce"\n', lambda: dict(passes=[{"nme": "dce"}])),
    ('description = 3\n', lambda: dict(description=3)),
    ('[export]\nformats = ["onnx", "tflite"]\n', lambda: dict(export={"formats": ["onnx", "tflite"]})),
    ('[export]\nformat = ["onnx"]\n', lambda: dict(export={"format": ["onnx"]})),
    ('[export]\nopset = 99\n', lambda: dict(export={"opset": 99})),
    ('export = 3\n', lambda: dict(export=3)),
    ('[validate]\nmin_sqrn_db = 30\n', lambda: dict(validate={"min_sqrn_db": 30})),
    ('[validate]\nmin_top1_agreement = 2.0\n', lambda: dict(validate={"min_top1_agreement": 2.0})),
    ('[validate]\natol = "tight"\n', lambda: dict(validate={"atol": "tight"})),
]


@pytest.mark.parametrize("text, python", SAME_MISTAKES)
def test_a_recipe_built_in_python_is_checked_like_toml(tmp_path, text, python):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(RecipeError) as from_toml:
        load_recipe(f)
    with pytest.raises(RecipeError) as from_python:
        Recipe(name="mine", **python())
    assert str(from_toml.value).startswith(f"recipe {f}: ")
    assert str(from_python.value).startswith("recipe 'mine': ")
    assert str(from_python.value).removeprefix("recipe 'mine': ") == str(from_toml.value).removeprefix(f"recipe {f}: ")


def test_config_objects_are_checked_when_built_and_accepted_by_recipe():
    from slimfx.recipe import ExportConfig, ValidateConfig

    with pytest.raises(RecipeError, match="ExportConfig: export.opset must be an integer from 17 to 23; got 99"):
        ExportConfig(opset=99)
    with pytest.raises(RecipeError, match=r"ValidateConfig: validate.min_top1_agreement must be a finite number from 0 to 1 \(a fraction"):
        ValidateConfig(min_top1_agreement=2.0)
    assert ExportConfig(formats="onnx").formats == ("onnx",)  # one format as a string, not 'o', 'n', ...
    r = Recipe(name="mine", passes=[("dce", None), {"name": "cse"}], export=ExportConfig(formats=("torchscript",)),
               validate={"min_sqnr_db": 30})
    assert r.passes == [("dce", {}), ("cse", {})] and r.export.formats == ("torchscript",)
    assert r.validate == ValidateConfig(min_sqnr_db=30.0) and [p.name for p in r.build_passes()] == ["dce", "cse"]
    with pytest.raises(RecipeError, match=r"passes\[0\] is str 'dce'; 'passes' must be an array of tables"):
        Recipe(name="mine", passes=["dce"])
    with pytest.raises(RecipeError, match="'passes' must be an array of tables.*got str 'dce'"):
        Recipe(name="mine", passes="dce")


def test_deeply_nested_toml_is_a_recipe_error(tmp_path):
    f = tmp_path / "deep.toml"
    f.write_text("[[passes]]\nname = \"dce\"\nx = " + "[" * 10000 + "]" * 10000 + "\n")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(f)


def test_names_are_never_paths_unless_they_look_like_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "int8").mkdir()
    (tmp_path / "cleanup").write_text("garbage [")
    (tmp_path / "cleanup.toml").write_text("garbage [")
    (tmp_path / "mine").write_text('[[passes]]\nname = "dce"\n')
    assert load_recipe("int8").name == "int8" and load_recipe("cleanup").source.parent.name == "recipes"
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe("cleanup.toml")
    with pytest.raises(RecipeError, match=r"unknown recipe 'mine'.*to use the file mine here, write \./mine"):
        load_recipe("mine")
    assert load_recipe("./mine").passes == [("dce", {})]
    with pytest.raises(RecipeError, match="recipe file ./int8 is a folder"):
        load_recipe("./int8")


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_builtin_recipe_has_a_gate(name):
    v = load_recipe(name).validate
    assert any(x is not None for x in (v.min_top1_agreement, v.min_sqnr_db, v.max_accuracy_drop)), name
