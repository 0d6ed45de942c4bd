"""`slimfx inspect MODEL`: the captured IR as text, a per-node table, Graphviz dot, or JSON."""

from __future__ import annotations

import argparse
import json

from slimfx import ir
from slimfx.commands import _args
from slimfx.loading import IMPORT_NOTE, resolve_model


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="print a model's IR and a per-node table (op, shape, params, MACs)",
                       description="Capture MODEL and print its IR. MODEL is a zoo name, "
                                   "'package.module:callable', 'path/to/file.py:callable' or a saved "
                                   "'model.slimfx' (its graph is printed as saved)." + " " + IMPORT_NOTE)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--format", choices=["text", "table", "dot", "json"], default=None,
                   help="text: IR only; table: per-node table only; dot: Graphviz; json: machine-readable "
                        "(default: IR text and the table)")
    p.add_argument("--untrained", action="store_true", help="zoo models: skip training, use random weights")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="capture with a batch of your data ('file.py:fn' or 'package.module:fn' returning "
                        "slimfx.Data) instead of the model's example inputs")
    _args.add_plugin_argument(p)
    return p


def format_table(graph: ir.Graph) -> str:
    rows = ir.node_table(graph)
    headers = ["node", "op", "shape", "params", "MACs", "module"]
    cells = [[r["name"], r["op"], r["shape"], f"{r['params']:,}", f"{r['macs']:,}", r["module"]] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = {3, 4}
    fmt = lambda row: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    lines = [fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, cells)]
    lines.append(f"total: {len(rows)} nodes, {ir.count_params(graph):,} params, {ir.count_macs(graph):,} MACs")
    return "\n".join(lines)


def format_dot(graph: ir.Graph) -> str:
    lines = [f'digraph "{graph.name}" {{', "  node [shape=box, fontname=monospace];"]
    for n in graph:
        label = f"{n.name}\\n{n.op}" + (f"\\n{n.meta}" if isinstance(n.meta, ir.TensorMeta) else "")
        lines.append(f'  "{n.name}" [label="{label}"];')
        for src in n.input_nodes():
            lines.append(f'  "{src.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines)


def to_json(graph: ir.Graph) -> dict:
    return {"name": graph.name, "params": ir.count_params(graph), "macs": ir.count_macs(graph),
            "nodes": [{**r, "inputs": [i.name for i in graph.node(r["name"]).input_nodes()]}
                      for r in ir.node_table(graph)]}


def run(args: argparse.Namespace) -> int:
    loaded = resolve_model(args.model, trained=not args.untrained, need_inputs=not args.data)
    inputs, kwargs = loaded.example_inputs, loaded.example_kwargs
    if args.data:  # shapes from the user's data: one batch of it (validation, else test, else train)
        inputs, kwargs = _first_batch(args.data), None
    graph = loaded.graph if loaded.graph is not None and not args.data else \
        ir.capture(loaded.module, inputs, example_kwargs=kwargs)  # a saved model: its graph as saved
    if args.format == "json":
        print(json.dumps(to_json(graph), indent=2))
    elif args.format == "dot":
        print(format_dot(graph))
    elif args.format == "table":
        print(format_table(graph))
    elif args.format == "text":
        print(graph)
    else:
        print(graph)
        print()
        print(format_table(graph))
    return 0


def _first_batch(spec: str) -> tuple:
    from slimfx.data import load_data
    from slimfx.ir.errors import DataError

    data = load_data(spec)
    for part in ("validation", "test", "train"):
        split = data.split(part)
        if split is not None:
            return next(iter(split))[0]
    raise DataError(f"--data {spec} holds no validation, test or train data to take input shapes from")
