"""slimfx installs its layers under its own namespace and claims no generic import name."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"ir": "slimfx.ir", "passes": "slimfx.passes", "exporters": "slimfx.exporters", "models": "slimfx.models"}


def test_every_package_folder_is_installed_under_the_slimfx_namespace():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {v: k for k, v in LAYERS.items()}
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(ROOT).parts
        if rel[0] in LAYERS:
            found.add(".".join((LAYERS[rel[0]], *rel[1:])))
        elif rel[0] == "slimfx":
            found.add(".".join(rel))
    assert found - {"slimfx.recipes"} <= set(cfg["packages"]) and "slimfx.recipes" in cfg["packages"], \
        sorted(found - set(cfg["packages"]))


def test_a_user_project_with_its_own_models_and_ir_packages_imports_slimfx(tmp_path):
    for pkg in ("models", "ir", "passes", "exporters"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"WHO = 'user {pkg}'\n")
    code = ("import slimfx, slimfx.ir, slimfx.passes, slimfx.exporters, slimfx.models\n"
            "import models, ir, passes, exporters\n"
            "assert [m.WHO for m in (models, ir, passes, exporters)] == "
            "['user models', 'user ir', 'user passes', 'user exporters']\n"
            "assert slimfx.ir.capture and slimfx.models.names()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
