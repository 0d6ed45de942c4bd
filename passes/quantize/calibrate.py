"""Calibration: run the graph over data and feed chosen intermediate values to observers.

Intermediate values are read by making them extra outputs of a copy of the
graph (no forward hooks), so what is observed is exactly what the lowered IR
computes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import torch

from slimfx.ir import Graph, lower
from slimfx.ir.errors import PassError


def progress(items: Iterable, *, desc: str, quiet: bool = False, total: int | None = None) -> Iterable:
    """A tqdm bar on a terminal, the bare iterable otherwise."""
    if quiet or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


def run_with_outputs(graph: Graph, names: Sequence[str]) -> torch.fx.GraphModule:
    """A lowered copy of `graph` returning (original outputs, value of each node in `names`)."""
    g = graph.copy()
    missing = [n for n in names if not g.has_node(n)]
    if missing:
        raise PassError(f"calibration: no node named %{missing[0]} in the graph")
    g.set_outputs((g.outputs, tuple(g.node(n) for n in names)))
    gm = lower(g)
    gm.eval()
    return gm


def collect(graph: Graph, batches: Sequence[tuple], names: Sequence[str],
            sink: Callable[[str, torch.Tensor], None], *, quiet: bool = True,
            desc: str = "calibrating") -> None:
    """Run `graph` on every batch and call `sink(name, value)` for each observed node's value."""
    if not batches:
        raise PassError("calibration needs at least one batch of inputs; pass calibration_data "
                        "(an iterable of input tuples)")
    gm = run_with_outputs(graph, list(names))
    with torch.no_grad():
        for batch in progress(batches, desc=desc, quiet=quiet, total=len(batches)):
            _, values = gm(*batch)
            for name, v in zip(names, values, strict=True):
                sink(name, v)


def calibration_batches(ctx, *, required: bool = True) -> list[tuple]:
    """The context's calibration batches; a PassError when none were given and they are `required`."""
    if ctx.calibration_data is None and required:
        raise PassError("quantize: static activation quantization needs calibration data; give the "
                        "PassContext calibration_data (an iterable of input tuples, e.g. 8-32 batches "
                        "of training inputs), or use scheme 'int8-dynamic' which needs none")
    return ctx.calibration_batches()
