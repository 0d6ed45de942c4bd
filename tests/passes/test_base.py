"""The Pass API: registry, typed options from dicts and text, and the errors for mistakes."""

from __future__ import annotations

from dataclasses import field
from typing import Literal

import pytest

from slimfx.ir.errors import PassError
from slimfx.passes import (
    Pass,
    PassContext,
    PassResult,
    create_pass,
    get_pass,
    parse_pass_spec,
    register_pass,
    registered_passes,
)


@register_pass("test-options")
class OptionsPass(Pass):
    """A pass with one option of every kind."""

    sparsity: float = 0.5
    steps: int = 3
    enabled: bool = True
    criterion: Literal["l1", "l2"] = "l2"
    layers: list[str] = field(default_factory=list)
    limit: float | None = None

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise PassError(f"pass '{self.name}': option 'sparsity' must be in [0, 1), got {self.sparsity}")

    def run(self, graph, ctx) -> PassResult:
        return PassResult(changed=False)


def test_builtins_are_registered():
    names = set(registered_passes())
    assert {"dce", "cse", "remove-identity", "fold-constants", "fold-batchnorm"} <= names
    assert get_pass("dce").name == "dce"


def test_options_from_dict_are_typed_and_converted():
    p = create_pass("test-options", {"sparsity": 1 / 4, "steps": 7, "criterion": "l1", "layers": "fc",
                                     "limit": 2})
    assert (p.sparsity, p.steps, p.criterion, p.layers, p.limit) == (0.25, 7, "l1", ["fc"], 2.0)
    assert isinstance(p.limit, float)
    assert create_pass("test-options").option_values() == {
        "sparsity": 0.5, "steps": 3, "enabled": True, "criterion": "l2", "layers": [], "limit": None}


def test_options_from_text():
    p = parse_pass_spec("test-options{sparsity=0.75, steps=2, enabled=false, criterion=l1, layers=['a', 'b']}")
    assert (p.sparsity, p.steps, p.enabled, p.criterion, p.layers) == (0.75, 2, False, "l1", ["a", "b"])
    assert parse_pass_spec("  dce ").name == "dce"
    assert parse_pass_spec("test-options{limit=null}").limit is None
    assert str(p).startswith("test-options{sparsity=0.75")


@pytest.mark.parametrize("spec, words", [
    ("no-such-pass", ["unknown pass 'no-such-pass'", "dce", "fold-batchnorm"]),
    ("test-options{sparsityy=0.5}", ["no option 'sparsityy'", "sparsity, steps, enabled"]),
    ("test-options{sparsity=abc}", ["'sparsity' must be float", "'abc'"]),
    ("test-options{steps=1.5}", ["'steps' must be int", "1.5"]),
    ("test-options{enabled=1}", ["'enabled' must be bool"]),
    ("test-options{criterion=l3}", ["'criterion' must be one of 'l1', 'l2'", "'l3'"]),
    ("test-options{layers=[1, 2]}", ["'layers' (item 0) must be str"]),
    ("test-options{sparsity=1.5}", ["'sparsity' must be in [0, 1)"]),
    ("test-options{sparsity}", ["needs a value"]),
    ("test-options{sparsity=0.5", ["enclosed in {...}"]),
    ("dce{x=1}", ["pass 'dce' has no option 'x'", "(none)"]),
])
def test_mistakes_raise_pass_error_naming_them(spec, words):
    with pytest.raises(PassError) as e:
        parse_pass_spec(spec)
    for w in words:
        assert w in str(e.value)


def test_registering_a_second_pass_under_a_taken_name_fails():
    with pytest.raises(PassError, match="already registered"):
        @register_pass("dce")
        class OtherDce(Pass):
            def run(self, graph, ctx):
                return PassResult(False)


def test_context_normalizes_inputs_and_seeds():
    import torch

    x = torch.zeros(2)
    ctx = PassContext(example_inputs=x, seed=3)
    assert ctx.example_inputs == (x,) or ctx.example_inputs[0] is x
    assert ctx.calibration_batches()[0][0] is x
    assert ctx.rng.random() == PassContext(seed=3).rng.random()
