"""Writing a custom pass: a pattern pass, a plain pass, and a pipeline running both.

This file is shown verbatim in docs/passes.md and executed by tests/passes/test_docs_example.py.
It is also a plugin: `slimfx compile docs/examples/custom_pass.py:Net --plugin docs/examples/custom_pass.py
--recipe my.toml` runs its passes from a recipe, and `slimfx passes --plugin ...` lists them.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx import ir
from slimfx.passes import Pass, PassContext, PassManager, PassResult, PatternPass, option, register_pass


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

    preserves_outputs = False  # it changes the numbers: the numeric check after each pass skips it

    # type, default, accepted range and help, declared once: checked when the pass is built (a recipe
    # with limit = -1 fails before any work) and shown by `slimfx passes clip-linear-weights`
    limit: float = option(1.0, gt=0, help="largest |weight| kept; larger ones are clamped to it")

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


def example_inputs() -> tuple[torch.Tensor]:  # what the MODEL spec `custom_pass.py:Net` is fed
    return (torch.randn(2, 8),)


def main() -> tuple[ir.Graph, list]:
    (x,) = example_inputs()
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
