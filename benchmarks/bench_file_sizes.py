"""What the int8 recipe's files weigh against float32, per format, on the trained zoo models.

    PYTHONPATH=. python benchmarks/bench_file_sizes.py [--models digits_cnn,resnet20]

For each model: `slimfx.compile` with `cleanup` (float32) and with `int8`, writing ONNX, TorchScript and
torch.export files (trained zoo weights, the zoo's data for calibration and the gate, no latency runs),
and the int8/float32 size ratio of each format. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import slimfx
from slimfx import models
from slimfx.data import zoo_data

FORMATS = ("onnx", "torchscript", "pt2", "slimfx")


def sizes(name: str, out: Path) -> dict[str, dict[str, int]]:
    zoo = models.get(name)
    model, example = zoo.trained(0, progress=False).eval(), zoo.example_inputs()
    row = {}
    for recipe in ("cleanup", "int8"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = slimfx.compile(model, example, recipe, formats=FORMATS, out_dir=out / f"{name}-{recipe}",
                               data=zoo_data(zoo.dataset), quiet=True, bench_seconds=0)
        row[recipe] = {f: d["size_bytes"] for f, d in r.report["exports"].items()}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,digits_cnn,resnet20,mobilenetv2,tiny_bert")
    args = ap.parse_args(argv)
    print("| model | " + " | ".join(f"{f} int8 / fp32" for f in FORMATS) + " |")
    print("|---|" + "---|" * len(FORMATS))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = sizes(name, Path(tmp))
            cells = [f"{row['int8'][f] / 1024:.1f} / {row['cleanup'][f] / 1024:.1f} KB "
                     f"({row['int8'][f] / row['cleanup'][f]:.2f})" for f in FORMATS]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
