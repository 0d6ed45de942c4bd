"""The `slimfx` command line. Each subcommand lives in slimfx/commands/<name>.py with
`add_parser(subparsers)` and `run(args) -> int`.

Exit codes: 0 success; 2 a user error (one paragraph, no traceback unless --debug); 3 a check failed
(the recipe's [validate] gate, an export's validation, `slimfx validate`); 1 an internal failure (a bug);
130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Partial outputs are removed in every case but 0.
Argument values are checked while parsing (slimfx/commands/_args.py), so a bad one is refused before any work.
Commands that resolve models, recipes or passes take `--plugin FILE_OR_MODULE`; those plugins (and the
installed `slimfx.plugins` entry points) are loaded here, before the command runs (slimfx/plugins.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

from slimfx.ir.errors import GateError, PassCrash, SlimfxError
from slimfx.output import Terminated, remove_live_stages, terminate_on_sigterm

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_CHECK, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


def _command_modules():
    import slimfx.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"slimfx.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimfx", description="Compile PyTorch models small and fast: "
                                     "prune, distil, quantize, and export validated ONNX/TorchScript.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = mod.add_parser(sub)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        p.set_defaults(_run=mod.run)
    return parser


def _load_plugins(specs: list[str]) -> None:
    """The installed `slimfx.plugins` entry points, then each --plugin, before the command resolves anything."""
    from slimfx.plugins import load_entry_points, load_plugins

    load_entry_points()
    load_plugins(specs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or an argparse error (already printed, exit 2): return, do not exit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        with terminate_on_sigterm():
            if hasattr(args, "plugin"):  # commands taking --plugin (_args.add_plugin_argument)
                _load_plugins(args.plugin)
            return int(args._run(args) or 0)
    except GateError as e:
        if debug:
            traceback.print_exc()
        print(f"slimfx: check failed: {e}", file=sys.stderr)
        return EXIT_CHECK
    except PassCrash as e:
        if not e.builtin:  # the user's own pass
            if debug:
                traceback.print_exc()
            print(f"slimfx: error: {e}", file=sys.stderr)
            return EXIT_USER
        traceback.print_exc()
        print(f"slimfx: internal error: {e}\nThis is a bug in slimfx; please report it with the traceback above "
              "(and the replay command, when one is given).", file=sys.stderr)
        return EXIT_BUG
    except SlimfxError as e:
        if debug:
            traceback.print_exc()
        print(f"slimfx: error: {e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("slimfx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `slimfx passes | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Terminated:
        print("slimfx: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as e:  # noqa: BLE001 - anything else is our bug
        traceback.print_exc()
        print(f"slimfx: internal error: {type(e).__name__}: {e}\n"
              "This is a bug in slimfx; please report it with the traceback above.", file=sys.stderr)
        return EXIT_BUG
    finally:  # SIGTERM handling is off again here: whatever ended the run, no stage is left behind
        remove_live_stages()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
