"""Latency measurement for ONNX models (onnxruntime, CPU) and torch modules, with explicit threading."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class LatencyStats:
    """Per-call latency in milliseconds: median and spread over `runs` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    runs: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms median (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}; "
                f"{self.runs} runs, {self.threads} thread{'s' if self.threads != 1 else ''})")


def ort_session(model: str | os.PathLike | bytes | Any, *, threads: int = 1):
    """An onnxruntime CPU session with explicit options: `threads` intra-op threads, one inter-op
    thread, all graph optimizations, sequential execution (what deployments and our numbers use)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])


def ort_feed(session: Any, inputs: tuple) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        from slimfx.ir.errors import ValidationError

        raise ValidationError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}) but "
                              f"{len(inputs)} were given")
    return {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            for n, x in zip(names, inputs)}


def _time_calls(call: Callable[[], Any], warmup: int | None, runs: int | None, budget_s: float,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(warmup if warmup is not None else (2 if first > 0.05 else 5)):
        call()
    if runs is None:
        t0 = time.perf_counter()
        call()
        one = max(time.perf_counter() - t0, 1e-6)
        runs = int(min(max(budget_s / one, 7), 2000))
    times = []
    for _ in range(runs):
        t0 = clock()
        call()
        times.append((clock() - t0) * 1e3)
    return times


def _stats(times: list[float], threads: int) -> LatencyStats:
    a = np.asarray(times)
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return LatencyStats(float(p50), float(p10), float(p90), float(p75 - p25), len(times), threads)


def measure_latency(model: str | os.PathLike | bytes | torch.nn.Module | Any, inputs: Any, *, threads: int = 1,
                    warmup: int | None = None, runs: int | None = None, budget_s: float = 0.8,
                    clock: str = "wall") -> LatencyStats:
    """Median and spread of one inference call, in ms.

    `model` is an ONNX file/bytes/ModelProto (run with onnxruntime, see `ort_session`) or a torch
    module (run under inference_mode with torch.set_num_threads(threads), restored afterwards).
    Without `runs`, the number of runs is chosen so the timed part takes about `budget_s`.
    `clock="cpu"` times the calling thread's CPU time instead of wall time: with one thread both
    runtimes compute on the calling thread, so this is the latency minus time spent descheduled,
    which makes comparisons stable on a busy machine.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError("clock='cpu' measures the calling thread only; use it with threads=1")
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if isinstance(model, torch.nn.Module):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                times = _time_calls(lambda: model(*inputs), warmup, runs, budget_s, timer)
        finally:
            torch.set_num_threads(prev)
        return _stats(times, threads)
    if isinstance(model, (str, Path)) and not Path(model).exists():
        raise FileNotFoundError(f"no ONNX file at {model}")
    sess = ort_session(model, threads=threads)
    feed = ort_feed(sess, inputs)
    times = _time_calls(lambda: sess.run(None, feed), warmup, runs, budget_s, timer)
    return _stats(times, threads)


def graph_latency_ms(graph: Any, inputs: list[tuple], budget_s: float = 0.05) -> list[float]:
    """Median milliseconds of one onnxruntime call (1 thread, thread CPU clock) of an IR graph exported to
    ONNX (once, dynamic batch), for each of `inputs` (e.g. batch 1 and 32), timed for about `budget_s` in all.
    What `PassContext.measure_ms` is when slimfx.compile runs passes (quantize's speed guard times with it)."""
    from slimfx.exporters.onnx import to_onnx_model

    sess = ort_session(to_onnx_model(graph, inputs=inputs[0]).SerializeToString())
    out = []
    for xs in inputs:
        feed = ort_feed(sess, xs)
        sess.run(None, feed)  # warm-up
        times: list[float] = []
        end = time.perf_counter() + budget_s / len(inputs)
        while len(times) < 3 or (time.perf_counter() < end and len(times) < 1000):
            t0 = time.thread_time()
            sess.run(None, feed)
            times.append((time.thread_time() - t0) * 1e3)
        out.append(float(np.median(times)))
    return out


def interleaved_latency(models: dict[str, Any], inputs: Any, *, rounds: int = 3, budget_s: float = 0.8,
                        threads: int = 1, clock: str = "wall", runs: int | None = None) -> dict[str, list[LatencyStats]]:
    """Latency of several models measured in turns: each round opens a fresh session per model, in an order
    that rotates from round to round; returns each model's per-round stats (`budget_s` or `runs` per
    measurement).

    Two onnxruntime sessions of the very same file can differ by more than 10% in median latency (memory
    placement, a busy neighbour), so a comparison built on one session per model is mostly noise; the best
    round of each (`best_median_ms`) is a steady estimate, and rounds run side by side share the machine's
    state."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, not {rounds}")
    out: dict[str, list[LatencyStats]] = {k: [] for k in models}
    items = list(models.items())
    for r in range(rounds):
        for label, model in items[r % len(items):] + items[:r % len(items)]:
            out[label].append(measure_latency(model, inputs, threads=threads, budget_s=budget_s, clock=clock,
                                              runs=runs))
    return out


@dataclass
class LatencySummary:
    """One model at one batch size, measured side by side with others: the best round's median (interference
    only adds time) and the spread: p10/p90 of that round's calls and the range of the rounds' medians."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    rounds: int
    runs: int
    round_medians_ms: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": round(self.median_ms, 4), "p10_ms": round(self.p10_ms, 4),
                "p90_ms": round(self.p90_ms, 4), "rounds": self.rounds, "runs": self.runs,
                "round_medians_ms": [round(m, 4) for m in self.round_medians_ms]}


def _runner(model: Any, threads: int) -> Callable[[tuple], Callable[[], Any]]:
    """model -> a function of inputs giving a zero-argument call (a fresh onnxruntime session per model per
    round, shared by its batch sizes; a torch module runs under inference_mode)."""
    if isinstance(model, torch.nn.Module):
        def bind(inputs: tuple) -> Callable[[], Any]:
            def call() -> Any:
                with torch.inference_mode():
                    return model(*inputs)
            return call
        return bind
    sess = ort_session(model, threads=threads)

    def bind_ort(inputs: tuple) -> Callable[[], Any]:
        feed = ort_feed(sess, inputs)
        return lambda: sess.run(None, feed)
    return bind_ort


def latency_side_by_side(models: dict[str, Any], inputs: dict[str, tuple], *, total_budget_s: float,
                         max_rounds: int = 3, threads: int = 1, min_runs: int = 2,
                         progress: Callable[[], None] | None = None) -> dict[str, dict[str, LatencySummary]]:
    """Latency of several models (ONNX paths/bytes or torch modules) at several inputs (e.g. {"b1": ..,
    "b32": ..}), measured in turns within one total time budget.

    Each round visits every model (in an order that rotates) and times each input: one warm-up call, then
    as many timed calls as the round's share of the budget allows (at least `min_runs`). After the first
    round, further rounds run only while the budget lasts, so a large model gets fewer rounds, never a
    longer wait; the summary says how many. Best-round medians compare well even on a busy machine
    (two onnxruntime sessions of one file can differ by more than 10%).

    The first input is always measured. A later one that one round of every model could not fit into the
    whole budget is left out: its key is missing from every model's results (see `unmeasured_inputs`). That
    is told from one call on an eighth of its rows where that clearly shows it (`_clearly_over`), else
    from its first warm-up call.
    """
    import math

    if not models or not inputs:
        return {}
    t_start = time.perf_counter()
    share = total_budget_s / (max_rounds * len(models) * len(inputs))
    per: dict[str, dict[str, list[list[float]]]] = {m: {k: [] for k in inputs} for m in models}
    first_key, skipped = next(iter(inputs)), set()
    items = list(models.items())
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for r in range(max_rounds):
            t_round = time.perf_counter()
            for name, model in items[r % len(items):] + items[:r % len(items)]:
                bind = _runner(model, threads)
                for key, ins in inputs.items():
                    if key in skipped:
                        continue
                    later = key != first_key and not per[name][key]
                    if later and _clearly_over(bind, ins, (1 + min_runs) * len(models), total_budget_s):
                        skipped.add(key)
                        continue
                    call = bind(ins)
                    t0 = time.perf_counter()
                    call()
                    one = max(time.perf_counter() - t0, 1e-6)
                    if later and one * (1 + min_runs) * len(models) > total_budget_s:
                        skipped.add(key)
                        continue
                    n = int(min(max(share / one, min_runs), 2000))
                    times = []
                    for _ in range(n):
                        t0 = time.perf_counter()
                        call()
                        times.append((time.perf_counter() - t0) * 1e3)
                    per[name][key].append(times)
                    if progress is not None:
                        progress()
            elapsed, this_round = time.perf_counter() - t_start, time.perf_counter() - t_round
            if elapsed + this_round > total_budget_s * 1.05:
                break
    finally:
        torch.set_num_threads(torch_threads)
    out: dict[str, dict[str, LatencySummary]] = {}
    for name, by_key in per.items():
        out[name] = {}
        for key, rounds in by_key.items():
            if key in skipped:
                continue
            medians = [float(np.median(t)) for t in rounds]
            best = rounds[int(np.argmin(medians))]
            p10, p90 = np.percentile(best, [10, 90])
            out[name][key] = LatencySummary(min(medians), float(p10), float(p90), len(rounds),
                                            sum(len(t) for t in rounds), medians)
    assert all(math.isfinite(v.median_ms) for d in out.values() for v in d.values())
    return out


def _clearly_over(bind: Callable[[tuple], Callable[[], Any]], inputs: tuple, calls: int, budget_s: float) -> bool:
    """Whether `calls` calls at `inputs` clearly cannot fit `budget_s`, told from one call on an eighth of
    their rows (every tensor input batched at dim 0, 16 rows or more): its time scaled to all rows, halved
    for what batching saves, exceeds the budget. A ResNet-18 at batch 32 on one thread takes a second and
    more; this spends an eighth of that. False when unsure (the caller then times a full call)."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    rows = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0
    if rows < 16 or any(t.dim() == 0 or t.shape[0] != rows for t in tensors):
        return False
    part = rows // 8
    try:
        call = bind(tuple(t[:part] if isinstance(t, torch.Tensor) else t for t in inputs))
        t0 = time.perf_counter()
        call()
    except Exception:  # noqa: BLE001 - a model that takes no other row count: time a full call instead
        return False
    return (time.perf_counter() - t0) * (rows / part) / 2 * calls > budget_s


def unmeasured_inputs(results: dict[str, dict[str, LatencySummary]], inputs: Iterable[str]) -> list[str]:
    """The inputs `latency_side_by_side` left out because one round of them would not fit its budget."""
    return [k for k in inputs if not any(k in by_key for by_key in results.values())]


def best_median_ms(rounds: list[LatencyStats]) -> float:
    """The best round's median: interference only ever adds time."""
    return min(s.median_ms for s in rounds)


def onnx_input_specs(model: str | os.PathLike | Any) -> list[tuple[str, torch.dtype, list[int | str | None]]]:
    """(name, dtype, dims) of each input of an ONNX file or ModelProto (initializers left out); a dim is its
    size, its symbol (`dim_param`) or None when the file says nothing about it."""
    import onnx
    from onnx import helper

    proto = model if hasattr(model, "graph") else onnx.load(str(model), load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tt.shape.dim]
        out.append((vi.name, torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(tt.elem_type))).dtype,
                    dims))
    return out


def example_sizes(model: str | os.PathLike | Any) -> dict[str, int]:
    """The sizes of the symbolic dims in the example a slimfx ONNX file was exported from (its metadata), the
    batch left out; {} for other files."""
    import json

    import onnx

    proto = model if hasattr(model, "graph") else onnx.load(str(model), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == "slimfx.example_sizes":
            try:
                return {k: int(v) for k, v in json.loads(prop.value).items() if k != "batch" and int(v) > 0}
            except (ValueError, TypeError, AttributeError):
                return {}
    return {}


def onnx_example_inputs(model: str | os.PathLike | Any, batch: int = 1, seed: int = 0,
                        sizes: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs for an ONNX file from its declared input types: a dynamic dim 0 (the batch, whatever the file names
    it) gets `batch`; another dynamic dim gets its size from `sizes` (by the file's name for it), else the size of
    the example the file was exported from (kept in its metadata by slimfx). A dynamic dim of no known size is a
    ValidationError naming it: it is never guessed (a sequence given the batch size would time another model).
    Floats are standard normal, integers are zeros (valid indices for any embedding)."""
    from slimfx.ir.errors import ValidationError

    known = {**example_sizes(model), **(sizes or {})}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, dt, dims in onnx_input_specs(model):
        shape = []
        for k, d in enumerate(dims):
            if isinstance(d, int):
                shape.append(d)
            elif d in known:
                shape.append(known[d])
            elif k == 0:
                shape.append(batch)
            else:
                what = repr(d) if d else "unnamed"
                raise ValidationError(
                    f"input {name!r} has a dynamic dim {k} ({what}) whose size the file does not say"
                    + (f"; give it with `slimfx bench --size {d}=N` (sizes={{{d!r}: N}} in Python), e.g. N = 128 "
                       "for a sequence length" if d else
                       "; re-export the file with that dim named or fixed"))
        out.append(torch.randn(shape, generator=gen).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt))
    return tuple(out)
