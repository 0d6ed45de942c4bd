"""The slimfx model file (`.slimfx`): a graph saved as text, weights and metadata, read back without code.

A zip archive holding three members:

- `graph.ir`: the IR text (`ir.format_graph(g, locations=True)`), readable and diffable;
- `weights.safetensors`: every param, bit for bit (safetensors: raw tensor bytes and a JSON header);
- `meta.json`: format and versions, the graph's name/mode/inputs/outputs/symbolic dims, the params
  manifest (names in order, dtypes, shapes, which are buffers), a summary of quantization parameters
  and pruning masks, and what the caller adds (recipe, pass history, model name).

Reading never unpickles and never runs code: zipfile, json, safetensors and ir.parse only. A file that
is missing, not a slimfx file, truncated, corrupt (zip CRC), from a newer format version, or whose parts
disagree (hand edits) is a ModelFileError naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from slimfx.ir.errors import ModelFileError, SlimfxError
from slimfx.ir.graph import Graph, Node, Param, TensorMeta
from slimfx.ir.symdims import graph_dims, set_graph_dims

FORMAT = "slimfx-model"
FORMAT_VERSION = 1
SUFFIX = ".slimfx"
GRAPH_MEMBER, WEIGHTS_MEMBER, META_MEMBER = "graph.ir", "weights.safetensors", "meta.json"
MEMBERS = (META_MEMBER, GRAPH_MEMBER, WEIGHTS_MEMBER)
ZIP_COMMENT = b"slimfx model file: graph.ir (IR text), weights.safetensors, meta.json"
# What zipfile and zlib raise for a damaged archive: a flipped bit in a header can name an unknown compression
# method (NotImplementedError) or set the encryption flag (RuntimeError: password required).
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error)
# Zip members above this size are refused before they are read (a hostile or broken file).
MAX_MEMBER_BYTES = 1 << 34


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("slimfx")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def quantization_records(graph: Graph) -> list[dict[str, Any]]:
    """One entry per quantize/dequantize node: what it reads, its scale and zero point, dtype and axis."""
    out = []
    for n in graph:
        if n.op not in ("quantize", "dequantize"):
            continue
        x, scale, zp = (list(n.inputs) + [None, None, None])[:3]

        def ref(v: Any) -> Any:
            return f"@{v.name}" if isinstance(v, Param) else f"%{v.name}" if isinstance(v, Node) else v
        entry = {"node": n.name, "op": n.op, "reads": ref(x), "scale": ref(scale), "zero_point": ref(zp),
                 "axis": n.attrs.get("axis")}
        dtype = n.attrs.get("dtype") if n.op == "quantize" else (
            graph.params[x.name].dtype if isinstance(x, Param) else x.meta.dtype
            if isinstance(x, Node) and isinstance(x.meta, TensorMeta) else None)
        entry["dtype"] = _dtype_name(dtype) if isinstance(dtype, torch.dtype) else None
        out.append(entry)
    return out


def mask_records(graph: Graph) -> list[dict[str, Any]]:
    """One entry per pruning mask node: the weight and mask params and the fraction of zeros."""
    out = []
    for n in graph:
        if n.op == "mask" and len(n.inputs) == 2 and all(isinstance(v, Param) for v in n.inputs):
            m = graph.params[n.inputs[1].name]
            sparsity = float((m == 0).sum()) / m.numel() if m.numel() else 0.0
            out.append({"node": n.name, "weight": f"@{n.inputs[0].name}", "mask": f"@{n.inputs[1].name}",
                        "sparsity": round(sparsity, 6)})
    return out


def _graph_info(graph: Graph) -> dict[str, Any]:
    from slimfx.ir.capture import output_names

    inputs = [{"name": n.name, "dtype": _dtype_name(n.meta.dtype), "shape": list(n.meta.shape)}
              if isinstance(n.meta, TensorMeta) else {"name": n.name, "dtype": None, "shape": None}
              for n in graph.inputs]
    return {
        "name": graph.name, "training": graph.training, "capture_method": graph.capture_method,
        "inputs": inputs, "outputs": output_names(graph.outputs),
        # The dims exports keep dynamic (ir.symdims; also in the IR text, `batch:1`), with the example's size
        # in the metas: {input: {dim: name}}, every input listed ({} = all dims fixed).
        "symbolic_dims": {n.name: {str(d): sym for d, sym in per.items()}
                          for n, per in zip(graph.inputs, graph_dims(graph))},
        "nodes": len(graph),
    }


def _params_manifest(graph: Graph) -> list[dict[str, Any]]:
    """One entry a param; a tied param (Graph.param_aliases) names the param whose stored tensor it shares."""
    alias = graph.param_aliases()
    return [{"name": k, "dtype": _dtype_name(t.dtype), "shape": list(t.shape), "buffer": k in graph.buffers,
             **({"tied_to": alias[k]} if alias[k] != k else {})} for k, t in graph.params.items()]


def build_metadata(graph: Graph, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "slimfx_version": _version(),
            "torch_version": torch.__version__, "graph": _graph_info(graph), "params": _params_manifest(graph),
            "quantization": quantization_records(graph), "masks": mask_records(graph)}
    for k, v in (extra or {}).items():
        if k in meta:
            raise ValueError(f"metadata key {k!r} is written by slimfx itself")
        meta[k] = v
    return meta


def save_graph(graph: Graph, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write `graph` as a .slimfx file (to a temporary name, then renamed: a reader never sees half a
    file). `metadata`: JSON-able keys to add (e.g. recipe, history, model); the graph's own `metadata`
    (what a loaded file recorded) is kept unless `metadata` replaces a key. Returns the path."""
    from safetensors.torch import save as st_save

    from slimfx.ir.printer import format_graph

    path = Path(path)
    check_saveable(graph)
    extra = {k: v for k, v in {**graph.metadata, **(metadata or {})}.items() if k not in _DERIVED_KEYS}
    meta = build_metadata(graph, extra)
    text = format_graph(graph, locations=True) + "\n"
    alias = graph.param_aliases()
    weights = st_save({k: t.detach().contiguous().clone() for k, t in graph.params.items() if alias[k] == k})
    if path.exists() and not path.is_file():
        raise ModelFileError(f"{path} exists and is not a regular file; slimfx will not replace it: give another "
                             "path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as z:
            z.comment = ZIP_COMMENT
            z.writestr(META_MEMBER, json.dumps(meta, indent=1, allow_nan=False) + "\n", zipfile.ZIP_DEFLATED)
            z.writestr(GRAPH_MEMBER, text, zipfile.ZIP_DEFLATED)
            z.writestr(WEIGHTS_MEMBER, weights, zipfile.ZIP_STORED)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_saveable(graph: Graph) -> None:
    """ModelFileError for what the file cannot hold: module objects (opaque call_module nodes) and
    functions ir.parse would not resolve. save_graph calls it; the driver calls it right after capture when
    the slimfx format is asked for, so the refusal comes before any pass runs."""
    from slimfx.ir.parser import check_opaque, resolve_function
    from slimfx.ir.printer import function_name

    instead = ("; leave slimfx out of the formats (--format / formats=) and keep the ONNX or TorchScript file, "
               "or re-run the recipe on the Python model when you need its graph again")
    for n in graph:
        if n.op != "opaque":
            continue
        if n.attrs.get("kind") == "call_module" or "module" in n.attrs:
            raise ModelFileError(
                f"cannot save %{n.name}: it calls the module object {n.attrs.get('target')!r} "
                f"({type(n.attrs.get('module')).__name__}, {n.where()}), which capture could not turn into IR ops "
                "and a model file holds no Python objects. Capture the model so that this layer becomes IR ops "
                f"(see `slimfx inspect` for opaque nodes){instead}.")
        target = n.attrs.get("target")
        if callable(target) and resolve_function(function_name(target)) is not target:
            what = (f"the ATen operator {target} ({n.where()}), which torch.export capture left without an IR op"
                    if isinstance(target, torch._ops.OpOverload) else
                    f"{function_name(target)} ({n.where()}), which is not a torch, operator or math function")
            raise ModelFileError(
                f"cannot save %{n.name}: it calls {what}, and a model file holds no Python code nor ATen calls; "
                f"make the model call torch functions there{instead}.")
        why = check_opaque(list(n.inputs), n.attrs)  # what loading would refuse is never written
        if why is not None:
            raise ModelFileError(
                f"cannot save %{n.name} ({n.where()}): {why}, and a model file holds only what it can read back "
                f"without running Python. Make the model compute that with torch functions{instead}.")


class _Reader:
    """Reads one file, turning every failure into a ModelFileError that names it."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, what: str, action: str = "") -> ModelFileError:
        return ModelFileError(f"{self.path}: {what}" + (f"; {action}" if action else ""))

    def open(self) -> zipfile.ZipFile:
        p = self.path
        if not p.exists():
            raise self.fail("no such file", "give the path of a .slimfx file written by slimfx.save or "
                                            "`slimfx compile --format slimfx`")
        if not p.is_file():
            raise self.fail("is not a regular file (a folder?)", "give the path of a .slimfx file")
        with open(p, "rb") as f:
            head = f.read(4)
        if not head:
            raise self.fail("the file is empty", "save the model again")
        if head != b"PK\x03\x04":
            raise self.fail("not a slimfx model file (it is not a zip archive)",
                            "give a file written by slimfx.save or `slimfx compile --format slimfx`")
        try:
            z = zipfile.ZipFile(p)
        except ZIP_ERRORS as e:
            raise self.fail(f"the file is truncated or corrupt (zip: {e})", "save the model again") from e
        names = z.namelist()
        missing = [m for m in MEMBERS if m not in names]
        if missing:
            z.close()
            if META_MEMBER in missing and z.comment != ZIP_COMMENT:
                raise self.fail(f"not a slimfx model file (a zip archive without {META_MEMBER})",
                                "give a file written by slimfx.save or `slimfx compile --format slimfx`")
            raise self.fail(f"the file lacks {', '.join(missing)} (it holds {', '.join(names) or 'nothing'})",
                            "save the model again")
        return z

    def read(self, z: zipfile.ZipFile, member: str) -> bytes:
        info = z.getinfo(member)
        if info.file_size > MAX_MEMBER_BYTES:
            raise self.fail(f"{member} claims {info.file_size} bytes, more than any model this reads")
        try:
            return z.read(member)
        except ZIP_ERRORS as e:
            raise self.fail(f"{member} is corrupt ({e})", "save the model again") from e

    def metadata(self, z: zipfile.ZipFile) -> dict[str, Any]:
        raw = self.read(z, META_MEMBER)
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.fail(f"{META_MEMBER} is not valid JSON ({e})", "save the model again") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise self.fail(f"{META_MEMBER} does not say format = {FORMAT!r}",
                            "give a file written by slimfx.save")
        version = meta.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise self.fail(f"{META_MEMBER} has no valid format_version ({version!r})", "save the model again")
        if version > FORMAT_VERSION:
            raise self.fail(f"written by a newer slimfx ({meta.get('slimfx_version', '?')}, file format version "
                            f"{version}); this slimfx reads format versions up to {FORMAT_VERSION}",
                            "upgrade slimfx (pip install -U slimfx)")
        for key, kind in (("graph", dict), ("params", list), ("quantization", list), ("masks", list)):
            if not isinstance(meta.get(key), kind):
                raise self.fail(f"{META_MEMBER}: key {key!r} is missing or not a {kind.__name__}",
                                "save the model again")
        return meta

    def weights(self, z: zipfile.ZipFile, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        raw = self.read(z, WEIGHTS_MEMBER)
        try:
            tensors = st_load(raw)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
            raise self.fail(f"{WEIGHTS_MEMBER} is not a readable safetensors file ({str(e).splitlines()[0]})",
                            "save the model again") from e
        manifest = meta["params"]
        try:
            listed = {m["name"]: m for m in manifest}
        except (TypeError, KeyError) as e:
            raise self.fail(f"{META_MEMBER}: the params manifest is malformed", "save the model again") from e
        tied = {name: m.get("tied_to") for name, m in listed.items() if "tied_to" in m}
        stored = set(listed) - set(tied)
        extra, missing = sorted(set(tensors) - stored), sorted(stored - set(tensors))
        if extra or missing:
            what = (f"{WEIGHTS_MEMBER} holds {', '.join(extra[:3])}, which {META_MEMBER} does not list" if extra else
                    f"{META_MEMBER} lists {', '.join(missing[:3])}, which {WEIGHTS_MEMBER} does not hold")
            raise self.fail(f"the weights and the manifest disagree: {what}", "save the model again")
        for name, to in tied.items():
            if not isinstance(to, str) or to not in stored:
                raise self.fail(f"{META_MEMBER}: param {name!r} is tied to {to!r}, which {WEIGHTS_MEMBER} does not "
                                "hold", "save the model again")
        out = {}
        for name, m in listed.items():
            t = tensors[tied.get(name, name)]
            if _dtype_name(t.dtype) != m.get("dtype") or list(t.shape) != m.get("shape"):
                raise self.fail(f"weight {name!r} is {_dtype_name(t.dtype)}{list(t.shape)} in {WEIGHTS_MEMBER} but "
                                f"{m.get('dtype')}{m.get('shape')} in {META_MEMBER}", "save the model again")
            out[name] = t
        return out

    def graph(self, z: zipfile.ZipFile, meta: dict[str, Any], params: dict[str, torch.Tensor]) -> Graph:
        from slimfx.ir.parser import ParseError, parse
        from slimfx.ir.verify import VerifyError, verify

        raw = self.read(z, GRAPH_MEMBER)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{GRAPH_MEMBER} is not UTF-8 text ({e})", "save the model again") from e
        info = meta["graph"]
        buffers = {m["name"] for m in meta["params"] if m.get("buffer")}
        try:
            graph = parse(text, params, buffers=buffers, training=bool(info.get("training", False)),
                          capture_method=str(info.get("capture_method", "fx")), source=GRAPH_MEMBER)
        except ParseError as e:
            raise self.fail(f"the IR text does not parse: {e}",
                            "fix the hand edit, or save the model again") from e
        try:
            verify(graph)
        except VerifyError as e:
            raise self.fail(f"the IR text and the weights are inconsistent: {e}",
                            "fix the hand edit, or save the model again") from e
        return graph

    def check(self, graph: Graph, meta: dict[str, Any]) -> None:
        """meta.json's descriptions must match the graph that was read (they are written from it)."""
        ours = _graph_info(graph)
        theirs = meta["graph"]
        for key in ("name", "inputs", "outputs"):
            if theirs.get(key) != ours[key]:
                raise self.fail(f"{META_MEMBER} says graph {key} {theirs.get(key)!r} but {GRAPH_MEMBER} has "
                                f"{ours[key]!r}", "fix the hand edit, or save the model again")
        dims = theirs.get("symbolic_dims")
        if dims is not None:
            self.apply_dims(graph, dims)
        for key, fn in (("quantization", quantization_records), ("masks", mask_records)):
            if meta[key] != json.loads(json.dumps(fn(graph))):
                raise self.fail(f"{META_MEMBER}'s {key} records do not match {GRAPH_MEMBER}",
                                "fix the hand edit, or save the model again")


    def apply_dims(self, graph: Graph, dims: Any) -> None:
        """meta.json's symbolic dims onto the graph inputs; they must agree with the names in the IR text."""
        if not isinstance(dims, dict):
            raise self.fail(f"{META_MEMBER}'s symbolic_dims is not {{input: {{dim: name}}}}", "save the model again")
        per_input = []
        for node in graph.inputs:
            entry = dims.get(node.name, {})
            rank = len(node.meta.shape) if isinstance(node.meta, TensorMeta) else 0
            if not isinstance(entry, dict) or not all(
                    isinstance(k, str) and k.isdigit() and int(k) < rank and isinstance(v, str) and v.isidentifier()
                    for k, v in entry.items()):
                raise self.fail(f"{META_MEMBER}'s symbolic_dims of input {node.name!r} is {entry!r}, not {{dim: name}} "
                                f"with dims 0..{rank - 1}", "fix the hand edit, or save the model again")
            want = {int(k): v for k, v in entry.items()}
            sym = node.meta.sym if isinstance(node.meta, TensorMeta) else None
            if sym is not None and {d: n for d, n in enumerate(sym) if n} != want:
                raise self.fail(f"{META_MEMBER} says input {node.name!r} has symbolic dims {want} but {GRAPH_MEMBER} "
                                f"names {dict((d, n) for d, n in enumerate(sym) if n)}",
                                "fix the hand edit, or save the model again")
            per_input.append(want)
        set_graph_dims(graph, per_input)


_OWN_KEYS = ("format", "format_version", "slimfx_version", "torch_version", "graph", "params", "quantization",
             "masks")
# what load_graph adds to graph.metadata from the file's own keys (written afresh on every save)
_DERIVED_KEYS = (*_OWN_KEYS, "saved_with", "symbolic_dims")


def load_graph(path: str | os.PathLike) -> Graph:
    """Read a .slimfx file into a Graph (verified); `graph.metadata` holds what the file recorded besides
    the graph (recipe, history, model, symbolic dims, versions). ModelFileError for anything wrong."""
    reader = _Reader(Path(path))
    z = reader.open()
    with z:
        meta = reader.metadata(z)
        params = reader.weights(z, meta)
        graph = reader.graph(z, meta, params)
    try:
        reader.check(graph, meta)
    except SlimfxError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed meta.json value that our comparisons trip on
        raise reader.fail(f"{META_MEMBER} is malformed ({type(e).__name__}: {e})", "save the model again") from e
    graph.metadata = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    graph.metadata["saved_with"] = {"slimfx_version": meta.get("slimfx_version"),
                                    "torch_version": meta.get("torch_version")}
    graph.metadata["symbolic_dims"] = meta["graph"].get("symbolic_dims", {})
    return graph


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a .slimfx file (checked like load_graph checks it), without reading the weights."""
    reader = _Reader(Path(path))
    with reader.open() as z:
        return reader.metadata(z)


def is_model_file(path: str | os.PathLike) -> bool:
    """True when `path` names a .slimfx file (by its suffix; the content is checked when it is loaded)."""
    return str(path).endswith(SUFFIX)


__all__ = ["save_graph", "load_graph", "read_metadata", "is_model_file", "FORMAT_VERSION", "SUFFIX",
           "quantization_records", "mask_records"]
