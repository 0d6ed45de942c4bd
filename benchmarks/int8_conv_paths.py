"""One convolution as onnxruntime runs it in float and as QDQ int8 (fused to QLinearConv), side by side.

onnxruntime's fast symmetric int8 convolution (MLAS ConvSym: int8 weights with zero point 0, requantization
fused into the kernel) needs, on x86, input channels a multiple of 4 and at least 16 output channels (a
multiple of 8), or a depthwise conv over a multiple of 16 channels; any other conv runs im2col + an integer
GEMM + a separate requantization. A 3-channel image stem is always on the slow path, which is why int8 stems run
1.3-2.3x their float time in bench_quant's models while the same conv over 4 channels is faster than float.
Times: thread CPU clock, 1 thread, best of interleaved rounds of fresh sessions; the int8 model includes the
quantize of its float input and the dequantize of its output (the same in every row).

    PYTHONPATH=. python benchmarks/int8_conv_paths.py [cin,cout,k,stride,groups,hw,batch ...]
"""

from __future__ import annotations

import sys
import time

import numpy as np

DEFAULT = ("3,16,3,1,1,32,32", "4,16,3,1,1,32,32", "3,32,3,2,1,224,1", "4,32,3,2,1,224,1",
           "16,8,1,1,1,16,32", "16,16,1,1,1,16,32")


def conv_model(cin: int, cout: int, k: int, stride: int, groups: int, hw: int, int8: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32) * 0.1
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    attrs = dict(pads=[k // 2] * 4, strides=[stride] * 2, group=groups)
    init = lambda a, n: numpy_helper.from_array(np.asarray(a), n)  # noqa: E731
    if not int8:
        nodes, inits = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], [init(w, "w"), init(b, "b")]
    else:
        sx, sy = np.float32(4 / 255), np.float32(0.05)
        sw = (np.abs(w).reshape(cout, -1).max(1) / 63).astype(np.float32)
        inits = [init(sx, "sx"), init(np.uint8(128), "zx"), init(np.round(w / sw[:, None, None, None]).astype(np.int8), "wq"),
                 init(sw, "sw"), init(np.zeros(cout, np.int8), "zw"), init(np.round(b / (sx * sw)).astype(np.int32), "bq"),
                 init((sx * sw).astype(np.float32), "sb"), init(np.zeros(cout, np.int32), "zb"), init(sy, "sy"),
                 init(np.uint8(128), "zy")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
                 helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], axis=0),
                 helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], **attrs),
                 helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]),
                 helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def best_ms(model: bytes, x: np.ndarray, rounds: int, runs: int) -> float:
    from slimfx.exporters.bench import ort_session

    best = float("inf")
    for _ in range(rounds):
        sess = ort_session(model)
        sess.run(None, {"x": x})
        times = []
        for _ in range(runs):
            t0 = time.thread_time()
            sess.run(None, {"x": x})
            times.append(time.thread_time() - t0)
        best = min(best, float(np.median(times)) * 1e3)
    return best


def main(specs: list[str]) -> None:
    print("| conv (cin->cout, kernel, stride, groups, HxW, batch) | float ms | int8 ms | int8/float |\n|---|---|---|---|")
    for spec in specs or DEFAULT:
        cin, cout, k, stride, groups, hw, batch = (int(v) for v in spec.split(","))
        x = np.random.default_rng(1).standard_normal((batch, cin, hw, hw)).astype(np.float32)
        models = {v: conv_model(cin, cout, k, stride, groups, hw, v) for v in (False, True)}
        t = {v: float("inf") for v in models}
        for _ in range(3):  # interleaved: float, int8, float, int8, ...
            for v, m in models.items():
                t[v] = min(t[v], best_ms(m, x, 1, 20))
        print(f"| {cin}->{cout}, {k}x{k}, s{stride}, g{groups}, {hw}x{hw}, b{batch} | {t[False]:.3f} | {t[True]:.3f} "
              f"| {t[True] / t[False]:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
