"""Sweep of public architectures: does slimfx compile them with `cleanup` and `int8`, and how well?

Needs the third-party environment (`make venv-thirdparty`: torch 2.14.1, torchvision 0.29.1, timm):

    .venv-thirdparty/bin/python benchmarks/bench_third_party.py --resolution 64 --jobs 2 \
        --results benchmarks/results/third_party_64.jsonl --table docs/third_party_64.md
    .venv-thirdparty/bin/python benchmarks/bench_third_party.py --models resnet18,swin_t   # a few only

Models: every classification builder in `torchvision.models.list_models(module=torchvision.models)` with at
most --max-params parameters (from its weights' metadata; nothing is downloaded, weights=None), plus a timm
sample (pretrained=False). Random init; batch-norm statistics are randomised as in a trained network, so
folding them is not a no-op, and zero-initialised Linear layers (ViT's head) get random weights, or the
outputs would all be zero.

Per model (each in its own process, --timeout seconds at most; --jobs processes at once):
- input: --resolution (default: the model's own crop size from its weights' transforms); a model that does
  not run at that size in eager mode is run at its default size, and the row says which size it used;
- peer: `torch.onnx.export(..., dynamo=False)` wall time;
- cleanup: `slimfx.compile(model, (x,), recipe)` with the built-in recipe's passes and export tolerances but
  no accuracy gate (random weights have no accuracy to keep), ONNX only, no latency report; the row passes
  when the written model.onnx, run by onnxruntime on fresh inputs, is within --rtol (1e-4) of eager:
  max |onnx - eager| <= rtol x max |eager|;
- int8: the same with the `int8` recipe (calibrated on 8 random inputs); passes when onnxruntime runs the
  file and it agrees with slimfx's own fake-quant module (`result.module`): SQNR >= 25 dB on 8 inputs (the
  recipe's own export check, atol 0.25 / rtol 0.05 against the same module, passed too, or it would not
  have compiled). Top-1 agreement with the module and SQNR and agreement against eager are reported beside
  it; they are not judged: random-init logits are near ties, so one flip in 8 is quantization rounding.
- prune50 (with --recipes prune50): the `prune50` recipe's passes (fold-batchnorm, prune-channels 50% L2; no
  train data, so no fine-tune) on the captured graph, nothing exported: the row records MACs after over
  before (`prune50_macs`) and the conv layers' share of the original's MACs (`conv_share`). The table counts
  MACs <= 0.35 over the convolutional models (conv layers at least half the MACs).
Failures keep the exception's class and first line. Results append to --results (JSON lines); a model
already there at the same resolution is skipped (resume), so the sweep can run in pieces.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

# timm models: one per family the torchvision list does not already cover (or covers differently).
TIMM_SAMPLE = [
    "resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto", "mixer_s16_224",
    "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "regnetx_002", "ghostnet_100", "levit_128s",
    "poolformer_s12", "mobilevit_xxs", "edgenext_xx_small", "resmlp_12_224", "repvgg_a0", "cspresnet50",
]

CALIB_SAMPLES = 8
EVAL_SAMPLES = 8
INT8_MIN_SQNR_DB = 25.0
PRUNE50_MAX_MACS = 0.35  # issue 15's done-when for the convolutional models


# ---------------------------------------------------------------------------------------------- model list
def torchvision_entries(max_params: float) -> list[dict]:
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = torchvision.models.get_model_weights(name)
        first = next(iter(weights))
        params = first.meta.get("num_params", 0)
        if params > max_params:
            continue
        crop = getattr(first.transforms(), "crop_size", [224])
        out.append({"source": "torchvision", "name": name, "params": params, "default_res": int(crop[0])})
    return out


def timm_entries(names: list[str]) -> list[dict]:
    import timm

    out = []
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        res = cfg.input_size[-1] if cfg is not None else 224
        out.append({"source": "timm", "name": name, "params": None, "default_res": int(res)})
    return out


# builders whose input size is part of the architecture (position embeddings, fixed grids): at a reduced
# resolution they are built for it
SIZED = {"vit_": "image_size", "maxvit_": "input_size"}


def build(entry: dict, res: int | None = None):
    import torch

    torch.manual_seed(0)
    if entry["source"] == "torchvision":
        import torchvision

        kw = {"aux_logits": False, "init_weights": True} if entry["name"] in ("googlenet", "inception_v3") else {}
        for prefix, key in SIZED.items():
            if res is not None and res != entry["default_res"] and entry["name"].startswith(prefix):
                kw[key] = res if key == "image_size" else (res, res)
        model = torchvision.models.get_model(entry["name"], weights=None, **kw)
    else:
        import timm

        model = timm.create_model(entry["name"], pretrained=False)
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return randomize_zero_heads(model)


def randomize_zero_heads(model):
    """Give zero-initialised Linear layers random weights (std 0.02), in place; returns the model.

    ViT and MLP-Mixer builders (torchvision, timm) zero their classifier head, so a randomly initialised
    model outputs exact zeros for every input and any export "matches" eager: the check could not fail."""
    import torch

    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
    return model


# ---------------------------------------------------------------------------------------------- one model
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _ort_run(path: Path, xs: tuple | dict) -> list:
    import numpy as np
    import torch

    from slimfx.exporters import ort_session
    from slimfx.exporters.bench import ort_feed

    sess = ort_session(path, threads=torch.get_num_threads())
    if isinstance(xs, dict):
        feed = {i.name: xs[i.name].numpy() for i in sess.get_inputs()}
    else:
        feed = ort_feed(sess, xs)
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feed)]


def _recipe(name: str):
    from slimfx.recipe import Recipe, load_recipe

    base = load_recipe(name)
    v = base.validate
    # the recipe's passes and export tolerances (export file vs the IR); no accuracy gate on random weights
    return Recipe(name=f"{name}-sweep", description=base.description, passes=list(base.passes),
                  export={"formats": ["onnx"]}, validate={"atol": v.atol, "rtol": v.rtol})


def run_one(entry: dict, resolution: int | None, rtol: float, peer: bool = True,
            recipes: tuple[str, ...] = ("cleanup", "int8")) -> dict:
    import torch

    row = dict(entry)
    t0 = time.perf_counter()
    res = entry["default_res"] if resolution is None else min(resolution, entry["default_res"])
    try:
        try:
            model = build(entry, res)
        except Exception:  # noqa: BLE001 - not buildable for this size (MaxViT: grids divisible by 7): its own
            if res == entry["default_res"]:
                raise
            res = entry["default_res"]
            model = build(entry, res)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"build: {_first_line(e)}"
        return row
    if row["params"] is None:
        row["params"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        try:
            model(torch.randn(1, 3, res, res))
        except Exception:  # noqa: BLE001 - this size is too small for the architecture: its own size
            res = entry["default_res"]
            model = build(entry, res)
    row["res"] = res
    row["build_s"] = round(time.perf_counter() - t0, 2)
    gen = torch.Generator().manual_seed(1)
    row.update(check_model(model, lambda n: (torch.randn(n, 3, res, res, generator=gen),), rtol=rtol,
                           recipes=recipes, peer=peer))
    row["total_s"] = round(time.perf_counter() - t0, 2)
    return row


def check_model(model, make_inputs, rtol: float = 1e-4, recipes: tuple[str, ...] = ("cleanup", "int8"),
                peer: bool = True) -> dict:
    """Compile `model` (eval mode) with each recipe and check the written ONNX (see the module docstring).

    make_inputs(n) -> a tuple of input tensors with batch n, or a dict of keyword inputs (Hugging Face
    models; onnxruntime is fed by name). Returns the row: `{recipe}_ok`, `{recipe}_error`,
    timings and the agreement numbers. The third-party tests call this too, so CI and the sweep judge alike.
    """
    import torch

    import slimfx
    from slimfx.ir.metrics import compare

    row: dict = {}

    def call(m, inputs):
        return m(**inputs) if isinstance(inputs, dict) else m(*inputs)

    example = make_inputs(1)
    evals = make_inputs(EVAL_SAMPLES)
    with torch.no_grad():
        eager = call(model, evals)
    flat = [t for t in (eager.values() if isinstance(eager, dict) else
                        eager if isinstance(eager, (tuple, list)) else [eager]) if isinstance(t, torch.Tensor)]
    if flat and not any(t.float().any() for t in flat):
        # nothing to compare against: every export would match (a zero-initialised head; randomize_zero_heads)
        msg = "eager outputs are all zero for random inputs, so no comparison can fail (zero-initialised head?)"
        return {**{f"{r}_ok": False for r in recipes}, **{f"{r}_error": msg for r in recipes}}
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        tmp = Path(tmp)
        if peer:
            t = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    args = ((), example) if isinstance(example, dict) else example
                    torch.onnx.export(model, args, str(tmp / "peer.onnx"), dynamo=False)
                row["peer_export_s"] = round(time.perf_counter() - t, 2)
            except Exception as e:  # noqa: BLE001
                row["peer_error"] = _first_line(e)
        kwargs = example if isinstance(example, dict) else None
        validation = None if kwargs else (make_inputs(4), torch.zeros(4, dtype=torch.long))
        for recipe in recipes:
            if recipe.startswith("prune"):  # the pruned model computes something else: its MACs are the result
                row.update(_pruned_macs(model, example, recipe))
                continue
            calib = [make_inputs(1) for _ in range(CALIB_SAMPLES)] if recipe.startswith("int8") and not kwargs else None
            data = slimfx.Data(validation=validation, calibration=calib) if validation is not None else None
            t = time.perf_counter()
            try:
                result = slimfx.compile(model, () if kwargs else example, _recipe(recipe), data=data,
                                        example_kwargs=kwargs, out_dir=tmp / recipe,
                                        quiet=True, bench_seconds=0)
            except Exception as e:  # noqa: BLE001
                row[f"{recipe}_ok"] = False
                row[f"{recipe}_error"] = _first_line(e)
                row[f"{recipe}_s"] = round(time.perf_counter() - t, 2)
                if os.environ.get("BENCH_TP_TRACE"):
                    traceback.print_exc()
                continue
            row[f"{recipe}_s"] = round(time.perf_counter() - t, 2)
            try:
                got = _ort_run(result.exports["onnx"], evals)
            except Exception as e:  # noqa: BLE001
                row[f"{recipe}_ok"] = False
                row[f"{recipe}_error"] = f"onnxruntime: {_first_line(e)}"
                continue
            vs_eager = compare(eager, got)
            row[f"{recipe}_rel_eager"] = max((o.max_rel_diff for o in vs_eager.outputs.values()), default=0.0)
            row[f"{recipe}_sqnr_eager"] = _num(vs_eager.sqnr_db)
            row[f"{recipe}_agree_eager"] = vs_eager.top1_agreement
            if not recipe.startswith("int8"):
                rel = row[f"{recipe}_rel_eager"]
                ok = vs_eager.trustworthy is None and rel <= rtol
                row[f"{recipe}_ok"] = ok
                if not ok:
                    row[f"{recipe}_error"] = vs_eager.trustworthy or f"ONNX max relative diff {rel:.2g} > {rtol:g} of eager"
                continue
            with torch.no_grad():
                fq = call(result.module, evals)
            vs_fq = compare(fq, got)
            row[f"{recipe}_sqnr_fq"] = _num(vs_fq.sqnr_db)
            row[f"{recipe}_agree_fq"] = vs_fq.top1_agreement
            row[f"{recipe}_problem"] = vs_fq.trustworthy
            _judge_int8(row, recipe)
    return row


def _conv_macs(model, example: tuple | dict) -> int:
    """MACs of the model's nn.Conv1d/2d layers on `example` (batch 1), from forward hooks."""
    import torch

    total = 0

    def hook(m, args, out):
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    try:
        with torch.no_grad():
            model(**example) if isinstance(example, dict) else model(*example)
    finally:
        for h in hooks:
            h.remove()
    return total


def _pruned_macs(model, example: tuple | dict, recipe: str) -> dict:
    """MACs after the recipe's passes over the original's (`{recipe}_macs`), and the conv layers' share of the
    original's MACs (`conv_share`: which models count as convolutional). The passes run on the captured graph
    as compile runs them (no train data: prune50's fine-tune is skipped); nothing is exported."""
    import torch

    from slimfx import ir
    from slimfx.passes import PassContext, PassManager
    from slimfx.recipe import load_recipe

    t = time.perf_counter()
    row: dict = {}
    try:
        kwargs = example if isinstance(example, dict) else None
        g = ir.capture(model, () if kwargs else example, example_kwargs=kwargs)
        base = ir.count_macs(g)
        with torch.no_grad():
            run = PassManager(load_recipe(recipe).build_passes()).run(g, PassContext(example_inputs=example))
        row[f"{recipe}_macs"] = round(ir.count_macs(run.graph) / base, 4) if base else None
        row[f"{recipe}_ok"] = True
        row["conv_share"] = round(_conv_macs(model, example) / base, 3) if base else None
    except Exception as e:  # noqa: BLE001
        row[f"{recipe}_ok"] = False
        row[f"{recipe}_error"] = _first_line(e)
    row[f"{recipe}_s"] = round(time.perf_counter() - t, 2)
    return row


def _judge_int8(row: dict, recipe: str = "int8") -> None:
    """The int8 verdict from the row's numbers (also for rows written under an older criterion)."""
    if f"{recipe}_sqnr_fq" not in row and f"{recipe}_agree_fq" not in row:
        return  # it did not compile or run: the error stays
    sq = row.get(f"{recipe}_sqnr_fq")
    sq = math.inf if sq is None else sq  # None: identical outputs
    ok = not row.get(f"{recipe}_problem") and sq >= INT8_MIN_SQNR_DB
    row[f"{recipe}_ok"] = ok
    row.pop(f"{recipe}_error", None)
    if not ok:
        row[f"{recipe}_error"] = row.get(f"{recipe}_problem") or (
            f"ONNX vs fake-quant module: SQNR {sq:.1f} dB < {INT8_MIN_SQNR_DB:g} dB")


def _num(v: float) -> float | None:
    return round(v, 2) if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------- the sweep
def _child(entry: dict, args) -> dict | None:
    if not args.rerun and _key(entry, args.resolution) in _done_keys(args):
        return None  # another sweep process (--reverse) ran it meanwhile
    cmd = [sys.executable, __file__, "--one", json.dumps(entry), "--rtol", str(args.rtol),
           "--threads", str(args.threads)]
    if args.resolution:
        cmd += ["--resolution", str(args.resolution)]
    if args.no_peer:
        cmd += ["--no-peer"]
    cmd += ["--recipes", args.recipes]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**entry, "res": args.resolution, "error": f"timeout after {args.timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**entry, "res": args.resolution, "error": f"process exit {p.returncode}: {tail[:300]}",
                "total_s": round(time.perf_counter() - t, 1)}
    return json.loads(lines[-1])


def _done_keys(args) -> set[tuple]:
    recipes = args.recipes.split(",")
    return {_key(r, r.get("asked_res")) for r in load_rows(args.results) if _done(r, recipes)}


def _key(row: dict, resolution: int | None) -> tuple:
    return row["source"], row["name"], resolution


DEFAULT_RECIPES = ("cleanup", "int8")


def _merge(old: dict, new: dict) -> dict:
    """A later row of the same model replaces what it ran: the fields of its recipes (`recipes`; rows without
    it ran DEFAULT_RECIPES) and the model's own fields; an earlier row's other recipes stay."""
    ran = new.get("recipes") or DEFAULT_RECIPES
    out = {k: v for k, v in old.items() if not any(k.startswith(f"{r}_") for r in ran)}
    if "error" in old and set(old.get("error_recipes") or old.get("recipes") or DEFAULT_RECIPES) <= set(ran):
        out.pop("error", None)  # the earlier run's model-level failure (a timeout) was run again
        out.pop("error_recipes", None)
    elif "error" in old:
        out["error_recipes"] = old.get("error_recipes") or old.get("recipes") or list(DEFAULT_RECIPES)
    out.update(new)
    out["recipes"] = list(dict.fromkeys([*(old.get("recipes") or DEFAULT_RECIPES), *ran]))
    return out


def load_rows(path: Path) -> list[dict]:
    """The rows of a results file, one for each model and resolution: later rows merged into earlier ones
    (`_merge`), so a sweep with `--recipes prune50` adds its columns to the cleanup/int8 rows."""
    if not path.exists():
        return []
    merged: dict[tuple, dict] = {}
    for ln in path.read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            key = _key(r, r.get("asked_res"))
            merged[key] = _merge(merged[key], r) if key in merged else r
    for r in merged.values():
        _judge_int8(r)
    return list(merged.values())


def _done(row: dict, recipes: list[str]) -> bool:
    """The row has a result for each recipe (or the model failed as a whole: build error, timeout)."""
    return bool(row.get("error")) or all(f"{r}_ok" in row for r in recipes)


def _ran(row: dict, recipe: str) -> bool:
    """The row has a result for `recipe` (a model-level error counts for the recipes of that run)."""
    return f"{recipe}_ok" in row or (bool(row.get("error")) and recipe in (
        row.get("error_recipes") or row.get("recipes") or DEFAULT_RECIPES))


def _verdict(row: dict, recipe: str) -> str:
    return ("yes" if row.get(f"{recipe}_ok") else "**no**") if _ran(row, recipe) else "(not run)"


def table(rows: list[dict], title: str, missing: list[dict] = ()) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    rows = sorted(rows, key=lambda r: (r["source"] != "torchvision", r.get("params") or 0))
    prune = any("prune50_ok" in r for r in rows)
    lines = [f"# {title}", ""]
    for source in ("torchvision", "timm"):
        every = [r for r in rows if r["source"] == source]
        total = len(every) + sum(m["source"] == source for m in missing)
        if not total:
            continue
        group = [r for r in every if _ran(r, "cleanup") or _ran(r, "int8")]  # not rows of prune50 alone
        n = len(group)
        c = sum(bool(r.get("cleanup_ok")) for r in group)
        q = sum(bool(r.get("int8_ok")) for r in group)
        both = sum(bool(r.get("cleanup_ok") and r.get("int8_ok")) for r in group)
        lines.append(f"- {source}: {n} of {total} models run with cleanup and int8; of those, cleanup {c}/{n}, int8 {q}/{n}, both {both}/{n} "
                     f"({100 * both / max(n, 1):.0f}%)")
        pruned = [r for r in every if r.get("prune50_macs") is not None and (r.get("conv_share") or 0) >= 0.5]
        if pruned:
            low = sum(r["prune50_macs"] <= PRUNE50_MAX_MACS for r in pruned)
            lines.append(f"- {source}: prune50 MACs <= {PRUNE50_MAX_MACS} on {low} of {len(pruned)} convolutional models "
                         f"({100 * low / len(pruned):.0f}%; conv layers >= half the MACs)")
    lines += ["", "| source | model | params (M) | res | cleanup | rel. diff vs eager | int8 | agree vs fake-quant | "
              "SQNR vs fake-quant (dB) | agree vs eager | SQNR vs eager (dB) | torch.onnx.export (s) | "
              "slimfx cleanup (s) | slimfx int8 (s) |" + (" prune50 MACs | conv share |" if prune else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if prune else "")]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else ""
        lines.append(" | ".join([
            f"| {r['source']}", r["name"], params, str(r.get("res", "")),
            _verdict(r, "cleanup"), f(r.get("cleanup_rel_eager"), ".1e"), _verdict(r, "int8"), f(r.get("int8_agree_fq"), ".2f"), f(r.get("int8_sqnr_fq"), ".1f"),
            f(r.get("int8_agree_eager"), ".2f"), f(r.get("int8_sqnr_eager"), ".1f"), f(r.get("peer_export_s"), ".1f"),
            f(r.get("cleanup_s"), ".1f"), f(r.get("int8_s"), ".1f"),
            *([f(r.get("prune50_macs"), ".3f") if r.get("prune50_ok", True) else "**no**",
               f(r.get("conv_share"), ".2f")] if prune else [])]) + " |")
    if missing:
        lines += ["", f"Not run yet ({len(missing)}; the sweep resumes where it stopped): " +
                  ", ".join(f"{m['source']} `{m['name']}`" for m in missing)]
    failures = [r for r in rows if any(_ran(r, k) and not r.get(f"{k}_ok") for k in ("cleanup", "int8", "prune50"))]
    if failures:
        lines += ["", "Failures and their reasons:", ""]
        for r in failures:
            for k in ("error", "cleanup_error", "int8_error", "prune50_error", "peer_error"):
                if r.get(k):
                    what = {"error": "model", "cleanup_error": "cleanup", "int8_error": "int8",
                            "prune50_error": "prune50", "peer_error": "torch.onnx.export"}[k]
                    msg = str(r[k]).replace("|", "\\|").replace("\n", " ")
                    lines.append(f"- {r['source']} `{r['name']}` ({what}): {msg}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=None,
                    help="input height and width (at most the model's own; default: the model's own)")
    ap.add_argument("--models", default="", help="comma-separated names to run (default: all); a name that is "
                    "neither a torchvision builder nor in the timm sample is built with timm.create_model")
    ap.add_argument("--max-params", type=float, default=100e6)
    ap.add_argument("--no-timm", action="store_true")
    ap.add_argument("--no-torchvision", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="models compiled at once, each in its own process")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per model (default: cores / jobs)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    ap.add_argument("--rtol", type=float, default=1e-4, help="cleanup: ONNX vs eager, relative to max |eager|")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "third_party.jsonl",
                    help="JSON lines; models already there at this resolution are skipped")
    ap.add_argument("--table", type=Path, default=None, help="write the markdown table of --results here")
    ap.add_argument("--reverse", action="store_true",
                    help="largest models first (a second process on the same --results meets the first halfway)")
    ap.add_argument("--table-only", action="store_true", help="run nothing: write --table from --results")
    ap.add_argument("--rerun", action="store_true", help="run --models again even when --results has them")
    ap.add_argument("--no-peer", action="store_true", help="skip the torch.onnx.export timing")
    ap.add_argument("--recipes", default="cleanup,int8",
                    help="recipes to compile with, comma-separated: cleanup, int8, prune50 (MACs only)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads <= 0:
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))

    import torch

    torch.set_num_threads(args.threads)
    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one), args.resolution, args.rtol, not args.no_peer,
                                 tuple(args.recipes.split(",")))), flush=True)
        return 0

    entries = [] if args.no_torchvision else torchvision_entries(args.max_params)
    if not args.no_timm:
        entries += timm_entries(TIMM_SAMPLE)
    if args.models:
        wanted = args.models.split(",")
        known = {e["name"] for e in entries}
        entries = [e for e in entries if e["name"] in wanted]
        if not args.no_timm:  # other names: timm models beyond the sample
            entries += timm_entries([n for n in wanted if n not in known])
    done = set() if args.rerun else _done_keys(args)
    todo = sorted((e for e in entries if _key(e, args.resolution) not in done), key=lambda e: e["params"] or 0,
                  reverse=args.reverse)
    print(f"{len(entries)} models, {len(entries) - len(todo)} already in {args.results}, {len(todo)} to run "
          f"({args.jobs} at once, {args.threads} threads each)", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        todo = []
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_child, e, args): e for e in todo}
        for fut in cf.as_completed(futures):
            row = fut.result()
            if row is None:
                continue
            row["asked_res"] = args.resolution
            row["recipes"] = args.recipes.split(",")
            if row.get("error") and tuple(row["recipes"]) != DEFAULT_RECIPES:
                # a build error or timeout of these recipes only: the model's other results stay good
                err = row.pop("error")
                row.update({f"{r}_ok": False for r in row["recipes"]} | {f"{r}_error": err for r in row["recipes"]})
            with args.results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            status = "ok" if all(row.get(f"{r}_ok") for r in row["recipes"]) else "FAIL"
            what = " ".join(f"{r}={row.get(f'{r}_ok')}" + (f" ({row[f'{r}_macs']})" if f"{r}_macs" in row else "")
                            for r in row["recipes"])
            errors = [row.get("error")] + [row.get(f"{r}_error") for r in row["recipes"]]
            print(f"{status:4} {row['source']}/{row['name']} res={row.get('res')} {what} {row.get('total_s', '')}s "
                  f"{next((e for e in errors if e), '')}"[:300], flush=True)
    if args.table:
        rows = [r for r in load_rows(args.results) if r.get("asked_res") == args.resolution]
        res = "each model's default resolution" if args.resolution is None else \
            f"input {args.resolution}x{args.resolution} (or the model's own size when it needs it)"
        have = {(r["source"], r["name"]) for r in rows}
        missing = [e for e in entries if (e["source"], e["name"]) not in have]
        args.table.write_text(table(rows, f"Third-party sweep: {res}", missing))
        print(f"table: {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
