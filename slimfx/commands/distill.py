"""`slimfx distill TEACHER --student S`: whole-model knowledge distillation of a zoo or user model.

Teacher and student go through the same loader as every MODEL argument (slimfx.loading.resolve_model)."""

from __future__ import annotations

import argparse

import torch

from slimfx.commands import _args
from slimfx.ir.errors import SlimfxError
from slimfx.loading import IMPORT_NOTE, resolve_model
from slimfx.passes.distill.losses import LOSS_NAMES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("distill", help="distil a (trained) teacher model into a smaller student",
                              description="Train STUDENT to imitate MODEL on MODEL's dataset with a distillation "
                                          "loss; prints teacher and student accuracy. MODEL and STUDENT are each "
                                          "a zoo name, 'package.module:callable' or 'path/to/file.py:callable' "
                                          "(a zoo student is built untrained; a callable may return the module "
                                          f"alone). {IMPORT_NOTE}")
    p.add_argument("model", metavar="MODEL", help="teacher: zoo name, package.module:callable or file.py:callable")
    p.add_argument("--student", required=True,
                   help="student: zoo name, package.module:callable or file.py:callable (built untrained)")
    p.add_argument("--loss", default="kd", choices=LOSS_NAMES, metavar="LOSS", help=" | ".join(LOSS_NAMES))
    p.add_argument("--features", nargs="*", default=[], metavar="S:T", type=_feature_pair,
                   help="attention-transfer pairs 'student_feature:teacher_feature' (node names or module paths)")
    p.add_argument("--epochs", type=_args.count("the number of epochs", 1, 100_000), default=10)
    p.add_argument("--lr", type=_args.number("the learning rate", 0.0, lo_open=True), default=3e-3)
    p.add_argument("--batch-size", type=_args.count("the batch size", 1, _args.BATCH_MAX), default=64)
    p.add_argument("--T", type=_args.number("the temperature", 0.0, lo_open=True), default=4.0,
                   help="KD temperature")
    p.add_argument("--alpha", type=_args.number("alpha", 0.0, 1.0), default=0.9,
                   help="weight of the soft (teacher) term, from 0 to 1")
    p.add_argument("--dataset", default=None, help="zoo dataset name (default: the teacher's zoo dataset)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="your data instead of a zoo dataset: 'file.py:fn' or 'package.module:fn' returning "
                        "slimfx.Data(train=..., validation=..., test=...); the best epoch is chosen on validation, "
                        "accuracy reported on test")
    p.add_argument("--seed", type=_args.seed, default=0)
    p.add_argument("--out", type=_args.output_file, default="student.pt",
                   help="where to save the student's state_dict")
    p.add_argument("--quiet", action="store_true")
    _args.add_plugin_argument(p)
    return p


def _feature_pair(text: str) -> tuple[str, str]:
    s, sep, t = text.partition(":")
    if not sep or not s.strip() or not t.strip():
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give 'student_feature:teacher_feature'")
    return s.strip(), t.strip()


def _runs_on(role: str, spec: str, module: torch.nn.Module, inputs: tuple, classes: int | None) -> None:
    """SlimfxError unless `module` maps a batch of the data's inputs to [batch, classes] logits."""
    inputs = tuple(t[:2] for t in inputs)
    shapes = ", ".join(str(list(t.shape)) for t in inputs)
    try:
        with torch.no_grad():
            out = module.eval()(*inputs)
    except Exception as e:  # noqa: BLE001 - a model that cannot eat the data is a user error
        raise SlimfxError(f"{role} {spec!r} cannot run on the data's inputs of shape {shapes}: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or (classes is not None and out.shape[-1] != classes):
        raise SlimfxError(f"{role} {spec!r} must return [batch, {classes or 'classes'}] logits for the data; "
                          f"it returns {list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")


def _data(args: argparse.Namespace, teacher_spec: str):
    """(Data, a description, number of classes or None) from --data or the zoo dataset."""
    from slimfx import models
    from slimfx.data import load_data, zoo_data

    if args.data:
        if args.dataset:
            raise SlimfxError("give either --data (your data) or --dataset (a zoo dataset), not both")
        data = load_data(args.data)
        missing = [p for p in ("train", "validation") if getattr(data, p) is None]
        if missing:
            raise SlimfxError(f"--data {args.data}: distillation needs {' and '.join(missing)} data (train to learn "
                              "from, validation to choose the best epoch); give them in the slimfx.Data")
        return data, f"data {args.data}", None
    dataset = args.dataset or (models.get(teacher_spec).dataset if ":" not in teacher_spec else None)
    if dataset is None:
        raise SlimfxError(f"teacher {args.model!r} has no bundled dataset: give --data (your data) or --dataset "
                          f"({', '.join(models.dataset_names())})")
    if dataset not in models.dataset_names():
        raise SlimfxError(f"unknown dataset {dataset!r} (--dataset); choose one of {', '.join(models.dataset_names())}")
    data = zoo_data(dataset, seed=args.seed, batch_size=args.batch_size)
    return data, f"zoo dataset {dataset}", models.load_dataset(dataset).num_classes


def run(args: argparse.Namespace) -> int:
    from slimfx import models
    from slimfx.data import accuracy
    from slimfx.exporters._common import atomic_path
    from slimfx.passes.distill import distill

    if args.loss.startswith("at") and not args.features:
        raise SlimfxError(f"--loss {args.loss} uses attention transfer: give --features "
                          "student_feature:teacher_feature ... (node names or module paths)")
    teacher_spec = args.model.strip()
    if ":" not in teacher_spec and teacher_spec not in models.names():
        resolve_model(teacher_spec)  # an unknown zoo name: raises "unknown model ... (did you mean ...)"
    data, where, classes = _data(args, teacher_spec)
    train, validation, test = data.split("train"), data.split("validation"), data.split("test")
    first_inputs = next(iter(validation))[0]
    # Everything cheap is checked before the teacher is loaded (a zoo teacher trains on first use).
    student = resolve_model(args.student, trained=False, seed=args.seed, progress=False, need_inputs=False).module
    _runs_on("student", args.student, student, first_inputs, classes)
    teacher = resolve_model(teacher_spec, seed=args.seed, progress=not args.quiet, need_inputs=False)
    _runs_on("teacher", args.model, teacher.module, first_inputs, classes)
    loss = args.loss
    opts = {}
    if loss.split("+")[-1] in ("kd", "ctkd", "logit-std"):
        opts.update(T=args.T, alpha=args.alpha)
    scored = test if test is not None else validation
    scored_name = "test" if test is not None else "validation (no test data given)"
    t_acc = accuracy(teacher.module, scored)
    n_t = sum(p.numel() for p in teacher.module.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    res = distill(teacher.module if loss != "ce" else None, student, train, loss=loss, loss_options=opts,
                  features=list(args.features), epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                  eval_fn=lambda m: accuracy(m, validation), seed=args.seed, quiet=args.quiet)
    s_acc = accuracy(student, scored)
    with atomic_path(args.out) as tmp:
        torch.save(student.state_dict(), tmp)
    print(f"{where}: best epoch chosen on validation data, accuracy on {scored_name} data")
    print(f"teacher {teacher.name}: {n_t} params, accuracy {t_acc * 100:.2f}%")
    print(f"student {args.student}: {n_s} params ({n_s / max(n_t, 1):.2f}x), accuracy {s_acc * 100:.2f}% "
          f"({args.loss}, best epoch {res.best_epoch}/{args.epochs}) -> {args.out}")
    return 0
