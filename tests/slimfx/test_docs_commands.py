"""Every concrete `slimfx ...` command the README and docs show parses with the CLI as it is: a flag the docs
use and the CLI lacks (`compile -o` was one) is caught here, not by a user."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from slimfx.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SYNOPSIS = re.compile(r"\[|\||\.\.\.|\b[A-Z]{2,}\b")  # usage lines: [optional], a|b, MODEL, PATH


def _commands() -> list[tuple[str, str]]:
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_code = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            text = line.split(" #")[0].strip()
            if in_code and text.startswith("slimfx ") and not SYNOPSIS.search(text) and not text.endswith("\\"):
                out.append((doc.name, text))
    return out


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10, COMMANDS


def _flags_only_parser():
    """The CLI's parser without the checks that read files (the docs' example files do not exist here)."""
    import argparse

    from slimfx.commands import _args

    reading = {_args.onnx_file, _args.exported_file}
    parser = build_parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        for action in p._actions:
            if action.type in reading:
                action.type = None
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return parser


@pytest.mark.parametrize("doc, line", COMMANDS, ids=[f"{d}:{c[:50]}" for d, c in COMMANDS])
def test_a_documented_command_parses(doc, line, capsys):
    try:
        _flags_only_parser().parse_args(shlex.split(line)[1:])
    except SystemExit as e:  # argparse's way of refusing
        pytest.fail(f"{doc}: `{line}` does not parse: {capsys.readouterr().err.strip()} (exit {e.code})")
