"""`slimfx inspect MODEL`: the captured IR as text, a per-node table, Graphviz dot, or JSON."""

from __future__ import annotations

import argparse
import json

from slimfx import ir
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
    loaded = resolve_model(args.model, trained=not args.untrained)
    graph = loaded.graph if loaded.graph is not None else \
        ir.capture(loaded.module, loaded.example_inputs, example_kwargs=loaded.example_kwargs)
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
