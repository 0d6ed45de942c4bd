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
    p.add_argument("--dataset", default=None, help="dataset name (default: the teacher's zoo dataset)")
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


def _runs_on(role: str, spec: str, module: torch.nn.Module, ds, dataset: str) -> None:
    """SlimfxError unless `module` maps two of the dataset's inputs to [batch, num_classes] logits."""
    x = ds.test_x[:2]
    try:
        with torch.no_grad():
            out = module.eval()(x)
    except Exception as e:  # noqa: BLE001 - a model that cannot eat the data is a user error
        raise SlimfxError(f"{role} {spec!r} cannot run on {dataset!r} inputs of shape {list(x.shape)}: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[-1] != ds.num_classes:
        raise SlimfxError(f"{role} {spec!r} must return [batch, {ds.num_classes}] logits for {dataset!r}; "
                          f"it returns {list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")


def run(args: argparse.Namespace) -> int:
    from slimfx import models
    from slimfx.exporters._common import atomic_path
    from slimfx.passes.distill import distill

    if args.loss.startswith("at") and not args.features:
        raise SlimfxError(f"--loss {args.loss} uses attention transfer: give --features "
                          "student_feature:teacher_feature ... (node names or module paths)")
    teacher_spec = args.model.strip()
    if ":" not in teacher_spec and teacher_spec not in models.names():
        resolve_model(teacher_spec)  # an unknown zoo name: raises "unknown model ... (did you mean ...)"
    dataset = args.dataset or (models.get(teacher_spec).dataset if ":" not in teacher_spec else None)
    if dataset is None:
        raise SlimfxError(f"teacher {args.model!r} has no bundled dataset: give --dataset "
                          f"({', '.join(models.dataset_names())})")
    if dataset not in models.dataset_names():
        raise SlimfxError(f"unknown dataset {dataset!r} (--dataset); choose one of {', '.join(models.dataset_names())}")
    # Everything cheap is checked before the teacher is loaded (a zoo teacher trains on first use).
    student = resolve_model(args.student, trained=False, seed=args.seed, progress=False, need_inputs=False).module
    ds = models.load_dataset(dataset)
    _runs_on("student", args.student, student, ds, dataset)
    teacher = resolve_model(teacher_spec, seed=args.seed, progress=not args.quiet, need_inputs=False)
    _runs_on("teacher", args.model, teacher.module, ds, dataset)
    loss = args.loss
    opts = {}
    if loss.split("+")[-1] in ("kd", "ctkd", "logit-std"):
        opts.update(T=args.T, alpha=args.alpha)
    t_acc = models.accuracy(teacher.module, ds)
    n_t = sum(p.numel() for p in teacher.module.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    res = distill(teacher.module if loss != "ce" else None, student, ds, loss=loss, loss_options=opts,
                  features=list(args.features), epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                  eval_fn=lambda m: models.accuracy(m, ds), seed=args.seed, quiet=args.quiet)
    s_acc = models.accuracy(student, ds)
    with atomic_path(args.out) as tmp:
        torch.save(student.state_dict(), tmp)
    print(f"teacher {teacher.name}: {n_t} params, test accuracy {t_acc * 100:.2f}%")
    print(f"student {args.student}: {n_s} params ({n_s / max(n_t, 1):.2f}x), test accuracy {s_acc * 100:.2f}% "
          f"({args.loss}, best epoch {res.best_epoch}/{args.epochs}) -> {args.out}")
    return 0
