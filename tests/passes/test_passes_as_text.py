"""Pass tests written as IR text in, expected IR text out (the style of MLIR's lit/FileCheck tests): each
case is the graph before the pass and the whole graph after it, as `print(graph)` writes it."""

from __future__ import annotations

import textwrap

import pytest
import torch

from slimfx import ir
from slimfx.exporters import example_inputs
from slimfx.passes import PassContext, PassManager, create_pass


def after(pass_name: str, before: str, params: dict[str, torch.Tensor] | None = None) -> tuple[str, ir.Graph]:
    """Parse `before`, run the pass (verified, outputs checked), and return the graph's text."""
    g = ir.parse(textwrap.dedent(before), params or {})
    ir.verify(g)
    PassManager([pass_name], verify_each=True, check_numerics=1e-6).run(
        g, PassContext(example_inputs=example_inputs(g)))
    return str(g), g


def expect(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


W = {"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3), "unused": torch.randn(7)}


def test_dce_removes_dead_nodes_and_unread_params():
    got, g = after("dce", """
        graph Net(%x: f32[2, 4]) {
          %fc = linear(%x, @fc.weight, @fc.bias) : f32[2, 3]
          %dead = relu(%fc) : f32[2, 3]
          %dead2 = sigmoid(%dead) : f32[2, 3]
          %out = tanh(%fc) : f32[2, 3]
          return %out
        }""", W)
    assert got == expect("""
        graph Net(%x: f32[2, 4]) {
          %fc = linear(%x, @fc.weight, @fc.bias) : f32[2, 3]
          %out = tanh(%fc) : f32[2, 3]
          return %out
        }""")
    assert sorted(g.params) == ["fc.bias", "fc.weight"]


def test_remove_identity_drops_noops_and_keeps_dtype_changes():
    got, _ = after("remove-identity", """
        graph Net(%x: f32[2, 4], %ids: i64[2, 4]) {
          %i = identity(%x) : f32[2, 4]
          %d = dropout(%i) {p=0.5, training=None} : f32[2, 4]
          %m = mul(%d, 1.0) : f32[2, 4]
          %r = reshape(%m) {shape=(2, 4)} : f32[2, 4]
          %f = mul(%ids, 1.0) : f32[2, 4]
          %z = add(%ids, 0) : i64[2, 4]
          %s = add(%r, %f) : f32[2, 4]
          return (%s, %z)
        }""")
    assert got == expect("""
        graph Net(%x: f32[2, 4], %ids: i64[2, 4]) {
          %f = mul(%ids, 1.0) : f32[2, 4]
          %s = add(%x, %f) : f32[2, 4]
          return (%s, %ids)
        }""")


def test_remove_identity_keeps_dropout_when_it_is_told_to_train():
    text = expect("""
        graph Net(%x: f32[2, 4]) {
          %d = dropout(%x) {p=0.5, training=True} : f32[2, 4]
          return %d
        }""")
    g = ir.parse(text)
    PassManager(["remove-identity"]).run(g, PassContext())
    assert str(g) == text


def test_fold_constants_computes_param_only_subgraphs_once():
    params = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 0.5, 0.5])}
    got, g = after("fold-constants", """
        graph Net(%x: f32[2, 3]) {
          %s = add(@a, @b) : f32[3]
          %t = mul(%s, 2.0) : f32[3]
          %y = mul(%x, %t) : f32[2, 3]
          return %y
        }""", params)
    assert got == expect("""
        graph Net(%x: f32[2, 3]) {
          %y = mul(%x, @folded.t) : f32[2, 3]
          return %y
        }""")
    assert torch.equal(g.params["folded.t"], torch.tensor([3.0, 5.0, 7.0])) and set(g.params) == {"folded.t"}


def test_fold_constants_turns_size_arithmetic_into_literals():
    got, _ = after("fold-constants", """
        graph Net(%x: f32[2, 6]) {
          %n = size(@w) {dim=0}
          %r = reshape(%x) {shape=(%n, -1)} : f32[3, 4]
          return %r
        }""", {"w": torch.zeros(3)})
    assert got == expect("""
        graph Net(%x: f32[2, 6]) {
          %r = reshape(%x) {shape=(3, -1)} : f32[3, 4]
          return %r
        }""")


@pytest.mark.parametrize("pass_name", ["dce", "remove-identity", "fold-constants", "cse"])
def test_a_clean_graph_is_left_as_it_was(pass_name):
    text = expect("""
        graph Net(%x: f32[2, 4]) {
          %fc = linear(%x, @fc.weight, @fc.bias) : f32[2, 3]
          %r = relu(%fc) : f32[2, 3]
          return {'logits': %fc, 'act': %r}
        }""")
    got, _ = after(pass_name, text, {k: v for k, v in W.items() if k != "unused"})
    assert got == text


def test_cse_merges_equal_work_and_keeps_random_draws_and_different_constants_apart():
    got, _ = after("cse", """
        graph Net(%x: f32[4]) {
          %d1 = dropout(%x) {p=0.5, training=False} : f32[4]
          %d2 = dropout(%x) {p=0.5, training=False} : f32[4]
          %m1 = mul(%x, 2) : f32[4]
          %m2 = mul(%x, 2.5) : f32[4]
          %t1 = tanh(%x) : f32[4]
          %t2 = tanh(%x) : f32[4]
          %s = add(%t1, %t2) : f32[4]
          return (%d1, %d2, %m1, %m2, %s)
        }""")
    assert got == expect("""
        graph Net(%x: f32[4]) {
          %d1 = dropout(%x) {p=0.5, training=False} : f32[4]
          %m1 = mul(%x, 2) : f32[4]
          %m2 = mul(%x, 2.5) : f32[4]
          %t1 = tanh(%x) : f32[4]
          %s = add(%t1, %t1) : f32[4]
          return (%d1, %d1, %m1, %m2, %s)
        }""")
    training = expect("""
        graph Net(%x: f32[4]) {
          %d1 = dropout(%x) {p=0.5, training=True} : f32[4]
          %d2 = dropout(%x) {p=0.5, training=True} : f32[4]
          return (%d1, %d2)
        }""")
    g = ir.parse(training)
    PassManager(["cse"]).run(g, PassContext())
    assert str(g) == training  # two draws of a random mask are two values


def test_fold_constants_does_not_grow_the_model():
    text = expect("""
        graph Net(%x: f32[1000, 4]) {
          %e = expand(@b) {size=(1000, 4)} : f32[1000, 4]
          %y = add(%x, %e) : f32[1000, 4]
          return %y
        }""")
    g = ir.parse(text, {"b": torch.randn(1, 4)})
    PassManager([create_pass("fold-constants", {"max_growth_numel": 100})]).run(g, PassContext())
    assert str(g) == text
