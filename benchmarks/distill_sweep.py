"""The sweep behind the defaults of `slimfx distill` and the `distill` pass (issue #18).

Teacher: the zoo's digits_cnn, trained with the run's seed as the command does. Students from
benchmarks/students.py. Seeds 0 1 2; every run goes through slimfx.distilling.train_arm -- the code `slimfx distill`
runs -- so a row here is what the command prints. Every run chooses its best epoch on the validation split and every
choice below is made on validation accuracy (mean over pairs and seeds); test accuracy is recorded too and shown only
for the final comparison.

The machine has 2 shared cores, so grids are scouted on seed 0 and the best of them confirmed on seeds 0 1 2.

Round 1, pairs `narrow` (zoo-like, 3.7k params), `shallow` (one conv stage, 1.4k), `dwres` (depthwise-separable
residual, 2.4k), no augmentation:
  coarse: 15 epochs, lr 3e-3: ce; kd and logit-std over T in {2, 4} x alpha in {0.5, 0.9}; ctkd    seed 0
  at:     at+kd at the best kd (T, alpha), beta in {10, 100}; at+logit-std, beta 100          seed 0
  budget: ce and the 3 best so far at 30 epochs (lr 3e-3) and 15 epochs (lr 1e-2)              seed 0
  refine: the two best scouted configs and ce at their budgets                                 seeds 0 1 2
Round 2, same pairs, consistent and patient teaching (Beyer et al. 2022):
  patient: 40 epochs, lr 1e-2: ce and kd (T=2, alpha=0.9) with augment none, mixup:1, mixup:0.4, and pure
           function matching (kd T=1 alpha=1, mixup:1); the scratch baseline of a config is ce with the same
           budget and augment (what `--baseline` trains)                                       seed 0
  refine2: the two patient configs with the largest gain over their baseline, and it           seeds 0 1 2
Round 3, students far below the teacher: `shallow`, `thin` (4 conv layers of 4-8 channels, 1.4k), `mlp` (no
convolution, 1.2k):
  small:  round 2's refined configs and their baseline                                         seeds 0 1 2
  at3:    at+kd at the pick with beta in {1, 10, 100} (the at* losses' beta)                    seeds 0 1 2
Round 4, attention transfer's automatic pairs (why AT+KD lost to KD on `shallow`): its pairs were the last map of
every spatial size both networks have, and shallow's 4x4 map is its one conv stage max-pooled, paired with the
teacher's third conv stage. The rules (`pairs`, a sweep setting; PAIR_RULES):
  rules:  at+kd at the defaults with pairs `computed` and `same-kind` (`every-size` is at3's beta=1 row), on the
          students where they differ (shallow, thin); the best on validation is the rule    seeds 0 1 2
  beta4:  at+kd at that rule with beta in {1, 3}, on the students with feature maps, including `strided` (declared
          for this round, before any run of it; mlp has none)                             seeds 0 1 2
  final:  the defaults (slimfx.distilling.DEFAULTS, which must be what `small` picks), their baseline, and kd and
          at+kd (automatic pairs: the library's auto_pairs, which must be the rule picked) at the defaults'
          settings, on shallow, thin, mlp and strided, scored on test                         seeds 0 1 2
  nomix:  a diagnostic, read after `final`, no choice made on it: kd and at+kd as in `final` without mixup, on
          the students with feature maps (does AT's gain, or KD's loss on strided, hang on mixup?)   seeds 0 1 2

    .venv/bin/python benchmarks/distill_sweep.py --jobs 2            # all stages (resumes from --results)
    .venv/bin/python benchmarks/distill_sweep.py --stage report      # the tables from the stored runs

Each finished run is appended to --results (JSON lines) at once, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PAIRS = ("narrow", "shallow", "dwres")  # rounds 1 and 2
SMALL = ("shallow", "thin", "mlp")       # round 3: students far below the teacher
RULE_PAIRS = ("shallow", "thin")         # round 4: the students whose pairs differ between the rules
AT_PAIRS = ("shallow", "thin", "strided")  # round 4: the students with feature maps (mlp has none)
FINAL = ("shallow", "thin", "mlp", "strided")  # the final table
#: attention transfer's automatic pairs, by rule: for each spatial size both networks have, the last map of that
#: size in each (features.stage_ends), when
PAIR_RULES = {
    "every-size": "always (auto_pairs up to round 3)",
    "computed": "both networks compute at that size (a conv writes a map of it: features.computed_sizes)",
    "same-kind": "both compute at that size, or neither does (a pooled map is never paired with a computed one)",
}
SEEDS = (0, 1, 2)
SCOUT = (0,)  # the coarse, at and budget stages scout on one seed; refine and final run all three
TEACHER = "digits_cnn"
BASE = dict(epochs=15, lr=3e-3, batch_size=64)

_cache: dict = {}


def _setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _one(job: tuple[str, dict, int]) -> dict:
    """Train one student: (pair, settings, seed) -> the run's record."""
    import students
    import torch

    from slimfx import models
    from slimfx.data import zoo_data
    from slimfx.distilling import Settings, train_arm
    from slimfx.errors import SlimfxError

    pair, settings, seed = job
    s = Settings(**{k: v for k, v in settings.items() if v is not None and k != "pairs"})
    if ("teacher", seed) not in _cache:
        _cache["teacher", seed] = models.get(TEACHER).trained(seed=seed, progress=False)
    data = zoo_data(models.get(TEACHER).dataset, seed=seed, batch_size=s.batch_size)
    torch.manual_seed(seed)  # as slimfx.loading does before calling a student callable
    student = getattr(students, pair)()
    if settings.get("pairs"):  # named pairs, by the run's rule (none found: auto_pairs below says why)
        s = replace(s, features=tuple(rule_pairs(settings["pairs"], student, _cache["teacher", seed])))
    try:
        arm = train_arm(pair, _cache["teacher", seed], student, data, s, seed=seed, quiet=True)
    except SlimfxError as e:  # e.g. attention transfer on a student without feature maps (mlp)
        return {"pair": pair, "seed": seed, "settings": settings, "validation": None, "test": None,
                "error": str(e)}
    return {"pair": pair, "seed": seed, "settings": settings, "validation": arm.validation_accuracy,
            "test": arm.test_accuracy, "best_epoch": arm.best_epoch, "seconds": arm.seconds,
            "features": [f"{a}:{b}" for a, b in arm.features]}


def rule_pairs(rule: str, student, teacher) -> list[tuple[str, str]]:
    """The attention-transfer pairs of `rule` (PAIR_RULES) between two modules, as node names."""
    from slimfx import ir, models
    from slimfx.passes.distill import computed_sizes, stage_ends

    x = models.get(TEACHER).example_inputs()
    sg, tg = ir.capture(student, x), ir.capture(teacher, x)
    s_ends, t_ends, cs, ct = stage_ends(sg), stage_ends(tg), computed_sizes(sg), computed_sizes(tg)
    keep = {"every-size": lambda k: True, "computed": lambda k: k in cs and k in ct,
            "same-kind": lambda k: (k in cs) == (k in ct)}[rule]
    return [(s_ends[k].name, t_ends[k].name) for k in s_ends if k in t_ends and keep(k)]


def _key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def load(results: Path) -> dict[tuple[str, str, int], dict]:
    out = {}
    if results.exists():
        for line in results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r["settings"].setdefault("augment", "none")  # runs stored before the augment option
                # runs stored before round 4 paired every shared size
                r["settings"].setdefault("pairs", "every-size" if r["settings"]["loss"].startswith("at") else None)
                out[_key(r["settings"]), r["pair"], r["seed"]] = r
    return out


def run_all(configs: list[dict], results: Path, jobs: int, threads: int, seeds: tuple[int, ...] = SEEDS,
            pairs: tuple[str, ...] = PAIRS) -> dict:
    done = load(results)
    todo = [(p, c, s) for c in configs for p in pairs for s in seeds if (_key(c), p, s) not in done]
    print(f"{len(configs)} configs x {len(pairs)} pairs x seeds {seeds}: {len(todo)} runs to do", flush=True)
    if not todo:
        return done
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs, initializer=_setup, initargs=(threads,)) as pool, \
            results.open("a") as f:
        for i, r in enumerate(pool.imap_unordered(_one, todo), 1):
            f.write(json.dumps(r) + "\n")
            f.flush()
            done[_key(r["settings"]), r["pair"], r["seed"]] = r
            what = (f"val {r['validation'] * 100:.2f} test {r['test'] * 100:.2f}" if "error" not in r
                    else f"n/a: {r['error'][:80]}")
            print(f"[{i}/{len(todo)} {time.perf_counter() - t0:.0f}s] {r['pair']} seed {r['seed']} "
                  f"{_label(r['settings'])}: {what}", flush=True)
    return done


def _label(c: dict) -> str:
    loss = c["loss"]
    parts = [loss]
    if loss.split("+")[-1] in ("kd", "ctkd", "logit-std"):
        parts.append(f"T={c['T']:g} a={c['alpha']:g}")
    if loss.startswith("at"):
        parts.append(f"beta={c['beta']:g}")
    parts.append(f"{c['epochs']}ep lr={c['lr']:g}")
    if c.get("augment", "none") != "none":
        parts.append(c["augment"])
    if c.get("pairs") not in (None, "every-size"):
        parts.append(f"pairs={c['pairs']}")
    return " ".join(parts)


def cfg(loss: str, **kw) -> dict:
    """A run's settings; the options a loss does not read are None, so they never split a cell."""
    d = {"loss": loss, "T": 4.0, "alpha": 0.9, "beta": 1000.0, **BASE, "augment": "none", "pairs": "every-size", **kw}
    if loss.split("+")[-1] not in ("kd", "ctkd", "logit-std"):
        d["T"] = d["alpha"] = None
    if not loss.startswith("at"):
        d["beta"] = d["pairs"] = None
    return d


def default_cfg() -> dict:
    from slimfx.distilling import DEFAULTS as D

    return cfg(D.loss, T=D.T, alpha=D.alpha, beta=D.beta, epochs=D.epochs, lr=D.lr, batch_size=D.batch_size,
               augment=D.augment)


def ce_of(c: dict) -> dict:
    """The scratch baseline of a config: what `--baseline` trains, the same budget and augmentation."""
    return cfg("ce", epochs=c["epochs"], lr=c["lr"], augment=c.get("augment", "none"))


def final_stage(done: dict) -> list[dict]:
    """Scratch without augmentation (for reference), the defaults and their baseline, and KD / AT+KD (automatic
    pairs: the rule round 4 picked, once it has) at the defaults' settings."""
    from slimfx.distilling import DEFAULTS as D

    d = default_cfg()
    plain = [ce_of({**d, "augment": "none"})] if d["augment"] != "none" else []  # scratch as it was, for reference
    rule = rule_pick(done)
    return plain + [ce_of(d), d] + [
        cfg(loss, T=D.T, alpha=D.alpha, beta=D.beta, epochs=D.epochs, lr=D.lr, augment=D.augment, pairs=rule)
        for loss in ("kd", "at+kd") if loss != D.loss and (rule or loss == "kd")]


def cell(done: dict, c: dict, split: str = "validation", seeds: tuple[int, ...] = SEEDS,
         pairs: tuple[str, ...] = PAIRS) -> dict[str, float | None] | None:
    """Mean accuracy per pair (over seeds) and over the pairs, or None when a run is missing; a pair the config
    cannot run on (a stored error) is None and left out of the mean."""
    per: dict[str, float | None] = {}
    for p in pairs:
        vals = [done.get((_key(c), p, s)) for s in seeds]
        if any(v is None for v in vals):
            return None
        per[p] = None if any("error" in v for v in vals) else statistics.mean(v[split] for v in vals)
    ok = [per[p] for p in pairs if per[p] is not None]
    per["mean"] = statistics.mean(ok) if ok else None
    return per


def coarse() -> list[dict]:
    out = [cfg("ce")]
    out += [cfg(loss, T=T, alpha=a) for loss in ("kd", "logit-std") for T in (2.0, 4.0) for a in (0.5, 0.9)]
    out.append(cfg("ctkd", T=4.0, alpha=0.5))
    return out


def _scout(done: dict, c: dict) -> float:
    v = cell(done, c, seeds=SCOUT)
    return v["mean"] if v else -1.0


def best(done: dict, configs: list[dict], loss: str | None = None) -> dict:
    """The config with the highest scouted validation accuracy (of one loss, or of any loss but ce)."""
    cands = [c for c in configs if (c["loss"] == loss if loss else c["loss"] != "ce")]
    return max(cands, key=lambda c: _scout(done, c))


def at_stage(done: dict) -> list[dict]:
    kd, ls = best(done, coarse(), "kd"), best(done, coarse(), "logit-std")
    return [cfg("at+kd", T=kd["T"], alpha=kd["alpha"], beta=beta) for beta in (10.0, 100.0)] + [
        cfg("at+logit-std", T=ls["T"], alpha=ls["alpha"], beta=100.0)]


def budget_stage(done: dict) -> list[dict]:
    tops = sorted((c for c in coarse() + at_stage(done) if c["loss"] != "ce"), key=lambda c: -_scout(done, c))[:3]
    return [{**c, **b} for c in (cfg("ce"), *tops) for b in (dict(epochs=30, lr=3e-3), dict(epochs=15, lr=1e-2))]


def scouted(done: dict) -> list[dict]:
    return coarse() + at_stage(done) + budget_stage(done)


def refine_stage(done: dict) -> list[dict]:
    """The two best scouted configs and the scratch baseline at their budgets, on every seed."""
    tops = sorted((c for c in scouted(done) if c["loss"] != "ce"), key=lambda c: -_scout(done, c))[:2]
    ces = {_key(ce_of(c)): ce_of(c) for c in tops}
    return tops + list(ces.values())


PATIENT = dict(epochs=40, lr=1e-2)
MIXUPS = ("mixup:1", "mixup:0.4")


def patient() -> list[dict]:
    """Round 2 (consistent, patient teaching): ce and kd at 40 epochs without and with mixup, where the teacher
    answers on the blended inputs and `--baseline` trains on the same blends with blended labels; plus pure
    function matching (T=1, alpha=1: the teacher's output as the only target)."""
    out = []
    for aug in ("none", *MIXUPS):
        out += [cfg("ce", augment=aug, **PATIENT), cfg("kd", T=2.0, alpha=0.9, augment=aug, **PATIENT)]
    return out + [cfg("kd", T=1.0, alpha=1.0, augment="mixup:1", **PATIENT)]


def gain(done: dict, c: dict, seeds: tuple[int, ...] = SCOUT) -> float:
    """Validation accuracy over the scratch baseline of the same budget and augmentation (what --baseline shows)."""
    v, b = cell(done, c, seeds=seeds), cell(done, ce_of(c), seeds=seeds)
    return v["mean"] - b["mean"] if v and b else -1.0


def refine2_stage(done: dict) -> list[dict]:
    """The two patient configs with the largest scouted gain over their baseline, and those baselines."""
    tops = sorted((c for c in patient() if c["loss"] != "ce"), key=lambda c: -gain(done, c))[:2]
    return tops + list({_key(ce_of(c)): ce_of(c) for c in tops}.values())


def small_stage(done: dict) -> list[dict]:
    """Round 3: round 2's refined configs on students far below the teacher (SMALL), seeds 0 1 2."""
    return refine2_stage(done)


def chosen(done: dict) -> dict | None:
    """The sweep's pick for the defaults: the distillation config of round 3 with the highest validation accuracy
    (mean over SMALL pairs and seeds; its baseline is shared, so also the largest gain over it)."""
    cands = [c for c in small_stage(done) if c["loss"] != "ce" and cell(done, c, pairs=SMALL)]
    return max(cands, key=lambda c: cell(done, c, pairs=SMALL)["mean"]) if cands else None


def at3_stage(done: dict) -> list[dict]:
    """Round 3's attention-transfer weight: at+kd at the picked config with beta in {1, 10, 100} (beta=10 came
    from round 1, without augmentation); the at* losses' default beta is the best on validation."""
    pick = chosen(done) or default_cfg()
    return [{**pick, "loss": "at+kd", "beta": b, "pairs": "every-size"} for b in (1.0, 10.0, 100.0)]


def beta_pick(done: dict) -> float | None:
    """The at* losses' beta: the at3 config with the highest validation accuracy over the pairs it runs on."""
    cands = [(cell(done, c, pairs=SMALL), c) for c in at3_stage(done)]
    cands = [(v["mean"], c["beta"]) for v, c in cands if v and v["mean"] is not None]
    return max(cands)[1] if cands else None


def rules_stage(done: dict) -> list[dict]:
    """Round 4: at+kd at the defaults (beta of at3) under each pairing rule; every-size is at3's row."""
    from slimfx.distilling import DEFAULTS as D

    return [cfg("at+kd", T=D.T, alpha=D.alpha, beta=D.beta, epochs=D.epochs, lr=D.lr, augment=D.augment, pairs=r)
            for r in PAIR_RULES]


def rule_pick(done: dict) -> str | None:
    """The automatic pairing rule: the rules-stage config with the highest validation accuracy on RULE_PAIRS."""
    cands = [(cell(done, c, pairs=RULE_PAIRS), c) for c in rules_stage(done)]
    if not all(v for v, _ in cands):
        return None
    return max(cands, key=lambda vc: vc[0]["mean"])[1]["pairs"]


def beta4_stage(done: dict) -> list[dict]:
    """Round 4: at+kd at the picked rule with beta in {1, 3}, on the students with feature maps."""
    rule = rule_pick(done)
    return [{**c, "beta": b} for c in rules_stage(done) if c["pairs"] == rule for b in (1.0, 3.0)] if rule else []


def beta4_pick(done: dict) -> float | None:
    cands = [(cell(done, c, pairs=AT_PAIRS), c["beta"]) for c in beta4_stage(done)]
    return max((v["mean"], b) for v, b in cands)[1] if cands and all(v for v, _ in cands) else None


def nomix_stage(done: dict) -> list[dict]:
    """The final stage's kd and at+kd without augmentation (a diagnostic; their baseline is plain scratch)."""
    return [{**c, "augment": "none"} for c in final_stage(done) if c["loss"] != "ce"]


def auto_pairs_are(rule: str) -> bool:
    """Whether the library's automatic pairs (what `slimfx distill` uses) are `rule`'s, on every AT student."""
    import students

    from slimfx import ir, models
    from slimfx.passes.distill import auto_pairs

    teacher, x = models.get(TEACHER).trained(seed=0, progress=False), models.get(TEACHER).example_inputs()
    return all(auto_pairs(ir.capture(getattr(students, p)(), x), ir.capture(teacher, x))
               == rule_pairs(rule, getattr(students, p)(), teacher) for p in AT_PAIRS)


def table(done: dict, configs: list[dict], split: str = "validation", seeds: tuple[int, ...] = SEEDS,
          pairs: tuple[str, ...] = PAIRS) -> str:
    rows = [f"| config | {' | '.join(pairs)} | mean | vs ce (same budget, augment) |",
            "|---|" + "---|" * (len(pairs) + 2)]
    for c in configs:
        v = cell(done, c, split, seeds, pairs)
        if v is None:
            continue
        ce = cell(done, ce_of(c), split, seeds, pairs)
        ok = [p for p in pairs if v[p] is not None]
        gain = f"{statistics.mean(v[p] - ce[p] for p in ok) * 100:+.2f}" if ce and ok and c["loss"] != "ce" else "—"
        note = "" if len(ok) == len(pairs) else f" ({len(ok)} pairs)"
        rows.append(f"| {_label(c)} | " + " | ".join("n/a" if v[p] is None else f"{v[p] * 100:.2f}" for p in pairs)
                    + f" | {'n/a' if v['mean'] is None else format(v['mean'] * 100, '.2f')}{note} | {gain} |")
    return "\n".join(rows)


def report(done: dict) -> None:
    stages = [("coarse", coarse(), SCOUT, PAIRS)]
    if all(cell(done, c, seeds=SCOUT) for c in coarse()):
        stages.append(("at", at_stage(done), SCOUT, PAIRS))
        if all(cell(done, c, seeds=SCOUT) for c in at_stage(done)):
            stages.append(("budget", budget_stage(done), SCOUT, PAIRS))
            if all(cell(done, c, seeds=SCOUT) for c in budget_stage(done)):
                stages.append(("refine", refine_stage(done), SEEDS, PAIRS))
    if all(cell(done, c, seeds=SCOUT) for c in patient()):
        stages.append(("patient", patient(), SCOUT, PAIRS))
        if all(cell(done, c) for c in refine2_stage(done)):
            stages.append(("refine2", refine2_stage(done), SEEDS, PAIRS))
            stages.append(("small", small_stage(done), SEEDS, SMALL))
            stages.append(("at3", at3_stage(done), SEEDS, SMALL))
            if rule_pick(done):
                stages.append(("rules", rules_stage(done), SEEDS, RULE_PAIRS))
                if beta4_pick(done) is not None:
                    stages.append(("beta4", beta4_stage(done), SEEDS, AT_PAIRS))
    for name, configs, seeds, pairs in stages:
        print(f"\n### {name}: validation accuracy %, mean of seed{'s' * (len(seeds) > 1)} "
              f"{', '.join(map(str, seeds))}\n")
        print(table(done, configs, seeds=seeds, pairs=pairs))
        if name == "refine2":  # read before round 3 was planned: why round 3 changed the students
            print("\n### refine2 on the test split (read after round 2), mean of seeds 0, 1, 2\n")
            print(table(done, configs, "test", pairs=pairs))
    pick = chosen(done)
    if pick is not None:
        same = _key(pick) == _key(default_cfg())
        print(f"\nthe sweep picks {_label(pick)}; slimfx.distilling.DEFAULTS {'are' if same else 'are NOT'} that "
              f"({_label(default_cfg())})")
    beta = beta_pick(done)
    if beta is not None:
        print(f"round 3 picks beta={beta:g} for the at* losses")
    rule = rule_pick(done)
    if rule is not None:
        print(f"round 4 picks automatic pairs {rule!r} ({PAIR_RULES[rule]}); the library's auto_pairs "
              f"{'is' if auto_pairs_are(rule) else 'is NOT'} that rule on {', '.join(AT_PAIRS)}")
    beta = beta4_pick(done)
    if beta is not None:
        from slimfx.distilling import DEFAULTS

        print(f"round 4 picks beta={beta:g} for the at* losses; DEFAULTS.beta is {DEFAULTS.beta:g}")
    final = final_stage(done)
    print(f"\n### the defaults ({_label(default_cfg())}) on the test split, mean of seeds {', '.join(map(str, SEEDS))}\n")
    print(table(done, final, "test", pairs=FINAL))
    print()
    for c in final:
        if cell(done, c, "test", pairs=FINAL):
            runs = {p: [done[_key(c), p, s] for s in SEEDS] for p in FINAL}
            vals = {p: [r["test"] * 100 for r in rs] for p, rs in runs.items() if all("error" not in r for r in rs)}
            errors = {p: rs[0]["error"] for p, rs in runs.items() if p not in vals}
            print(f"- {_label(c)}, test % per seed (mean ± std): " + "; ".join(
                f"{p} {' '.join(f'{v:.2f}' for v in vals[p])} ({statistics.mean(vals[p]):.2f} ± "
                f"{statistics.stdev(vals[p]):.2f})" if p in vals else f"{p} n/a ({errors[p].split(';')[0]})"
                for p in FINAL))
    nomix = nomix_stage(done)
    if nomix and all(cell(done, c, pairs=AT_PAIRS) for c in nomix):
        for split in ("validation", "test"):
            print(f"\n### nomix (a diagnostic, no choice made on it): {split} accuracy %, mean of seeds 0, 1, 2\n")
            print(table(done, [ce_of(nomix[0]), *nomix], split, pairs=AT_PAIRS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("all", "coarse", "at", "budget", "refine", "patient", "refine2", "small",
                                        "at3", "rules", "beta4", "final", "nomix", "report"), default="all")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "distill_sweep.jsonl")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one per core)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = ap.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    from slimfx import models

    for s in SEEDS:  # train (or load) the teachers once, before the workers need them
        models.get(TEACHER).trained(seed=s, progress=False)
    done = load(args.results)
    for stage, configs, seeds, pairs in (
            ("coarse", lambda d: coarse(), SCOUT, PAIRS), ("at", at_stage, SCOUT, PAIRS),
            ("budget", budget_stage, SCOUT, PAIRS), ("refine", refine_stage, SEEDS, PAIRS),
            ("patient", lambda d: patient(), SCOUT, PAIRS), ("refine2", refine2_stage, SEEDS, PAIRS),
            ("small", small_stage, SEEDS, SMALL), ("at3", at3_stage, SEEDS, SMALL),
            ("rules", rules_stage, SEEDS, RULE_PAIRS), ("beta4", beta4_stage, SEEDS, AT_PAIRS),
            ("final", final_stage, SEEDS, FINAL), ("nomix", nomix_stage, SEEDS, AT_PAIRS)):
        if args.stage in ("all", stage):
            done = run_all(configs(done), args.results, args.jobs, args.threads, seeds, pairs)
    report(done)


if __name__ == "__main__":
    main()
