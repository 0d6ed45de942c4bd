"""Checked argument types shared by every command, and checks of the files commands read and write.

Each `type=` function turns a bad value into an argparse error (exit 2, one line) that names the flag
(argparse adds it), the value and the accepted range, before any model is loaded:

    p.add_argument("--runs", type=count("timed runs", hi=1_000_000))
    slimfx bench: error: argument --runs: invalid value '0': timed runs must be a whole number from 1 to 1000000
"""

from __future__ import annotations

import argparse
import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimfx.exporters._common import non_regular_kind
from slimfx.ir.errors import ExportError, ValidationError

SEED_MAX = 2**32 - 1  # numpy's and Python's seeders all take this; torch takes more
BATCH_MAX = 65536
THREADS_MAX = 1024
EXPORT_FORMATS = ("onnx", "torchscript", "pt2", "slimfx")


def _invalid(text: str, what: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"invalid value {text!r}: {what}")


def count(what: str, lo: int = 1, hi: int | None = None) -> Callable[[str], int]:
    """A whole number in [lo, hi] (`what` names it in the message: "timed runs must be ...")."""
    rng = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise _invalid(text, f"{what} must be a whole number {rng}") from None
        if value < lo or (hi is not None and value > hi):
            raise _invalid(text, f"{what} must be a whole number {rng}")
        return value
    parse.__name__ = "count"
    return parse


def number(what: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], float]:
    """A finite number in the range [lo, hi] (open at an end with lo_open/hi_open); never nan or inf."""
    parts = []
    if lo is not None:
        parts.append(f"{'above' if lo_open else 'at least'} {lo:g}")
    if hi is not None:
        parts.append(f"{'below' if hi_open else 'at most'} {hi:g}")
    rng = f"a finite number {' and '.join(parts)}" if parts else "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _invalid(text, f"{what} must be {rng}") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
                or (hi is not None and (value >= hi if hi_open else value > hi)):
            raise _invalid(text, f"{what} must be {rng}")
        return value
    parse.__name__ = "number"
    return parse


seed = count("the seed", 0, SEED_MAX)
threads = count("the thread count", 1, THREADS_MAX)
tolerance = number("a tolerance", 0.0)
bench_seconds = number("the timed budget in seconds", 0.0, 3600.0)  # 0: no latency report, as bench_seconds=0


def batch_sizes(text: str) -> list[int]:
    """Comma-separated batch sizes, each from 1 to BATCH_MAX (at least one)."""
    what = f"give batch sizes as whole numbers from 1 to {BATCH_MAX}, comma-separated, e.g. 1,32"
    out = []
    for part in text.split(","):
        try:
            b = int(part.strip(), 10)
        except ValueError:
            raise _invalid(text, what) from None
        if not 1 <= b <= BATCH_MAX:
            raise _invalid(text, what)
        out.append(b)
    return list(dict.fromkeys(out))


def export_formats(text: str) -> str:
    """Comma-separated export formats (one or several of EXPORT_FORMATS); returned as a normalized
    comma-separated string, e.g. "onnx" or "onnx,torchscript"."""
    names = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in EXPORT_FORMATS]
    if bad or not names:
        raise _invalid(text, f"{'unknown format ' + repr(bad[0]) if bad else 'no format given'}; "
                             f"formats are {', '.join(EXPORT_FORMATS)} (one, or several comma-separated)")
    return ",".join(dict.fromkeys(names))


def add_plugin_argument(p: argparse.ArgumentParser) -> None:
    """`--plugin FILE_OR_MODULE` (repeatable), on every command that resolves models, recipes or passes.
    slimfx.cli loads the plugins (and the installed `slimfx.plugins` entry points) before the command runs."""
    p.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="load your passes, ops or emitters first: a .py file (relative to the working directory) "
                        "or a module name, e.g. --plugin my_passes.py; repeatable")


# --- files ----------------------------------------------------------------------------------------------

_MAGIC = [
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"PK\x03\x04", "a zip archive"),
    (b"\x7fELF", "an executable"), (b"\x89HDF", "an HDF5 file"), (b"\x93NUMPY", "a NumPy array"),
    (b"\x80\x02", "a Python pickle"), (b"\x80\x03", "a Python pickle"), (b"\x80\x04", "a Python pickle"),
    (b"\x80\x05", "a Python pickle"), (b"BZh", "a bzip2 archive"), (b"\xfd7zXZ", "an xz archive"),
]


def sniff(path: Path) -> str:
    """What a file's first bytes say it is: 'torchscript', 'pt2' (torch.export), 'slimfx' (a slimfx model
    file), 'torch.save', 'onnx?' (plausibly a protobuf),
    or a description for messages such as 'a PNG image', 'a text file', 'an empty file'."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            return "a truncated or corrupt zip archive (TorchScript and torch.save files are zip archives)"
        if "meta.json" in names and "graph.ir" in names:
            return "slimfx"
        if any(n.split("/", 1)[-1].startswith("code/") for n in names):
            return "torchscript"
        if any(n.split("/", 1)[-1] in ("models/model.json", "archive_format") for n in names):
            return "pt2"
        if any(n.endswith("data.pkl") for n in names):
            return "torch.save"
        return "a zip archive"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "a text file"
        except UnicodeDecodeError as e:
            if e.start >= len(head) - 3:  # a multi-byte character cut at the end of what we read
                return "a text file"
    return "onnx?" if head[:1] == b"\x08" else "unknown binary data"


def _check_readable(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path was given; give the path of a file")
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist{_model_spec_hint(text)}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is {non_regular_kind(path)}, not a model file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable (permission denied)")
    return path


def _model_spec_hint(text: str) -> str:
    """For a missing file that is a MODEL spec (`net.py:make`, a zoo name): the command takes exported files."""
    from slimfx import models

    code, sep, _ = text.rpartition(":")
    if (sep and Path(code).is_file()) or text in models.names():
        return (f" as a file: it is a MODEL spec, and this command takes an exported file; export it first, e.g. "
                f"`slimfx export {text} --format onnx -o model.onnx`")
    return ""


def _onnx_problem(path: Path, kind: str) -> str | None:
    """Why `path` (sniffed as `kind`) is not a loadable ONNX model, or None."""
    if kind == "torchscript":
        return (f"{path} is not an ONNX model (it is a TorchScript file: `slimfx validate` takes it; export ONNX "
                "with `slimfx export MODEL -o FILE.onnx`)")
    if kind == "pt2":
        return (f"{path} is not an ONNX model (it is a torch.export .pt2 program: `slimfx validate` takes it; "
                "export ONNX with `slimfx export MODEL -o FILE.onnx`)")
    if kind == "slimfx":
        return (f"{path} is not an ONNX model (it is a slimfx model file: export it with `slimfx export {path} "
                "--format onnx -o FILE.onnx`)")
    if kind == "torch.save":
        return (f"{path} is not an ONNX model (it is a torch.save checkpoint, e.g. a state_dict; export the model "
                "with `slimfx export MODEL -o FILE.onnx`)")
    if kind not in ("onnx?", "unknown binary data"):
        starts = kind in {what for _, what in _MAGIC}
        return f"{path} is not an ONNX model (it {'starts like' if starts else 'is'} {kind})"
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - a protobuf decode error: not ONNX, or cut short
        if kind == "unknown binary data":
            return f"{path} is not an ONNX model (unrecognized binary data)"
        return f"{path} is not a readable ONNX model (truncated or corrupt: {first_line(e)})"
    if not proto.graph.output or proto.ir_version <= 0 or not proto.opset_import:
        return (f"{path} is not a complete ONNX model (it has no graph outputs, IR version or opset: it is "
                "truncated, or not ONNX at all)")
    return None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(e).__name__}: {line[:300]}" if line else type(e).__name__


def onnx_file(text: str) -> Path:
    """An existing, readable ONNX model file (argparse type)."""
    path = _check_readable(text)
    problem = _onnx_problem(path, sniff(path))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return path


def exported_file(text: str) -> Path:
    """An existing ONNX, TorchScript, torch.export (.pt2) or slimfx model file (argparse type)."""
    path = _check_readable(text)
    kind = sniff(path)
    if kind in ("torchscript", "pt2", "slimfx"):
        return path
    if kind == "torch.save":
        raise argparse.ArgumentTypeError(
            f"{path} is a torch.save checkpoint (e.g. a state_dict), not an exported model; validate takes an "
            "ONNX or TorchScript file written by `slimfx export` or `slimfx compile`")
    if kind.startswith("a truncated or corrupt zip"):
        raise argparse.ArgumentTypeError(f"{path} is not a readable TorchScript file (it is {kind})")
    problem = _onnx_problem(path, kind)
    if problem:
        raise argparse.ArgumentTypeError(problem.replace("is not an ONNX model", "is not an ONNX or TorchScript "
                                                                                  "model"))
    return path


def open_onnx_session(path: Path, threads: int = 1):
    """An onnxruntime session of `path`; a file onnxruntime refuses is a ValidationError naming it."""
    from slimfx.exporters.bench import ort_session

    try:
        return ort_session(path, threads=threads)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad models
        raise ValidationError(f"onnxruntime cannot load {path}: {first_line(e)}; is it a complete ONNX model "
                              "(re-export it with `slimfx export`)?") from e


def output_problem(path: Path) -> str | None:
    """Why slimfx may not write the file `path`, or None: it exists and is not a regular file (directory,
    FIFO, device, socket: never replaced), it is one of the run's inputs, or its folder is a file or not writable."""
    from slimfx.output import input_problem

    kind = non_regular_kind(path)
    if kind is not None:
        return f"{path} exists and is {kind}, not a regular file; slimfx will not replace it: give another path"
    clash = input_problem(path)
    if clash:
        return clash
    for folder in (path.parent, *path.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                return f"cannot write {path}: {folder} is a file, not a folder"
            if not os.access(folder, os.W_OK | os.X_OK):
                return f"cannot write {path}: folder {folder} is not writable"
            break
    return None


def output_file(text: str) -> Path:
    """A file to write (argparse type): see `output_problem`."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path was given; give the file to write, e.g. -o model.onnx")
    problem = output_problem(Path(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def check_output_file(path: Path) -> None:
    """`output_problem` as an ExportError, for output paths that do not come from an argument."""
    problem = output_problem(path)
    if problem:
        raise ExportError(problem)


def output_dir(text: str) -> str:
    """A non-empty output folder path (argparse type; what happens to an existing one is the command's call)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path was given; give the output folder, e.g. --out slimfx-out")
    return text


def dynamic_dims(text: str) -> Any:
    """--dynamic-dims: names ("batch,seq", "batch,height,width"), "none", or per input
    "INPUT=DIM:NAME,...;INPUT=...", parsed (ir.symdims); checked against the model's inputs when it is loaded."""
    from slimfx.ir.symdims import DynamicDimsError, parse_dynamic_dims

    try:
        return parse_dynamic_dims(text)
    except DynamicDimsError as e:
        raise argparse.ArgumentTypeError(str(e).replace(" (`--dynamic-dims` on the command line, dynamic_dims= in "
                                                        "Python)", "")) from None


DYNAMIC_DIMS_HELP = ("input dims the exported files keep dynamic, by name (ONNX dim_param, torch.export Dim): "
                     "names where they conventionally sit, 'batch,seq' (seq: dim 1 of token inputs), "
                     "'batch,height,width' (dims 2, 3 of images); per input 'INPUT=DIM:NAME,...;INPUT=...' "
                     "(e.g. 'x=0:batch,2:height,3:width'); 'none': every dim fixed. Default: batch, and seq "
                     "for token inputs when the model runs at other lengths")
