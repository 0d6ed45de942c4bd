"""`slimfx passes` lists every registered pass with options and description."""

from __future__ import annotations

from slimfx.cli import main
from slimfx.passes import registered_passes


def test_lists_every_pass_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name, cls in registered_passes().items():
        assert f"{name} " in out and cls.describe() in out
    assert "max_growth_numel: int = 65536" in out


def test_describes_one_pass_and_rejects_unknown_names(capsys):
    assert main(["passes", "fold-constants"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fold-constants") and "max_growth_numel: int = 65536" in out and "bloats" in out
    assert main(["passes", "no-such"]) == 2
    assert "unknown pass 'no-such'" in capsys.readouterr().err
