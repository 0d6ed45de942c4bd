"""Helpers shared by the exporters: example inputs, batch variants, output flattening, atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimfx.ir.analysis import example_inputs  # noqa: F401 - re-exported: exporters use it
from slimfx.ir.errors import ExportError, GateError


@dataclass
class ExportResult:
    """What an export produced: the file, its validation report, and how long it took."""

    path: Path
    validation: Any  # exporters.validate.ValidationReport | None
    seconds: float
    format: str = "onnx"
    size_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)  # e.g. opset, emit seconds, torchscript method

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "seconds": self.seconds,
                "size_bytes": self.size_bytes, "details": dict(self.details),
                "validation": self.validation.to_dict() if self.validation is not None else None}


def with_batch(inputs: tuple, batch: int) -> tuple:
    """The same inputs with dim 0 resized to `batch` by cycling through the given rows."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] > 0:
            out.append(x[torch.arange(batch) % x.shape[0]])
        else:
            out.append(x)
    return tuple(out)


def validation_sets(inputs: tuple, *, dynamic_batch: bool = True,
                    dims: list[dict[int, str]] | None = None) -> list[tuple]:
    """The inputs, and the same at other sizes of every symbolic dim (`dims`, one {dim: symbol} per input; by
    default batch at dim 0 when `dynamic_batch`): batch 1 (3 when already 1), the others a size the export's
    probes did not run."""
    from slimfx.ir.symdims import at_sizes, probe_sizes

    if dims is None:  # the old rule: dim 0 of every input when the first has one
        batched = dynamic_batch and bool(inputs) and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() >= 1
        dims = [{0: "batch"} if batched and isinstance(x, torch.Tensor) and x.dim() >= 1 else {} for x in inputs]
    sets = [inputs]
    if inputs and any(dims):
        gen = torch.Generator().manual_seed(0)
        sets.append(tuple(_jitter(x, gen) for x in at_sizes(inputs, dims, probe_sizes(inputs, dims)[2])))
    return sets


def _jitter(x: Any, gen: torch.Generator) -> Any:
    """A float input tiled to another size with each value scaled by 1 +- 1%: exact copies of the example's values
    would make exact ties (a conv of a tiled image repeats its outputs), and an argmax or topk over a tiled dim
    then depends on how each runtime breaks ties. The sign of every value, and its zeros, are kept."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.numel() == 0:
        return x
    scale = 1 + (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.01
    return (x.double() * scale).to(x.dtype)


FLOAT_TOLERANCE = (1e-5, 1e-4)  # (atol, rtol): a file vs the IR it was written from, in float32
# onnxruntime's integer kernels (QLinearConv, QGemm, ...) round apart from the IR's fake-quant lowering by a few
# output quantization steps; the built-in quantizing recipes' [validate] atol/rtol say the same
INTEGER_KERNEL_TOLERANCE = (0.25, 0.05)


def runs_integer_kernels(graph: Any) -> bool:
    """Whether the graph quantizes activations (static or dynamic), which onnxruntime runs as integer kernels."""
    return any(n.op in ("quantize", "dynamic_quantize") for n in graph.nodes)


def onnx_tolerance(graph: Any, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """(atol, rtol) for an ONNX file of `graph`: the ones given, else INTEGER_KERNEL_TOLERANCE for a graph that
    runs integer kernels and FLOAT_TOLERANCE for the rest."""
    default = INTEGER_KERNEL_TOLERANCE if runs_integer_kernels(graph) else FLOAT_TOLERANCE
    return (default[0] if atol is None else atol), (default[1] if rtol is None else rtol)


def raise_if_invalid(report: Any, what: str, keep_invalid: bool, integer_kernels: bool = False) -> None:
    """GateError (a failed check: exit 3 on the command line) naming the output that disagrees and the numbers
    (never a temporary file's path)."""
    if not report.passed:
        cause = ("onnxruntime's integer kernels round apart from the IR's fake-quant by a few output steps, more "
                 "where ranges are wide; " if integer_kernels else
                 "a float32 export that disagrees is a bug in slimfx's exporter (please report it with the model); ")
        loosen = ("to accept a looser match, raise the tolerance (`--atol`/`--rtol` of `slimfx export`, atol/rtol "
                  "in the recipe's [validate] table).")
        if report.integer_failure and integer_kernels:
            loosen = ("integer outputs (indices of a topk or argmax) must match exactly, and no tolerance loosens "
                      "that: values quantization rounds to ties pick other indices. Return the scores and take the "
                      "indices after the model, or keep the layers before them float (quantize's `skip`).")
        elif report.integer_failure:
            loosen = "integer outputs must match exactly, and no tolerance loosens that."
        raise GateError(
            f"{what} disagrees with the model: {report.failure or 'outside tolerance'}. {report.summary()}. "
            + ("The file was kept for inspection. " if keep_invalid else "No file was written. ")
            + cause[0].upper() + cause[1:] + loosen
        )


def as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def flatten_outputs(value: Any) -> list[Any]:
    """Leaves of a nested tuple/list/dict output structure, in order (dict values in insertion order)."""
    from slimfx.ir.metrics import named_leaves

    return [leaf for _, leaf in named_leaves(value)]


def _umask() -> int:
    """The process umask (read from /proc where possible, as setting it to read it races with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def non_regular_kind(target: Path) -> str | None:
    """What `target` is when it exists and is not a regular file (following symlinks), else None."""
    import stat

    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a dangling symbolic link" if target.is_symlink() else None
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error remove it.

    A reader never sees a half-written file, and a failed export leaves nothing behind
    (unless `keep_on_error`, which moves the incomplete-but-written file into place). The file gets the
    permissions any tool's new file gets (0666 masked by the umask). A `path` that exists and is not a
    regular file (directory, FIFO, device, socket) is refused with ExportError and left untouched.
    """
    target = Path(path)
    kind = non_regular_kind(target)
    if kind is not None:
        raise ExportError(f"{target} exists and is {kind}, not a regular file; slimfx will not replace it: "
                          "give another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    mode = 0o666 & ~_umask()
    try:
        yield tmp
        os.chmod(tmp, mode)
        if non_regular_kind(target) is not None:  # appeared while we worked
            raise ExportError(f"{target} was replaced by something that is not a regular file while slimfx "
                              "worked; nothing was written")
    except BaseException:
        if keep_on_error and tmp.exists() and tmp.stat().st_size > 0 and non_regular_kind(target) is None:
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        else:
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def pack_small_tensors(module: torch.nn.Module, limit_bytes: int = 1 << 16) -> int:
    """Make the module's parameters and buffers under `limit_bytes` views of one storage per dtype; returns
    how many. PyTorch's file formats write one zip member per storage (about 130 bytes of headers each), so a
    quantized model's many scales, zero points and biases cost more in headers than in data otherwise."""
    by_dtype: dict[torch.dtype, list[tuple[dict, str, torch.Tensor]]] = {}
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None and t.numel() * t.element_size() < limit_bytes:
                    by_dtype.setdefault(t.dtype, []).append((table, name, t))
    packed = 0
    for items in by_dtype.values():
        if len(items) < 2:
            continue
        flat = torch.cat([t.detach().reshape(-1) for _, _, t in items])
        offset = 0
        for table, name, t in items:
            view = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()
            table[name] = torch.nn.Parameter(view, t.requires_grad) if isinstance(t, torch.nn.Parameter) else view
        packed += len(items)
    return packed


def _attr_value(gm: torch.fx.GraphModule, arg: Any) -> Any:
    """The tensor a get_attr node reads, or the constant itself; None for a computed value."""
    if not isinstance(arg, torch.fx.Node):
        return arg
    if arg.op != "get_attr":
        return None
    owner, _, leaf = arg.target.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf, None)


def _zero_point(gm: torch.fx.GraphModule, arg: Any, *, per_tensor: bool) -> int | None:
    """A zero point as a Python int: a constant, or a buffer whose entries are all equal (one entry when
    `per_tensor`); None when it is computed or varies (the generic dequantize stays)."""
    z = _attr_value(gm, arg)
    if isinstance(z, int) and not isinstance(z, bool):
        return z
    if not isinstance(z, torch.Tensor) or z.is_floating_point() or z.numel() == 0 or (per_tensor and z.numel() != 1):
        return None
    first = int(z.reshape(-1)[0])
    return first if bool((z == first).all()) else None


def _narrow_to_int16(gm: torch.fx.GraphModule, arg: Any) -> bool:
    """Store an int32 buffer as int16 when its values fit and only `dequantize_symmetric` reads it."""
    from slimfx.ir import ops

    t = _attr_value(gm, arg)
    if (not isinstance(arg, torch.fx.Node) or not isinstance(t, torch.Tensor) or t.dtype != torch.int32
            or t.numel() == 0 or int(t.min()) < -(2**15) or int(t.max()) >= 2**15
            or any(u.target is not ops.dequantize_symmetric for u in arg.users)):
        return False
    owner, _, leaf = arg.target.rpartition(".")
    gm.get_submodule(owner)._buffers[leaf] = t.to(torch.int16)
    return True


def compact_quantization(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Rewrite a lowered graph's quantization into fewer torch calls, bit for bit the same results, for the
    formats that record every call (torch.export's program, TorchScript's code): an activation's per-tensor
    quantize → dequantize pair (int8/uint8, the integers read by nothing else) becomes one `fake_quantize`
    (5 torch calls instead of 10), and a dequantize whose zero points are all 0 (symmetric weights, int32 biases)
    skips them (`dequantize_symmetric`), its int32 integers stored as int16 when they fit (int32 biases:
    half the bytes; a float32 scale times int16 or int32 gives the same floats); zero-point buffers nothing
    reads any more are removed. Weights stay integer tensors. Returns how many of each it rewrote."""
    from slimfx.ir import ops

    quantize, dequantize = ops.get_op("quantize").impl, ops.get_op("dequantize").impl
    graph, done = gm.graph, {"fake_quantize": 0, "dequantize_symmetric": 0, "int16": 0}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not dequantize or node.kwargs.get("block_size"):
            continue
        q, scale, zp = node.args
        axis = node.kwargs.get("axis")
        src = q if isinstance(q, torch.fx.Node) and q.op == "call_function" and q.target is quantize else None
        dtype = src.kwargs.get("dtype", torch.int8) if src is not None else None
        if (src is not None and len(src.users) == 1 and src.args[1] is scale and src.args[2] is zp
                and axis is None and src.kwargs.get("axis") is None and not src.kwargs.get("block_size")
                and dtype in (torch.int8, torch.uint8)
                and (z := _zero_point(gm, zp, per_tensor=True)) is not None):
            with graph.inserting_before(node):
                new = graph.call_function(ops.fake_quantize, (src.args[0], scale, z), {"dtype": dtype})
            done["fake_quantize"] += 1
        elif _zero_point(gm, zp, per_tensor=False) == 0:
            with graph.inserting_before(node):
                new = graph.call_function(ops.dequantize_symmetric, (q, scale), {"axis": axis})
            done["dequantize_symmetric"] += 1
        else:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if src is not None and not src.users and new.target is ops.fake_quantize:
            graph.erase_node(src)
    for node in list(graph.nodes):  # zero points (and anything else) no node reads any more
        if node.op == "get_attr" and node.users and _narrow_to_int16(gm, node):
            done["int16"] += 1
        if node.op == "get_attr" and not node.users:
            owner, _, leaf = node.target.rpartition(".")
            graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == node.target for n in graph.nodes):
                mod = gm.get_submodule(owner)
                mod._buffers.pop(leaf, None)
                mod._parameters.pop(leaf, None)
    gm.recompile()
    return done


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    import time

    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
