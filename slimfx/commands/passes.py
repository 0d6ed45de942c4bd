"""`slimfx passes [NAME]`: list every registered pass with its options, or describe one."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Any

from slimfx.ir.errors import PassError
from slimfx.passes import get_pass, registered_passes
from slimfx.passes.base import Pass, _type_name


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("passes", help="list the registered passes and their options",
                              description="List every registered pass with its options (name, type, default) "
                                          "and a one-line description; with NAME, describe that pass in full.")
    p.add_argument("name", nargs="?", help="a pass to describe in full")
    return p


def option_rows(cls: type[Pass]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of each option of a pass (help from `field(metadata={"help": ...})`)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in cls.options():
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((f.name, _type_name(hints.get(f.name, Any)), default, f.metadata.get("help", "")))
    return rows


def run(args: argparse.Namespace) -> int:
    if args.name:
        names = sorted(registered_passes())
        if args.name not in names:
            close = difflib.get_close_matches(args.name, names, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise PassError(f"unknown pass {args.name!r}; {hint}`slimfx passes` lists them all: {', '.join(names)}")
        cls = get_pass(args.name)
        print(f"{cls.name}{'  (analysis)' if cls.is_analysis else ''}\n")
        print(typing.cast(str, cls.__doc__ or "(no description)").strip())
        rows = option_rows(cls)
        print("\noptions:" if rows else "\noptions: none")
        for name, tp, default, text in rows:
            print(f"  {name}: {tp} = {default}" + (f"\n      {text}" if text else ""))
        print(f"\nuse: PassManager([\"{cls.name}\"]) or, in a recipe, [[passes]] name = \"{cls.name}\"")
        return 0
    passes = registered_passes()
    width = max((len(n) for n in passes), default=0)
    for name, cls in passes.items():
        print(f"{name:<{width}}  {cls.describe()}")
        for opt, tp, default, _ in option_rows(cls):
            print(f"{'':<{width}}    {opt}: {tp} = {default}")
    return 0
