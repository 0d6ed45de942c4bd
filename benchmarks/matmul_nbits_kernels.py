"""One linear as onnxruntime runs it in float (MatMul) and as MatMulNBits at 4 and 8 bits, accuracy_level 0
(float compute) and 4 (the activation quantized to int8 per block), side by side.

Which of these is fastest decides quantize-weights' form (MatMulNBits or the folded form, which runs the float
MatMul on weights onnxruntime dequantizes at load): it depends on the CPU, the layer's size and M (rows of the
activation: batch x sequence). Times: thread CPU clock, 1 thread, best of interleaved rounds of fresh sessions.

    PYTHONPATH=. python benchmarks/matmul_nbits_kernels.py [K,N,M ...]
"""

from __future__ import annotations

import sys

import numpy as np
from int8_conv_paths import best_ms

DEFAULT = ("256,8000,1", "256,8000,32", "768,3072,1", "768,3072,32", "128,512,1", "128,512,32")
VARIANTS = ((4, 0), (4, 4), (8, 0))  # (bits, accuracy_level)


def linear_model(k: int, n: int, bits: int | None, level: int = 0, block: int = 32) -> bytes:
    """x [M, K] @ W^T, W [N, K]: a float MatMul (bits None) or MatMulNBits on random codes."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from slimfx.ir.ops import pack_codes

    g = torch.Generator().manual_seed(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if bits is None:
        w = numpy_helper.from_array(torch.randn(k, n, generator=g).numpy(), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    codes = pack_codes(torch.randint(0, 2 ** bits, (n, k), generator=g), bits).reshape(n, k // block, -1)
    inits = [numpy_helper.from_array(codes.numpy(), "q"),
             numpy_helper.from_array((torch.rand(n, k // block, generator=g) * 0.01).numpy(), "s")]
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level or None)
    graph = helper.make_graph([node], "nbits", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


def main(specs: list[str]) -> None:
    head = " | ".join(f"{b}-bit level {lv} / float" for b, lv in VARIANTS)
    print(f"| K, N, M | float ms | {head} |\n|---|---|" + "---|" * len(VARIANTS))
    for spec in specs or DEFAULT:
        k, n, m = (int(v) for v in spec.split(","))
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        models = {None: linear_model(k, n, None), **{v: linear_model(k, n, *v) for v in VARIANTS}}
        t = {v: float("inf") for v in models}
        for _ in range(3):  # interleaved rounds
            for v, model in models.items():
                t[v] = min(t[v], best_ms(model, x, 1, 20))
        ratios = " | ".join(f"{t[v] / t[None]:.2f}" for v in VARIANTS)
        print(f"| {k}, {n}, {m} | {t[None]:.3f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
