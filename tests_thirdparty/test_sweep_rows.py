"""The sweep's results file (benchmarks/bench_third_party.py): rows of later runs merge into earlier ones by
recipe, and the table judges only what ran. Pure Python: runs without torchvision too."""

import json

from bench_third_party import load_rows, table


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


BASE = {"source": "torchvision", "params": 1e6, "default_res": 224, "res": 224, "asked_res": None}


def test_a_prune50_run_adds_its_columns_and_a_rerun_replaces_a_timeout(tmp_path):
    path = tmp_path / "rows.jsonl"
    _write(path, [
        {**BASE, "name": "a", "cleanup_ok": True, "int8_ok": False, "int8_error": "SQNR 20 dB", "int8_sqnr_fq": 20.0},
        {**BASE, "name": "b", "error": "timeout after 1800 s"},
        {**BASE, "name": "a", "recipes": ["prune50"], "prune50_ok": True, "prune50_macs": 0.3, "conv_share": 1.0},
        {**BASE, "name": "b", "recipes": ["prune50"], "prune50_ok": True, "prune50_macs": 0.4, "conv_share": 0.9},
        {**BASE, "name": "c", "recipes": ["prune50"], "prune50_ok": True, "prune50_macs": 0.2, "conv_share": 1.0},
        {**BASE, "name": "d", "recipes": ["prune50"], "prune50_ok": True, "prune50_macs": 0.5, "conv_share": 0.1},
    ])
    rows = {r["name"]: r for r in load_rows(path)}
    assert rows["a"]["int8_error"] == "ONNX vs fake-quant module: SQNR 20.0 dB < 25 dB" and rows["a"]["prune50_macs"] == 0.3
    assert rows["b"]["error"].startswith("timeout")  # the prune run did not re-run cleanup/int8
    md = table(list(rows.values()), "t")
    # c and d ran prune50 only: not counted (nor failed) for cleanup/int8; d is not convolutional
    assert "2 of 4 models run with cleanup and int8; of those, cleanup 1/2, int8 0/2" in md
    assert "prune50 MACs <= 0.35 on 2 of 3 convolutional models" in md
    assert "| c | 1.0 | 224 | (not run) |" in md and "`c`" not in md.split("Failures")[1]
    _write(path, [*map(json.loads, path.read_text().splitlines()), {**BASE, "name": "b", "cleanup_ok": True, "int8_ok": True}])
    b = next(r for r in load_rows(path) if r["name"] == "b")
    assert "error" not in b and b["prune50_macs"] == 0.4 and b["int8_ok"]
