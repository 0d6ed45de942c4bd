"""Pass scaling benchmark: dce, cse, fold-batchnorm, remove-identity and a pattern pass on synthetic
graphs of 1k, 10k and 50k nodes, and collapse-requantize on a quantize/dequantize chain of the same sizes. Reports milliseconds per 1k nodes (must stay flat: no quadratic behaviour), the 10k-node
total (acceptance: under 2 s), ir.verify's cost, and torch.fx's own dead-code elimination and
subgraph_rewriter on the same graphs (lowered) as peers measured in the same run.

Then the instrumentation overhead on the 10k-node graph: the five passes as one PassManager pipeline with
no instrumentation, with the verifier, with the verifier and the numerics check, and with the defaults
(plus failure dumps), and the defaults with check_every_pass=True (the checks after every pass instead of
once after the run of rewrites). Acceptance: verify + numerics cost no more than the passes themselves.

    PYTHONPATH=. python benchmarks/bench_passes.py [--sizes 1000 10000 50000] [--no-peers]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import math
import pstats
import sys
import time

import torch
import torch.fx as fx
from tqdm import tqdm

from slimfx import ir
from slimfx.ir import Graph, TensorMeta
from slimfx.passes import PassContext, PassManager, PatternPass, create_pass, register_pass
from slimfx.passes.quantize.qdq import collapse_requantize

NODES_PER_BLOCK = 11


@register_pass("bench-fuse-silu")
class FuseSilu(PatternPass):
    """x * sigmoid(x) -> silu(x) (the docs example)."""

    pattern = staticmethod(lambda x: x * torch.sigmoid(x))

    def replace(self, graph, match):
        return match.insert("silu", (match["x"],))


def build(n_nodes: int, channels: int = 4) -> Graph:
    """A chain of blocks: conv -> batch_norm -> x*sigmoid(x) -> relu twice (a CSE duplicate) -> add -> x+0
    (a no-op) -> x*0.5, plus two dead nodes per block. Tiny tensors: this measures the passes, not arithmetic."""
    g = Graph()
    meta = TensorMeta((1, channels, 2, 2), torch.float32)
    v = g.create_node("input", name="x", meta=meta)
    gen = torch.Generator().manual_seed(0)
    for i in range((n_nodes - 2) // NODES_PER_BLOCK):
        w = g.add_param(f"b{i}.conv.weight", torch.randn(channels, channels, 1, 1, generator=gen) * 0.5)
        stats = [g.add_param(f"b{i}.bn.{k}", t, buffer=k.startswith("running")) for k, t in (
            ("running_mean", torch.randn(channels, generator=gen) * 0.1),
            ("running_var", torch.rand(channels, generator=gen) + 0.5),
            ("weight", torch.rand(channels, generator=gen) + 0.5), ("bias", torch.randn(channels, generator=gen)))]
        c = g.create_node("conv2d", (v, w, None), dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
                          name=f"conv{i}", meta=meta)
        b = g.create_node("batch_norm", (c, *stats, None), dict(eps=1e-5, momentum=0.1, training=None), meta=meta)
        s = g.create_node("sigmoid", (b,), meta=meta)
        y = g.create_node("mul", (b, s), meta=meta)
        r1 = g.create_node("relu", (y,), meta=meta)
        r2 = g.create_node("relu", (y,), meta=meta)
        a = g.create_node("add", (r1, r2), meta=meta)
        d = g.create_node("tanh", (a,), meta=meta)      # dead
        g.create_node("exp", (d,), meta=meta)           # dead
        z = g.create_node("add", (a, 0.0), meta=meta)   # a no-op for remove-identity
        v = g.create_node("mul", (z, 0.5), meta=meta)   # keeps values small along the chain
    g.set_outputs(v)
    return g


def build_qdq(n_nodes: int, channels: int = 4) -> Graph:
    """A chain of quantized blocks: dequantize -> quantize with the same params (a round trip that
    collapse-requantize drops) -> dequantize -> relu -> quantize, five nodes per block."""
    g = Graph()
    fmeta, qmeta = TensorMeta((1, channels), torch.float32), TensorMeta((1, channels), torch.uint8)
    v = g.create_node("input", name="x", meta=fmeta)
    qp = {"dtype": torch.uint8, "axis": None}
    s, z = g.add_param("s", torch.tensor(0.05), buffer=True), g.add_param("z", torch.tensor(0, dtype=torch.uint8))
    v = g.create_node("quantize", (v, s, z), qp, meta=qmeta)
    for i in range((n_nodes - 3) // 5):
        s2 = g.add_param(f"s{i}", torch.tensor(0.05), buffer=True)  # equal values, separate params
        d = g.create_node("dequantize", (v, s, z), {"axis": None}, meta=fmeta)
        q = g.create_node("quantize", (d, s2, z), qp, meta=qmeta)
        d2 = g.create_node("dequantize", (q, s2, z), {"axis": None}, meta=fmeta)
        r = g.create_node("relu", (d2,), meta=fmeta)
        v = g.create_node("quantize", (r, s, z), qp, meta=qmeta)
    g.set_outputs(v)
    return g


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is what the pass costs; wall time also
    counts waiting for the 2 cores other jobs share."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def count_calls(p, graph: Graph, ctx: PassContext) -> int:
    """Python function calls a pass makes: a load-independent measure of its work."""
    return _count(lambda: p.run(graph, ctx))


def _count(fn) -> int:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return pstats.Stats(prof, stream=io.StringIO()).total_calls


def peer_rewrite(gm: fx.GraphModule) -> None:
    def pattern(x):
        return x * torch.sigmoid(x)

    def replacement(x):
        return torch.nn.functional.silu(x)

    fx.subgraph_rewriter.replace_pattern(gm, pattern, replacement)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--repeat", type=int, default=3, help="time each pass this many times, keep the best")
    ap.add_argument("--no-peers", action="store_true", help="skip torch.fx's DCE and subgraph_rewriter")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ["dce", "cse", "fold-batchnorm", "remove-identity", "bench-fuse-silu"]
    ctx = PassContext()
    FuseSilu.compiled_pattern()  # trace the pattern once, outside the timings
    rows = []
    calls: dict[tuple[str, int], float] = {}
    for size in tqdm(args.sizes, desc="graph sizes", disable=not sys.stderr.isatty()):
        g = build(size)
        n = len(g)
        row: dict = {"nodes": n}
        for name in names:
            times, out = [], {}
            for _ in range(args.repeat):  # best of N: other processes share this machine
                work = g.copy()
                pm = PassManager([create_pass(name)], verify_each=False)
                times.append(timed(lambda pm=pm, work=work, out=out: out.update(graph=pm.run(work, ctx).graph)))
            row[name] = min(times)  # best wall time (and its CPU time)
            ir.verify(out["graph"])  # the graph after the pass (a pass may return a new one)
            calls[(name, n)] = count_calls(create_pass(name), g.copy(), ctx) / n
        q = build_qdq(size)
        qtimes = []
        for _ in range(args.repeat):
            work = q.copy()
            qtimes.append(timed(lambda work=work: collapse_requantize(work)))
        row["collapse-requantize"] = min(qtimes)
        work = q.copy()
        calls[("collapse-requantize", n)] = _count(lambda work=work: collapse_requantize(work)) / len(q)
        importlib.import_module("slimfx.ir.verify")._SHAPE_CACHE.clear()  # cold: as on a freshly captured model
        row["verify(first)"] = timed(lambda g=g: ir.verify(g))
        row["verify(again)"] = timed(lambda g=g: ir.verify(g))
        if not args.no_peers:
            gm = ir.lower(g)
            row["fx dce"] = timed(gm.graph.eliminate_dead_code)
            gm = ir.lower(g)
            nan = (float("nan"), float("nan"))  # quadratic: 50k nodes would take many minutes
            row["fx rewriter"] = timed(lambda gm=gm: peer_rewrite(gm)) if n <= 10_500 else nan
        rows.append(row)

    cols = [c for c in rows[0] if c != "nodes"]
    for label, k in (("CPU", 1), ("wall-clock", 0)):
        print(f"\n{label} ms per 1k nodes (flat across sizes = linear scaling)")
        print(f"{'nodes':>7} " + " ".join(f"{c:>16}" for c in cols))
        for r in rows:
            print(f"{r['nodes']:>7} " + " ".join(f"{1e3 * r[c][k] / (r['nodes'] / 1e3):>16.2f}" for c in cols))
    print("(passes run through PassManager(verify_each=False), best of --repeat; verify(first) is the "
          "meta-shape check on a cold cache, verify(again) with every signature cached)")
    first, last = rows[0], rows[-1]
    print(f"\ngrowth of CPU ms/1k nodes from {first['nodes']} to {last['nodes']} nodes "
          "(1.0 = perfectly linear; 50 would be quadratic):")
    for c in names + ["collapse-requantize", "verify(first)"]:
        print(f"  {c:16} x{(last[c][1] / last['nodes']) / (first[c][1] / first['nodes']):.2f}")
    print("\nPython function calls per node (deterministic, unaffected by machine load; flat = linear):")
    counted = names + ["collapse-requantize"]
    print(f"{'nodes':>7} " + " ".join(f"{c:>19}" for c in counted))
    for r in rows:
        print(f"{r['nodes']:>7} " + " ".join(f"{calls[(c, r['nodes'])]:>19.1f}" for c in counted))
    ten = min(rows, key=lambda r: abs(r["nodes"] - 10_000))
    wall, cpu = (sum(ten[c][k] for c in names) for k in (0, 1))
    total = cpu  # the budget is the passes' own cost; wall time also measures the machine's other jobs
    print(f"\n{ten['nodes']}-node graph through {' + '.join(names)}: {cpu:.3f} s CPU "
          f"({'under' if cpu < 2 else 'OVER'} the 2 s budget), {wall:.3f} s wall-clock")
    if not args.no_peers:
        fx_dce, fx_rw = ten["fx dce"][1], ten["fx rewriter"][1]
        print(f"peers at {ten['nodes']} nodes (CPU): torch.fx eliminate_dead_code {fx_dce:.3f} s vs slimfx dce "
              f"{ten['dce'][1]:.3f} s; torch.fx subgraph_rewriter {fx_rw:.3f} s vs slimfx pattern pass "
              f"{ten['bench-fuse-silu'][1]:.3f} s (x{fx_rw / ten['bench-fuse-silu'][1]:.0f})")
    overhead_ok = pipeline_overhead(build(min(args.sizes, key=lambda s: abs(s - 10_000))), names, args.repeat)
    return 0 if total < 2 and overhead_ok else 1


def pipeline_overhead(g: Graph, names: list[str], repeat: int) -> bool:
    """The five passes as one pipeline, with each set of instrumentations (best CPU seconds of `repeat`)."""
    x = (torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)),)
    configs = {"passes only": dict(verify_each=False, failure_dumps=False),
               "+ verify": dict(failure_dumps=False),
               "+ verify + numerics": dict(check_numerics=1e-5, failure_dumps=False),
               "+ failure dumps (defaults)": dict(check_numerics=1e-5),
               "defaults, check_every_pass": dict(check_numerics=1e-5, check_every_pass=True)}
    cpu = {}
    ir.verify(g)  # verify's shape cache warm, as after a session's first check of the model (capture, export)
    for label, kw in configs.items():
        best = math.inf
        for _ in range(repeat):
            work = g.copy()
            pm = PassManager(names, **kw)
            best = min(best, timed(lambda pm=pm, work=work: pm.run(work, PassContext(example_inputs=x)))[1])
        cpu[label] = best
    base = cpu["passes only"]
    print(f"\npipeline {' -> '.join(names)} on {len(g)} nodes, CPU seconds (best of {repeat}):")
    for label, c in cpu.items():
        print(f"  {label:28} {c:7.3f} s" + (f"   overhead {c - base:+.3f} s = {(c - base) / base:.2f} x the passes"
                                              if label != "passes only" else ""))
    ok = cpu["+ verify + numerics"] - base <= base
    print(f"verify + numerics overhead {'within' if ok else 'OVER'} the passes' own cost")
    return ok


if __name__ == "__main__":
    sys.exit(main())
