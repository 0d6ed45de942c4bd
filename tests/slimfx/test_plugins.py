"""Plugins: the README's custom passes (docs/examples/custom_pass.py) run from the CLI with --plugin and from a
recipe's `plugins` key, appear in `slimfx passes` with their origin; entry points; broken plugins exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import onnx.numpy_helper
import pytest

from slimfx import plugins
from slimfx.cli import main
from slimfx.ir.errors import RecipeError
from slimfx.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "custom_pass.py"
EXAMPLE_RECIPE = ROOT / "docs" / "examples" / "custom_pass.toml"
MY_TOML = '[[passes]]\nname = "fuse-silu"\n[[passes]]\nname = "clip-linear-weights"\nlimit = 0.05\n'


def test_compile_with_plugin_runs_the_readme_custom_passes_from_the_cli(tmp_path):
    """A fresh process, as a user runs it: without --plugin the recipe's pass is unknown; with it, it runs."""
    (tmp_path / "my.toml").write_text(MY_TOML)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def slimfx(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "slimfx", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    model = f"{EXAMPLE}:Net"
    r = slimfx("compile", model, "--recipe", "my.toml", "--out", "out0", "--bench-seconds", "0.05")
    assert r.returncode == 2 and "unknown pass 'fuse-silu'" in r.stderr and "--plugin" in r.stderr, r.stderr
    r = slimfx("compile", model, "--plugin", str(EXAMPLE), "--recipe", "my.toml", "--out", "out",
               "--bench-seconds", "0.05")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(p["name"], p["stats"]) for p in report["passes"]] == [("fuse-silu", {"rewritten": 1}),
                                                                   ("clip-linear-weights", {"clipped": 2})]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    weights = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("weight")]
    assert len(weights) == 2 and all(abs(w).max() <= 0.05 + 1e-7 for w in weights)  # the exported file is clipped


def test_passes_lists_plugin_passes_with_origin_and_option_help(capsys):
    assert main(["passes", "clip-linear-weights", "--plugin", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"clip-linear-weights  [plugin {EXAMPLE}]")
    assert "limit: float = 1.0  (> 0)\n      largest |weight| kept" in out
    assert main(["passes", "--plugin", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("built-in:\n") and "  dce " in out.split(f"plugin {EXAMPLE}:")[0]
    assert plugins.pass_origin("fuse-silu") == f"plugin {EXAMPLE}"
    assert plugins.pass_origin("quantize") == "built-in"


def test_a_recipe_plugins_key_loads_files_relative_to_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plugin path is relative to the recipe, not the working directory
    rec = load_recipe(EXAMPLE_RECIPE)
    assert rec.plugins == ["custom_pass.py"]
    assert [p.name for p in rec.build_passes()] == ["fuse-silu", "cse", "dce", "clip-linear-weights"]
    assert rec.build_passes()[3].limit == 0.5
    assert main(["compile", f"{EXAMPLE}:Net", "--recipe", str(EXAMPLE_RECIPE), "--out", "out",
                 "--bench-seconds", "0.05", "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["fuse-silu", "cse", "dce", "clip-linear-weights"]


def test_a_plugin_option_out_of_its_declared_range_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text(f'plugins = ["{EXAMPLE}"]\n[[passes]]\nname = "clip-linear-weights"\n'
                                       'limit = -1\n')
    assert main(["compile", "no_such_model", "--recipe", str(tmp_path / "bad.toml"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "passes[0] (name = 'clip-linear-weights')" in err and "option 'limit' must be > 0, got -1.0" in err


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("command", [["passes"], ["inspect", "mlp", "--untrained"], ["export", "mlp"],
                                     ["compile", "mlp"]])
def test_a_broken_plugin_exits_2_naming_it_on_every_command(tmp_path, capsys, command):
    broken = _write(tmp_path / "broken_plugin.py", "import no_such_module_anywhere\n")
    assert main([*command, "--plugin", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "could not import plugin file" in err and "broken_plugin.py" in err and "no_such_module_anywhere" in err
    assert "Traceback" not in err


def test_a_plugin_taking_a_registered_name_exits_2_naming_it(tmp_path, capsys):
    clash = _write(tmp_path / "clash_plugin.py", """
        from slimfx.passes import Pass, PassResult, register_pass

        @register_pass("dce")
        class MyDce(Pass):
            '''Not the built-in.'''
            def run(self, graph, ctx):
                return PassResult(False)
        """)
    assert main(["passes", "--plugin", str(clash)]) == 2
    err = capsys.readouterr().err
    assert "clash_plugin.py" in err and "a pass named 'dce' is already registered" in err
    assert "give MyDce another name" in err
    missing = tmp_path / "nowhere.py"
    assert main(["passes", "--plugin", str(missing)]) == 2
    assert "plugin file" in capsys.readouterr().err
    assert main(["passes", "--plugin", "no_such_plugin_module"]) == 2
    assert "no module named 'no_such_plugin_module'" in capsys.readouterr().err


def test_a_recipe_naming_a_missing_plugin_is_a_recipe_error(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text('plugins = ["missing.py"]\n[[passes]]\nname = "dce"\n')
    with pytest.raises(RecipeError, match=r"missing\.py.*does not exist.*relative to the folder") as e:
        load_recipe(bad)
    assert str(e.value).count("key 'plugins'") == 1  # where it came from, said once
    bad.write_text('plugins = "x.py"\nplugins2 = 1\n')
    with pytest.raises(RecipeError, match="unknown top-level key 'plugins2'"):
        load_recipe(bad)
    bad.write_text('plugins = [3]\n')
    with pytest.raises(RecipeError, match="'plugins' must be a list of .py files"):
        load_recipe(bad)


def test_a_plugin_spec_may_name_a_function_to_call(tmp_path, capsys):
    _write(tmp_path / "late_plugin.py", """
        def register():
            from slimfx.passes import Pass, PassResult, register_pass

            @register_pass("test-late-registered")
            class Late(Pass):
                '''Registered by a function the spec names.'''
                def run(self, graph, ctx):
                    return PassResult(False)
        """)
    spec = f"{tmp_path / 'late_plugin.py'}:register"
    assert main(["passes", "test-late-registered", "--plugin", spec]) == 0
    assert capsys.readouterr().out.startswith(f"test-late-registered  [plugin {spec}]")


def test_entry_points_in_the_slimfx_plugins_group_are_loaded(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    dist = site / "fakeplug-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[slimfx.plugins]\nfake = fakeplug_passes\n")
    _write(site / "fakeplug_passes.py", """
        from slimfx.passes import Pass, PassResult, register_pass

        @register_pass("test-from-entry-point")
        class FromEntryPoint(Pass):
            '''Registered by an installed package.'''
            def run(self, graph, ctx):
                return PassResult(False)
        """)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "plugin fakeplug_passes (entry point 'fake' of fakeplug):\n  test-from-entry-point" in out

    (dist / "entry_points.txt").write_text("[slimfx.plugins]\nbroken = fakeplug_missing_module\n")
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    assert main(["passes"]) == 2
    err = capsys.readouterr().err
    assert "entry point 'broken' of fakeplug" in err and "fix or uninstall fakeplug" in err
    monkeypatch.setattr(plugins, "_entry_points_loaded", True)  # leave no broken state for other tests


def test_a_plugin_pass_that_adds_an_output_exits_2_naming_it_and_writes_nothing(tmp_path, capsys):
    # It is lossy (no numerics check): before, the compile went on and the gate failed (exit 3) saying the
    # compiled model returns 2 outputs, naming no pass.
    _write(tmp_path / "two_outputs.py", """
        from slimfx.passes import Pass, PassResult, register_pass

        @register_pass("test-plugin-two-outputs")
        class TwoOutputs(Pass):
            '''Returns the output twice.'''
            preserves_outputs = False
            def run(self, graph, ctx):
                graph.set_outputs((graph.outputs, graph.outputs))
                return PassResult(changed=True)
        """)
    (tmp_path / "r.toml").write_text('plugins = ["two_outputs.py"]\n[[passes]]\nname = "test-plugin-two-outputs"\n'
                                     '[export]\nformats = ["onnx"]\n')
    out = tmp_path / "out"
    assert main(["compile", f"{EXAMPLE}:Net", "--recipe", str(tmp_path / "r.toml"), "--out", str(out),
                 "--bench-seconds", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pass 'test-plugin-two-outputs' (step 1 of 1" in err
    assert "changed the graph's outputs from (output) to (output[0], output[1])" in err
    assert not out.exists() and not list(tmp_path.glob(".*out*"))


def test_two_plugins_registering_the_same_pattern_pass_name_exit_2(tmp_path, capsys):
    # A PatternPass body holds only staticmethods: its definition was looked up in dataclasses.py (where the
    # generated __repr__'s wrapper lives) for both classes, so the second silently replaced the first.
    body = """
        import torch
        import torch.nn.functional as F
        from slimfx.passes import PatternPass, register_pass

        @register_pass("test-same-pattern-name")
        class FuseSilu(PatternPass):
            '''{doc}'''
            pattern = staticmethod(lambda x: x * torch.sigmoid(x))
            replacement = staticmethod(lambda x: F.silu(x))
        """
    first = _write(tmp_path / "first_plugin.py", body.format(doc="The first."))
    second = _write(tmp_path / "second_plugin.py", body.format(doc="The second."))
    assert main(["passes", "--plugin", str(first), "--plugin", str(second)]) == 2
    err = capsys.readouterr().err
    assert "second_plugin.py" in err and "a pass named 'test-same-pattern-name' is already registered" in err
    assert f"(FuseSilu from {first})" in err
    assert main(["passes", "test-same-pattern-name", "--plugin", str(first)]) == 0  # loading one again is fine
    assert "The first." in capsys.readouterr().out


def test_run_pass_on_a_pass_of_your_own_without_its_plugin_says_how_to_load_it(tmp_path, capsys):
    from slimfx import ir
    from slimfx.persist import save

    path = tmp_path / "g.slimfx"
    save(ir.capture(__import__("torch").nn.Linear(2, 2).eval(), (__import__("torch").randn(1, 2),)), path)
    assert main(["run-pass", "my-unloaded-pass", str(path)]) == 2
    err = capsys.readouterr().err  # before: "unknown pass ...; registered passes: ..." and nothing on plugins
    assert "unknown pass 'my-unloaded-pass'" in err and "--plugin my_passes.py on the command line" in err
    assert main(["run-pass", "fold-batchnom", str(path)]) == 2
    assert "did you mean 'fold-batchnorm'" in capsys.readouterr().err


def test_a_crash_in_a_plugin_pass_is_the_users_exit_2_and_in_a_builtin_pass_a_bug_exit_1(tmp_path, capsys,
                                                                                          monkeypatch):
    (tmp_path / "crashy.py").write_text(textwrap.dedent("""
        from slimfx.passes import Pass, register_pass

        @register_pass("test-plugin-crash")
        class Crashy(Pass):
            def run(self, graph, ctx):
                return {}["missing"]
        """))
    (tmp_path / "r.toml").write_text('plugins = ["crashy.py"]\n\n[[passes]]\nname = "test-plugin-crash"\n')
    monkeypatch.chdir(tmp_path)
    argv = ["compile", "mlp", "--no-bench", "--quiet"]
    assert main([*argv, "--recipe", "r.toml", "-o", "a"]) == 2
    err = capsys.readouterr().err
    assert "pass 'test-plugin-crash' (step 1 of 1" in err and "crashed: KeyError" in err and "Traceback" not in err
    from slimfx.passes.cleanup import DeadCodeElimination

    monkeypatch.setattr(DeadCodeElimination, "run", lambda self, graph, ctx: {}["missing"])
    assert main([*argv, "--recipe", "cleanup", "-o", "b"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "slimfx: internal error: pass 'dce'" in err and "bug in slimfx" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
