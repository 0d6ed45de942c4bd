"""`slimfx recipes [NAME]`: list the built-in recipes, or print one as TOML to copy and edit."""

from __future__ import annotations

import argparse
import textwrap
from importlib import resources
from typing import Any

WIDTH = 100


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("recipes", help="list the built-in recipes, or print one as TOML to start your own",
                              description="List the built-in recipes (their passes and gate); with NAME, print "
                                          "that recipe's TOML file, to copy and edit: `slimfx recipes int8 > "
                                          "my.toml`, then `slimfx compile MODEL --recipe my.toml`.")
    p.add_argument("name", nargs="?", help="a built-in recipe to print as TOML")
    return p


def summary(name: str) -> str:
    """One entry of the list: name, passes in order, the gate's thresholds, and the description."""
    from slimfx.recipe import load_recipe

    recipe = load_recipe(name)
    gate = {k: v for k, v in vars(recipe.validate).items() if v is not None and k not in ("atol", "rtol")}
    lines = [f"{name}: {' -> '.join(p for p, _ in recipe.passes) or '(no passes)'}",
             f"  gate: {', '.join(f'{k} = {v:g}' for k, v in gate.items()) or 'none'}"]
    lines += textwrap.wrap(recipe.description, WIDTH, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from slimfx.errors import RecipeError
    from slimfx.recipe import builtin_recipes, load_recipe

    if args.name is None:
        for name in builtin_recipes():
            print(summary(name) + "\n")
        print("print one as TOML to start your own: slimfx recipes NAME > my.toml, then --recipe my.toml")
        return 0
    if args.name not in builtin_recipes():
        if args.name.endswith(".toml") or "/" in args.name:
            raise RecipeError(f"{args.name} is a path; `slimfx recipes` prints the built-in recipes "
                              f"({', '.join(builtin_recipes())})")
        load_recipe(args.name)  # the unknown-name RecipeError --recipe gives, with close matches
    print((resources.files("slimfx") / "recipes" / f"{args.name}.toml").read_text(encoding="utf-8"), end="")
    return 0
