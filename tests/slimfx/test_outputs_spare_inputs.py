"""An output never replaces the files the run reads: `compile --out DIR --force` where DIR holds the model, data,
recipe or plugin file (or the saved model being resumed), and `export -o` naming the model file, exit 2 before any
work and leave every file as it was (before, --force deleted the user's source along with the old outputs)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from slimfx.cli import main

NET = textwrap.dedent("""
    import torch, torch.nn as nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 4)).eval(), (torch.randn(2, 8),)
""")
DATA = textwrap.dedent("""
    import torch, slimfx

    def make_data():
        return slimfx.Data(validation=(torch.randn(20, 8), torch.randint(0, 4, (20,))))
""")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "net.py").write_text(NET)
    (tmp_path / "src" / "data.py").write_text(DATA)
    (tmp_path / "src" / "plug.py").write_text("")
    (tmp_path / "src" / "mine.toml").write_text('[[passes]]\nname = "dce"\n')
    return tmp_path


@pytest.mark.parametrize("argv, what", [
    (["compile", "src/net.py:make", "--recipe", "cleanup"], "holds {src}/net.py, the model file this run reads"),
    (["compile", "net.py:make", "--recipe", "cleanup", "--data", "src/data.py:make_data"],
     "holds {src}/data.py, the data file this run reads"),
    (["compile", "net.py:make", "--recipe", "src/mine.toml"], "holds {src}/mine.toml, the recipe file this run reads"),
    (["compile", "net.py:make", "--recipe", "cleanup", "--plugin", "src/plug.py"],
     "holds {src}/plug.py, the plugin file this run reads"),
], ids=["model", "data", "recipe", "plugin"])
def test_compile_out_force_never_replaces_an_input(project, capsys, argv, what):
    (project / "net.py").write_text(NET)
    before = sorted(p.name for p in (project / "src").iterdir())
    code = main([*argv, "--out", "src", "--force", "--no-bench", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert what.format(src=(project / "src").resolve()) in err
    assert "slimfx never replaces its own inputs, even with --force (API: force=True): choose another --out" in err
    assert sorted(p.name for p in (project / "src").iterdir()) == before
    assert not [p for p in project.iterdir() if p.name.startswith(".src")]  # no stage left


def test_resuming_a_saved_model_never_replaces_it(project, capsys):
    assert main(["export", "src/net.py:make", "--format", "slimfx", "-o", "saved/model.slimfx"]) == 0
    capsys.readouterr()
    code = main(["compile", "saved/model.slimfx", "--recipe", "cleanup", "--out", "saved", "--force", "--no-bench"])
    assert code == 2
    assert "the saved model this run reads" in capsys.readouterr().err
    assert [p.name for p in (project / "saved").iterdir()] == ["model.slimfx"]


def test_export_never_overwrites_the_model_file(project, capsys):
    code = main(["export", "src/net.py:make", "-o", "src/net.py"])
    assert code == 2
    assert "src/net.py is the model file this run reads; slimfx never overwrites its own inputs: give another " \
           "path" in capsys.readouterr().err
    assert (project / "src" / "net.py").read_text() == NET


def test_distill_refuses_an_input_as_its_output_before_it_trains(project, capsys, monkeypatch):
    """The check ran only when the student was written, after every epoch of training."""
    import slimfx.distilling

    def never(*args, **kwargs):
        raise AssertionError("trained before refusing --out")

    monkeypatch.setattr(slimfx.distilling, "run", never)
    (project / "src" / "data.py").write_text(DATA.replace("validation=", "train=(torch.randn(20, 8), "
                                                           "torch.randint(0, 4, (20,))), validation="))
    before = (project / "src" / "data.py").read_text()
    code = main(["distill", "src/net.py:make", "--student", "src/net.py:make", "--data", "src/data.py:make_data",
                 "--out", "src/data.py", "--epochs", "1", "--quiet"])
    assert code == 2
    assert "src/data.py is the data file this run reads" in capsys.readouterr().err
    assert (project / "src" / "data.py").read_text() == before
