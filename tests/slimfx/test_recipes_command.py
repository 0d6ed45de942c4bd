"""`slimfx recipes`: the built-in recipes listed, and printed as TOML a user copies, edits and compiles with."""

from __future__ import annotations

import tomllib

import pytest

from slimfx.cli import main
from slimfx.recipe import builtin_recipes, load_recipe


def test_the_list_names_every_builtin_recipe_with_its_passes_and_gate(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert f"{name}: {' -> '.join(p for p, _ in recipe.passes)}\n" in out
    assert "int8: fold-batchnorm -> quantize\n  gate: min_top1_agreement = 0.99\n" in out


@pytest.mark.parametrize("name", builtin_recipes())
def test_a_printed_recipe_is_the_builtin_one_as_a_file(name, capsys, tmp_path):
    assert main(["recipes", name]) == 0
    text = capsys.readouterr().out
    tomllib.loads(text)
    (tmp_path / "mine.toml").write_text(text)
    mine, builtin = load_recipe(tmp_path / "mine.toml"), load_recipe(name)
    assert mine.passes == builtin.passes and mine.validate == builtin.validate and mine.export == builtin.export


@pytest.mark.parametrize("arg, words", [("int9", "unknown recipe 'int9' (did you mean 'int8'?)"),
                                        ("my.toml", "my.toml is a path; `slimfx recipes` prints the built-in")])
def test_what_is_not_a_builtin_recipe_exits_2(arg, words, capsys):
    assert main(["recipes", arg]) == 2
    assert words in capsys.readouterr().err
