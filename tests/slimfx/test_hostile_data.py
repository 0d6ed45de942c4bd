"""A user's `--data` file with messy data: every mistake exits 2 before any work, with one paragraph naming the
part, the batch and what to change, no traceback and nothing written; data that is fine but unusual (a
generator, a map-style Dataset, several inputs) compiles. The same `Data` reaches `slimfx.compile`, so one
Python row per check guards the API too."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch

import slimfx
from slimfx.cli import main
from slimfx.errors import DataError

NET = textwrap.dedent("""
    import torch, torch.nn as nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()

    def make():
        return mlp(), (torch.randn(2, 8),)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(3, 4)
        def forward(self, x, z):
            return self.a(x) + self.b(z)

    def two():
        torch.manual_seed(0)
        return Two().eval(), (torch.randn(2, 8), torch.randn(2, 3))

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(16, 3)
        def forward(self, ids):
            return self.fc(self.emb(ids).mean(1))

    def tokens():
        torch.manual_seed(0)
        return Tokens().eval(), (torch.randint(0, 50, (2, 7)),)

    def cnn():  # runs at any image size (adaptive pooling); its files keep only the batch dynamic by default
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 4)).eval(), (torch.randn(2, 1, 8, 8),)
""")

DATA = textwrap.dedent("""
    import torch, slimfx
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    X, Y = torch.randn(120, 8), torch.randint(0, 4, (120,))
    V = (X[100:], Y[100:])

    def val(x=X[:20], y=Y[:20]):
        return slimfx.Data(validation=(x, y))

    def wrong_rank(): return val(x=torch.randn(20, 8, 2))
    def wrong_dtype(): return val(x=X[:20].double())
    def labels_out_of_range(): return val(y=Y[:20] + 10)
    def labels_negative(): return val(y=Y[:20] - 5)
    def float_labels(): return val(y=Y[:20].float())
    def one_hot(): return val(y=torch.nn.functional.one_hot(Y[:20], 4).float())
    def nan_inputs():
        x = X[:20].clone(); x[3, 2] = float("nan")
        return val(x=x)
    def inf_train():
        x = X[:20].clone(); x[5, 0] = float("inf")
        return slimfx.Data(train=(x, Y[:20]), validation=V)
    def inf_late_test():
        x = X.clone(); x[90, 1] = float("inf")
        return slimfx.Data(validation=V, test=(x, Y))
    def empty_tensors(): return val(x=X[:0], y=Y[:0])
    def one_tensor(): return slimfx.Data(validation=X[:20])
    def numpy_pair(): return slimfx.Data(validation=(X[:20].numpy(), Y[:20].numpy()))
    def unlabelled_singletons(): return slimfx.Data(validation=[(X[:10],)])
    def dict_inputs(): return slimfx.Data(validation=[({"x": X[:10]}, Y[:10])])
    def dict_split(): return slimfx.Data(validation=({"x": X[:10]}, Y[:10]))
    def flat_two_input_samples(): return slimfx.Data(validation=TensorDataset(X[:10], torch.randn(10, 3), Y[:10]))
    def list_of_samples(): return slimfx.Data(validation=[(X[i], Y[i]) for i in range(10)])
    def list_of_unlabelled_samples(): return slimfx.Data(validation=[(X[i], None) for i in range(10)])
    def two_inputs_for_one(): return slimfx.Data(validation=[((X[:10], X[:10]), Y[:10])])
    def drop_last():
        return slimfx.Data(validation=DataLoader(TensorDataset(X[:10], Y[:10]), batch_size=32, drop_last=True))
    class Once:
        def __init__(self): self.used = False
        def __iter__(self):
            if self.used: return iter(())
            self.used = True
            return iter([(X[:10], Y[:10])])
    def read_once(): return slimfx.Data(validation=Once())
    def train_labels_out_of_range(): return slimfx.Data(train=(X[:20], Y[:20] + 4), validation=V)
    def float_tokens(): return slimfx.Data(validation=(torch.randn(20, 7), torch.randint(0, 3, (20,))))

    def generators():  # read once each: calibration draws from train, then training reads it again
        def gen(a, b):
            for i in range(a, b, 10):
                yield X[i:i + 10], Y[i:i + 10]
        return slimfx.Data(train=gen(0, 60), validation=gen(60, 100), test=gen(100, 120))
    def dataset(): return slimfx.Data(validation=TensorDataset(X[:40], Y[:40]))
    def two_inputs(): return slimfx.Data(validation=((X[:20], torch.randn(20, 3)), Y[:20]))
    # what the message for one tensor says to write for data without targets
    def unlabelled_pair(): return slimfx.Data(validation=(X[:20], None), calibration=(X[20:40], None))
    def small_images(): return slimfx.Data(validation=(torch.randn(20, 1, 6, 6), Y[:20]))
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile_data")
    (d / "net.py").write_text(NET)
    (d / "data.py").write_text(DATA)
    return d


# (data function, MODEL callable in net.py, recipe, message fragments); each exits 2 before any work
REFUSED = [
    ("wrong_rank", "make", "cleanup", ["data.validation, batch 0: input 0 is tensor torch.float32[20, 8, 2] but the "
                                       "model's example input 0 is tensor torch.float32[2, 8]", "number of dimensions"]),
    ("wrong_dtype", "make", "cleanup", ["data.validation, batch 0: input 0 is tensor torch.float64[20, 8]",
                                        "e.g. x.to(torch.float32)"]),
    ("float_tokens", "tokens", "cleanup", ["input 0 is tensor torch.float32[20, 7] but the model's example input 0 "
                                           "is tensor torch.int64[2, 7]"]),
    ("list_of_samples", "make", "cleanup", ["data.validation, batch 0: the target is one value (tensor torch.int64[])",
                                            "one sample (tensor torch.float32[8]) without its batch dim",
                                            "map-style Dataset"]),
    ("list_of_unlabelled_samples", "make", "cleanup", ["data.validation, batch 0: input 0 is tensor torch.float32[8]",
                                                       "one sample without its batch dim", "map-style Dataset"]),
    ("two_inputs_for_one", "make", "cleanup", ["data.validation, batch 0 gives 2 inputs per batch but the model "
                                               "takes 1", "one per forward argument"]),
    ("labels_out_of_range", "make", "cleanup", ["data.validation, batch 0: targets hold class 13, but the model's "
                                                "first output scores 4 classes (0 to 3)"]),
    ("labels_negative", "make", "cleanup", ["targets hold class -5"]),
    ("float_labels", "make", "cleanup", ["data.validation, batch 0: targets are torch.float32; accuracy needs class "
                                         "indices", "y.long()", "(inputs, None)"]),
    ("one_hot", "make", "cleanup", ["targets of shape [20, 4] are shaped like the model's first output", "one-hot",
                                    "y.argmax(-1)"]),
    ("train_labels_out_of_range", "make", "prune50", ["data.train, batch 0: targets hold class"]),
    ("nan_inputs", "make", "cleanup", ["data.validation: input 0 holds 1 NaN/Inf values (in 1 row, the "
                                       "first at row 3 of the split", "remove or fix those samples"]),
    ("inf_train", "make", "prune50", ["data.train: input 0 holds 1 NaN/Inf values"]),
    # past the first batch: found before any work (it was found when a pass's stage row first read that batch, and
    # blamed on the pass: "pass 'fold-batchnorm' (step 1 of 2): data.test, rows 64-127: ...")
    ("inf_late_test", "make", "int8", ["data.test: input 0 holds 1 NaN/Inf values (in 1 row, the first at row 90 of "
                                       "the split)"]),
    ("empty_tensors", "make", "cleanup", ["data.validation holds no samples (its tensors have 0 rows)"]),
    ("one_tensor", "make", "cleanup", ["data.validation is one tensor (tensor torch.float32[20, 8]); give the split "
                                       "as an (inputs, targets) pair, e.g. validation=(x, y)"]),
    ("numpy_pair", "make", "cleanup", ["data.validation is a pair of ndarray and ndarray",
                                       "validation=(torch.as_tensor(x), torch.as_tensor(y))"]),
    ("unlabelled_singletons", "make", "cleanup", ["data.validation, batch 0 has 1 element", "(inputs, None)"]),
    ("dict_inputs", "make", "cleanup", ["data.validation, batch 0: inputs are a dict (x)", "forward's argument order"]),
    # a whole split whose inputs are a dict: it was read as an iterable of batches ('batch 0 is a dict')
    ("dict_split", "make", "cleanup", ["data.validation: inputs are a dict (x)", "validation=((x, z), y)"]),
    ("flat_two_input_samples", "two", "cleanup", ["data.validation, batch 0 has 3 elements",
                                                  "((x, z), target) (a Dataset's samples too)"]),
    ("drop_last", "make", "cleanup", ["data.validation is a DataLoader with drop_last=True and fewer samples than its "
                                      "batch_size (32)", "set drop_last=False"]),
    # the torch model runs at 6x6, the ONNX file (fixed 8x8) does not: refused before the passes, not an
    # onnxruntime crash (exit 1) once every pass had run
    ("small_images", "cnn", "int8", ["data.validation, batch 0: input 0 (input) is [20, 1, 6, 6], but the exported "
                                     "files take input as [batch, 1, 8, 8]: dims 2, 3 are fixed",
                                     "--dynamic-dims 'input=0:batch,2:height,3:width'"]),
    ("read_once", "make", "cleanup", ["data.validation gave no batches when slimfx went over it again",
                                      "give a list of batches, a DataLoader or a Dataset"]),
]


@pytest.mark.parametrize("fn, model, recipe, words", REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_data_exits_2_before_any_work(work, monkeypatch, capsys, fn, model, recipe, words):
    monkeypatch.chdir(work)
    before = set(os.listdir(work))
    code = main(["compile", f"net.py:{model}", "--recipe", recipe, "--data", f"data.py:{fn}", "--out", "out",
                 "--no-bench", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    for w in words:
        assert w in err, err
    assert err.startswith("slimfx: error: ") and err.count("\n") == 1  # one paragraph
    assert "Traceback" not in err
    assert set(os.listdir(work)) - {"__pycache__"} == before - {"__pycache__"}  # no --out, no stage


ACCEPTED = [("generators", "make", "cleanup", []), ("dataset", "make", "cleanup", []),
            ("two_inputs", "two", "cleanup", []), ("unlabelled_pair", "make", "cleanup", []),
            # what the refusal of small_images says to do
            ("small_images", "cnn", "cleanup", ["--dynamic-dims", "input=0:batch,2:height,3:width"])]


@pytest.mark.parametrize("fn, model, recipe, flags", ACCEPTED, ids=[r[0] for r in ACCEPTED])
def test_unusual_but_valid_data_compiles(work, monkeypatch, capsys, tmp_path, fn, model, recipe, flags):
    monkeypatch.chdir(work)
    out = tmp_path / "out"
    code = main(["compile", f"net.py:{model}", "--recipe", recipe, "--data", f"data.py:{fn}", "--out", str(out),
                 "--no-bench", "--quiet", *flags])
    assert code == 0, capsys.readouterr().err
    assert (out / "model.onnx").is_file()


def test_a_generator_for_train_is_read_once_and_replayed():
    """Calibration draws from train and training reads it again: one Split per part, kept by Data."""
    x, y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    data = slimfx.Data(train=((x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)), calibration_samples=15)
    assert sum(len(b[0]) for b in data.calibration_batches()) == 15
    assert [len(t) for _, t in data.split("train")] == [10, 10, 10, 10]
    assert [len(t) for _, t in data.split("train")] == [10, 10, 10, 10]


def test_an_inputs_none_pair_is_a_whole_unlabelled_split():
    """`(x, None)` was read as an iterable of two batches, x and None, and refused at the second ('batch 1 is a
    NoneType'), though the message for a part given as one tensor suggests exactly that form."""
    x, z = torch.randn(70, 8), torch.randn(70, 3)
    data = slimfx.Data(validation=(x, None), test=((x, z), None), calibration=(x[:40], None), batch_size=32)
    assert [(len(b[0][0]), b[1]) for b in data.split("validation")] == [(32, None), (32, None), (6, None)]
    assert len(data.split("validation")) == 3
    assert [len(b[1]) for b, _ in data.split("test")] == [32, 32, 6]
    assert [len(b[0]) for b in data.calibration_batches(1)] == [32, 8]
    with pytest.raises(DataError, match="same number of rows"):
        slimfx.Data(validation=((x, z[:5]), None)).split("validation")
    with pytest.raises(DataError, match="holds no samples"):
        slimfx.Data(validation=(x[:0], None)).split("validation")


def test_calibration_items_of_a_two_input_model_are_its_input_tuples():
    """The docs allow calibration items that are input tuples: for a model of two inputs, (img, vec) was read as
    (inputs=img, target=vec) and the quantize pass crashed on a missing argument."""
    img, vec, y = torch.randn(4, 3), torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    for items in ([(img, vec)], [((img, vec), None)], [((img, vec), y)]):
        (batch,) = slimfx.Data(calibration=items).calibration_batches(n_inputs=2)
        assert len(batch) == 2 and batch[0] is img and batch[1] is vec
    (batch,) = slimfx.Data(calibration=[(img, y)]).calibration_batches(n_inputs=1)  # one input: (inputs, target)
    assert len(batch) == 1 and batch[0] is img

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(3, 4)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    torch.manual_seed(0)
    recipe = slimfx.Recipe(name="q", passes=[("quantize", {"speed_guard": False})], export={"formats": ["onnx"]})
    result = slimfx.compile(Two().eval(), (torch.randn(2, 8), torch.randn(2, 3)), recipe=recipe, bench_seconds=0,
                            calibration_data=[(torch.randn(16, 8), torch.randn(16, 3))], quiet=True)
    assert result.graph.find("quantize")


def test_validation_or_test_that_is_the_train_data_is_refused():
    x, y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    for same in ((x, y), (x.view(40, 8), y.clone())):
        for part in ("validation", "test"):
            with pytest.raises(DataError, match=f"data.{part} is the same data as data.train"):
                slimfx.Data(train=(x, y), **{part: same})
    loader = [(x[:20], y[:20])]
    with pytest.raises(DataError, match="data.test is the same data as data.train"):
        slimfx.Data(train=loader, test=loader)
    slimfx.Data(train=(x[:30], y[:30]), validation=(x[30:], y[30:]), test=(x[30:], y[30:]))  # held out: fine
    # a copy, or train holding the held-out rows (the whole set as train): the same data under other storage
    for leaky in ((x[30:].clone(), y[30:]), (x[::4].clone(), y[::4])):
        with pytest.raises(DataError, match=r"data.validation repeats data.train \(100% of its rows are rows of "
                                            r"train\)"):
            slimfx.Data(train=(x, y), validation=leaky)


def test_held_out_rows_that_are_also_train_rows_are_said_in_the_headline():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    x, y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    val = torch.cat([x[30:], x[:2]])  # 2 of 12 validation rows are train rows
    data = slimfx.Data(train=(x[:30], y[:30]), validation=(val, torch.cat([y[30:], y[:2]])))
    assert data.shared_rows() == {"validation": pytest.approx(2 / 12)}
    result = slimfx.compile(model, (x[:2],), "cleanup", data=data, bench_seconds=0, quiet=True)
    assert any(h.startswith("16.7% of the validation rows are also rows of train") for h in result.report["headline"])
    assert slimfx.Data(train=(x[:30], y[:30]), validation=(x[30:], y[30:])).shared_rows() == {}


def test_token_ids_beyond_the_vocabulary_are_named_as_such():
    """An embedding looked up past its table said only 'the original model fails' and suggested --fixed-batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    ids = torch.randint(0, 10, (8, 3))
    with pytest.raises(slimfx.SlimfxError, match=r"token ids\) of that batch run from 0 to 12: check that they "
                                                 r"are below the vocabulary size") as e:
        slimfx.compile(model, (ids[:2],), recipe="cleanup", bench_seconds=0, quiet=True,
                       data=slimfx.Data(validation=(ids.clamp(max=9).index_fill(0, torch.tensor([1]), 12), None)))
    assert "--fixed-batch" not in str(e.value)


def test_the_api_refuses_bad_labels_before_any_work(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(20, 8)
    with pytest.raises(DataError, match=r"data.test, batch 0: targets hold class 7, but the model's first output "
                                        r"scores 4 classes"):
        slimfx.compile(model, (x[:2],), recipe="cleanup", data=slimfx.Data(test=(x, torch.full((20,), 7))),
                       out_dir=tmp_path / "out", bench_seconds=0, quiet=True)
    assert len(calls) == 1  # the one check on the first batch; no capture, no passes
    assert not list(tmp_path.iterdir())


def test_validate_names_data_unlike_the_example(work, monkeypatch, capsys):
    """`slimfx validate --data` checks its batches as compile does (it blamed --batch for a dtype before)."""
    monkeypatch.chdir(work)
    assert main(["export", "net.py:make", "-o", "net.onnx"]) == 0
    capsys.readouterr()
    assert main(["validate", "net.onnx", "--model", "net.py:make", "--data", "data.py:wrong_dtype"]) == 2
    err = capsys.readouterr().err
    assert "data.validation, batch 0: input 0 is tensor torch.float64[20, 8] but the model's example input 0" in err
    assert "--batch" not in err


def test_an_inputs_none_pair_is_one_unlabelled_split_as_the_errors_advise():
    """`(x, None)` is what the messages (and docs) tell a user without labels to give; it was read as a list of two
    batches (all of x as one unlabelled batch, then None: "data.train, batch 1 is a NoneType")."""
    x = torch.randn(10, 8)
    split = slimfx.Data(train=(x, None), batch_size=4).split("train")
    assert len(split) == 3
    batches = list(split)
    assert [len(i[0]) for i, _ in batches] == [4, 4, 2] and all(t is None for _, t in batches)
    assert torch.equal(torch.cat([i[0] for i, _ in batches]), x)
    assert [i[0].shape for i in slimfx.Data(train=(x, None), batch_size=4).calibration_batches(1)] == \
        [torch.Size([4, 8])] * 2 + [torch.Size([2, 8])]
    with pytest.raises(DataError, match="data.validation is the same data as data.train"):
        slimfx.Data(train=(x, None), validation=(x, None))


def test_a_training_step_with_unlabelled_validation_keeps_its_lowest_loss_epoch(tmp_path):
    """Validation without labels is fine for the gate (agreement, SQNR), but a distill/finetune step was handed an
    eval_fn that measured accuracy on it, got None and crashed (TypeError from float(None), exit 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(96, 8)
    y = model(x).argmax(1).detach()
    recipe = slimfx.Recipe(name="kd", passes=[("distill", {"epochs": 2, "required": True}),
                                              ("finetune", {"epochs": 1, "required": True})],
                           export={"formats": ["onnx"]}, validate={"min_top1_agreement": 0.5})
    res = slimfx.compile(model, (x[:2],), recipe=recipe, bench_seconds=0, quiet=True, out_dir=tmp_path / "out",
                         data=slimfx.Data(train=(x[:64], y[:64]), validation=(x[64:], None)))
    stats = {p["name"]: p["stats"] for p in res.report["passes"]}
    assert stats["distill"]["best_epoch"] in (1, 2) and "accuracy_after" not in stats["distill"]
    assert (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("calibration, note", [
    ((torch.randn(3, 8), None), "static quantization calibrated on 3 inputs only (data.calibration)"),
    ((torch.randn(64, 8), None), None)])
def test_a_few_calibration_inputs_are_named_in_the_headline(calibration, note):
    """One calibration image was taken silently: activation ranges from it are a guess, and nothing said so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    recipe = slimfx.Recipe(name="q", passes=[("quantize", {"speed_guard": False})], export={"formats": ["onnx"]})
    result = slimfx.compile(model, (torch.randn(2, 8),), recipe=recipe, bench_seconds=0, quiet=True,
                            data=slimfx.Data(calibration=calibration))
    few = [h for h in result.report["headline"] if "calibrated on" in h]
    assert (few == []) if note is None else (len(few) == 1 and note in few[0] and "at least 32" in few[0]), few
