"""finetune / train_graph: trains graph.params in place, keeps the best epoch, skips or fails without data."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimfx import ir
from slimfx.ir.errors import PassError
from slimfx.passes import PassContext, create_pass
from slimfx.passes.finetune import iter_batches, train_graph


def _problem():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
    return ir.capture(model, (x[:4],)), x, y


def _acc(x, y):
    return lambda m: float((m(x).argmax(-1) == y).float().mean())


def test_train_graph_updates_graph_params_in_place():
    g, x, y = _problem()
    w = g.params["0.weight"]
    before = w.clone()
    rm = g.params["1.running_mean"].clone()
    acc0 = _acc(x, y)(ir.lower(g).eval())
    hist = train_graph(g, (x, y), epochs=5, lr=1e-2, batch_size=32, quiet=True)
    assert g.params["0.weight"] is w and not torch.equal(w, before)  # same tensor, new values
    assert not torch.equal(g.params["1.running_mean"], rm)  # BN statistics were trained too
    assert hist["loss"][-1] < hist["loss"][0]
    assert _acc(x, y)(ir.lower(g).eval()) > max(acc0, 0.9)
    assert not ir.lower(g).training


def test_best_epoch_is_kept_with_an_eval_fn():
    g, x, y = _problem()
    calls = []

    def ev(m):
        calls.append(1)
        return 1.0 if len(calls) == 1 else 0.0  # the untrained graph scores best

    before = {k: v.clone() for k, v in g.params.items()}
    hist = train_graph(g, (x, y), epochs=2, lr=1e-2, eval_fn=ev, quiet=True)
    assert hist["best_epoch"] == 0 and len(calls) == 3
    assert all(torch.equal(g.params[k], before[k]) for k in before)


def test_finetune_pass_requires_or_skips_without_data():
    g, x, y = _problem()
    ctx = PassContext(example_inputs=(x[:4],))
    res = create_pass("finetune").run(g, ctx)
    assert res.stats == {"skipped": True, "reason": "no train data"} and not res.changed
    strict = create_pass("finetune", {"required": True})
    assert "train data" in strict.check_context(ctx)
    with pytest.raises(PassError, match=r"pass 'finetune' needs train data and none was given.*required = false"):
        strict.run(g, ctx)
    batches = list(iter_batches((x, y), 100, shuffle=False))
    assert [len(b[1]) for b in batches] == [100, 100, 56] and isinstance(batches[0][0], tuple)
    res = create_pass("finetune", {"epochs": 3, "lr": 0.01}).run(
        g, PassContext(example_inputs=(x[:4],), train_data=batches, eval_fn=_acc(x, y)))
    assert not res.stats["skipped"] and res.stats["best_eval"] >= res.stats["eval"][0]
    with pytest.raises(PassError, match="option 'lr' must be > 0"):
        create_pass("finetune", {"lr": 0.0})
    with pytest.raises(PassError, match="batches"):
        list(iter_batches([torch.zeros(3)], 2))


EMPTY = {"list": lambda x, y: [], "tensors": lambda x, y: (x[:0], y[:0]),
         "dataset": lambda x, y: torch.utils.data.TensorDataset(x[:0], y[:0])}


@pytest.mark.parametrize("kind", sorted(EMPTY))
@pytest.mark.parametrize("required", [False, True])
def test_empty_train_data_is_refused_up_front_and_at_run_time_naming_the_option(kind, required):
    """An empty list is not data: before any work (check_context) and at run time, whatever `required` says,
    a clear PassError naming the pass and the way out (it used to be 'crashed: StopIteration')."""
    g, x, y = _problem()
    ctx = PassContext(example_inputs=(x[:4],), train_data=EMPTY[kind](x, y))
    p = create_pass("finetune", {"required": required})
    msg = p.check_context(ctx)
    assert msg and "pass 'finetune'" in msg and "empty" in msg and "epochs = 0" in msg
    before = {k: v.clone() for k, v in g.params.items()}
    with pytest.raises(PassError, match=r"pass 'finetune' trains on the train data, but it is empty.*epochs = 0"):
        p.run(g, ctx)
    assert all(torch.equal(g.params[k], before[k]) for k in before)
    off = create_pass("finetune", {"epochs": 0, "required": required})
    assert off.check_context(ctx) is None and off.run(g, ctx).stats["reason"] == "epochs=0"


def test_the_trainer_names_empty_one_shot_data_it_could_not_check_up_front():
    from slimfx.passes.distill.trainer import distill

    g, x, y = _problem()
    ctx = PassContext(example_inputs=(x[:4],), train_data=iter([]))
    assert create_pass("finetune").check_context(ctx) is None  # not consumed to find out
    with pytest.raises(PassError, match="finetune: the train data is empty"):
        create_pass("finetune").run(g, ctx)
    with pytest.raises(PassError, match="distill: the train data is empty"):
        distill(None, g, [], loss="ce", epochs=1, quiet=True)
    with pytest.raises(PassError, match="no batches"):  # batches without samples
        train_graph(g, [((x[:0],), y[:0])], epochs=1, quiet=True)
