"""`slimfx distill TEACHER --student S`: whole-model knowledge distillation of a zoo or user model."""

from __future__ import annotations

import argparse

import torch

from slimfx.ir.errors import SlimfxError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("distill", help="distil a (trained) teacher model into a smaller student",
                              description="Train STUDENT (zoo name or module:callable) to imitate MODEL on MODEL's "
                                          "dataset with a distillation loss; prints teacher and student accuracy.")
    p.add_argument("model", metavar="MODEL", help="teacher: zoo name, package.module:callable or file.py:callable")
    p.add_argument("--student", required=True, help="student: zoo name or module:callable (built untrained)")
    p.add_argument("--loss", default="kd", help="ce | kd | ctkd | logit-std | at | at+kd | at+ctkd | at+logit-std")
    p.add_argument("--features", nargs="*", default=[], metavar="S:T",
                   help="attention-transfer pairs 'student_feature:teacher_feature' (node names or module paths)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--T", type=float, default=4.0, help="KD temperature")
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft (teacher) term")
    p.add_argument("--dataset", default=None, help="dataset name (default: the teacher's zoo dataset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="student.pt", help="where to save the student's state_dict")
    p.add_argument("--quiet", action="store_true")
    return p


def _student(spec: str, seed: int) -> torch.nn.Module:
    """A fresh student: a zoo model built untrained, or what `module:callable` returns (inputs come from data)."""
    from slimfx.loading import resolve_model

    if ":" not in spec:
        return resolve_model(spec, trained=False, seed=seed, progress=False).module
    import importlib

    mod, _, attr = spec.rpartition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise SlimfxError(f"cannot load student {spec!r}: {e}") from e
    torch.manual_seed(seed)
    built = fn()
    built = built[0] if isinstance(built, tuple) else built
    if not isinstance(built, torch.nn.Module):
        raise SlimfxError(f"student {spec!r} returned {type(built).__name__}, not an nn.Module")
    return built


def run(args: argparse.Namespace) -> int:
    from slimfx import models
    from slimfx.loading import resolve_model
    from slimfx.passes.distill import distill

    teacher = resolve_model(args.model, seed=args.seed, progress=not args.quiet)
    dataset = args.dataset or (teacher.zoo.dataset if teacher.zoo is not None else None)
    if dataset is None:
        raise SlimfxError(f"teacher {args.model!r} is not a zoo model: give --dataset "
                          f"({', '.join(models.dataset_names())})")
    student = _student(args.student, args.seed)
    ds = models.load_dataset(dataset)
    try:
        with torch.no_grad():
            out = student.eval()(ds.test_x[:2])
    except Exception as e:  # noqa: BLE001 - a student that cannot eat the data is a user error
        raise SlimfxError(f"student {args.student!r} cannot run on {dataset!r} inputs of shape "
                          f"{list(ds.test_x[:2].shape)}: {type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor) or out.shape[-1] != ds.num_classes:
        raise SlimfxError(f"student {args.student!r} must return [batch, {ds.num_classes}] logits for {dataset!r}; "
                          f"it returns {getattr(out, 'shape', type(out).__name__)}")
    loss = args.loss
    opts = {}
    if loss.split("+")[-1] in ("kd", "ctkd", "logit-std"):
        opts.update(T=args.T, alpha=args.alpha)
    pairs = []
    for f in args.features:
        if ":" not in f:
            raise SlimfxError(f"--features {f!r} must be 'student_feature:teacher_feature'")
        pairs.append(tuple(f.split(":", 1)))
    t_acc = models.accuracy(teacher.module, ds)
    n_t = sum(p.numel() for p in teacher.module.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    res = distill(teacher.module if loss != "ce" else None, student, ds, loss=loss, loss_options=opts,
                  features=pairs, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                  eval_fn=lambda m: models.accuracy(m, ds), seed=args.seed, quiet=args.quiet)
    s_acc = models.accuracy(student, ds)
    torch.save(student.state_dict(), args.out)
    print(f"teacher {teacher.name}: {n_t} params, test accuracy {t_acc * 100:.2f}%")
    print(f"student {args.student}: {n_s} params ({n_s / max(n_t, 1):.2f}x), test accuracy {s_acc * 100:.2f}% "
          f"({args.loss}, best epoch {res.best_epoch}/{args.epochs}) -> {args.out}")
    return 0
