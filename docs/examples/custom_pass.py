"""Writing a custom pass: a pattern pass, a plain pass, and a pipeline running both.

This file is shown verbatim in docs/passes.md and executed by tests/passes/test_docs_example.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx import ir
from slimfx.passes import Pass, PassContext, PassManager, PassResult, PatternPass, register_pass


# --- 1. A pattern pass: x * sigmoid(x) is SiLU; emit one `silu` node instead of two. -------------
@register_pass("fuse-silu")
class FuseSilu(PatternPass):
    """Rewrites x * sigmoid(x) as silu(x)."""

    pattern = staticmethod(lambda x: x * torch.sigmoid(x))  # also matches sigmoid(x) * x
    replacement = staticmethod(lambda x: F.silu(x))          # written like the pattern, same arguments


# --- 2. A plain pass with an option: clamp weights of every linear layer to +-limit. ------------
@register_pass("clip-linear-weights")
class ClipLinearWeights(Pass):
    """Clamps the weights of every linear layer to [-limit, limit]."""

    limit: float = 1.0

    def run(self, graph: ir.Graph, ctx: PassContext) -> PassResult:
        clipped = 0
        for node in graph.find("linear"):
            w = node.inputs[1]
            if isinstance(w, ir.Param):  # never mutate in place: the tensor may be the user's
                graph.params[w.name] = graph.params[w.name].clamp(-self.limit, self.limit)
                clipped += 1
        return PassResult(changed=clipped > 0, stats={"clipped": clipped})


# --- 3. Run them in a pipeline with the built-in passes. ----------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(h))


def main() -> tuple[ir.Graph, list]:
    x = torch.randn(2, 8)
    graph = ir.capture(Net().eval(), (x,))
    pipeline = PassManager(["fuse-silu", "cse", "dce"], check_numerics=1e-6)  # checks outputs after each
    run = pipeline.run(graph, PassContext(example_inputs=(x,)))  # a PassRecord per pass, and run.graph
    more = PassManager(["clip-linear-weights{limit=0.1}"]).run(run.graph, PassContext())  # changes numbers
    graph, records = more.graph, [*run, *more]  # go on with the returned graph: a pass may build a new one
    for r in records:
        print(f"{r.name:22} {r.seconds * 1e3:6.2f} ms  {r.stats}")
    print(graph)
    return graph, records


if __name__ == "__main__":
    main()
