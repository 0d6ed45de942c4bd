"""`slimfx passes [NAME]`: list every registered pass with its origin and options, or describe one."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from typing import Any

from slimfx.commands import _args
from slimfx.passes import get_pass, registered_passes
from slimfx.passes.base import OptionInfo, Pass
from slimfx.plugins import pass_origin

WIDTH = 100


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("passes", help="list the registered passes and their options",
                              description="List every registered pass, built-in or from a plugin, with its options "
                                          "(name, type, default) and a one-line description; with NAME, describe "
                                          "that pass in full: every option's type, default, accepted range and help.")
    p.add_argument("name", nargs="?", help="a pass to describe in full")
    _args.add_plugin_argument(p)
    return p


def _default(info: OptionInfo) -> str:
    return "(required)" if info.default is dataclasses.MISSING else repr(info.default)


def option_line(info: OptionInfo) -> str:
    """`name: type = default` and, when declared, the accepted range."""
    line = f"{info.name}: {info.type_name} = {_default(info)}"
    if info.bounds is not None:
        text = str(info.bounds)
        line += f"  (in {text})" if text[0] in "[(" else f"  ({text})"
    return line


def describe(cls: type[Pass]) -> str:
    """The full description `slimfx passes NAME` prints."""
    lines = [f"{cls.name}{'  (analysis)' if cls.is_analysis else ''}  [{pass_origin(cls.name)}]", ""]
    lines.append((cls.__doc__ or "(no description)").strip())
    infos = cls.option_infos()
    lines.append("\noptions:" if infos else "\noptions: none")
    for info in infos:
        lines.append(f"  {option_line(info)}")
        if info.help:
            lines.extend(textwrap.wrap(info.help, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
    example = next((i for i in infos if i.default is not dataclasses.MISSING), None)
    spec = f"{cls.name}{{{example.name}={example.default!r}}}" if example else cls.name
    lines.append(f"\nuse: in a recipe, [[passes]] name = \"{cls.name}\" and its options as keys; in Python, "
                 f"PassManager([\"{spec}\"]) or create_pass(\"{cls.name}\", {{...}})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    passes = registered_passes()
    if args.name:
        print(describe(get_pass(args.name)))  # an unknown name: PassError with the closest names
        return 0
    by_origin: dict[str, list[str]] = {}
    for name in passes:
        by_origin.setdefault(pass_origin(name), []).append(name)
    width = max((len(n) for n in passes), default=0)
    for i, (origin, names) in enumerate(sorted(by_origin.items(), key=lambda kv: kv[0] != "built-in")):
        print(f"{'' if i == 0 else chr(10)}{origin}:")
        for name in names:
            cls = passes[name]
            print(f"  {name:<{width}}  {cls.describe()}")
            for info in cls.option_infos():
                print(f"  {'':<{width}}    {option_line(info)}")
    return 0
