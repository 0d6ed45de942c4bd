"""`slimfx run-pass NAME INPUT.slimfx`: run one pass on a saved graph, with the pipeline's checks.

This is the command a failing pipeline prints to replay its failure: the failing pass's input graph is saved
as a .slimfx file next to the IR dumps, with the pass's options (`--options JSON`) and the numerics tolerance
it ran under. The pass runs on inputs made from the graph's input metas (calibration uses those too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimfx.commands import _args
from slimfx.ir.errors import PassError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run-pass", help="run one pass on a saved .slimfx graph (replays a pipeline failure)",
                       description="Run pass NAME with its options on the graph in INPUT (a .slimfx file), "
                                   "verifying the result like a pipeline does; a failure is reported as in "
                                   "the pipeline, with IR dumps. Failing pipelines print this command for "
                                   "their failing pass. `slimfx passes NAME` lists the options.")
    p.add_argument("name", metavar="NAME", help="the pass (`slimfx passes` lists them)")
    p.add_argument("input", metavar="INPUT", help="the graph, a .slimfx file")
    p.add_argument("--options", default="{}", metavar="JSON",
                   help="the pass's options as a JSON object, e.g. '{\"sparsity\": 0.5}' (default: none)")
    p.add_argument("--check-numerics", type=_args.tolerance, default=None, metavar="TOL",
                   help="also check the outputs stay within TOL x their magnitude (passes that preserve outputs)")
    p.add_argument("--out", type=_slimfx_name, default=None, metavar="OUT.slimfx",
                   help="write the graph after the pass here (a .slimfx file)")
    p.add_argument("--print-ir", action="store_true", help="print the IR after the pass when it changed it")
    p.add_argument("--dump-dir", default=None, metavar="DIR",
                   help="where a failure's IR dumps go (default: a fresh temporary directory)")
    _args.add_plugin_argument(p)
    return p


def _slimfx_name(text: str) -> str:
    """--out: a name ending in .slimfx (checked before the pass runs, as the rest of the path is)."""
    from slimfx.persist import SUFFIX

    if not text.endswith(SUFFIX):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: run-pass writes a slimfx model file, whose name "
                                         f"ends in {SUFFIX}; give e.g. --out {Path(text).stem or 'after'}{SUFFIX}")
    return text


def run(args: argparse.Namespace) -> int:
    from slimfx.output import note_input
    from slimfx.passes import PassContext, PassManager, create_pass
    from slimfx.persist import example_inputs, load, save

    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        raise PassError(f"--options must be a JSON object such as '{{\"sparsity\": 0.5}}': {e}") from None
    if not isinstance(options, dict):
        raise PassError(f"--options must be a JSON object such as '{{\"sparsity\": 0.5}}', got {args.options!r}")
    p = create_pass(args.name, options)
    graph = load(args.input)
    note_input(args.input, "saved model")
    if args.out:  # checked before the pass runs: never the input file, a folder, or an unwritable place
        _args.check_output_file(Path(args.out))
    x = example_inputs(graph)
    ctx = PassContext(example_inputs=x, calibration_data=[x], quiet=True)
    problem = p.check_context(ctx)
    if problem:
        raise PassError(f"pass '{p.name}' cannot run from the command line on {args.input}: {problem}")
    run = PassManager([p], check_numerics=args.check_numerics, print_ir=args.print_ir,
                      dump_dir=args.dump_dir).run(graph, ctx)
    (record,) = run
    print(f"{p}: {'changed the graph' if record.changed else 'no change'} in {record.seconds * 1e3:.1f} ms "
          f"{json.dumps(record.stats, default=str)}", file=sys.stdout)
    if args.out:
        print(f"wrote {save(run.graph, args.out)}")
    return 0
