"""Reports: the before/after table for the terminal and report.md, and the accuracy/latency/size plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt_int(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "-"


def _fmt_bytes(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v / 1024:.1f} KiB" if v < 1024 * 1024 else f"{v / 1024 / 1024:.2f} MiB"


def _fmt_ms(v: Any) -> str:
    return f"{v:.3f} ms" if isinstance(v, (int, float)) else "-"


def _fmt_acc(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "n/a"


def _ratio(a: Any, b: Any) -> str:
    return f"{b / a:.3f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """[metric, original, compiled, ratio] rows of the before/after table."""
    b, c = report["baseline"], report["compressed"]
    rows = [
        ["params", _fmt_int(b["params"]), _fmt_int(c["params"]), _ratio(b["params"], c["params"])],
        ["MACs per input", _fmt_int(b["macs"]), _fmt_int(c["macs"]), _ratio(b["macs"], c["macs"])],
        ["ONNX file", _fmt_bytes(b["size_bytes"]), _fmt_bytes(c["size_bytes"]),
         _ratio(b["size_bytes"], c["size_bytes"])],
    ]
    for key, label in (("b1", "latency b1 (ORT, 1 thread)"), ("b32", "latency b32 (ORT, 1 thread)")):
        lb, lc = (b["latency_ms"] or {}).get(key), (c["latency_ms"] or {}).get(key)
        rows.append([label, _fmt_ms(lb), _fmt_ms(lc), _ratio(lb, lc)])
    acc_delta = (f"{100 * (c['accuracy'] - b['accuracy']):+.2f} pt"
                 if isinstance(b["accuracy"], float) and isinstance(c["accuracy"], float) else "-")
    data = report.get("data", {})
    acc_split = data.get("accuracy_split")
    rows.append([f"accuracy ({acc_split} data)" if acc_split else "accuracy (no labelled data)",
                 _fmt_acc(b["accuracy"]), _fmt_acc(c["accuracy"]), acc_delta])
    v = report["validation"]
    on = f" ({v.get('split', '?')} data)"
    rows.append(["top-1 agreement" + on, "", _fmt_acc(v["top1_agreement"]), ""])
    sqnr = "exact" if v.get("exact") else (f"{v['sqnr_db']:.1f} dB" if isinstance(v.get("sqnr_db"), (int, float))
                                           else "-")
    rows.append(["SQNR vs original" + on, "", sqnr, ""])
    rows.append(["max abs diff" + on, "", f"{v['max_abs_diff']:.3g}", ""])
    return rows


_WEIGHTS = {"float": "float", "int8": "int8, dequantized in the graph", "fake-quant": "FAKE-QUANT: float tensors"}


def export_rows(report: dict[str, Any]) -> list[list[str]]:
    """[file, size, weights, latency b1, latency b32, runtime] per exported file: what each file holds
    (float weights, real int8 tensors, or fake-quant floats) and how fast it runs."""
    rows = []
    for e in report.get("exports", {}).values():
        lat = e.get("latency_ms") or {}
        rows.append([e.get("path", "?"), _fmt_bytes(e.get("size_bytes")),
                     _WEIGHTS.get(e.get("weights"), e.get("weights") or "-"), _fmt_ms(lat.get("b1")),
                     _fmt_ms(lat.get("b32")), e.get("runtime") or ("-" if e.get("format") != "slimfx" else
                                                                      "(model file: slimfx.load / compile)")])
    return rows


def headline_lines(report: dict[str, Any]) -> list[str]:
    """What a reader must know before trusting the table: the gate's verdict, skipped steps, weak data."""
    lines = []
    gate = report.get("gate")
    if gate is not None:
        lines.append("gate: passed" if gate["passed"] else "gate: FAILED")
        lines += [f"  - {f}" for f in gate.get("failures", [])]
    lines += [f"note: {h}" for h in report.get("headline", [])]
    return lines


def _table(headers: list[str], rows: list[list[str]], markdown: bool, right: set[int] | None = None) -> str:
    """A text (aligned) or markdown table; `right`: the columns to right-align (default: all but the first)."""
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    right = set(range(1, len(headers))) if right is None else right
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _stats_text(stats: dict[str, Any], limit: int = 6) -> str:
    items = [(k, v) for k, v in stats.items() if isinstance(v, (int, float, str, bool))]
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])
    return text + (", ..." if len(items) > limit else "")


def format_report(report: dict[str, Any], *, markdown: bool = False) -> str:
    """The before/after table and the per-pass times and stats."""
    head = headline_lines(report)
    parts = ["\n".join(f"- {h}" if markdown and not h.startswith("  ") else h for h in head)] if head else []
    parts.append(_table(["", "original", "compiled", "ratio"], summary_rows(report), markdown))
    erows = export_rows(report)
    if erows:
        parts.append(_table(["file", "size", "weights", "latency b1", "latency b32", "runtime"], erows, markdown,
                            right={1, 3, 4}))
    if report.get("passes"):
        prow = [[p["name"], f"{p['seconds']:.2f} s", _stats_text(p.get("stats", {}))] for p in report["passes"]]
        parts.append(_table(["pass", "time", "stats"], prow, markdown, right={1}))
    for w in report.get("warnings", []):
        parts.append(f"warning: {w}")
    return "\n\n".join(parts)


def plot_stages(stages: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy against latency (batch 32, or batch 1 when 32 was not measured) and against file size, one
    point per stage."""
    batch = "32" if any(s.get("latency_b32_ms") is not None for s in stages) else "1"
    pts = [s for s in stages if s.get(f"latency_b{batch}_ms") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    have_acc = any(s.get("accuracy") is not None for s in pts)
    markers = "osD^v<>ph*X"
    for ax, key, label in ((axes[0], f"latency_b{batch}_ms", f"latency at batch {batch} (ms, ORT, 1 thread)"),
                           (axes[1], "size_bytes", "ONNX file size (KiB)")):
        shown = [(i, s) for i, s in enumerate(pts) if s.get(key) is not None]
        xs = [s[key] / (1024 if key == "size_bytes" else 1) for _, s in shown]
        ys = [100 * s["accuracy"] if have_acc and s.get("accuracy") is not None else float(i) for i, s in shown]
        ax.plot(xs, ys, "-", color="0.75", zorder=1)
        for (i, s), x, y in zip(shown, xs, ys):
            ax.scatter([x], [y], marker=markers[i % len(markers)], s=50, zorder=2, label=s["stage"])
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)" if have_acc else "stage")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("slimfx: accuracy against latency and size, per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_markdown(report: dict[str, Any], path: Path, plot_path: Path) -> None:
    """report.md: the summary table, per-pass stats, per-stage numbers and the plot."""
    plotted = plot_stages(report.get("stages", []), plot_path)
    stage_rows = [[s["stage"], _fmt_int(s["params"]), _fmt_int(s["macs"]), _fmt_bytes(s["size_bytes"]),
                   _fmt_ms(s["latency_b32_ms"]), _fmt_acc(s["accuracy"])] for s in report.get("stages", [])]
    text = [f"# slimfx report: {report['model']} with recipe `{report['recipe']}`", "",
            format_report(report, markdown=True), "", "## Stages", "",
            _table(["stage", "params", "MACs per input", "ONNX size", "latency b32", "accuracy"], stage_rows, True)]
    if plotted:
        text += ["", f"![accuracy against latency and size]({plot_path.name})"]
    text.append("")
    path.write_text("\n".join(text))
