"""A user's data for compile, validate and distill, and the zoo's bundled data in the same shape.

    slimfx.Data(train=loader, validation=val_loader, test=test_loader, calibration=None)

Each part may be a torch DataLoader, a map-style Dataset of `(inputs, target)` samples, an iterable of
`(inputs, target)` batches, or one `(inputs, targets)` pair of tensors holding the whole split (`(inputs, None)`
without targets). `inputs`
is a tensor or a tuple of tensors (one per forward argument) like the example inputs (dtype, number of
dimensions), finite; `target` holds class indices of the model's first output, or is None. The driver checks
the first batch of each part before any work (`check_like_example`, `correct`); every batch is checked as it
is read (`Split`). What each part is for:

- train: fine-tuning, distillation and QAT steps.
- validation: every number the gate checks (agreement, SQNR, max diff, accuracy drop) and the choice of
  the best epoch in training steps. Never test.
- test: the accuracy in the report, measured once at the end on the written file.
- calibration: activation ranges for static quantization; default: `calibration_samples` inputs drawn
  from train. Its items may be input tuples or `(inputs, target)` batches (a pair of
  tensors is the inputs of a two-input model, else one input and its target).

`--data SPEC` (CLI) and `data = "SPEC"` (recipe) name a callable `file.py:fn` or `package.module:fn`
returning a `Data`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimfx.ir.errors import DataError, SlimfxError

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]
PARTS = ("train", "validation", "test", "calibration")
GENERATED_SAMPLES = 256
# What generated gate inputs may cost one model, in multiply-accumulates: a 224x224 ResNet-18 (1.8 GMACs per input)
# is checked on 128 inputs, not 256, so its whole compile stays within seconds; never fewer than the minimum.
GENERATED_MACS_BUDGET = 256e9
GENERATED_SAMPLES_MIN = 64


@dataclass
class Data:
    """A user's data, split by purpose (see the module docstring)."""

    train: Any = None
    validation: Any = None
    test: Any = None
    calibration: Any = None
    calibration_samples: int = 256
    batch_size: int = 64
    # each part's Split, made once: a one-shot iterator (a generator) is read once and then replayed to every
    # step that goes over the part (calibration drawn from train, then training)
    _splits: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _shared: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # see shared_rows()

    def __post_init__(self) -> None:
        if isinstance(self.calibration_samples, bool) or not isinstance(self.calibration_samples, int) \
                or self.calibration_samples < 1:
            raise DataError(f"Data.calibration_samples must be a positive integer, got {self.calibration_samples!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DataError(f"Data.batch_size must be a positive integer, got {self.batch_size!r}")
        for held in ("validation", "test"):
            same = _same_data(getattr(self, held), self.train)
            shared = 1.0 if same else _shared_rows(getattr(self, held), self.train)
            if shared >= SHARED_ROWS_REFUSED:
                what = "is the same data as data.train" if same else \
                    f"repeats data.train ({shared:.0%} of its rows are rows of train)"
                raise DataError(f"data.{held} {what}: every number the report and the gate "
                                f"give from {held} would be measured on data the model trains or calibrates on. "
                                f"Give {held} samples kept out of train (e.g. split the tensors first), or leave "
                                f"{held} out")
            if shared > 0:
                self._shared[held] = shared

    def shared_rows(self) -> dict[str, float]:
        """The fraction of validation's and test's rows (tensors given whole) that are rows of train, where some
        are (checked when the Data is made): a few identical samples happen in real data, more are a split that
        leaks. The report's headline says so."""
        return dict(self._shared)

    def split(self, part: str) -> Split | None:
        """The part as a re-iterable of `(inputs_tuple, target)` batches (None when not given)."""
        value = getattr(self, part)
        if value is None:
            return None
        made = self._splits.get(part)
        if made is None or made[0] is not value or made[1].batch_size != self.batch_size:
            made = self._splits[part] = (value, Split(part, value, self.batch_size))
        return made[1]

    def calibration_batches(self, n_inputs: int | None = None) -> list[tuple[torch.Tensor, ...]] | None:
        """Input tuples for calibration: the calibration part, else `calibration_samples` drawn from train.
        `n_inputs`, the model's number of inputs, tells an input tuple from an (inputs, target) batch."""
        if self.calibration is not None:
            return [inputs for inputs, _ in Split("calibration", self.calibration, self.batch_size,
                                                  inputs_only=True, n_inputs=n_inputs)]
        train = self.split("train")
        if train is None:
            return None
        out, n = [], 0
        for inputs, _ in train:
            take = min(len(inputs[0]), self.calibration_samples - n) if inputs and inputs[0].dim() else 1
            out.append(tuple(t[:take] for t in inputs) if inputs[0].dim() else inputs)
            n += take
            if n >= self.calibration_samples:
                break
        return out

    def given(self) -> list[str]:
        return [p for p in PARTS if getattr(self, p) is not None]


class Split:
    """One part of `Data`, normalised: iterating yields `(inputs_tuple, target_or_None)` batches and
    checks each one (DataError naming the part and the batch)."""

    def __init__(self, name: str, source: Any, batch_size: int = 64, *, inputs_only: bool = False,
                 n_inputs: int | None = None):
        # inputs_only (calibration): items may be input tuples; a tuple of n_inputs tensors is one (a pair of
        # tensors is otherwise read as (inputs, target))
        self.name, self.inputs_only, self.batch_size, self.n_inputs = name, inputs_only, batch_size, n_inputs
        self._tensors: tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None = None
        self._source: Any = None
        self._passes = 0  # passes over the source started so far
        _refuse_non_tensors(name, source)
        pair = _tensor_pair(source)
        if pair is not None:
            self._tensors = pair
            if len(pair[0][0]) == 0:
                raise DataError(f"data.{name} holds no samples (its tensors have 0 rows): give at least one, "
                                f"or leave {name} out")
            # the whole split, now: before any work, not when a step first reads the batch that holds the NaN
            check_finite(pair[0], f"data.{name}", of="the split")
        elif isinstance(source, torch.utils.data.Dataset) and not isinstance(source, torch.utils.data.IterableDataset) \
                and hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            self._source = torch.utils.data.DataLoader(source, batch_size=batch_size)
        elif isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
            raise DataError(f"data.{name} must be a DataLoader, a Dataset, an iterable of (inputs, target) batches "
                            f"or an (inputs, targets) pair of tensors; got {type(source).__name__}")
        elif isinstance(source, Iterator):  # one-shot (asked without iter(), which may read it): kept, so every
            # pass sees the same batches
            self._source = list(source)
        else:
            self._source = source
        if self._source is not None and hasattr(self._source, "__len__") and len(self._source) == 0:
            loader = self._source if isinstance(self._source, torch.utils.data.DataLoader) else None
            if loader is not None and loader.drop_last and loader.batch_size:
                raise DataError(f"data.{name} is a DataLoader with drop_last=True and fewer samples than its "
                                f"batch_size ({loader.batch_size}), so it gives no batch: set drop_last=False or "
                                f"a smaller batch_size")
            raise DataError(f"data.{name} is empty: give at least one batch, or leave {name} out")

    def __iter__(self) -> Iterator[Batch]:
        if self._tensors is not None:
            xs, y = self._tensors
            for i in range(0, len(xs[0]), self.batch_size):
                inputs = tuple(t[i:i + self.batch_size] for t in xs)
                yield inputs, y[i:i + self.batch_size] if y is not None else None
            return
        n, self._passes = 0, self._passes + 1
        for i, item in enumerate(self._source):
            batch = self._normalize(item, i)
            check_finite(batch[0], f"data.{self.name}, batch {i}")
            yield batch
            n += 1
        if n == 0 and self._passes > 1:
            raise DataError(f"data.{self.name} gave no batches when slimfx went over it again (it gave some the "
                            f"first time): slimfx reads each part several times (calibration, training epochs, "
                            f"checks), so give a list of batches, a DataLoader or a Dataset rather than something "
                            f"that can be read only once")
        if n == 0:
            raise DataError(f"data.{self.name} gave no batches: give at least one, or leave {self.name} out")

    def __len__(self) -> int:
        if self._tensors is not None:
            return math.ceil(len(self._tensors[0][0]) / self.batch_size)
        return len(self._source)

    def _normalize(self, item: Any, index: int) -> Batch:
        where = f"data.{self.name}, batch {index}"
        if isinstance(item, torch.Tensor):
            return (item,), None
        if isinstance(item, dict):
            raise DataError(f"{where} is a dict; give (inputs, target) with inputs a tensor or a tuple of tensors "
                            "in forward's argument order")
        if isinstance(item, (tuple, list)) and len(item) == 1 and not self.inputs_only:
            raise DataError(f"{where} has 1 element; each batch must be (inputs, target), or (inputs, None) when "
                            "there are no targets")
        if not isinstance(item, (tuple, list)):
            raise DataError(f"{where} is a {type(item).__name__}; each batch must be (inputs, target) with inputs "
                            "a tensor or a tuple of tensors")
        if self.inputs_only and all(isinstance(t, torch.Tensor) for t in item) \
                and (len(item) != 2 or self.n_inputs == 2):
            return tuple(item), None
        if len(item) != 2:
            raise DataError(f"{where} has {len(item)} elements; each batch must be (inputs, target), with the inputs "
                            f"of a model of several inputs as one tuple: ((x, z), target) (a Dataset's samples too)")
        inputs, target = item
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        if isinstance(inputs, dict):
            raise DataError(f"{where}: inputs are a dict ({', '.join(map(str, inputs))}); give them as a tuple of "
                            "tensors in forward's argument order instead")
        if not isinstance(inputs, (tuple, list)) or not inputs or \
                not all(isinstance(t, torch.Tensor) for t in inputs):
            raise DataError(f"{where}: inputs must be a tensor or a tuple of tensors, got {_describe(inputs)}")
        inputs = tuple(inputs)
        if target is not None and not isinstance(target, torch.Tensor):
            raise DataError(f"{where}: the target must be a tensor (class indices or values), got {_describe(target)}")
        if target is not None and not self.inputs_only and target.dim() == 0 and inputs[0].dim() \
                and inputs[0].shape[0] != 1:
            raise DataError(f"{where}: the target is one value ({_describe(target)}), so this looks like one sample "
                            f"({_describe(inputs[0])}) without its batch dim: a list or iterable holds batches; give "
                            "single samples as a map-style Dataset, which slimfx batches, or torch.stack them")
        if target is not None and not self.inputs_only:
            n_in = inputs[0].shape[0] if inputs[0].dim() else 1
            n_t = target.shape[0] if target.dim() else 1
            if n_in != n_t:
                raise DataError(f"{where}: {n_t} targets for {n_in} inputs; each input row needs one target")
        return inputs, target


def _refuse_non_tensors(name: str, source: Any) -> None:
    """DataError for a part given as one tensor, or as a pair of numpy arrays / Python lists."""
    if isinstance(source, torch.Tensor):
        raise DataError(f"data.{name} is one tensor ({_describe(source)}); give the split as an (inputs, targets) "
                        f"pair, e.g. {name}=(x, y), or (x, None) when there are no targets")
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], dict) \
            and isinstance(source[1], (torch.Tensor, type(None))):
        raise DataError(f"data.{name}: inputs are a dict ({', '.join(map(str, source[0]))}); give them as a tuple of "
                        f"tensors in forward's argument order instead, e.g. {name}=((x, z), y)")
    if isinstance(source, tuple) and len(source) == 2 and any(_array_like(v) for v in source):
        raise DataError(f"data.{name} is a pair of {_describe(source[0])} and {_describe(source[1])}; slimfx "
                        f"takes torch tensors: give {name}=(torch.as_tensor(x), torch.as_tensor(y))")


def _array_like(v: Any) -> bool:
    return type(v).__module__ == "numpy" or (isinstance(v, list) and bool(v) and isinstance(v[0], (int, float, list)))


def check_finite(inputs: tuple, where: str, of: str = "the batch") -> None:
    """DataError when a floating-point input (of a batch, a whole split, or the example) holds NaN or Inf: no check
    on such inputs means anything (inputs generated like a NaN example are NaN, and NaN agrees with NaN)."""
    for k, t in enumerate(inputs):  # meta tensors hold no values (capture refuses them, naming the input)
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            rows = bad.reshape(len(t), -1).any(1).nonzero().flatten().tolist() if t.dim() else [0]
            raise DataError(f"{where}: input {k} holds {int(bad.sum())} NaN/Inf values (in {len(rows)} "
                            f"row{'s' if len(rows) != 1 else ''}, the first at row {rows[0]} of {of}); slimfx "
                            "calibrates, trains and checks on finite inputs only: remove or fix those samples")


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor {v.dtype}{list(v.shape)}"
    return type(v).__name__


def _same_data(a: Any, b: Any) -> bool:
    """Whether two parts are one object, or (inputs, targets) pairs over the same input tensors (same storage,
    offset and shape: views of other rows are different data)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    pa, pb = _tensor_pair_or_none(a), _tensor_pair_or_none(b)
    if pa is None or pb is None:
        return False
    x, z = pa[0][0], pb[0][0]
    return x.untyped_storage().data_ptr() == z.untyped_storage().data_ptr() and \
        x.storage_offset() == z.storage_offset() and x.shape == z.shape


# held-out data with at least this fraction of its rows in train is refused: it is (mostly) the train data
SHARED_ROWS_REFUSED = 0.5


def _shared_rows(held: Any, train: Any) -> float:
    """The fraction of `held`'s rows (first input, tensors given whole) that are also rows of `train`'s, byte
    for byte: a clone or a slice of the train tensors, or train holding the held-out rows. 0 for other data."""
    if held is None or train is None:
        return 0.0
    ph, pt = _tensor_pair_or_none(held), _tensor_pair_or_none(train)
    if ph is None or pt is None:
        return 0.0
    x, z = ph[0][0], pt[0][0]
    if x.dtype != z.dtype or x.shape[1:] != z.shape[1:] or not len(x):
        return 0.0
    def row_bytes(t: torch.Tensor) -> Any:  # any dtype (bfloat16 too), as raw bytes per row
        return t.detach().reshape(len(t), -1).contiguous().view(torch.uint8).numpy()

    seen = {r.tobytes() for r in row_bytes(z)}
    return sum(r.tobytes() in seen for r in row_bytes(x)) / len(x)


def _tensor_pair_or_none(source: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    try:
        return _tensor_pair(source)
    except DataError:  # a malformed pair: Split names it when the part is read
        return None


def _tensor_pair(source: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """`(inputs, targets)` holding a whole split as tensors (`(inputs, None)`: unlabelled), or None when `source`
    is something else."""
    if not (isinstance(source, tuple) and len(source) == 2 and (source[1] is None
                                                                 or isinstance(source[1], torch.Tensor))):
        return None
    xs = (source[0],) if isinstance(source[0], torch.Tensor) else source[0]
    if not (isinstance(xs, (tuple, list)) and xs and all(isinstance(t, torch.Tensor) and t.dim() for t in xs)):
        return None
    y = source[1]
    if y is None:
        if any(len(t) != len(xs[0]) for t in xs):
            raise DataError(f"inputs of {', '.join(str(len(t)) for t in xs)} rows: an (inputs, None) pair needs the "
                            "same number of rows in every input")
        return tuple(xs), None
    if y.dim() == 0 or any(len(t) != len(y) for t in xs):
        raise DataError(f"{len(y) if y.dim() else 0} targets for {len(xs[0])} inputs: an (inputs, targets) pair "
                        "needs one target per input row")
    return tuple(xs), y


def correct(output: Any, target: torch.Tensor, where: str = "") -> int:
    """How many of the target's positions (rows, tokens, pixels) the model's first output has its argmax at;
    DataError (its message starting with `where`, e.g. "data.validation, batch 0: ") when the targets are not
    class indices. Accuracy is this over `target.numel()`."""
    try:
        return _correct(output, target)
    except DataError as e:
        raise DataError(f"{where}{e}") from None


def _correct(output: Any, target: torch.Tensor) -> int:
    from slimfx.ir.metrics import named_leaves

    logits = next((v for _, v in named_leaves(output) if isinstance(v, torch.Tensor)), None)
    if logits is not None and logits.dim() >= 1 and target.shape == logits.shape and target.is_floating_point():
        raise DataError(f"targets of shape {list(target.shape)} are shaped like the model's first output: they "
                        "look one-hot or probabilities, but accuracy needs class indices, one per row of logits: "
                        "give y.argmax(-1)")
    if logits is not None and logits.dim() >= 1 and logits.shape[:-1] == target.shape:
        class_dim = -1  # [batch, classes] / [batch, tokens, classes]
    elif logits is not None and logits.dim() >= 3 and logits.shape[:1] + logits.shape[2:] == target.shape:
        class_dim = 1  # dense prediction, channels first: [batch, classes, H, W] with a [batch, H, W] mask
    else:
        raise DataError(f"targets of shape {list(target.shape)} do not match the model's first output "
                        f"{list(logits.shape) if logits is not None else None}: accuracy needs class-index "
                        "targets, one per row of logits (or per position: [batch, H, W] for [batch, classes, H, "
                        "W] scores)")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise DataError(f"targets are {target.dtype}; accuracy needs class indices, an integer tensor (e.g. "
                        "y.long()); data without class labels goes in as (inputs, None)")
    classes = logits.shape[class_dim]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        bad = int(target.min()) if int(target.min()) < 0 else int(target.max())
        raise DataError(f"targets hold class {bad}, but the model's first output scores {classes} classes "
                        f"(0 to {classes - 1}): give class indices in that range")
    return int((logits.argmax(class_dim) == target).sum())


def check_like_example(where: str, inputs: tuple, example: tuple) -> None:
    """DataError when a batch's inputs differ from the model's example inputs in number, dtype or rank: the
    exported files take exactly the example's, so data that differs cannot check them."""
    if len(inputs) != len(example):
        raise DataError(f"{where} gives {len(inputs)} input{'s' if len(inputs) != 1 else ''} per batch but the model "
                        f"takes {len(example)} ({', '.join(_describe(t) for t in example)} in its example): give "
                        "inputs as a tuple of tensors, one per forward argument, in forward's order")
    for k, (got, want) in enumerate(zip(inputs, example)):
        if isinstance(want, torch.Tensor) and (got.dtype != want.dtype or got.dim() != want.dim()):
            single = got.dim() == want.dim() - 1 and tuple(got.shape) == tuple(want.shape[1:])
            raise DataError(f"{where}: input {k} is {_describe(got)} but the model's example input {k} is "
                            f"{_describe(want)}; the data must have the example's dtype and number of dimensions "
                            + ("(this looks like one sample without its batch dim: a list or iterable holds "
                               "batches; give single samples as a map-style Dataset, which slimfx batches, or "
                               "torch.stack them)" if single else f"(e.g. x.to({want.dtype}))"))


def accuracy(model: Any, split: Iterable) -> float | None:
    """Top-1 accuracy of `model` (a module, run in eval mode, or any callable) on `(inputs, target)`
    batches; None when a batch has no target."""
    module = model if isinstance(model, torch.nn.Module) else None
    was = module.training if module is not None else False
    if module is not None:
        module.eval()
    hits = n = 0
    try:
        with torch.no_grad():
            for inputs, target in split:
                if target is None:
                    return None
                hits, n = hits + correct(model(*inputs), target), n + target.numel()
    finally:
        if module is not None:
            module.train(was)
    return hits / n if n else None


def generated_sample_count(macs_per_sample: int | None) -> int:
    """How many generated inputs check a model that comes with no data: GENERATED_SAMPLES, or for a heavy model
    as many as GENERATED_MACS_BUDGET allows (a multiple of 32, at least GENERATED_SAMPLES_MIN)."""
    if not macs_per_sample or macs_per_sample * GENERATED_SAMPLES <= GENERATED_MACS_BUDGET:
        return GENERATED_SAMPLES
    return max(GENERATED_SAMPLES_MIN, int(GENERATED_MACS_BUDGET // macs_per_sample) // 32 * 32)


def generated_batches(example: tuple, samples: int = GENERATED_SAMPLES, seed: int = 0,
                      batch: int | None = None) -> list[Batch]:
    """`samples` random inputs like the example: float inputs drawn with its mean and spread and clipped to
    its range; integer inputs uniform over the example's range (bool: as the example). For models that
    come with no data; the report says its numbers came from these."""
    gen = torch.Generator().manual_seed(seed)
    rows = int(example[0].shape[0]) if example and isinstance(example[0], torch.Tensor) and example[0].dim() else 1
    step = batch or max(rows, 32)
    out: list[Batch] = []
    for start in range(0, samples, step):
        n = min(step, samples - start)
        out.append((tuple(_like(t, n, gen) for t in example), None))
    return out


def example_at_batch(example: tuple, batch: int, seed: int = 0) -> tuple:
    """The example inputs at `batch` rows: the example's own rows first, the others drawn like them (the rule of
    `generated_batches`), so a check at a batch size larger than the example's compares new inputs, not copies of
    the example's rows. Tensors without a dim 0 stay as they are."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in example:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == 0:
            out.append(t)
        elif batch <= t.shape[0]:
            out.append(t[:batch])
        else:
            out.append(torch.cat([t, _like(t, batch - int(t.shape[0]), gen)]))
    return tuple(out)


def _like(t: Any, n: int, gen: torch.Generator) -> Any:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    shape = (n, *t.shape[1:])
    if t.dtype.is_floating_point:
        x = t.double()
        lo, hi = float(x.min()), float(x.max())
        mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 1.0
        std = std if std > 0 else max(abs(mean), 1.0)
        # in place: the same float64 arithmetic as `randn * std + mean`, without a temporary per step
        out = torch.randn(shape, generator=gen, dtype=torch.float64).mul_(std).add_(mean)
        if hi > lo and (lo >= 0 or hi <= 0):
            out.clamp_(lo, hi)  # keep one-signed inputs one-signed
        return out.to(t.dtype)
    if t.dtype == torch.bool:
        return t[torch.arange(n) % t.shape[0]]
    lo, hi = int(t.min()), int(t.max())
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=t.dtype)


# --- the zoo's bundled data, and tensors -> batches ------------------------------------------------------

class Batches:
    """Re-iterable `(inputs_tuple, target)` mini-batches over tensors; reshuffled (seeded) each pass."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, *, shuffle: bool = True,
                 seed: int = 0):
        if len(x) != len(y):
            raise DataError(f"inputs ({len(x)}) and targets ({len(y)}) differ in length")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self._gen) if self.shuffle else torch.arange(len(self.x))
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield (self.x[idx],), self.y[idx]


def calibration_batches(x: torch.Tensor, samples: int, batch_size: int = 32, seed: int = 0) -> list[tuple]:
    """`samples` inputs drawn (seeded) from `x`, as a list of input tuples of `batch_size`."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[:samples]
    return [(x[idx[i:i + batch_size]],) for i in range(0, len(idx), batch_size)]


def zoo_data(dataset: str, *, seed: int = 0, calibration_samples: int = 256, batch_size: int = 64) -> Data:
    """A zoo dataset split three ways: train, validation (carved from train), test; calibration from train."""
    from slimfx import models

    ds = models.load_dataset(dataset)  # the split the zoo trained on; `seed` orders batches and calibration
    return Data(train=Batches(ds.train_x, ds.train_y, batch_size, seed=seed), batch_size=batch_size,
                validation=((ds.val_x,), ds.val_y), test=((ds.test_x,), ds.test_y),
                calibration=calibration_batches(ds.train_x, calibration_samples, seed=seed),
                calibration_samples=calibration_samples)


def load_data(spec: str, *, base: Path | None = None, given_by: str = "") -> Data:
    """The `Data` a `file.py:fn` / `package.module:fn` spec returns (DataError otherwise); a relative file is
    resolved against `base` (a recipe's folder; default the working directory)."""
    from slimfx.loading import import_spec

    fn = import_spec(spec, what="data", base=base, given_by=given_by)
    try:
        value = fn() if callable(fn) else fn
    except SlimfxError:
        raise
    except Exception as e:  # noqa: BLE001 - a user function that raises is a user error
        raise DataError(f"data {spec} raised {type(e).__name__}: {e}") from e
    if isinstance(value, dict) and set(value) <= set(PARTS) | {"calibration_samples", "batch_size"}:
        value = Data(**value)
    if not isinstance(value, Data):
        raise DataError(f"data {spec} returned {type(value).__name__}; return slimfx.Data(train=..., "
                        "validation=..., test=..., calibration=...) (each part optional)")
    return value


__all__ = ["Data", "Split", "DataError", "Batches", "check_like_example", "check_finite", "calibration_batches",
           "generated_batches", "example_at_batch", "zoo_data", "load_data", "accuracy", "correct"]
