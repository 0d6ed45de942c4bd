"""`slimfx distill TEACHER --student S`: whole-model knowledge distillation of a zoo or user model.

Teacher and student go through the same loader as every MODEL argument (slimfx.loading.resolve_model); the job
itself is slimfx.distilling (shared with benchmarks/distill_sweep.py, which chose the defaults). Under
`torchrun --nproc_per_node=N` the ranks train one DistributedDataParallel job and rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from slimfx.commands import _args
from slimfx.distilling import DEFAULTS, Arm, Settings
from slimfx.ir.errors import SlimfxError
from slimfx.loading import IMPORT_NOTE, resolve_model
from slimfx.passes.distill.augment import AUGMENT_HELP, parse_augment
from slimfx.passes.distill.losses import LOSS_NAMES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("distill", help="distil a (trained) teacher model into a smaller student",
                              description="Train STUDENT to imitate MODEL on MODEL's dataset (or --data) with a "
                                          "distillation loss; prints teacher and student accuracy, and with "
                                          "--baseline the same student trained from scratch. The best epoch is "
                                          "chosen on the validation split, accuracy is reported on test. MODEL "
                                          "and STUDENT are each a zoo name, 'package.module:callable', "
                                          "'path/to/file.py:callable' or a saved 'model.slimfx' (a zoo student "
                                          "is built untrained; a callable may return the module alone). Under "
                                          "`torchrun --nproc_per_node=N -m slimfx distill ...` the N processes "
                                          f"train one data-parallel job and rank 0 writes. {IMPORT_NOTE}")
    p.add_argument("model", metavar="MODEL", help="teacher: zoo name, package.module:callable or file.py:callable")
    p.add_argument("--student", required=True,
                   help="student: zoo name, package.module:callable, file.py:callable or model.slimfx (built "
                        "untrained)")
    p.add_argument("--baseline", action="store_true",
                   help="also train the same student from scratch (labels only) with the same epochs, learning "
                        "rate and batches, and report both side by side")
    p.add_argument("--loss", default=DEFAULTS.loss, choices=LOSS_NAMES, metavar="LOSS",
                   help=f"{' | '.join(LOSS_NAMES)} (default {DEFAULTS.loss}; see docs/distillation.md)")
    p.add_argument("--features", nargs="*", default=[], metavar="S:T", type=_feature_pair,
                   help="attention-transfer pairs 'student_feature:teacher_feature' (node names or module paths); "
                        "default for the at* losses: the last feature map of each spatial size both models share, where "
                        "both compute (or both only pool)")
    p.add_argument("--epochs", type=_args.count("the number of epochs", 1, 100_000), default=DEFAULTS.epochs,
                   help=f"default {DEFAULTS.epochs}")
    p.add_argument("--lr", type=_args.number("the learning rate", 0.0, lo_open=True), default=DEFAULTS.lr,
                   help=f"peak learning rate of the one-cycle schedule (default {DEFAULTS.lr:g})")
    p.add_argument("--batch-size", type=_args.count("the batch size", 1, _args.BATCH_MAX),
                   default=DEFAULTS.batch_size)
    p.add_argument("--T", type=_args.number("the temperature", 0.0, lo_open=True), default=DEFAULTS.T,
                   help=f"KD temperature (default {DEFAULTS.T:g})")
    p.add_argument("--alpha", type=_args.number("alpha", 0.0, 1.0), default=DEFAULTS.alpha,
                   help=f"weight of the soft (teacher) term, from 0 to 1 (default {DEFAULTS.alpha:g})")
    p.add_argument("--beta", type=_args.number("beta", 0.0), default=DEFAULTS.beta,
                   help=f"weight of the attention-transfer term of the at* losses (default {DEFAULTS.beta:g})")
    p.add_argument("--augment", default=DEFAULTS.augment, type=_augment, metavar="AUG",
                   help="augmentation of the training inputs, the same for teacher and student and for --baseline "
                        "(default " + DEFAULTS.augment + "): " + AUGMENT_HELP)
    p.add_argument("--dataset", default=None, help="zoo dataset name (default: the teacher's zoo dataset)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="your data instead of a zoo dataset: 'file.py:fn' or 'package.module:fn' returning "
                        "slimfx.Data(train=..., validation=..., test=...); the best epoch is chosen on validation, "
                        "accuracy reported on test")
    p.add_argument("--seed", type=_args.seed, default=0,
                   help="seeds the student's weights, the batch order and a zoo teacher's training")
    p.add_argument("--threads", type=_args.threads, default=1,
                   help="torch threads per process (default 1: fastest for small models, and steady on a busy "
                        "machine)")
    p.add_argument("--out", type=_args.output_file, default="student.pt",
                   help="where to save the student's state_dict (default student.pt; an existing file is replaced)")
    p.add_argument("--json", type=_args.output_file, default=None, metavar="FILE",
                   help="also write the report as JSON: settings, splits, teacher, each student's accuracy per "
                        "split and per-epoch history")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines; the report only")
    _args.add_plugin_argument(p)
    return p


def _augment(text: str) -> str:
    try:
        parse_augment(text)
    except SlimfxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip().lower()


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


def _augments(augment: str, inputs: tuple) -> None:
    """SlimfxError naming --augment none when the augmentation cannot apply to the data's inputs."""
    from slimfx.passes.distill.augment import apply

    try:
        apply(parse_augment(augment), tuple(inputs), None, torch.Generator().manual_seed(0))
    except SlimfxError as e:
        default = " (the default)" if augment == DEFAULTS.augment else ""
        raise SlimfxError(f"--augment {augment}{default} does not fit this data: {e} (on the command line: "
                          "--augment none)") from None


def _data(args: argparse.Namespace, teacher_spec: str):
    """(a function giving the Data afresh, a description, number of classes or None) from --data or the zoo."""
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
        return (lambda: load_data(args.data)), f"data {args.data}", None
    dataset = args.dataset or (models.get(teacher_spec).dataset if ":" not in teacher_spec else None)
    if dataset is None:
        raise SlimfxError(f"teacher {args.model!r} has no bundled dataset: give --data (your data) or --dataset "
                          f"({', '.join(models.dataset_names())})")
    if dataset not in models.dataset_names():
        raise SlimfxError(f"unknown dataset {dataset!r} (--dataset); choose one of {', '.join(models.dataset_names())}")
    return (lambda: zoo_data(dataset, seed=args.seed, batch_size=args.batch_size)), f"zoo dataset {dataset}", \
        models.load_dataset(dataset).num_classes


def _labelled(args: argparse.Namespace, settings: Settings, data, where: str) -> None:
    """SlimfxError, before any model loads, when a split lacks the labels this run reads: validation's choose the
    best epoch and give the accuracies; train's feed a loss with a cross-entropy term and --baseline."""
    from slimfx.passes.distill.losses import make_loss

    if next(iter(data.split("validation")))[1] is None:
        raise SlimfxError(f"{where}: the validation split has no labels, but distill chooses the best epoch by "
                          "validation accuracy and reports accuracies; give validation as (inputs, labels)")
    if next(iter(data.split("train")))[1] is not None:
        return
    if args.baseline:
        raise SlimfxError(f"{where}: the train split has no labels, so --baseline (the student trained from "
                          "scratch on labels) cannot run; give train as (inputs, labels), or drop --baseline")
    if make_loss(settings.loss, **settings.loss_options()).needs_labels:
        kd = "alpha" in settings.loss_options()  # a KD-type logit term: its 1 - alpha part is the labels'
        fix = "--alpha 1" if kd else ("--loss at+kd --alpha 1" if settings.loss == "at" else "--loss kd --alpha 1")
        raise SlimfxError(f"{where}: the train split has no labels, but --loss {settings.loss}"
                          f"{f' with --alpha {settings.alpha:g}' if kd else ''} has a cross-entropy term on labels; "
                          f"give train as (inputs, labels), or use {fix} (the teacher's soft targets only)")


def _settings(args: argparse.Namespace) -> Settings:
    if args.features and not args.loss.startswith("at"):
        raise SlimfxError(f"--features names attention-transfer pairs, but --loss {args.loss} has no attention "
                          "transfer; drop --features or use --loss at+kd (or at, at+ctkd, at+logit-std)")
    if args.loss == "ctkd" and not 1.0 < args.T < 20.0:
        raise SlimfxError(f"--loss ctkd starts its learned temperature at --T, which must lie between 1 and 20; "
                          f"got --T {args.T:g}")
    if args.json is not None and Path(args.json).resolve() == Path(args.out).resolve():
        raise SlimfxError(f"--json and --out name the same file {args.out}; give them different paths")
    return Settings(loss=args.loss, T=args.T, alpha=args.alpha, beta=args.beta, epochs=args.epochs, lr=args.lr,
                    batch_size=args.batch_size, augment=args.augment, features=tuple(args.features))


def run(args: argparse.Namespace) -> int:
    from slimfx import distilling, models
    from slimfx.data import accuracy
    from slimfx.distributed import Ranks

    settings = _settings(args)
    torch.set_num_threads(args.threads)
    ranks = Ranks.from_env()
    logging.basicConfig(level=logging.WARNING if args.quiet or not ranks.main else logging.INFO,
                        format="%(message)s")
    with ranks:
        teacher_spec = args.model.strip()
        if ":" not in teacher_spec and not teacher_spec.endswith(".slimfx") and teacher_spec not in models.names():
            resolve_model(teacher_spec)  # an unknown zoo name: raises "unknown model ... (did you mean ...)"
        make_data, where, classes = _data(args, teacher_spec)
        data = make_data()
        first_inputs = next(iter(data.split("validation")))[0]
        _labelled(args, settings, data, where)

        def make_student() -> torch.nn.Module:
            return resolve_model(args.student, trained=False, seed=args.seed, progress=False,
                                 need_inputs=False).module

        # Everything cheap is checked before the teacher is loaded (a zoo teacher trains on first use).
        _runs_on("student", args.student, make_student(), first_inputs, classes)
        _augments(settings.augment, first_inputs)
        teacher = ranks.first(lambda: resolve_model(teacher_spec, seed=args.seed,
                                                    progress=not args.quiet and ranks.main, need_inputs=False))
        _runs_on("teacher", args.model, teacher.module, first_inputs, classes)
        _check_outputs(args)  # before training: every input file (teacher, student, data) has been read now
        student, arms = distilling.run(teacher.module, make_student, make_data, settings, baseline=args.baseline,
                                       seed=args.seed, quiet=args.quiet)
        if not ranks.main:
            return 0
        report = _report(args, settings, where, data, teacher, arms, accuracy, ranks.world)
        _write(args, student, report)
        print(_format(report))
    return 0


def _count(split) -> int | None:
    return None if split is None else sum(len(t) if t is not None else len(i[0]) for i, t in split)


def _report(args, settings: Settings, where: str, data, teacher, arms: list[Arm], accuracy, world: int) -> dict:
    validation, test = data.split("validation"), data.split("test")
    n_t = sum(p.numel() for p in teacher.module.parameters())
    return {
        "data": where, "world_size": world, "json": str(args.json) if args.json is not None else None,
        "splits": {"best_epoch": "validation", "accuracy": "test" if test is not None else None,
                   "validation_samples": _count(validation), "test_samples": _count(test)},
        "settings": {"loss": settings.loss, **settings.loss_options(), "epochs": settings.epochs, "lr": settings.lr,
                     "batch_size": settings.batch_size, "augment": settings.augment, "seed": args.seed},
        "teacher": {"model": args.model, "params": n_t, "validation_accuracy": accuracy(teacher.module, validation),
                    "test_accuracy": accuracy(teacher.module, test) if test is not None else None},
        "student": {"model": args.student, "out": str(args.out), **arms[0].as_dict()},
        **({"baseline": arms[1].as_dict()} if len(arms) > 1 else {}),
    }


def _check_outputs(args) -> None:
    from slimfx.commands._args import check_output_file

    for path in (args.out, args.json):  # the teacher's, student's or data's own file is never overwritten
        if path is not None:
            check_output_file(Path(path))


def _write(args, student: torch.nn.Module, report: dict) -> None:
    from slimfx.exporters._common import atomic_path

    _check_outputs(args)
    with atomic_path(args.out) as tmp:
        torch.save(student.state_dict(), tmp)
    if args.json is not None:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def _format(report: dict) -> str:
    sp = report["splits"]
    test_note = (f"accuracy on the test split ({sp['test_samples']} samples)" if sp["accuracy"] == "test"
                 else "no test data given: only validation accuracy (optimistic: it also chose the epoch)")
    lines = [f"{report['data']}: best epoch chosen on the validation split ({sp['validation_samples']} samples); "
             f"{test_note}"]
    t, s = report["teacher"], report["student"]
    rows = [("", "params", "validation", "test", "best epoch"),
            (f"teacher {t['model']}", str(t["params"]), _pct(t["validation_accuracy"]), _pct(t["test_accuracy"]), "")]
    for key, what in (("student", f"distilled ({report['settings']['loss']})"), ("baseline", "from scratch (ce)")):
        if key in report:
            a = report[key]
            rows.append((f"student {s['model']}, {what}", f"{a['params']} ({a['params'] / max(t['params'], 1):.2f}x)",
                         _pct(a["validation_accuracy"]), _pct(a["test_accuracy"]), f"{a['best_epoch']}/{a['epochs']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
              for r in rows]
    if "baseline" in report:
        b = report["baseline"]
        split = "test" if sp["accuracy"] == "test" else "validation"
        gain = (s[f"{split}_accuracy"] - b[f"{split}_accuracy"]) * 100
        aug = report["settings"]["augment"]
        same = f"same epochs, lr, batches{', augmentation ' + aug if aug != 'none' else ''} and seed"
        lines.append(f"distillation vs from scratch: {gain:+.2f} pt on {split} ({same})")
    if s["features"]:
        lines.append(f"attention-transfer pairs (student:teacher): {', '.join(s['features'])}")
    lines.append(f"wrote {s['out']}" + (f", {report['json']}" if report.get("json") else ""))
    return "\n".join(lines)
