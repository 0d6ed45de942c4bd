"""Fixtures for the model-zoo tests: an isolated weight cache so no test reads or writes a user's cache."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A fresh, empty SLIMFX_CACHE_DIR for one test."""
    monkeypatch.setenv("SLIMFX_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory):
    """One SLIMFX_CACHE_DIR for a whole module, so an expensive trained() runs once."""
    path = tmp_path_factory.mktemp("slimfx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLIMFX_CACHE_DIR", str(path))
        yield path
