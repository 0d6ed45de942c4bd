"""Options declared once (`option(...)`): type, default, range and help in one place, checked once when a
pass is built, whichever way it is built; the built-in passes declare every option that way."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.ir.errors import PassError
from slimfx.passes import Pass, PassContext, PassManager, PassResult, create_pass, option, register_pass
from slimfx.passes.base import Bounds
from slimfx.passes.distill.losses import LOSS_NAMES, make_loss
from slimfx.passes.distill.trainer import Optimizer, _make_optimizer

VALIDATE_CALLS: list[str] = []


@register_pass("test-declared")
class Declared(Pass):
    """A pass whose options are declared with option()."""

    fraction: float = option(0.5, ge=0, lt=1, help="a fraction")
    steps: int = option(3, gt=0, help="how many")
    mode: Literal["a", "b"] = option("a", help="which")
    levels: list[float] = option([0.25, 0.5], ge=0, le=1, help="each in [0, 1]")
    per_layer: dict[str, float] = option({}, ge=0, lt=1, help="pattern -> fraction")
    cap: float | None = option(None, gt=0, help="unset: no cap")

    def validate(self) -> None:
        VALIDATE_CALLS.append(self.name)
        if self.mode == "b" and self.cap is None:
            raise PassError("pass 'test-declared': mode 'b' needs a cap")

    def run(self, graph, ctx) -> PassResult:
        return PassResult(False)


@pytest.mark.parametrize("options, words", [
    ({"fraction": 1.0}, ["option 'fraction' must be in [0, 1), got 1.0"]),
    ({"fraction": -0.5}, ["'fraction' must be in [0, 1)"]),
    ({"fraction": float("nan")}, ["'fraction' must be in [0, 1)", "nan"]),
    ({"steps": 0}, ["option 'steps' must be > 0, got 0"]),
    ({"levels": [0.5, 1.5]}, ["option 'levels' (item 1) must be in [0, 1], got 1.5"]),
    ({"levels": [0.5, "x"]}, ["option 'levels' (item 1) must be float, got 'x' (str)"]),  # was: 'levels' must be
    ({"per_layer": {"fc*": "x"}}, ["option 'per_layer' (entry 'fc*') must be float, got 'x'"]),  # float, of a list
    ({"per_layer": {"fc*": 1.0}}, ["option 'per_layer' (entry 'fc*') must be in [0, 1)"]),
    ({"cap": 0}, ["option 'cap' must be > 0, got 0.0"]),
    ({"mode": "c"}, ["'mode' must be one of 'a', 'b'; got 'c'"]),
    ({"mode": "b"}, ["mode 'b' needs a cap"]),  # validate(): the rule tying two options together
])
def test_types_ranges_and_choices_come_from_the_declaration(options, words):
    for build in (lambda: create_pass("test-declared", options), lambda: Declared(**options)):
        with pytest.raises(PassError) as e:
            build()
        for w in words:
            assert w in str(e.value), str(e.value)


def test_a_pass_is_checked_once_however_it_is_built_and_never_by_run():
    VALIDATE_CALLS.clear()
    p = Declared(steps=2, cap=3)  # the constructor converts and checks, as create_pass does
    assert (p.cap, type(p.cap)) == (3.0, float)
    create_pass("test-declared", {"mode": "b", "cap": 1})
    assert VALIDATE_CALLS == ["test-declared", "test-declared"]
    g = ir.capture(nn.Linear(2, 2).eval(), (torch.randn(1, 2),))
    PassManager([p]).run(g, PassContext())
    assert VALIDATE_CALLS == ["test-declared", "test-declared"]
    # list and dict defaults are copied for each pass
    a, b = Declared(), Declared()
    a.levels.append(0.75)
    a.per_layer["x"] = 0.1
    assert (b.levels, b.per_layer) == ([0.25, 0.5], {})


def test_a_recipe_builds_its_passes_once_and_compile_reuses_them():
    import slimfx
    from slimfx.recipe import Recipe

    VALIDATE_CALLS.clear()
    rec = Recipe(name="once", passes=[("test-declared", {"steps": 2}), ("dce", {})])
    first, second = rec.build_passes(), rec.build_passes()
    assert VALIDATE_CALLS == ["test-declared"]
    assert first[0] is not second[0] and first[0] == second[0]  # copies of the one checked build
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    slimfx.compile(model, (torch.randn(2, 4),), rec, quiet=True, bench_seconds=0)
    assert VALIDATE_CALLS == ["test-declared"]  # the driver took the built passes: no second check
    rec.passes = [("test-declared", {"steps": 5})]  # changed after construction: built and checked again
    assert rec.build_passes()[0].steps == 5 and VALIDATE_CALLS == ["test-declared"] * 2


def test_every_builtin_option_is_declared_with_help():
    builtin = {n: c for n, c in _registered().items() if c.__module__.startswith("slimfx.")}
    assert len(builtin) >= 17
    for name, cls in builtin.items():
        for info in cls.option_infos():
            assert len(info.help) >= 15, f"{name}.{info.name} has no help text"
            assert info.type is not typing.Any, f"{name}.{info.name} has no type"
            if info.bounds is not None and info.default not in (None, dataclasses.MISSING):
                for v in (info.default.values() if isinstance(info.default, dict) else
                          info.default if isinstance(info.default, list) else [info.default]):
                    assert v in info.bounds, f"{name}.{info.name}: the default is out of its own range"
        if name != "distill-subgraph":  # it has no default block to replace
            cls.create({})  # every default is valid


def test_one_definition_of_the_optimizers_the_training_loop_knows():
    choices = set(typing.get_args(Optimizer))
    assert choices == {"adam", "adamw", "sgd"}
    for name, opt in [("finetune", "optimizer"), ("distill", "optimizer"), ("kd-finetune", "optimizer"),
                      ("quantize", "qat_optimizer")]:
        info = next(i for i in _registered()[name].option_infos() if i.name == opt)
        assert set(info.choices) == choices, name
        with pytest.raises(PassError, match=f"'{opt}' must be one of 'adam', 'adamw', 'sgd'; got 'lamb'"):
            create_pass(name, {opt: "lamb"})
    w = nn.Parameter(torch.ones(3))
    for name in choices:  # every declared name builds an optimizer
        assert isinstance(_make_optimizer(name, [w], 0.1, 0.01), torch.optim.Optimizer)
    assert type(_make_optimizer("adamw", [w], 0.1, 0.0)) is torch.optim.AdamW


def test_finetune_with_adamw_trains():
    torch.manual_seed(0)
    x = torch.randn(128, 4)
    y = (x[:, 0] > 0).long()
    g = ir.capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), (x[:2],))
    res = create_pass("finetune", {"optimizer": "adamw", "weight_decay": 0.01, "epochs": 2, "lr": 0.01}).run(
        g, PassContext((x[:2],), train_data=(x, y), quiet=True))
    assert res.stats["loss"][-1] < res.stats["loss"][0]


def test_value_sets_are_derived_from_the_literals():
    from slimfx.passes.quantize import CALIBRATION_METHODS, Calibration, Quantize, Scheme

    assert CALIBRATION_METHODS == typing.get_args(Calibration)
    infos = {i.name: i for i in Quantize.option_infos()}
    assert infos["scheme"].choices == typing.get_args(Scheme)
    assert infos["calibration"].choices == CALIBRATION_METHODS
    sens = {i.name: i for i in _registered()["quant-sensitivity"].option_infos()}
    assert sens["scheme"].choices == typing.get_args(Scheme)  # checked there too, not an unchecked string
    with pytest.raises(PassError, match="'scheme' must be one of"):
        create_pass("quant-sensitivity", {"scheme": "int4"})
    loss = next(i for i in _registered()["distill"].option_infos() if i.name == "loss")
    assert loss.choices == LOSS_NAMES
    for name in LOSS_NAMES:  # every name the option accepts, the loss factory builds
        make_loss(name, **({"beta": 1.0} if name.startswith("at") else {}))


def test_bounds_text():
    assert [str(b) for b in (Bounds(ge=0, lt=1), Bounds(gt=0, le=1), Bounds(ge=1), Bounds(gt=0), Bounds(le=31))] \
        == ["[0, 1)", "(0, 1]", ">= 1", "> 0", "<= 31"]


def _registered():
    from slimfx.passes import registered_passes

    return registered_passes()
