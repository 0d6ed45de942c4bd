"""Compile time on a real-size network, against torch's own ONNX exporter measured in the same run.

    PYTHONPATH=. python benchmarks/bench_compile_speed.py             # ResNet-18-class, 224x224, batch 1
    PYTHONPATH=. python benchmarks/bench_compile_speed.py --repeat 5 --threads 2

The peer is `torch.onnx.export(..., dynamo=False)` of the same eval-mode model. slimfx's core is what a
compile must do to write a file: capture, the `cleanup` recipe's passes (verified after each, numerics
checked as `slimfx compile` does) and ONNX emission with its checker; validation (onnxruntime against the
IR at two batch sizes) is timed on its own. Each is the median of --repeat runs after one warm-up, in
wall seconds and in CPU seconds of this process (which other jobs on a busy machine do not inflate).
Targets (issue #15): core <= 3x the peer; the whole `slimfx.compile(..., "cleanup")`, gate and latency
report included, under 20 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from _latency import median_seconds


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (11.7M params, 1.8 GMACs at 224x224), written out: no download."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    model = ResNet18().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as in a trained network
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, (torch.randn(1, 3, 224, 224),)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-compile", action="store_true", help="skip the whole slimfx.compile run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import warnings

    import slimfx
    from slimfx import ir
    from slimfx.exporters._common import validation_sets
    from slimfx.exporters.onnx import to_onnx_model
    from slimfx.exporters.validate import validate_onnx
    from slimfx.passes import PassContext, PassManager
    from slimfx.recipe import load_recipe

    model, example = resnet18()
    recipe = load_recipe("cleanup")
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        peer_path = Path(tmp) / "torch.onnx"

        def peer():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, example, str(peer_path), dynamo=False,
                                  dynamic_axes={"input": {0: "batch"}}, input_names=["input"])

        def core():
            g = ir.capture(model, example, for_inference=True)
            g = PassManager(recipe.build_passes(), verify_each=True, check_numerics=1e-4).run(
                g, PassContext(example_inputs=example, quiet=True)).graph
            (Path(tmp) / "slimfx.onnx").write_bytes(to_onnx_model(g, inputs=example).SerializeToString())
            return g

        graph = core()
        data = (Path(tmp) / "slimfx.onnx").read_bytes()

        def validation():
            validate_onnx(data, graph, validation_sets(example, dynamic_batch=True))

        for name, fn in (("torch.onnx.export", peer), ("slimfx core", core), ("slimfx validation", validation)):
            wall, cpu = median_seconds(fn, args.repeat)
            rows[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
        peer_wall, peer_cpu = rows["torch.onnx.export"]["wall_s"], rows["torch.onnx.export"]["cpu_s"]
        rows["slimfx core"]["x_peer_wall"] = round(rows["slimfx core"]["wall_s"] / peer_wall, 2)
        rows["slimfx core"]["x_peer_cpu"] = round(rows["slimfx core"]["cpu_s"] / peer_cpu, 2)

        if not args.no_compile:
            t0 = time.perf_counter()
            result = slimfx.compile(model, example, "cleanup", out_dir=Path(tmp) / "out", quiet=True)
            rows["slimfx.compile cleanup"] = {"wall_s": round(time.perf_counter() - t0, 2),
                                              "stages_s": result.report["timings"],
                                              "gate_samples": result.report["validation"]["samples"]}

    print(f"{'':26s} {'wall s':>8s} {'cpu s':>8s}  vs torch.onnx.export (wall, cpu)")
    for name, r in rows.items():
        if "cpu_s" in r:
            ratio = f"{r['x_peer_wall']:.2f}x, {r['x_peer_cpu']:.2f}x" if "x_peer_wall" in r else ""
            print(f"{name:26s} {r['wall_s']:8.2f} {r['cpu_s']:8.2f}  {ratio}")
        else:
            print(f"{name:26s} {r['wall_s']:8.2f}           stages {r['stages_s']}, gate on {r['gate_samples']} "
                  "generated samples")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
