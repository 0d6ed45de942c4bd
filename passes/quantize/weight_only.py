"""`quantize-weights`: weight-only INT4 (or INT8) linears, exported as onnxruntime's MatMulNBits.

Each linear's weight W [N, K] is cut along K into blocks of `block_size`; each block of each output row
gets a float scale (and, asymmetric, a 4-bit zero point), and its values become `bits`-bit codes packed two
to a byte: the file holds about bits/32 of the float weight plus 4 (or 4.5) bytes per block. Embedding
tables become int8, or 4-bit block codes (`embeddings`, `embedding_bits`; GatherBlockQuantized); a table tied to
an LM head is stored once as block codes both read (gather_nbits and matmul_nbits on one initializer).
Activations stay float; onnxruntime dequantizes inside the kernel (accuracy_level 4: it also quantizes the
activation to int8 per block and multiplies in integers).

Rounding: `rtn` rounds each weight to the nearest code. `gptq` (Frantar et al. 2022) is data-aware: it
quantizes one input column at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian H = X^T X of the layer's inputs on the calibration data, so the
layer's output on such inputs moves least. Inputs are those of the float model (all layers at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from slimfx.ir import Graph, Node, Param, TensorMeta
from slimfx.ir.errors import PassError
from slimfx.ir.ops import pack_codes
from slimfx.passes.base import Pass, PassContext, PassResult, option, register_pass
from slimfx.passes.quantize.calibrate import calibration_batches, collect
from slimfx.passes.quantize.observers import qparams_from_range
from slimfx.passes.quantize.qdq import (
    check_skip,
    matches,
    quantizable_embeddings,
    quantize_embedding,
    through_noops,
)

Method = Literal["rtn", "gptq"]


@dataclass(frozen=True)
class StoredCodes:
    """A weight stored as block-quantized codes: the params matmul_nbits and gather_nbits read."""

    qweight: Param
    scales: Param
    zero_points: Param | None
    bits: int
    block_size: int
    k: int  # the weight's columns (input features; a table's embedding dim)
    nbytes: int


CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5


def block_qparams(w: torch.Tensor, bits: int, symmetric: bool, clip: float | torch.Tensor = 1.0,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (as float codes) per row of `w` [rows, block]: asymmetric spans [min, max] with
    codes 0..2^bits-1; symmetric puts 0 at code 2^(bits-1) and max|w| at the top code. `clip` (a scalar or
    one per row) shrinks that range: values beyond it saturate."""
    qmax = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = w.abs().amax(dim=1) * clip / (half - 1)
        zp = torch.full_like(scale, float(half))
    else:
        lo = w.amin(dim=1).clamp(max=0) * clip
        hi = w.amax(dim=1).clamp(min=0) * clip
        scale = (hi - lo) / qmax
        zp = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zp


def fitted_qparams(w: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_qparams` with the range clipped per row to the ratio in CLIP_GRID that minimises the rounding
    error sum_j importance_j (w_j - dequant(quant(w_j)))^2 (at 4 bits, clipping the largest weights a little
    buys finer steps for all the others; importance: the Hessian's diagonal, the input energy per column)."""
    best_err = best_scale = best_zp = None
    for clip in CLIP_GRID:
        scale, zp = block_qparams(w, bits, symmetric, clip)
        err = (w - (_codes(w, scale, zp, bits) - zp[:, None]) * scale[:, None]) ** 2
        err = (err * importance[None, :] if importance is not None else err).sum(dim=1)
        if best_err is None:
            best_err, best_scale, best_zp = err, scale, zp
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def _codes(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale[:, None]) + zp[:, None], 0, 2 ** bits - 1)


def _blocked(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """`w` [N, K] zero-padded along K to whole blocks, as [N * blocks, block]; and the number of blocks."""
    n, k = w.shape
    blocks = -(-k // block)
    return torch.nn.functional.pad(w, (0, blocks * block - k)).reshape(n * blocks, block), blocks


def rtn(w: torch.Tensor, bits: int, block: int, symmetric: bool, clip_search: bool = False,
        ) -> tuple[torch.Tensor, ...]:
    """Round to nearest: (codes [N, K padded], scales [N, blocks], zero points [N, blocks])."""
    n = w.shape[0]
    wp, blocks = _blocked(w, block)
    scale, zp = fitted_qparams(wp, bits, symmetric) if clip_search else block_qparams(wp, bits, symmetric)
    codes = _codes(wp, scale, zp, bits)
    return codes.reshape(n, -1), scale.reshape(n, blocks), zp.reshape(n, blocks)


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, block: int, symmetric: bool,
         damp: float = 0.01, clip_search: bool = False) -> tuple[torch.Tensor, ...]:
    """GPTQ rounding of `w` [N, K] given H = X^T X [K, K] of its inputs; same outputs as `rtn`.

    Columns are quantized in order of decreasing H_jj (act-order: the columns whose errors cost most go first,
    while the most columns remain to absorb them), each with its block's scale and zero point fitted up front
    to the original weights (static groups, so the stored blocks stay contiguous along K)."""
    n, k = w.shape
    w = w.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    wp, blocks = _blocked(w, block)
    if clip_search:
        col_weight = torch.nn.functional.pad(torch.diag(h), (0, blocks * block - k)).reshape(blocks, block)
        fitted = [fitted_qparams(w[:, b * block:(b + 1) * block], bits, symmetric,
                                 col_weight[b, :min(block, k - b * block)]) for b in range(blocks)]
        scales = torch.stack([s for s, _ in fitted], dim=1)
        zps = torch.stack([z for _, z in fitted], dim=1)
    else:
        scales, zps = (t.reshape(n, blocks) for t in block_qparams(wp, bits, symmetric))
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as e:  # pragma: no cover - damping keeps H positive definite
        raise PassError(f"quantize-weights: the calibration inputs' Hessian is singular ({e}); raise gptq_damp "
                        "or use method = 'rtn'") from e
    codes = torch.zeros(n, blocks * block, dtype=torch.float64)
    for i in range(k):
        col = int(order[i])
        scale, zp = scales[:, col // block], zps[:, col // block]
        q = _codes(w[:, i:i + 1], scale, zp, bits)[:, 0]
        codes[:, col] = q
        err = (w[:, i] - (q - zp) * scale) / hinv[i, i]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
    if blocks * block > k:  # padding codes: the zero point (they multiply nothing)
        codes[:, k:] = zps.repeat_interleave(block, dim=1)[:, k:]
    return codes, scales.float(), zps


def fold(nodes: list[Node]) -> None:
    """Export matmul_nbits / gather_nbits nodes in the folded form: their codes dequantized by ops onnxruntime folds
    at load, then fp32's MatMul / Gather."""
    for n in nodes:
        n.attrs = {**n.attrs, "form": "folded"}


@register_pass("quantize-weights")
@dataclass
class QuantizeWeights(Pass):
    """Weight-only low-bit linears: block-wise 4-bit (or 8-bit) weights, float activations (MatMulNBits)."""

    preserves_outputs = False

    bits: int = option(4, ge=4, le=8, help="weight bits: 4 (two codes a byte) or 8")
    block_size: int = option(32, ge=16, help=(
        "weights per scale along the input dimension: a power of two >= 16 (32, 64, 128: smaller is more "
        "accurate, larger is smaller)"))
    symmetric: bool = option(False, help=(
        "zero point fixed at the middle code (no zero points stored) instead of one per block fitted to its "
        "[min, max]"))
    method: Method = option("rtn", help=(
        "rtn: round each weight to the nearest code; gptq: data-aware rounding that spreads each column's "
        "error over the columns not yet quantized (uses calibration data; seconds on CPU for small models)"))
    clip_search: bool = option(True, help=(
        "fit each block's range: try clipping it to 100%..50% of max|w| and keep the ratio with the least "
        "rounding error (weighted by the layer's input energy per column with gptq); false: the full range"))
    gptq_damp: float = option(0.01, gt=0, le=1, help="gptq: damping added to the Hessian's diagonal, as a "
                                                     "fraction of its mean (typical 0.01)")
    accuracy_level: int = option(0, ge=0, le=4, help=(
        "onnxruntime's MatMulNBits compute type: 0 unset (float32), 1 fp32, 2 fp16, 3 bf16, 4 int8 (the "
        "activation is quantized per block too: fastest on CPU, a little less exact)"))
    embeddings: bool = option(True, help=(
        "also store embedding tables as integers (embedding_bits); a table tied to a linear (an LM head reading "
        "the token table) is stored once, block-wise at embedding_bits, and both read its codes"))
    embedding_bits: int = option(8, ge=4, le=8, help=(
        "tables' bits: 8, int8 with one symmetric scale per table (Gather + DequantizeLinear, as quantize does); "
        "4, block-wise 4-bit codes (block_size per scale; onnxruntime's GatherBlockQuantized). A tied table is "
        "block-wise at these bits either way, its head a MatMulNBits on the same codes"))
    min_features: int = option(16, ge=1, help=(
        "linears with fewer input features than this stay float, and tables with fewer columns (T5's relative "
        "position biases, one column a head): nothing to save there"))
    skip: list[str] = option([], help="layers kept float: node names, module paths (fnmatch globs) or op names")
    speed_guard: bool = option(True, help=(
        "time the model with MatMulNBits and with the folded form (the same stored codes dequantized by ops "
        "onnxruntime folds when it loads the file, then float MatMuls: fp32's speed, fp32's memory at run time) "
        "side by side with the float model on onnxruntime (1 thread, batch 1 and 32, the quantize speed guard's "
        "rule); keep MatMulNBits only where it is clearly faster than the folded form (and not slower than "
        "float), else the folded form (the file is as small either way). Needs a runtime "
        "(slimfx.compile with latency measurement; MatMulNBits otherwise, but 8-bit layers folded: onnxruntime "
        "has no fast 8-bit MatMulNBits CPU kernel; the stats say so); accuracy_level > 0 "
        "always keeps MatMulNBits (its int8 compute exists only there); false: MatMulNBits"))

    def validate(self) -> None:
        for name in ("bits", "embedding_bits"):
            if getattr(self, name) not in (4, 8):
                raise PassError(f"pass 'quantize-weights': {name} = {getattr(self, name)}; use 4 or 8")
        if self.block_size & (self.block_size - 1):
            raise PassError(f"pass 'quantize-weights': block_size = {self.block_size} is not a power of two; "
                            "use 32, 64 or 128")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.method == "gptq"

    def check_context(self, ctx: PassContext) -> str | None:
        from slimfx.passes.finetune import data_problem

        problem = data_problem(ctx.calibration_data, "calibration data")
        if self.method == "gptq" and problem:
            return (f"quantize-weights with method = 'gptq' rounds with the layers' inputs on calibration data, "
                    f"but {problem}: give an iterable of input tuples (a few hundred samples), or use method = 'rtn'")
        return None

    def check_graph(self, graph: Graph) -> str | None:
        return check_skip(graph, self.skip, pass_name="quantize-weights")

    def _eligible(self, graph: Graph, n: Node) -> bool:
        """A linear with a 2-D float weight param, enough input features, and a param (or no) bias."""
        if n.op != "linear" or not isinstance(n.inputs[1], Param) or matches(n, self.skip):
            return False
        w = graph.params[n.inputs[1].name]
        return w.dim() == 2 and w.is_floating_point() and w.shape[1] >= self.min_features \
            and (len(n.inputs) < 3 or n.inputs[2] is None or isinstance(n.inputs[2], Param))

    def tied_tables(self, graph: Graph) -> dict[str, list[Node]]:
        """Tables tied to linears (an LM head reading the token table, under the table's name or one of its
        own: Graph.param_aliases), stored once when `embeddings` is on: {table param: its readers}, when every
        reader is a lookup or a linear that could be quantized."""
        if not self.embeddings:
            return {}
        users, alias = graph.param_users(tied=True), graph.param_aliases()
        lookups = quantizable_embeddings(graph, skip=self.skip, tied_heads=True)
        out: dict[str, list[Node]] = {}
        for n in lookups:
            name = alias[n.inputs[1].name]
            readers = users[name]
            if name not in out and any(u.op == "linear" for u in readers) \
                    and all(self._eligible(graph, u) if u.op == "linear" else u in lookups for u in readers):
                out[name] = readers
        return out

    @staticmethod
    def tied(graph: Graph) -> list[Node]:
        """Linears whose weight another op reads too (under any of its names) and that stay float: a head tied
        to a table that is not stored once in integers (embeddings off, or the head skipped)."""
        users = graph.param_users(tied=True)
        return [n for n in graph if n.op == "linear" and isinstance(n.inputs[1], Param)
                and any(u is not n for u in users[n.inputs[1].name])]

    def targets(self, graph: Graph) -> list[Node]:
        tied = set(self.tied(graph))
        return [n for n in graph if n not in tied and self._eligible(graph, n)]

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        tables = self.tied_tables(graph)
        layers = self.targets(graph)
        embeds = [n for n in quantizable_embeddings(graph, skip=self.skip)
                  if graph.params[n.inputs[1].name].shape[-1] >= self.min_features] if self.embeddings else []
        if not layers and not embeds and not tables:
            return PassResult(False, {"quantized_layers": 0, "embeddings": 0})
        float_graph = graph.copy() if self.speed_guard and self.accuracy_level == 0 and ctx.measure_ms else None
        hessians = self._hessians(graph, layers, ctx) if self.method == "gptq" else {}
        before = after = 0
        for n in layers:
            w = graph.params[n.inputs[1].name].detach().float()
            before += w.numel() * 4
            if self.method == "gptq":
                codes, scales, zps = gptq(w, hessians[n.name], self.bits, self.block(w), self.symmetric,
                                          self.gptq_damp, self.clip_search)
            else:
                codes, scales, zps = rtn(w, self.bits, self.block(w), self.symmetric, self.clip_search)
            stored = self._store(graph, n.inputs[1].name, codes, scales, zps, self.bits)
            after += stored.nbytes
            self._replace(graph, n, stored)
        # a table and the head tied to it: one set of codes (rounded to the nearest, so the rows a lookup returns
        # are the table's own; GPTQ's compensation is for the head's inputs only), read by both
        for name, readers in tables.items():
            before += graph.params[name].numel() * 4
            stored = self._store_rounded(graph, name)
            after += stored.nbytes
            for u in readers:
                (self._replace if u.op == "linear" else self._lookup)(graph, u, stored)
        for n in embeds:
            w = graph.params[n.inputs[1].name]
            before += w.numel() * w.element_size()
            if self.embedding_bits == 8:
                after += w.numel()
                quantize_embedding(graph, n, qparams_from_range(w.min(), w.max(), torch.int8, symmetric=True,
                                                                qmin=-127, qmax=127))
                continue
            stored = self._store_rounded(graph, n.inputs[1].name)
            after += stored.nbytes
            self._lookup(graph, n, stored)
        graph.remove_unused_params()
        stats = {"quantized_layers": len(layers) + sum(u.op == "linear" for r in tables.values() for u in r),
                 "embeddings": len(embeds) + sum(u.op != "linear" for r in tables.values() for u in r),
                 "tied_tables": {k: [u.name for u in r] for k, r in tables.items()},
                 "tied_float": [n.name for n in self.tied(graph)], "method": self.method, "bits": self.bits,
                 "embedding_bits": self.embedding_bits, "block_size": self.block_size, "symmetric": self.symmetric,
                 "weight_bytes": {"before": before, "after": after}}
        if stats["quantized_layers"]:
            stats["speed_guard"] = self._choose_form(graph, float_graph, ctx)
            notes = [] if stats["speed_guard"].get("chosen") != "folded" else [
                stats["speed_guard"]["why"]]
            stats["notes"] = notes
        return PassResult(True, stats)

    def _choose_form(self, graph: Graph, float_graph: Graph | None, ctx: PassContext) -> dict:
        """MatMulNBits or the folded form for every matmul_nbits node (attr `form`), by timing both against the
        float model (passes/quantize/speed.py's rule); the report section."""
        from slimfx.passes.quantize import speed

        if float_graph is None:
            why = ("off (speed_guard = false)" if not self.speed_guard else
                   f"accuracy_level {self.accuracy_level}: only MatMulNBits computes in int8" if self.accuracy_level
                   else speed.UNTIMED)
            eight = [n for n in graph.find("matmul_nbits") if n.attrs["bits"] == 8]
            if self.speed_guard and not self.accuracy_level and eight:
                # untimed, 8-bit codes still go the folded way: onnxruntime 1.32 has no fast 8-bit MatMulNBits CPU
                # kernel (benchmarks/matmul_nbits_kernels.py: 2.6-39x of the float MatMul)
                codes = {n.inputs[1].name for n in eight}
                fold([*eight, *(n for n in graph.find("gather_nbits") if n.inputs[1].name in codes)])
                why += f"; {len(eight)} 8-bit layer(s) folded: MatMulNBits has no fast 8-bit CPU kernel"
            return {"chosen": "nbits", "why": why}
        folded = graph.copy()
        fold([*folded.find("matmul_nbits"), *folded.find("gather_nbits")])
        batches = list(speed.BATCHES)
        times = speed.interleaved_times(ctx.measure_ms, {"nbits": graph, "folded": folded, "float": float_graph},
                                        batches, speed.BUDGET_S, speed.ROUNDS)
        vs = {k: speed.compare(times, k, "float", batches) for k in ("nbits", "folded")}
        between = speed.compare(times, "nbits", "folded", batches)
        # the file is the same either way: MatMulNBits must earn its place by being clearly faster than the folded
        # form (which runs fp32's kernels), and not slower than fp32
        ruled_out = vs["nbits"].verdict == "slower" or bool(vs["nbits"].slower_at)
        chosen = "nbits" if between.verdict == "faster" and not ruled_out else "folded"
        ratios = {k: ", ".join(f"{r:.2f}x" for r in v.per_batch) for k, v in vs.items()}
        at = f"of fp32 at batch 1/32 on onnxruntime (1 thread; noise ±{vs['nbits'].spread:.2f})"
        why = (f"MatMulNBits {ratios['nbits']} {at}, the folded form {ratios['folded']}: MatMulNBits is clearly "
               "faster, kept (it also keeps the weights 4-bit in memory)" if chosen == "nbits" else
               f"MatMulNBits {ratios['nbits']} {at}, the folded form {ratios['folded']}: MatMulNBits is not clearly "
               "faster, so the file keeps the same 4-bit codes, dequantized when onnxruntime loads it (float MatMul)")
        if chosen == "folded":
            fold([*graph.find("matmul_nbits"), *graph.find("gather_nbits")])
        return {"mode": "measure", "batches": batches, "rule": speed.RULE, "chosen": chosen, "why": why,
                "model_ratio": {k: {f"b{b}": round(r, 3) for b, r in zip(batches, v.per_batch)} for k, v in vs.items()},
                "model_verdict": {k: v.to_dict(batches) for k, v in vs.items()},
                "nbits_vs_folded": between.to_dict(batches),
                "model_ms": {k: [[round(t, 4) for t in row] for row in v] for k, v in times.items()},
                "decisions": {"form": chosen}}

    def _hessians(self, graph: Graph, layers: list[Node], ctx: PassContext) -> dict[str, torch.Tensor]:
        """H = X^T X of each layer's input rows over the calibration data (float model)."""
        sources = {n.name: through_noops(n.inputs[0]).name for n in layers}
        acc: dict[str, torch.Tensor] = {}

        def sink(name: str, v: torch.Tensor) -> None:
            x = v.detach().reshape(-1, v.shape[-1]).double()
            acc[name] = acc.get(name, 0) + x.t() @ x

        collect(graph, calibration_batches(ctx), list(dict.fromkeys(sources.values())), sink, quiet=ctx.quiet)
        return {layer: acc[src] for layer, src in sources.items()}

    def block(self, w: torch.Tensor) -> int:
        """The block size for weight `w` [N, K]: `block_size`, or the least power of two (>= 16) that holds K
        when K is shorter (a longer block would only store padding codes)."""
        return min(self.block_size, max(16, 1 << (int(w.shape[1]) - 1).bit_length()))

    def _store_rounded(self, graph: Graph, name: str) -> StoredCodes:
        """A table's codes at embedding_bits, rounded to the nearest (RTN with the fitted ranges)."""
        w = graph.params[name].detach().float()
        return self._store(graph, name, *rtn(w, self.embedding_bits, self.block(w), self.symmetric,
                                             self.clip_search), self.embedding_bits)

    def _store(self, graph: Graph, base: str, codes: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor,
               bits: int) -> StoredCodes:
        """Add a weight's packed codes [N, K blocks, block bytes], scales [N, K blocks] (and packed zero points,
        asymmetric) to the params."""
        rows, blocks = scales.shape
        block = codes.shape[1] // blocks
        qweight = pack_codes(codes.to(torch.int16), bits).reshape(rows, blocks, block * bits // 8)
        qw = graph.add_param(f"{base}_q{bits}", qweight, buffer=True)
        sc = graph.add_param(f"{base}_s", scales.float().contiguous(), buffer=True)
        zp = None if self.symmetric else graph.add_param(f"{base}_z", pack_codes(zps.to(torch.int16), bits),
                                                         buffer=True)
        k = graph.params[base].shape[1]
        nbytes = sum(graph.params[p.name].numel() * graph.params[p.name].element_size() for p in (qw, sc, zp) if p)
        return StoredCodes(qw, sc, zp, bits, block, k, nbytes)

    def _replace(self, graph: Graph, n: Node, stored: StoredCodes) -> Node:
        """Put a matmul_nbits node reading `stored` in the linear's place."""
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        attrs = {"k": stored.k, "n": graph.params[stored.qweight.name].shape[0], "bits": stored.bits,
                 "block_size": stored.block_size, "accuracy_level": self.accuracy_level}
        new = graph.create_node("matmul_nbits", (n.inputs[0], stored.qweight, stored.scales, stored.zero_points, bias),
                                attrs, name=f"{n.name}_nbits", before=n, meta=TensorMeta(n.meta.shape, n.meta.dtype),
                                module_path=n.module_path)
        graph.replace_all_uses(n, new)
        graph.erase(n)
        graph.rename(new, n.name)
        return new

    def _lookup(self, graph: Graph, n: Node, stored: StoredCodes) -> Node:
        """Put a gather_nbits node reading `stored` in the embedding lookup's place."""
        new = graph.create_node("gather_nbits", (n.inputs[0], stored.qweight, stored.scales, stored.zero_points),
                                {"k": stored.k, "bits": stored.bits, "block_size": stored.block_size},
                                name=f"{n.name}_nbits", before=n, meta=TensorMeta(n.meta.shape, n.meta.dtype),
                                module_path=n.module_path)
        graph.replace_all_uses(n, new)
        graph.erase(n)
        graph.rename(new, n.name)
        return new
