"""Generation speed: our compiled KV-cache loop against (a) a loop that recomputes the whole
sequence for every token and (b) Hugging Face PyTorch `GPT2LMHeadModel.generate`, side by side
in one run.

    python scripts/bench_generate.py                      # every case, batch 1 and 8, 256 tokens
    python scripts/bench_generate.py --cases char --batch 1 --new_tokens 64 --repeats 3

Cases (greedy decoding, random GPT-2-style Vanilla weights, EOS never stops a row):
  char       6 layers, 384 wide, 6 heads, 65-symbol vocabulary (nanoGPT's Shakespeare-char
             shape), 16-token prompts; against HF.
  gpt2       the GPT-2 124M shape: 12 layers, 768 wide, 12 heads, 50257 tokens; against HF.
  recompute  the char shape at 512 tokens of context (256-token prompt + 256 new); against a
             loop that reruns the whole sequence per token (one jitted forward, right-padded to
             multiples of 64, so it compiles 5 programs instead of 256) -- what the original
             cleanGPT's generate did.
HF runs the same weights (exported with `cleangpt_jax.hf.export_gpt2`); the script reports
whether the greedy tokens agree. HF is timed with 1 and with the default number of torch
threads (--hf_threads) and the faster is compared: on a busy machine torch's thread pool can
collapse, and the comparison should be against HF at its best.

Batch-1 decoding reads every weight once per token, so it is bound by memory bandwidth, not
FLOPs, once the weights outgrow the caches. The script measures the read bandwidth XLA gets
on this machine (a jitted sum over 512 MiB) and prints the roofline: bandwidth / parameter
bytes = the most tokens/s any float32 implementation can reach at batch 1 (the KV cache adds
to the bytes, so the real ceiling is a little lower).

At batch 1 on CPU, "ours, W as stored" is the same program without `kernels.decode_layout`'s
transposed weight copies: the ratio between the two is what that layout buys here (below
kernels.cpu.DECODE_LAYOUT_MIN_STEPS new tokens neither makes them and the two are the same).

The machine is shared, so the contenders run interleaved (ours, theirs, ours, ...) --repeats
times and the medians are compared; tokens/s = batch * new_tokens / seconds of one whole call
(prompt included). Compile = our first call minus the median call (HF: its first-call
overhead). Rerun to confirm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cleangpt_jax import kernels  # noqa: E402
from cleangpt_jax.config import model_config  # noqa: E402
from cleangpt_jax.generation import generate  # noqa: E402
from cleangpt_jax.models import get_model  # noqa: E402

SHAPES = {
    "char": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65, block_size=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
}
TARGETS = {"char": 3.0, "gpt2": 1.0, "recompute": 20.0}


def build(shape: str):
    cfg = model_config(dict(model_type="vanilla", bias=True, activation="gelu_tanh", dropout=0.0,
                            **SHAPES[shape]))
    model = get_model(config=cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, model, params


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Ours:
    """Our generate(). decode_layout=False is the ablation: the same program without the
    batch-1 decode layout (every product reads W as stored), to measure what
    `kernels.decode_layout` buys on this machine."""

    def __init__(self, model, params, prompt, new_tokens, decode_layout=True):
        self.name = "ours (KV cache, one jit)" if decode_layout else "ours, W as stored"
        min_steps = kernels.cpu.DECODE_LAYOUT_MIN_STEPS if decode_layout else float("inf")

        def run():
            with mock.patch.object(kernels.cpu, "DECODE_LAYOUT_MIN_STEPS", min_steps):
                return np.asarray(generate(model, params, prompt, new_tokens,
                                           temperature=0).tokens)

        self.fn = run


class HF:
    def __init__(self, cfg, params, prompt, new_tokens, threads):
        import torch
        from transformers import GPT2LMHeadModel

        from cleangpt_jax.hf import export_gpt2

        self.torch, self.threads = torch, threads
        self.name = f"HF generate ({threads} thread{'s' if threads > 1 else ''})"
        with tempfile.TemporaryDirectory() as tmp:
            export_gpt2(cfg, params, os.path.join(tmp, "gpt2"))
            self.model = GPT2LMHeadModel.from_pretrained(os.path.join(tmp, "gpt2")).eval()
        ids = torch.as_tensor(np.asarray(prompt), dtype=torch.long)

        def run():
            torch.set_num_threads(self.threads)
            with torch.inference_mode():
                out = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                    eos_token_id=None, use_cache=True)
            return out[:, ids.shape[1]:].numpy()

        self.fn = run


class Recompute:
    name = "recompute every token"

    def __init__(self, model, params, prompt, new_tokens):
        forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits)
        total = prompt.shape[1] + new_tokens

        def run():
            buf = np.zeros((prompt.shape[0], -(-total // 64) * 64), np.int32)
            buf[:, :prompt.shape[1]] = prompt
            for t in range(prompt.shape[1], total):
                width = -(-t // 64) * 64
                logits = forward(params, jnp.asarray(buf[:, :width]))
                buf[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], -1))
            return buf[:, prompt.shape[1]:total]

        self.fn = run


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a jitted full read (sum) of a float32 array far larger than any cache."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(timed(lambda: total(x).block_until_ready())[0] for _ in range(repeats))
    del x
    return mib * 2**20 / best


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def race(contenders, repeats):
    """Interleaved timing: {name: (first call seconds, [steady seconds], output)}."""
    results = {}
    for c in contenders:  # first calls (compilation) one after another
        first, out = timed(c.fn)
        results[c.name] = (first, [], out)
    for _ in range(repeats):
        for c in contenders:
            seconds, _ = timed(c.fn)
            results[c.name][1].append(seconds)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="char,gpt2,recompute")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hf_threads", default=None,
                    help="torch thread counts to time HF with (default: 1 and torch's default)")
    args = ap.parse_args()
    import torch

    default_threads = torch.get_num_threads()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({default_threads} threads by default), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth (jitted sum over 512 MiB): {bandwidth / 1e9:.1f} GB/s",
          flush=True)
    rng = np.random.default_rng(0)
    summary = []
    for case in args.cases.split(","):
        shape = "char" if case == "recompute" else case
        cfg, model, params = build(shape)
        prompt_len = 256 if case == "recompute" else args.prompt_len
        batches = [1] if case == "recompute" else [int(b) for b in args.batch.split(",")]
        print(f"\n[{case}] L={cfg.n_layer} d={cfg.n_embd} V={cfg.vocab_size}: prompt "
              f"{prompt_len} + {args.new_tokens} new tokens, {args.repeats} interleaved repeats",
              flush=True)
        for b in batches:
            prompt = rng.integers(0, cfg.vocab_size, (b, prompt_len)).astype(np.int32)
            ours = Ours(model, params, prompt, args.new_tokens)
            if case == "recompute":
                others = [Recompute(model, params, prompt, args.new_tokens)]
            else:
                threads = ([int(t) for t in args.hf_threads.split(",")] if args.hf_threads
                           else sorted({1, default_threads}))
                others = [HF(cfg, params, prompt, args.new_tokens, t) for t in threads]
            ablation = ([Ours(model, params, prompt, args.new_tokens, decode_layout=False)]
                        if b == 1 and case != "recompute" and jax.default_backend() == "cpu"
                        else [])
            results = race([ours, *ablation, *others], args.repeats)
            tps = {}
            for name, (first, times, _) in results.items():
                med = statistics.median(times)
                tps[name] = b * args.new_tokens / med
                print(f"  {name:<28} batch {b}: {tps[name]:9.1f} tok/s  (median {med:7.3f} s, "
                      f"min {min(times):7.3f} s; compile/warm-up {max(first - med, 0):6.2f} s)",
                      flush=True)
            if ablation:
                print(f"  decode layout (kernels.decode_layout): "
                      f"{tps[ours.name] / tps[ablation[0].name]:.2f}x the W-as-stored program",
                      flush=True)
            best = max((o.name for o in others), key=tps.get)
            ratio = tps[ours.name] / tps[best]
            same = float(np.mean(np.all(results[ours.name][2] == results[best][2], axis=1)))
            target = TARGETS[case] if b == 1 else None
            verdict = "" if target is None else (f"  target >= {target:g}x: "
                                                 f"{'met' if ratio >= target else 'NOT met'}")
            print(f"  ours / {best}: {ratio:6.2f}x   (greedy rows identical: {same:.0%}){verdict}",
                  flush=True)
            if b == 1:
                ceiling = bandwidth / param_bytes(params)
                print(f"  roofline at batch 1: {param_bytes(params) / 2**20:.1f} MiB of weights "
                      f"per token at {bandwidth / 1e9:.1f} GB/s -> at most {ceiling:.0f} tok/s; "
                      f"ours reaches {tps[ours.name] / ceiling:.0%} of it", flush=True)
            summary.append((case, b, tps[ours.name], tps[best], ratio, target))
    print("\ncase       batch   ours tok/s   other tok/s   ratio   target")
    for case, b, ours_tps, other_tps, ratio, target in summary:
        print(f"{case:<10} {b:>5} {ours_tps:12.1f} {other_tps:13.1f} {ratio:7.2f}x  "
              f"{'' if target is None else f'>= {target:g}x'}")


if __name__ == "__main__":
    main()
