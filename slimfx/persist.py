"""slimfx.save / slimfx.load: a compiled model as one `.slimfx` file, read back without pickle.

    result = slimfx.compile(model, x, "prune50", data=data)
    slimfx.save(result, "pruned.slimfx")          # IR text + safetensors weights + JSON metadata
    g = slimfx.load("pruned.slimfx")              # an ir.Graph, verified
    slimfx.compile(g, recipe="int8", data=data)   # resume: continue from the saved IR
    # or: slimfx compile pruned.slimfx --recipe int8

The file format is ir/serialize.py's; this module adds what the driver knows (the recipe, the pass
history, the model's name) and imports the passes first, so ops they register can be read back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from slimfx import ir
from slimfx.ir.errors import ModelFileError
from slimfx.ir.serialize import SUFFIX, is_model_file, load_graph, read_metadata, save_graph


def history_entry(recipe: Any, passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One compile's record: the recipe's name and its passes with their options, and what each pass did."""
    from slimfx.driver import strict_json

    steps = list(getattr(recipe, "passes", []) or [])
    records = []
    for i, rec in enumerate(passes):
        options = steps[i][1] if i < len(steps) and steps[i][0] == rec.get("name") else {}
        records.append({"name": rec.get("name"), "options": options, "changed": rec.get("changed"),
                        "stats": rec.get("stats", {})})
    return strict_json({"recipe": getattr(recipe, "name", recipe), "passes": records})


def save(obj: Any, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write a compile result (`slimfx.compile(...)`'s CompileResult) or an ir.Graph as a `.slimfx` file.

    The file records the graph's `metadata`: after a compile, the model's name and the pass history (every
    recipe run on it, with options and stats, a resumed graph's earlier ones first); `metadata` adds keys.
    ModelFileError when the graph holds what a file cannot (module objects, non-torch functions in opaque
    nodes) or the name does not end in .slimfx."""
    from slimfx.driver import CompileResult, strict_json

    if isinstance(obj, CompileResult):
        graph = obj.graph
    elif isinstance(obj, ir.Graph):
        graph = obj
    else:
        raise ModelFileError(f"slimfx.save takes a CompileResult (what slimfx.compile returns) or an ir.Graph, "
                             f"got {type(obj).__name__}")
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ModelFileError(f"{path}: a slimfx model file's name ends in {SUFFIX} (e.g. model{SUFFIX}), so "
                             "commands that take a MODEL can tell it from a zoo name or Python spec")
    return save_graph(graph, path, metadata=strict_json(metadata or {}))


def load(path: str | os.PathLike) -> ir.Graph:
    """Read a `.slimfx` file into a verified ir.Graph (no pickle, no code run). `graph.metadata` holds the
    file's recipe, pass history and model name. ModelFileError naming the file when it cannot be read."""
    import slimfx.passes  # noqa: F401 - passes register the ops they create; the file may use them

    return load_graph(path)


def example_inputs(graph: ir.Graph, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs for a loaded graph, made from its stored input metas (floats standard normal, integer ids in
    range for the embeddings they feed)."""
    from slimfx.exporters import example_inputs as from_metas

    return from_metas(graph, batch=batch, seed=seed)


__all__ = ["save", "load", "read_metadata", "is_model_file", "example_inputs", "SUFFIX"]
