"""`slimfx validate PATH --model MODEL`: compare an exported ONNX/TorchScript/.pt2/.slimfx file with the model."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimfx.commands import _args
from slimfx.ir.errors import GateError, ValidationError
from slimfx.loading import ModelSpecError, resolve_model

# what `validate` compares on without --data: the example's rows, and more drawn like them at a larger --batch (the
# example's rows repeated would compare one input over and over and miss a file that differs on any other)
EXAMPLE_SETS = "example inputs (rows beyond the example's drawn like them)"

ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "bfloat16": "bfloat16",
             "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8",
             "bool": "bool"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("validate", help="compare an exported .onnx/.pt/.pt2/.slimfx file with the model it came from",
                       description="Run PATH (ONNX with onnxruntime, TorchScript, torch.export .pt2 or a slimfx "
                                   "model file) and MODEL on the same inputs "
                                   "(MODEL's example inputs at each --batch size, rows beyond the example's drawn like "
                                   "them, or your --data) and report "
                                   "max abs/rel error, cosine, SQNR and top-1 agreement. Exit status 3 when outside "
                                   "tolerance, 2 when PATH does not take MODEL's inputs or give its outputs.")
    p.add_argument("path", type=_args.exported_file, metavar="PATH")
    p.add_argument("--model", required=True, metavar="MODEL", help="zoo name, 'pkg.mod:callable' or 'file.py:callable'")
    p.add_argument("--batch", type=_args.batch_sizes, default="1,7",
                   help="comma-separated batch sizes to check (default 1,7)")
    p.add_argument("--atol", type=_args.tolerance, default=1e-5, help="absolute tolerance (default 1e-5)")
    p.add_argument("--rtol", type=_args.tolerance, default=1e-4, help="relative tolerance (default 1e-4)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="compare on your data instead of the example inputs: 'file.py:fn' or 'package.module:fn' "
                        "returning slimfx.Data; its validation part (else test, else train) is used, batch by batch")
    p.add_argument("--untrained", action="store_true", help="zoo models: skip training, use random weights")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _args.add_plugin_argument(p)
    return p


def _sig(dtype: str, dims: list[Any]) -> str:
    return f"{dtype}[{', '.join(str(d) if d is not None else '?' for d in dims)}]"


def _torch_sig(x: torch.Tensor) -> str:
    return _sig(str(x.dtype).removeprefix("torch."), list(x.shape))


def _check_onnx_inputs(path: Path, sess: Any, name: str, inputs: tuple, batches: list[int]) -> None:
    """ValidationError when the file's declared inputs cannot take the model's (count, dtype, rank, sizes)."""
    declared = [(i.name, ORT_TYPES.get(i.type.removeprefix("tensor(").rstrip(")"), i.type), list(i.shape or []))
                for i in sess.get_inputs()]
    ours = ", ".join(_sig(t, d) for _, t, d in declared)
    theirs = ", ".join(_torch_sig(x) for x in inputs)
    if len(declared) != len(inputs):
        raise ValidationError(f"{path} takes {len(declared)} input{'s' * (len(declared) != 1)} ({ours}) but {name} "
                              f"takes {len(inputs)} ({theirs}): was it exported from another model?")
    for (iname, dtype, dims), x in zip(declared, inputs):
        fixed_batch = dims[0] if dims and isinstance(dims[0], int) else None
        rest_ok = len(dims) == x.dim() and all(not isinstance(d, int) or d == s for d, s in
                                               zip(dims[1:], x.shape[1:]))
        if dtype != str(x.dtype).removeprefix("torch.") or not rest_ok:
            raise ValidationError(f"{path} takes input {_sig(dtype, dims)} but {name} takes {_torch_sig(x)}: "
                                  "was it exported from another model?")
        if fixed_batch is not None and any(b != fixed_batch for b in batches):
            raise ValidationError(f"{path} has a fixed batch size of {fixed_batch} (input {iname!r} is "
                                  f"{_sig(dtype, dims)}); check it with --batch {fixed_batch}, or export it with a "
                                  "dynamic batch")


def _flat(out: Any) -> list[np.ndarray]:
    from slimfx.exporters._common import flatten_outputs

    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in flatten_outputs(out)]


def _probe(path: Path, name: str, run_file: Callable[[tuple], list[np.ndarray]], reference: torch.nn.Module,
           sets: list[tuple], batches: list[int]) -> None:
    """Run both sides on every input set once: each must run, give the same number and shapes of outputs,
    and the model's outputs must hold finite values (or there is nothing to compare); the file may not be
    NaN/Inf where the model is finite."""
    for ins, b in zip(sets, batches):
        try:
            with torch.no_grad():
                refs = _flat(reference(*ins))
        except Exception as e:  # noqa: BLE001 - the user's model failing on its own inputs
            raise ModelSpecError(f"{name} fails on its example inputs at batch {b}: {_args.first_line(e)}; "
                                 "choose batch sizes it accepts with --batch") from e
        try:
            ours = [np.asarray(o) for o in run_file(ins)]
        except ValidationError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime's and torch.jit's own exception types
            raise ValidationError(f"{path} fails on {name}'s inputs at batch {b} "
                                  f"({', '.join(_torch_sig(x) for x in ins)}): {_args.first_line(e)}; was it "
                                  "exported from another model?") from e
        if len(ours) != len(refs):
            raise ValidationError(f"{path} gives {len(ours)} output{'s' * (len(ours) != 1)} but {name} gives "
                                  f"{len(refs)}: was it exported from another model?")
        for i, (o, r) in enumerate(zip(ours, refs)):
            if o.shape != r.shape:
                raise ValidationError(f"{path}'s output {i} has shape {list(o.shape)} but {name}'s has "
                                      f"{list(r.shape)} at batch {b}: was it exported from another model?")
        finite = sum(int(np.isfinite(r.astype(np.float64)).sum()) for r in refs)
        if finite == 0:
            raise ValidationError(f"{name}'s outputs at batch {b} hold no finite values (empty, NaN or Inf), so "
                                  f"there is nothing to compare {path} with; check the model on its own first")
        for i, (o, r) in enumerate(zip(ours, refs)):
            o64, r64 = o.astype(np.float64), r.astype(np.float64)
            bad = ~np.isfinite(o64) & np.isfinite(r64)
            if bad.any():
                raise GateError(f"{path} does not match {name}: output {i} holds {int(bad.sum())} NaN/Inf "
                                f"values where the model's are finite (batch {b})")


def _load_torch_file(path: Path, kind: str) -> Any:
    """A callable module for a TorchScript, torch.export (.pt2) or slimfx model file."""
    if kind == "slimfx":
        from slimfx import ir
        from slimfx.persist import load

        return ir.lower(load(path)).eval()  # ModelFileError (exit 2) names what is wrong with the file
    try:
        if kind == "pt2":
            from slimfx.exporters.pt2 import load_pt2

            return load_pt2(path)
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - torch.jit / torch.export raise RuntimeError and friends for bad files
        what = "torch.export (.pt2)" if kind == "pt2" else "TorchScript"
        raise ValidationError(f"{path} is not a loadable {what} file: {_args.first_line(e)}") from e


def run(args: argparse.Namespace) -> int:
    from slimfx.data import example_at_batch
    from slimfx.exporters.bench import ort_feed
    from slimfx.exporters.validate import validate_outputs

    kind = _args.sniff(args.path)
    loaded = resolve_model(args.model, trained=not args.untrained)
    module, example = loaded.positional()
    sets, where = [example_at_batch(example, b) for b in args.batch], EXAMPLE_SETS
    if args.data:
        sets, where = _data_sets(args.data, example)
        args.batch = [int(ins[0].shape[0]) for ins in sets]
    ts = None
    if kind in ("torchscript", "pt2", "slimfx"):
        ts = _load_torch_file(args.path, kind)

        def run_file(ins: tuple) -> list[np.ndarray]:
            with torch.no_grad():
                return _flat(ts(*ins))
        names = None
    else:
        sess = _args.open_onnx_session(args.path)
        _check_onnx_inputs(args.path, sess, loaded.name, example, args.batch)

        def run_file(ins: tuple) -> list[np.ndarray]:
            return sess.run(None, ort_feed(sess, ins))
        names = [o.name for o in sess.get_outputs()]
    _probe(args.path, loaded.name, run_file, module, sets, args.batch)
    report = validate_outputs(run_file, module, sets, atol=args.atol, rtol=args.rtol, names=names)
    print(json.dumps({**report.to_dict(), "inputs": where}, indent=2) if args.json
          else f"{args.path} on {where}: {report.summary()}")
    if not report.passed:
        why = (f". {args.path} holds quantized weights or activations, so it differs from the float model by their "
               f"rounding by design: judge it by the SQNR{' and top-1 agreement' if report.top1_agreement is not None else ''}"
               " above, or pass --atol/--rtol for the difference you accept" if _quantized(args.path, kind, ts) else "")
        raise GateError(f"{args.path} does not match {loaded.name} on {where}: {report.summary()}{why}")
    return 0


QUANTIZED_ONNX_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits",
                      "GatherBlockQuantized", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}


def _quantized(path: Path, kind: str, module: Any = None) -> bool:
    """Whether a model file holds quantized weights or activations; `module`: a TorchScript or .pt2 file
    loaded (its 8-bit tensors are integer weights: the exporters keep them integers)."""
    if kind == "slimfx":
        from slimfx.exporters.pt2 import weight_storage
        from slimfx.persist import load

        return weight_storage(load(path)) != "float"
    if kind in ("torchscript", "pt2"):
        return any(t.dtype in (torch.int8, torch.uint8) for t in module.state_dict().values())
    import onnx  # an ONNX file (the sniffer says "onnx?"; the session loaded it)

    return any(n.op_type in QUANTIZED_ONNX_OPS for n in onnx.load(str(path), load_external_data=False).graph.node)


def _data_sets(spec: str, example: tuple) -> tuple[list[tuple], str]:
    """The input batches of the user's validation data (else test, else train) and what they are; DataError for
    batches unlike the model's example inputs (number, dtype, rank)."""
    from slimfx.data import check_like_example, load_data

    data = load_data(spec)
    for part in ("validation", "test", "train"):
        split = data.split(part)
        if split is not None:
            sets = [inputs for inputs, _ in split]
            for i, inputs in enumerate(sets):
                check_like_example(f"data.{part}, batch {i}", inputs, example)
            return sets, f"the {part} data of {spec} ({sum(int(s[0].shape[0]) for s in sets)} samples)"
    raise ValidationError(f"--data {spec} holds no validation, test or train data to compare on")

