"""Data-package throughput: tokenise + pack + cache, cache reuse, and batch construction.

    python scripts/bench_data.py                       # 10k synthetic documents, local BPE
    python scripts/bench_data.py --num_docs=100000 --num_proc=8

1. `load_dataset` on `--num_docs` JSON-lines documents (sentences drawn from the embedded
   Shakespeare corpus, ~200 words each) with a locally trained byte-level BPE (GPT-2 format, the
   hub is not needed): cold with 1 tokenising process, cold with `--num_proc`, then warm (cache
   hit).
2. `batch_for_step` (B=32, T=256) against the obvious pure-function alternative that materialises
   the epoch's permutation, `rng(seed, epoch).permutation(W)[positions]`, on streams of 10^7 and
   10^10 tokens: the index shuffle costs the same at any size, the permutation grows with W.
"""

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np

from cleangpt_jax.config import get_config
from cleangpt_jax.data import batch_for_step, corpus, load_dataset
from cleangpt_jax.tokenizers import create_tokenizer
from cleangpt_jax.tokenizers.testing import build_local_gpt2_tokenizer


def write_documents(path, num_docs, words_per_doc=200, seed=0):
    lines = [line for line in corpus.shakespeare_text().splitlines() if len(line.split()) > 3]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(num_docs):
            words, doc = 0, []
            while words < words_per_doc:
                doc.append(rng.choice(lines))
                words += len(doc[-1].split())
            f.write(json.dumps({"id": i, "text": "\n".join(doc)}) + "\n")
    return lines


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_docs", type=int, default=10_000)
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--vocab_size", type=int, default=2048)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        lines = write_documents(os.path.join(tmp, "docs.jsonl"), args.num_docs)
        tok_dir = build_local_gpt2_tokenizer(os.path.join(tmp, "tok"), lines[:20_000],
                                             args.vocab_size)
        tokenizer = create_tokenizer("gpt2", name_or_path=tok_dir)
        cfg = get_config()
        cfg.tokenizer.type = "gpt2"
        cfg.data.source, cfg.data.name = "hf", "json"
        cfg.data.files = os.path.join(tmp, "docs.jsonl")

        print(f"load_dataset: {args.num_docs} documents, BPE vocab {tokenizer.vocab_size}")
        results = {}
        runs = (("cold, 1 process", 1, "c1"), (f"cold, {args.num_proc} processes", args.num_proc,
                "cN"), ("warm (cache hit)", args.num_proc, "cN"))
        for label, procs, cache in runs:
            cfg.data.num_proc = procs
            cache_dir = os.path.join(tmp, cache)
            seconds, data = timed(lambda: load_dataset(cfg, tokenizer, cache_dir=cache_dir))
            tokens = len(data.train) + len(data.val)
            results[label] = seconds
            print(f"  {label:22s} {seconds:8.3f} s  {tokens / seconds / 1e6:8.2f} M tokens/s  "
                  f"({tokens} tokens)")
        cold1, coldn, warm = results.values()
        print(f"  ratio: {args.num_proc} processes / 1 process = {cold1 / coldn:.2f}x faster; "
              f"cache hit = {cold1 / warm:.0f}x faster than cold")

    batch, block = 32, 256
    print(f"batch_for_step, B={batch} T={block}")
    for num_tokens, steps_perm in ((10**7, 200), (10**10, 3)):
        stream = np.broadcast_to(np.zeros(1, np.uint16), (num_tokens,))  # any length, no memory
        windows, rows = num_tokens // block, np.arange(batch)

        def ours(steps=200):
            for step in range(steps):
                batch_for_step(stream, seed=0, step=step, global_batch_size=batch,
                               block_size=block)

        def materialised(steps):
            for step in range(steps):
                g = step * batch + rows
                rng = np.random.default_rng([0, int(g[0] // windows)])
                w = rng.permutation(windows)[g % windows]
                np.asarray(stream[w[:, None] * block + np.arange(block)], np.int32)

        t_ours = timed(ours, repeat=3)[0] / 200
        t_perm = timed(lambda: materialised(steps_perm))[0] / steps_perm
        print(f"  {num_tokens:.0e} tokens ({windows} windows): index shuffle "
              f"{t_ours * 1e3:.3f} ms/batch, materialised permutation {t_perm * 1e3:.3f} ms/batch "
              f"({t_perm / t_ours:.1f}x slower)")


if __name__ == "__main__":
    main()
