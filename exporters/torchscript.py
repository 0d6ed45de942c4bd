"""TorchScript exporter: lower, script (or trace), freeze, optimize for inference, save, reload, compare.

A graph with integer (quantized) weights is not frozen: freezing would fold each dequantize of an int8
weight into a float32 constant, leaving a fake-quant model four times the size. The archive is written
zip-deflated (torch.jit.load reads it)."""

from __future__ import annotations

import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from slimfx.exporters._common import (
    ExportResult,
    as_tuple,
    atomic_path,
    compact_quantization,
    example_inputs,
    pack_small_tensors,
    raise_if_invalid,
    validation_sets,
)
from slimfx.exporters.onnx.context import FIXED_BATCH_ADVICE
from slimfx.exporters.pt2 import deflate_zip, weight_storage
from slimfx.ir.errors import ExportError
from slimfx.ir.graph import Graph
from slimfx.ir.lower import lower

log = logging.getLogger("slimfx.exporters")


#: aten factory overloads torch.export leaves in a graph, which take their sizes as Scalars: a trace hands them the
#: size of an input as a tensor (so the size stays dynamic), which the overload refuses and torch's own function
#: takes (a transformers decoder's positions: aten.arange.default(seq_len))
_SIZED_FACTORIES = {"arange": torch.arange, "zeros": torch.zeros, "ones": torch.ones, "full": torch.full}


def _traceable_sizes(gm: torch.fx.GraphModule) -> None:
    """Call torch's factory functions in place of their aten overloads (same arguments), so tracing works."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) \
                and n.target.namespace == "aten" and n.target.overloadpacket.__name__ in _SIZED_FACTORIES:
            n.target = _SIZED_FACTORIES[n.target.overloadpacket.__name__]
            changed = True
    if changed:
        gm.recompile()


def _reason(e: BaseException) -> str:
    """One line of why torch.jit failed: its first non-blank line; for the tracer's "cannot infer type of <the
    traced output, printed whole>" the reason it gives after it (a dict mixing tensors and tuples)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Tracer cannot infer type of"):
        return (f"{type(e).__name__}: the tracer cannot type the model's output: {lines[-1].lstrip(':').strip()}; "
                "TorchScript needs the values of a returned dict to be of one type, all tensors for instance")
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def to_torchscript(graph: Graph, inputs: tuple, *, optimize: bool = True) -> tuple[torch.jit.ScriptModule, dict]:
    """A frozen, inference-optimized ScriptModule of the graph, and how it was made.

    Scripting is tried first; the lowered module calls the IR's op implementations, whose
    keyword-only arguments TorchScript rejects, so it usually falls back to tracing. The IR is
    straight-line code (no Python control flow survives capture), so a trace records it exactly,
    and sizes read from tensors stay dynamic in the trace.
    """
    gm = lower(graph, copy_params=True).eval()
    _traceable_sizes(gm)
    info: dict[str, Any] = {"method": "script", "weights": weight_storage(graph)}
    info["compact_quantization"] = compact_quantization(gm)
    if info["weights"] == "int8":  # kept as params (not frozen, below): one zip member per storage, and
        pack_small_tensors(gm)     # one code file per submodule that holds them
        _flatten_attributes(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation and annotation warnings
        try:
            sm = torch.jit.script(gm)
        except Exception as e:  # noqa: BLE001 - any scripting failure falls back to tracing
            reason = _reason(e)
            log.debug("torch.jit.script failed on %s (%s); falling back to torch.jit.trace", graph.name, reason)
            info.update(method="trace", script_error=reason)
            try:
                sm = torch.jit.trace(gm, inputs, check_trace=False, strict=False, _store_inputs=False)
            except Exception as e2:  # noqa: BLE001
                raise ExportError(f"TorchScript export of {graph.name} failed: scripting ({reason}) and tracing "
                                  f"({_reason(e2)}) both failed. Export the other formats only: "
                                  "--format onnx (or pt2) on the command line, formats=('onnx',) in "
                                  "slimfx.compile, or formats = [\"onnx\"] in the recipe's [export]") from e2
        sm = sm.eval()
        info["optimized"] = False
        if info["weights"] == "int8":
            # Freezing folds dequantize(int8 weight) into float32 constants: the file would hold fake-quant
            # float weights at four times the size. Keep the integer params and the dequantization.
            info["frozen"] = False
            info["optimize_error"] = "skipped: freezing would fold the int8 weights into float32"
            return sm, info
        frozen = torch.jit.freeze(sm)
        info["frozen"] = True
        if optimize and any(n.op in ("conv1d", "conv2d") for n in graph):
            # On CPU it prepacks convolutions for MKL-DNN, which this torch cannot reload from a file.
            optimize = False
            info["optimize_error"] = "skipped: MKL-DNN prepacked convolutions are not serializable"
        if optimize:
            try:
                # optimize_for_inference rewrites its argument in place: give it its own frozen copy.
                opt = torch.jit.optimize_for_inference(torch.jit.freeze(sm))
                # Its MKL-DNN prepacked convolutions cannot be reloaded from a file in this torch
                # ("required keyword attribute 'value' is undefined"); keep it only if it round-trips.
                buf = io.BytesIO()
                torch.jit.save(opt, buf)
                buf.seek(0)
                torch.jit.load(buf)
                frozen = opt
                info["optimized"] = True
            except Exception as e:  # noqa: BLE001 - keep the frozen module
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.info("torch.jit.optimize_for_inference result of %s is not saveable (%s); saving the "
                         "frozen module", graph.name, reason)
                info["optimize_error"] = reason
    return frozen, info


def _flatten_attributes(gm: torch.fx.GraphModule) -> None:
    """Move every parameter and buffer the graph reads onto the root module (`fc1.weight` -> `fc1_weight`) and
    drop the then empty submodules: TorchScript writes a class file for each submodule."""
    taken = set(dict(gm.named_parameters())) | set(dict(gm.named_buffers()))
    for n in gm.graph.nodes:
        if n.op != "get_attr" or "." not in n.target:
            continue
        owner, _, leaf = n.target.rpartition(".")
        mod = gm.get_submodule(owner)
        t = getattr(mod, leaf)
        name = n.target.replace(".", "_")
        while name in taken or hasattr(gm, name):
            name += "_"
        taken.add(name)
        if isinstance(t, torch.nn.Parameter):
            gm.register_parameter(name, t)
        else:
            gm.register_buffer(name, t)
        n.target = name
    used = {n.target.split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for child in [c for c, _ in gm.named_children() if c not in used]:
        delattr(gm, child)
    gm.recompile()


def export_torchscript(graph: Graph, path: str | os.PathLike, *, inputs: Any = None, validate: bool = True,
                       atol: float = 1e-5, rtol: float = 1e-4, keep_invalid: bool = False,
                       optimize: bool = True, dynamic_batch: bool = True) -> ExportResult:
    """Write a TorchScript file of `graph` (temporary name, then rename), reload it, and compare it
    with the IR's lowering at the inputs' sizes and at other sizes of the graph's symbolic dims (batch unless
    `dynamic_batch=False`);
    ValidationError above tolerance (and no file left unless `keep_invalid`)."""
    from slimfx.exporters.validate import validate_torchscript

    t0 = time.perf_counter()
    inputs = as_tuple(inputs) if inputs is not None else example_inputs(graph)
    sm, info = to_torchscript(graph, inputs, optimize=optimize)
    path = Path(path)
    report = None
    with atomic_path(path, keep_on_error=keep_invalid) as tmp:
        raw = tmp.with_name(tmp.name + ".raw")
        try:
            torch.jit.save(sm, str(raw))
            # torch.jit.load reads deflated archives; the code and constants shrink. The debug tables (source
            # ranges of the traced lowering, not of the user's code) are a tenth of a small model's file.
            deflate_zip(raw, tmp, root=path.stem or "model", drop_suffixes=(".debug_pkl",))
        finally:
            raw.unlink(missing_ok=True)
        if validate:
            from slimfx.exporters.onnx.export import export_dims

            sets = validation_sets(inputs, dims=export_dims(graph, dynamic_batch))
            try:
                report = validate_torchscript(tmp, graph, sets, atol=atol, rtol=rtol)
            except RuntimeError as e:  # the traced file (or the graph) fails at a validation batch size
                sizes = [[list(t.shape) for t in x if isinstance(t, torch.Tensor)] for x in sets]
                last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                raise ExportError(  # TorchScript's last line names the error: `RuntimeError: shape '[1, 10]' ...`
                    f"the TorchScript export of {graph.name} fails at input shapes {sizes} ({last}). "
                    f"If the model fixes its batch size, {FIXED_BATCH_ADVICE}; if it fixes another dim, keep that "
                    "dim fixed (`--dynamic-dims` on the command line, dynamic_dims= in Python).") from None
            raise_if_invalid(report, f"the TorchScript export of {graph.name}", keep_invalid)
        size = tmp.stat().st_size
    return ExportResult(path=path, validation=report, seconds=time.perf_counter() - t0, format="torchscript",
                        size_bytes=size, details=info)
