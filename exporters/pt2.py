"""torch.export exporter: the IR's lowering as an ExportedProgram (`.pt2`), symbolic dims dynamic, validated
after reloading with `torch.export.load`.

Quantized graphs keep their integer weights: the IR stores them as int8/uint8/int32 params read by
`dequantize` nodes, and torch.export records those as buffers with the dequantization in the graph (no
constant folding), so the file holds real integer tensors. The archive is written zip-deflated (torch.export
.load reads it): the program's JSON is most of a small model's file and compresses about tenfold.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
import zipfile
import zlib
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
from slimfx.ir.errors import ExportError
from slimfx.ir.graph import Graph, Node, Param
from slimfx.ir.lower import lower
from slimfx.ir.symdims import at_sizes, describe, symbol_sizes

log = logging.getLogger("slimfx.exporters")


def weight_storage(graph: Graph) -> str:
    """How a PyTorch export of `graph` stores its weights: 'float' (no quantized weights), 'int8' (integer
    params dequantized in the graph: int8 weights, 4-bit codes, embedding tables whose rows are looked up and
    dequantized) or 'fake-quant' (quantized values held as float tensors)."""
    def stored_integers(v: Any) -> bool:
        """A stored integer param, or values taken from one (rows looked up in an int8 table); not a run-time
        quantize (whose zero point is an integer param too)."""
        refs = [v] if isinstance(v, Param) else list(v.params()) if isinstance(v, Node) and v.op != "quantize" else []
        return any(not graph.params[p.name].is_floating_point() for p in refs)

    if any(n.op in ("matmul_nbits", "gather_nbits") or n.op == "dequantize" and stored_integers(n.inputs[0])
           for n in graph):
        return "int8"
    if any(n.op in ("quantize", "dequantize") for n in graph):
        return "fake-quant"
    return "float"


def _dynamic_shapes(inputs: tuple, dims: list[dict[int, str]]) -> tuple[Any, ...]:
    """torch.export's dynamic_shapes: Dim.AUTO for each symbolic dim (torch finds which are equal, the
    ranges the program allows, and keeps a symbol per distinct size; named Dims with fixed ranges would be
    refused for any guard a strided layer adds, such as height >= 3)."""
    return tuple({d: torch.export.Dim.AUTO for d in per} if isinstance(x, torch.Tensor) and per else None
                 for x, per in zip(inputs, dims))


def _kept_dims(ep: torch.export.ExportedProgram, dims: list[dict[int, str]]) -> list[dict[int, str]]:
    """The symbolic dims the program kept dynamic (a SymInt in its input's example value)."""
    user = [n for n in ep.graph.nodes if n.op == "placeholder"
            and n.name in set(ep.graph_signature.user_inputs)]
    kept = []
    for node, per in zip(user, dims):
        val = node.meta.get("val")
        shape = getattr(val, "shape", ())
        kept.append({d: s for d, s in per.items() if d < len(shape) and isinstance(shape[d], torch.SymInt)})
    return kept


def to_exported_program(graph: Graph, inputs: tuple, *, dynamic_batch: bool = True
                        ) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The graph's lowering through torch.export (non-strict: the lowering is plain torch calls), with every
    symbolic dim of the graph inputs (batch, seq, ...; `dynamic_batch=False` fixes the batch) a torch.export
    Dim when possible; falls back to the example's fixed shapes (said in info)."""
    from slimfx.exporters.onnx.export import export_dims

    gm = lower(graph, copy_params=True).eval()
    info: dict[str, Any] = {"dynamic_batch": False, "dynamic_dims": "none", "weights": weight_storage(graph)}
    info["compact_quantization"] = compact_quantization(gm)
    pack_small_tensors(gm)
    dims = export_dims(graph, dynamic_batch)
    # torch.export specializes a size-1 dim: trace with every symbolic dim of size 1 at 2 so it stays symbolic.
    trace_inputs = at_sizes(inputs, dims, {s: 2 for s, n in symbol_sizes(inputs, dims).items() if n == 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if any(dims):
            try:
                ep = torch.export.export(gm, trace_inputs, dynamic_shapes=_dynamic_shapes(trace_inputs, dims),
                                         strict=False)
            except Exception as e:  # noqa: BLE001 - e.g. a reshape that bakes the example's batch size in
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.debug("torch.export with dynamic dims failed on %s (%s); exporting fixed shapes",
                          graph.name, reason)
                info["dynamic_batch_error"] = reason[:300]
            else:
                kept = _kept_dims(ep, dims)
                names = [n.name for n in graph.inputs]
                if kept != dims:  # a dim torch.export specialized: the program takes the example's size there
                    info["fixed_dims"] = describe([{d: s for d, s in a.items() if d not in b}
                                                   for a, b in zip(dims, kept)], names)
                info["dynamic_batch"] = any(s == "batch" for per in kept for s in per.values())
                info["dynamic_dims"] = describe(kept, names)
                info["dims"] = kept
                return ep, info
        try:
            ep = torch.export.export(gm, inputs, strict=False)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"torch.export of {graph.name} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}; export ONNX or TorchScript instead "
                              "(--format onnx / torchscript)") from e
    info["dims"] = [{} for _ in inputs]
    return ep, info


_DEBUG_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node")


def drop_debug_info(ep: torch.export.ExportedProgram) -> None:
    """Leave out of the file what only points into slimfx's generated lowering: each node's Python stack,
    module stack and trace provenance, and the dtype asserts torch.export adds after every `.to()` (a
    quantized model has one per dequantized tensor), together a third of a small int8 model's program; and
    the example inputs it was traced with (torch.export.load reads an empty entry as none; a 224x224 image
    example is 0.6 MB)."""
    ep.example_inputs = None
    graph = ep.graph_module.graph
    for n in list(graph.nodes):
        for key in _DEBUG_META:
            n.meta.pop(key, None)
        if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default and not n.users:
            graph.erase_node(n)
    ep.graph_module.recompile()


# A member this large is a tensor's storage: float32 (and int8) weights deflate by only ~8% at ~25 MB/s, two
# seconds of a ResNet-18's compile, so such a member is stored as it is unless a sample of it deflates well.
STORE_MIN_BYTES = 1 << 20
_SAMPLE_BYTES = 1 << 16
_MIN_SAVING = 0.10


def _deflates_well(data: bytes) -> bool:
    """Worth deflating: small (code, pickles, small tensors), or a sample from its middle shrinks by at least
    _MIN_SAVING (zeros, pruned or repeated weights)."""
    if len(data) < STORE_MIN_BYTES:
        return True
    mid = len(data) // 2
    sample = data[mid:mid + _SAMPLE_BYTES]
    return len(zlib.compress(sample, 6)) <= (1 - _MIN_SAVING) * len(sample)


def deflate_zip(src: Path, dst: Path, *, root: str | None = None, drop_suffixes: tuple[str, ...] = ()) -> None:
    """Copy a zip archive with its members deflated (torch.export.load and torch.jit.load read both), except
    large ones that barely shrink (`_deflates_well`), which are stored.

    `root` renames the archive's top folder (torch names it after the temporary file it saved to, and every
    member's name is stored twice); members ending in `drop_suffixes` are left out."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
        for info in zin.infolist():
            if info.filename.endswith(drop_suffixes):
                continue
            name = info.filename
            if root is not None and "/" in name:
                name = f"{root}/{name.split('/', 1)[1]}"
            data = zin.read(info.filename)
            zout.writestr(name, data, zipfile.ZIP_DEFLATED if _deflates_well(data) else zipfile.ZIP_STORED)


def export_pt2(graph: Graph, path: str | os.PathLike, *, inputs: Any = None, validate: bool = True,
               atol: float = 1e-5, rtol: float = 1e-4, keep_invalid: bool = False, dynamic_batch: bool = True,
               compress: bool = True) -> ExportResult:
    """Write `graph` as a torch.export ExportedProgram file (temporary name, then renamed), reload it with
    torch.export.load and compare it with the IR's lowering at the inputs' batch size and another one
    (when the batch is dynamic); ValidationError above tolerance (and no file left unless `keep_invalid`)."""
    from slimfx.exporters.validate import validate_pt2

    t0 = time.perf_counter()
    inputs = as_tuple(inputs) if inputs is not None else example_inputs(graph)
    ep, info = to_exported_program(graph, inputs, dynamic_batch=dynamic_batch)
    path = Path(path)
    report = None
    with atomic_path(path, keep_on_error=keep_invalid) as tmp, tempfile.TemporaryDirectory(prefix="slimfx-pt2-") as d:
        # torch.export's archive reader wants names ending in .pt2: write and check there, then move.
        raw, packed = Path(d) / "raw.pt2", Path(d) / "model.pt2"
        drop_debug_info(ep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.save(ep, str(raw if compress else packed))
        if compress:
            deflate_zip(raw, packed, drop_suffixes=("/.data/serialization_id",))  # a random id per save
        info["compressed"] = compress
        try:
            if validate:
                report = validate_pt2(packed, graph, validation_sets(inputs, dims=info.pop("dims")),
                                      atol=atol, rtol=rtol)
                raise_if_invalid(report, f"the torch.export (.pt2) export of {graph.name}", keep_invalid)
        finally:
            shutil.copyfile(packed, tmp)
        size = tmp.stat().st_size
    return ExportResult(path=path, validation=report, seconds=time.perf_counter() - t0, format="pt2",
                        size_bytes=size, details=info)


def load_pt2(path: str | os.PathLike) -> torch.nn.Module:
    """The runnable module of a .pt2 file (torch.export.load(...).module())."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.load(str(path)).module()


__all__ = ["export_pt2", "to_exported_program", "load_pt2", "weight_storage", "deflate_zip", "drop_debug_info"]
