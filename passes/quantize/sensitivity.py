"""Per-layer quantization sensitivity.

Sensitivity of a layer = what quantizing only that layer (its weights and the activation it reads)
does to the model: output SQNR against the float model on calibration data, and the accuracy drop
when an eval function is given. The accuracy-budget tuner (tune.py) ranks layers by it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from slimfx.ir import Graph, lower
from slimfx.ir.metrics import tensor_sqnr_db
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.quantize.calibrate import calibration_batches, progress
from slimfx.passes.quantize.observers import Calibration
from slimfx.passes.quantize.ptq import Scheme
from slimfx.passes.quantize.qdq import expand_for_integer_kernels, make_plan

if TYPE_CHECKING:
    from slimfx.passes.quantize.ptq import Quantize


def _flat_outputs(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().flatten().double()
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_flat_outputs(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict))])


sqnr_db = tensor_sqnr_db  # one convention for the project (slimfx.ir.metrics): +inf when equal


def graph_outputs(graph: Graph, batches: list[tuple]) -> torch.Tensor:
    gm = lower(graph)
    gm.eval()
    with torch.no_grad():
        return torch.cat([_flat_outputs(gm(*b)) for b in batches])


def layer_sensitivity(q: Quantize, graph: Graph, ctx: PassContext, *, ranges: dict | None = None,
                      with_accuracy: bool = True) -> list[dict[str, Any]]:
    """One row per quantizable layer: name, op, module, sqnr_db, accuracy_drop (None without eval_fn);
    most sensitive (lowest SQNR) first."""
    q = dataclasses.replace(q, max_accuracy_drop=None, qat_epochs=0)
    if q.scheme != "int8-dynamic":  # what apply quantizes (silu as x * sigmoid(x)): ranges of those tensors
        graph = graph.copy()
        expand_for_integer_kernels(graph)
    plan = make_plan(graph, skip=q.skip, weight_only=q.scheme == "int8-dynamic")
    batches = calibration_batches(ctx, required=q.scheme != "int8-dynamic")
    if ranges is None and q.scheme != "int8-dynamic":
        ranges = q.calibrate(graph, plan, ctx)
    ref = graph_outputs(graph, batches)
    base = ctx.eval_fn(lower(graph)) if (with_accuracy and ctx.eval_fn is not None) else None
    rows = []
    scratch = PassContext(ctx.example_inputs, calibration_data=ctx.calibration_data, quiet=True, seed=ctx.seed)
    for n in progress(plan.weight_ops + plan.act_ops, desc="sensitivity", quiet=ctx.quiet):
        g = graph.copy()
        q.apply(g, scratch, only={n.name}, ranges=ranges)
        row = {"name": n.name, "op": n.op, "module": n.module_path, "sqnr_db": sqnr_db(ref, graph_outputs(g, batches)),
               "accuracy_drop": None}
        if base is not None:
            row["accuracy_drop"] = base - ctx.eval_fn(lower(g))  # type: ignore[misc]
        rows.append(row)
    rows.sort(key=lambda r: (-(r["accuracy_drop"] or 0.0), r["sqnr_db"]))
    return rows


@register_pass("quant-sensitivity")
@dataclass
class QuantSensitivity(Pass):
    """Report each layer's SQNR and accuracy drop when only it is quantized (the graph is unchanged)."""

    is_analysis = True
    scheme: Scheme = option("int8-static", help="the quantize scheme each layer is tried with (as quantize's)")
    per_channel: bool = option(True, help="per-output-channel weight scales (as quantize's)")
    calibration: Calibration = option("minmax", help="how activation ranges are calibrated (as quantize's)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from slimfx.passes.quantize.ptq import Quantize

        q = Quantize.create({"scheme": self.scheme, "per_channel": self.per_channel,
                             "calibration": self.calibration})
        rows = layer_sensitivity(q, graph, ctx)
        return PassResult(False, {"layers": rows})
