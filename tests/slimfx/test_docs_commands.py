"""Every concrete `slimfx ...` command the README and docs show parses with the CLI as it is: a flag the docs
use and the CLI lacks (`compile -o` was one) is caught here, not by a user. Commands shown one after the other
can be run one after the other (no two compiles into the same --out), and the self-contained snippets run."""

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


def _blocks(doc: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced code block of `doc`."""
    return re.findall(r"^```(\w*)\n(.*?)^```", doc.read_text(), flags=re.S | re.M)


def test_commands_shown_together_write_to_different_out_dirs():
    """A user runs a block's commands in order; a second compile into the first one's --out is refused (exit 2:
    the directory is not empty), as docs/quantization.md's first block was."""
    clashes = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for _, text in _blocks(doc):
            outs: dict[str, str] = {}
            for line in text.splitlines():
                words = shlex.split(line.split(" #")[0]) if line.startswith("slimfx compile") else []
                for flag, value in zip(words, words[1:]):
                    if flag in ("-o", "--out"):
                        key = value.rstrip("/")
                        if key in outs:
                            clashes.append(f"{doc.name}: `{outs[key]}` and `{line.split(' #')[0].strip()}`")
                        outs[key] = line.split(" #")[0].strip()
    assert not clashes, clashes


def test_the_ir_text_snippet_of_persistence_md_runs():
    """docs/persistence.md's IR-in, IR-out example, as printed (it imports what it uses)."""
    snippet = next(text for lang, text in _blocks(ROOT / "docs" / "persistence.md")
                   if lang == "python" and "ir.parse(" in text)
    exec(compile(snippet, "docs/persistence.md", "exec"), {})  # its own assert checks the folded IR text


def test_distill_help_names_where_the_student_goes_by_default(capsys):
    """The README shows `[--out student.pt]`: the default, which a second run replaces; the help says so."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--help"])
    assert "default student.pt" in " ".join(capsys.readouterr().out.split())
