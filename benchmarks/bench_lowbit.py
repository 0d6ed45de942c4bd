"""INT4 weight-only linears: slimfx's `quantize-weights` vs onnxruntime's MatMulNBitsQuantizer (RTN), on the
zoo's transformer (tiny_bert, trained), both exported as MatMulNBits.

Per variant: ONNX file size / fp32, top-1 agreement with fp32 and accuracy on the test split, output SQNR vs
fp32, and onnxruntime latency (1 thread, batch 1 and 32, interleaved with fp32 and the peer, best round).

    PYTHONPATH=. python benchmarks/bench_lowbit.py [--blocks 32,64,128] [--rounds 5]

`--decoder`: issue #17's decoder check instead. A GPT-2-style decoder built from a transformers config
(`slimfx.models.hf`, random init, nothing downloaded) is first trained on real text that needs no download,
the Python standard library's own sources as bytes (`--task text`; or, a worst case, sequences from a random
second-order Markov chain whose next-token logits A[t-1] + B[t-2] make near-ties everywhere: `--task chain`;
greedy decoding of an untrained model is a walk over near-tied logits and says little), exported fp32 and
through the `int4-weights` recipe's passes, then 16 held-out prompts are greedily continued by 64 tokens (full
recompute every step, the ONNX files have a dynamic sequence length) by fp32 eager PyTorch, the fp32 ONNX file
(control) and the int4 ONNX file on onnxruntime, and compared token by token with fp32 eager.

    PYTHONPATH=.:benchmarks python benchmarks/bench_lowbit.py --decoder [--task text|chain] [--steps N]
        [--model-cache FILE] [--block-size 32] [--set OPTION=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_quant import ort_run, sqnr_db

from slimfx import ir, models
from slimfx.exporters import best_median_ms, interleaved_latency
from slimfx.exporters.onnx import to_onnx_model
from slimfx.passes import PassContext, create_pass


def theirs_nbits(fp32: bytes, block: int, symmetric: bool, accuracy_level: int) -> bytes:
    """onnxruntime.quantization.matmul_nbits_quantizer: 4-bit RTN, MatMulNBits (QOperator)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load_from_string(fp32)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric,
                                       accuracy_level=accuracy_level or None)
    q = MatMulNBitsQuantizer(model, algo_config=cfg, accuracy_level=accuracy_level or None)
    q.process()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "q.onnx")
        q.model.save_model_to_file(path)
        return Path(path).read_bytes()


# --- the decoder check ----------------------------------------------------------------------------------------

DECODER = dict(vocab_size=128, n_embd=128, n_layer=2, n_head=4, n_positions=128)


class MarkovChain:
    """Token sequences from a random second-order Markov chain: P(t | a, b) = softmax(A[b] + B[a]) for the two
    previous tokens a, b (A, B ~ N(0, scale^2), fixed by the seed)."""

    name = "Markov chain"

    def __init__(self, vocab: int, seed: int = 0, scale: float = 2.0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(vocab, vocab, generator=g) * scale
        self.b = torch.randn(vocab, vocab, generator=g) * scale
        self.vocab = vocab

    def sample(self, n: int, length: int, seed: int, held_out: bool = False) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + (1 << 20 if held_out else 0))
        out = torch.zeros(n, length, dtype=torch.long)
        out[:, :2] = torch.randint(0, self.vocab, (n, 2), generator=g)
        for t in range(2, length):
            logits = self.a[out[:, t - 1]] + self.b[out[:, t - 2]]
            out[:, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
        return out

    def floor(self) -> str:
        """The chain's own entropy, the lowest loss possible."""
        x = self.sample(256, 73, seed=1)
        p = torch.softmax(self.a[x[:, 1:-1]] + self.b[x[:, :-2]], -1)
        return f"the chain's entropy, the lowest loss possible: {float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()):.3f}"


class PythonSource:
    """Real text with no download: the Python standard library's own source files (every installed Python has
    them), as ASCII bytes (vocabulary 128), split by file: 90% to train and calibrate on, 10% held out for the
    prompts and the held-out loss."""

    name = "Python standard library sources (bytes)"

    def __init__(self, vocab: int = 128):
        import random
        import sysconfig

        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        random.Random(0).shuffle(files)
        texts = [bytes(c for c in f.read_bytes() if c < vocab) for f in files]
        cut = len(texts) * 9 // 10
        self.train = torch.frombuffer(bytearray(b"".join(texts[:cut])), dtype=torch.uint8).long()
        self.held = torch.frombuffer(bytearray(b"".join(texts[cut:])), dtype=torch.uint8).long()

    def sample(self, n: int, length: int, seed: int, held_out: bool = False) -> torch.Tensor:
        text = self.held if held_out else self.train
        start = torch.randint(0, len(text) - length, (n,), generator=torch.Generator().manual_seed(seed))
        return torch.stack([text[i:i + length] for i in start.tolist()])

    def floor(self) -> str:
        return "no known floor (real text)"


def train_decoder(model: torch.nn.Module, task, steps: int, seq: int = 72, batch: int = 32,
                  lr: float = 2e-3) -> list[float]:
    """Next-token cross-entropy on fresh training samples; returns the loss every 250 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        x = task.sample(batch, seq + 1, seed=10_000 + step)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 3))
    model.eval()
    return losses


def held_out_loss(model: torch.nn.Module, task, n: int = 64, length: int = 128) -> float:
    x = task.sample(n, length, seed=4, held_out=True)
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))


def greedy(step_logits, prompt: torch.Tensor, new: int) -> tuple[list[int], list[float]]:
    """Greedy continuation of `prompt` [1, P] by `new` tokens (full recompute per step); the tokens and, per
    step, the margin between the best and the second-best logit."""
    ids = prompt.clone()
    out, margins = [], []
    for _ in range(new):
        last = torch.as_tensor(step_logits(ids))[0, -1]
        top = torch.topk(last, 2).values
        margins.append(float(top[0] - top[1]))
        nxt = int(last.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, margins


def decoder_check(args) -> int:
    from slimfx.exporters.bench import ort_session
    from slimfx.models import hf
    from slimfx.recipe import load_recipe

    config = {**DECODER, **dict(args.config)}
    torch.manual_seed(0)
    model, kw = hf.build("gpt2", batch=1, seq_len=8, **config)
    task = PythonSource(config["vocab_size"]) if args.task == "text" else \
        MarkovChain(config["vocab_size"], scale=args.chain_scale)
    steps = args.steps if args.steps is not None else (4000 if args.task == "text" else 600)
    cache = {"task": args.task, "steps": steps, "chain_scale": args.chain_scale, "config": config}
    if args.model_cache and Path(args.model_cache).exists() and torch.load(args.model_cache)["cache"] == cache:
        saved = torch.load(args.model_cache)
        model.load_state_dict(saved["state"])
        losses = saved["losses"]
        model.eval()
    else:
        losses = train_decoder(model, task, steps, lr=3e-3 if args.task == "text" else 2e-3) \
            if not args.untrained else []
        if args.model_cache and not args.untrained:
            torch.save({"cache": cache, "state": model.state_dict(), "losses": losses}, args.model_cache)
    kw = {"input_ids": kw["input_ids"], "attention_mask": torch.ones_like(kw["input_ids"])}
    graph = ir.capture(model, (), example_kwargs=kw)
    ex = tuple(kw.values())
    fp32 = to_onnx_model(graph, inputs=ex).SerializeToString()
    recipe = load_recipe("int4-weights")
    cal = [(s[None, :64], torch.ones(1, 64, dtype=torch.long)) for s in task.sample(args.cal, 64, seed=2)]
    ctx = PassContext(ex, calibration_data=cal, quiet=True)
    g = graph.copy()
    stats = {}
    # what-ifs on the recipe's options (--block-size, --set), for the int4 step and its 8-bit control alike
    what_if = {**({"block_size": args.block_size} if args.block_size else {}), **dict(args.set)}
    for name, opts in recipe.passes:
        res = create_pass(name, {**opts, **what_if}).run(g, ctx)
        g = res.graph_after(g)
        stats[name] = {k: v for k, v in res.stats.items() if k in ("quantized_layers", "embeddings", "method",
                                                                     "block_size", "symmetric", "tied_float",
                                                                     "tied_tables", "embedding_bits")}
        stats[name]["what_if"] = what_if
    int4 = to_onnx_model(g, inputs=ex).SerializeToString()
    # the same pass at 8 bits: how much of the int4 gap is near-tied greedy steps any rounding flips
    g8 = graph.copy()
    for name, opts in recipe.passes:
        g8 = create_pass(name, {**opts, **what_if, "bits": 8}).run(g8, ctx).graph_after(g8)
    sessions = {"fp32 onnx": ort_session(fp32), "int4 onnx": ort_session(int4),
                "8-bit weights (same pass, control)": ort_session(to_onnx_model(g8, inputs=ex).SerializeToString())}

    def ort_logits(sess):
        return lambda ids: sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]

    def eager(ids):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    prompts = task.sample(args.prompts, args.prompt_len, seed=3, held_out=True)
    same = {k: 0 for k in sessions}
    forced = {k: 0 for k in sessions}  # next token on fp32's own trajectory (teacher forcing)
    noise = {k: [0.0, 0.0] for k in sessions}  # logit energy, error energy on that trajectory
    prefix = {k: [] for k in sessions}
    ref_margins = []
    for prompt in prompts:
        ref, margins = greedy(eager, prompt[None], args.new_tokens)
        ref_margins += margins
        traj = torch.cat([prompt, torch.tensor(ref)])[None, :-1]
        ref_logits = eager(traj)[0, prompt.numel() - 1:]
        for k, sess in sessions.items():
            toks, _ = greedy(ort_logits(sess), prompt[None], args.new_tokens)
            same[k] += sum(a == b for a, b in zip(toks, ref))
            prefix[k].append(next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(ref)))
            lg = torch.as_tensor(ort_logits(sess)(traj))[0, prompt.numel() - 1:]
            forced[k] += int((lg.argmax(-1) == ref_logits.argmax(-1)).sum())
            noise[k][0] += float((ref_logits ** 2).sum())
            noise[k][1] += float(((lg - ref_logits) ** 2).sum())
    total = args.prompts * args.new_tokens
    m = torch.tensor(ref_margins)
    print(f"\ndecoder: GPT-2 config {config}, {sum(p.numel() for p in model.parameters())} parameters, "
          + (f"trained {steps} steps on {task.name} (loss every 250 steps: {losses}; {task.floor()}); held-out "
             f"loss {held_out_loss(model, task):.3f}" if losses else "untrained (random init)"))
    print(f"int4-weights passes: {stats}; file {len(int4)} bytes = {len(int4) / len(fp32):.3f} of fp32 ({len(fp32)})")
    print(f"fp32 eager greedy margins (best - second logit) over {total} steps: median {float(m.median()):.3f}, "
          f"below 0.1: {float((m < 0.1).float().mean()):.1%}, below 0.5: {float((m < 0.5).float().mean()):.1%}\n")
    print("| file | greedy tokens identical to fp32 eager (position by position) | identical prefix per prompt "
          "(mean, min) | next token on fp32's trajectory (teacher-forced) | logits SQNR on it |")
    print("|---|---|---|---|---|")
    for k in sessions:
        sq = 10 * np.log10(noise[k][0] / noise[k][1]) if noise[k][1] > 0 else float("inf")
        print(f"| {k} | {same[k]}/{total} = {same[k] / total:.2%} | {sum(prefix[k]) / len(prefix[k]):.1f}, "
              f"{min(prefix[k])} of {args.new_tokens} | {forced[k]}/{total} = {forced[k] / total:.2%} | {sq:.1f} dB |")
    if args.json:
        Path(args.json).write_text(json.dumps({"identical": same, "forced": forced, "total": total, "prefix": prefix,
                                               "losses": losses, "task": args.task, "steps": steps,
                                               "chain_scale": args.chain_scale, "stats": stats,
                                               "size_ratio": len(int4) / len(fp32)}))
    return 0


def _option(text: str) -> tuple[str, object]:
    """OPTION=VALUE, the value read as JSON where it parses (false, 32, 0.5), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not OPTION=VALUE (e.g. clip_search=false)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", action="store_true", help="the decoder check (greedy decoding, int4 vs fp32)")
    p.add_argument("--task", choices=("text", "chain"), default="text", help=(
        "--decoder: what the decoder learns: text (the Python standard library's sources, bytes) or chain (a "
        "random second-order Markov chain, a worst case: near-tied next tokens everywhere)"))
    p.add_argument("--steps", type=int, help="--decoder: training steps (default: 4000 on text, 600 on chain)")
    p.add_argument("--model-cache", help="--decoder: load the trained decoder from this file when it was trained "
                                         "with the same settings; else train and save it there")
    p.add_argument("--config", type=_option, action="append", default=[], metavar="KEY=VALUE", help=(
        "--decoder: change the GPT-2 config (a bigger decoder), e.g. n_layer=4 n_embd=192 n_head=6; repeatable"))
    p.add_argument("--prompt-len", type=int, default=32, help="--decoder: prompt tokens (held-out samples)")
    p.add_argument("--untrained", action="store_true", help="--decoder: skip the training (random init)")
    p.add_argument("--chain-scale", type=float, default=2.0, help=(
        "--decoder: spread of the Markov chain's logits (larger: more peaked next-token distributions, fewer "
        "near-ties for greedy decoding)"))
    p.add_argument("--block-size", type=int, default=0, help="--decoder: override the recipe's block size")
    p.add_argument("--set", type=_option, action="append", default=[], metavar="OPTION=VALUE", help=(
        "--decoder: override one of the recipe's quantize-weights options (a what-if), e.g. clip_search=false, "
        "symmetric=false; repeatable"))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--blocks", default="32,64,128")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--cal", type=int, default=256, help="calibration samples (train split) for GPTQ")
    p.add_argument("--recipe-only", action="store_true", help=(
        "only the int4-weights recipe's settings (GPTQ, block 128, symmetric), as MatMulNBits and folded; no peer, "
        "no latency"))
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.decoder:
        return decoder_check(args)
    spec = models.get("tiny_bert")
    ds = models.load_dataset(spec.dataset)
    module = spec.trained(progress=False).eval()
    ex1 = spec.example_inputs(batch=1)
    graph = ir.capture(module, ex1)
    fp32 = to_onnx_model(graph, inputs=ex1).SerializeToString()
    cal = [(ds.train_x[i:i + 32],) for i in range(0, args.cal, 32)]
    ctx = PassContext(ex1, calibration_data=cal, quiet=True)
    test_x, test_y = ds.test_x, ds.test_y.numpy()
    ref = ort_run(fp32, test_x)
    rows = []
    variants = []
    for block in [int(b) for b in args.blocks.split(",")]:
        for method in ("rtn", "gptq"):
            for sym in (False, True):
                variants.append((f"ours {method} b{block}{' sym' if sym else ''}", block, method, sym, 0))
    variants.append(("ours gptq b32 acc4", 32, "gptq", False, 4))
    if args.recipe_only:  # the int4-weights recipe's settings alone (and its folded form), no peer, no timing
        variants = [("ours gptq b128 sym", 128, "gptq", True, 0)]
    files: dict[str, bytes] = {}
    for label, block, method, sym, acc in variants:
        g = graph.copy()
        create_pass("quantize-weights", {"block_size": block, "method": method, "symmetric": sym,
                                         "accuracy_level": acc}).run(g, ctx)
        files[label] = to_onnx_model(g, inputs=ex1).SerializeToString()
        if (block, method, sym, acc) == (128, "gptq", True, 0):  # the int4-weights recipe: also its folded form
            for n in g.find("matmul_nbits"):
                n.attrs = {**n.attrs, "form": "folded"}
            files[label + " folded"] = to_onnx_model(g, inputs=ex1).SerializeToString()
    try:
        if args.recipe_only:
            raise ImportError("--recipe-only")
        for block in [int(b) for b in args.blocks.split(",")]:
            for sym in (False, True):
                files[f"ORT rtn b{block}{' sym' if sym else ''}"] = theirs_nbits(fp32, block, sym, 0)
        files["ORT rtn b32 acc4"] = theirs_nbits(fp32, 32, False, 4)
    except ImportError as e:  # onnxruntime's quantizer needs the onnx_ir package
        print(f"peer skipped: onnxruntime's MatMulNBitsQuantizer does not import ({e})")
    for label, data in files.items():
        y = ort_run(data, test_x)
        rows.append({"variant": label, "size_ratio": len(data) / len(fp32), "bytes": len(data),
                     "top1_agreement": float((y.argmax(1) == ref.argmax(1)).mean()),
                     "accuracy": float((y.argmax(1) == test_y).mean()), "sqnr_db": sqnr_db(ref, y)})
    acc_fp32 = float((ref.argmax(1) == test_y).mean())
    print(f"\ntiny_bert fp32: {len(fp32)} bytes, test accuracy {acc_fp32:.2%} ({len(test_y)} samples)\n")
    print("| variant | file / fp32 | top-1 agreement with fp32 | accuracy | SQNR vs fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['size_ratio']:.4f} ({r['bytes']} bytes) | {r['top1_agreement']:.2%} "
              f"| {r['accuracy']:.2%} | {r['sqnr_db']:.1f} dB |")
    if args.recipe_only:
        return 0
    lat = {}
    timed = {k: files[k] for k in ("ours gptq b128 sym", "ours gptq b128 sym folded", "ours gptq b32",
                                   "ours gptq b32 acc4", "ours rtn b64", "ORT rtn b32",
                                   "ORT rtn b32 acc4") if k in files}
    timed = {"fp32": fp32, **timed}
    for b in (1, 32):
        ex = spec.example_inputs(batch=b)
        runs = interleaved_latency(timed, ex, rounds=args.rounds, budget_s=args.budget / args.rounds, clock="cpu")
        lat[b] = {k: best_median_ms(v) for k, v in runs.items()}
    print("\n| file | latency b1 (ms, / fp32) | latency b32 (ms, / fp32) |")
    print("|---|---|---|")
    for k in timed:
        print(f"| {k} | {lat[1][k]:.3f} ({lat[1][k] / lat[1]['fp32']:.2f}) | {lat[32][k]:.3f} "
              f"({lat[32][k] / lat[32]['fp32']:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "latency_ms": lat, "fp32_accuracy": acc_fp32}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
