"""A MODEL spec's factory runs the same way in every command: seeded and on one torch thread."""

from __future__ import annotations

import copy
import textwrap

import torch

from slimfx.loading import resolve_model

FACTORY = textwrap.dedent("""
    import torch, torch.nn as nn

    def make():  # weights that depend on how the factory ran, as a factory that trains them does
        m = nn.Linear(4, 2)
        with torch.no_grad():
            m.bias.fill_(torch.get_num_threads())
            m.weight.copy_(torch.randn(2, 4))
        return m.eval(), (torch.randn(1, 4),)
""")


def test_a_factory_builds_the_same_model_whatever_the_commands_thread_count(tmp_path):
    """compile --threads 2 and validate (default threads) built different models from a factory that trained its
    weights (float sums differ between thread counts), and validate failed a good file."""
    (tmp_path / "net.py").write_text(FACTORY)
    before = torch.get_num_threads()
    try:
        built = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            built.append(resolve_model(f"{tmp_path / 'net.py'}:make").module)
            assert torch.get_num_threads() == threads  # the command's own setting is restored
        assert [float(m.bias[0]) for m in built] == [1.0, 1.0]
        assert torch.equal(built[0].weight, built[1].weight)  # seeded
    finally:
        torch.set_num_threads(before)


CNN = textwrap.dedent("""
    import torch, torch.nn as nn

    def make():
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        return m.eval(), (torch.randn(2, 3, 8, 8),)
""")


def test_validate_tells_a_quantized_file_from_a_broken_one(tmp_path, monkeypatch, capsys):
    """`slimfx validate int8.onnx --model net.py:make` fails at float32's tolerance, as it should, but said nothing
    of why: a quantized file differs from the float model by its rounding, by design."""
    from slimfx import ir
    from slimfx.cli import main
    from slimfx.exporters import export_onnx
    from slimfx.passes import PassContext, create_pass

    (tmp_path / "net.py").write_text(CNN)
    monkeypatch.chdir(tmp_path)
    loaded = resolve_model("net.py:make")
    graph = ir.capture(loaded.module, loaded.example_inputs)
    ctx = PassContext(loaded.example_inputs, calibration_data=[(torch.randn(16, 3, 8, 8),)], quiet=True)
    export_onnx(graph, tmp_path / "float.onnx", inputs=loaded.example_inputs)
    create_pass("quantize", {"scheme": "int8-static", "speed_guard": False}).run(graph, ctx)
    export_onnx(graph, tmp_path / "int8.onnx", inputs=loaded.example_inputs)
    assert main(["validate", "int8.onnx", "--model", "net.py:make"]) == 3
    assert "int8.onnx holds quantized weights or activations" in capsys.readouterr().err
    assert main(["validate", "int8.onnx", "--model", "net.py:make", "--atol", "0.5", "--rtol", "0.1"]) == 0
    assert main(["validate", "float.onnx", "--model", "net.py:make"]) == 0
    capsys.readouterr()
    from slimfx.exporters import export_pt2, export_torchscript

    export_torchscript(graph, tmp_path / "int8.pt", inputs=loaded.example_inputs)
    export_pt2(graph, tmp_path / "int8.pt2", inputs=loaded.example_inputs)
    for f in ("int8.pt", "int8.pt2"):  # the torch files tell it too: their int8 tensors
        assert main(["validate", f, "--model", "net.py:make"]) == 3
        assert f"{f} holds quantized weights or activations" in capsys.readouterr().err
    broken = copy.deepcopy(loaded.module)
    with torch.no_grad():
        broken[0].weight.add_(0.1)
    export_torchscript(ir.capture(broken, loaded.example_inputs), tmp_path / "broken.pt", inputs=loaded.example_inputs)
    assert main(["validate", "broken.pt", "--model", "net.py:make"]) == 3  # a float file that differs: no excuse
    assert "holds quantized" not in capsys.readouterr().err
