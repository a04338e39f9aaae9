"""The input pipeline's host cost: training step time with and without prefetch, and the batch
build time per step.

    python scripts/bench_input.py                    # CPU: ~2 minutes
    python scripts/bench_input.py --steps=500 --batch_size=64 --block_size=256

1. Step time: `trainer.train_and_evaluate` on the embedded Shakespeare (characters) with a tiny
   model (1 layer, 32 wide), so the host's share of a step is visible; the same run with
   data.prefetch=0 (each batch built in the loop) and data.prefetch=2 (built ahead in a
   background thread), alternated `--repeats` times. The step time is the median interval
   between consecutive steps' starts after the first 10 (compilation excluded).
2. Batch build per step: `batch_for_step` (the host's gather from the memmapped stream) and
   `sharding.global_batch` (its transfer to the devices), for the run above and for a GPT-2
   tokenizer-sized case (vocabulary 50257, so uint16 tokens; 10^8-token stream on disk,
   B=`--gpt2_batch` rows of T=1024 per host).
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from cleangpt_jax import sharding, trainer
from cleangpt_jax.config import get_config
from cleangpt_jax.data import batch_for_step, token_dtype


def tiny_config(args, prefetch):
    cfg = get_config()
    cfg.model.update(n_layer=1, n_head=2, n_embd=32, block_size=args.block_size)
    cfg.train.update(batch_size=args.batch_size, num_steps=args.steps, warmup_steps=10,
                     eval_every=0, checkpoint_every=0, log_every=args.steps,
                     sample_max_new_tokens=0)
    cfg.data.prefetch = prefetch
    cfg.data.cache_dir = args.cache_dir
    return cfg


def step_time(args, prefetch, workdir):
    """Median seconds between consecutive steps' starts (the first 10 steps left out)."""
    starts = []

    def clock(event, run):
        if event == "step_begin":
            starts.append(time.perf_counter())

    trainer.train_and_evaluate(tiny_config(args, prefetch), workdir, callbacks=[clock])
    return statistics.median(np.diff(starts[10:]))


def build_times(stream, *, batch_size, block_size, mesh, steps=50):
    """(batch_for_step seconds, global_batch seconds) per step, means over `steps` steps."""
    gather, transfer = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = batch_for_step(stream, seed=0, step=step, global_batch_size=batch_size,
                               block_size=block_size)
        t1 = time.perf_counter()
        arrays = sharding.global_batch(batch, mesh)
        for x in arrays.values():
            x.block_until_ready()
        gather.append(t1 - t0)
        transfer.append(time.perf_counter() - t1)
    return statistics.mean(gather), statistics.mean(transfer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpt2_batch", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        args.cache_dir = os.path.join(tmp, "cache")
        times = {0: [], 2: []}
        for r in range(args.repeats):
            for prefetch in times:
                workdir = os.path.join(tmp, f"{r}-{prefetch}")
                times[prefetch].append(step_time(args, prefetch, workdir))
        no, yes = min(times[0]), min(times[2])
        print(f"step time, tiny model (1x32, B={args.batch_size} T={args.block_size}, "
              f"{args.steps} steps, best of {args.repeats}):")
        print(f"  data.prefetch=0  {no * 1e3:8.3f} ms/step    data.prefetch=2  {yes * 1e3:8.3f} "
              f"ms/step    saved {(no - yes) * 1e3:+.3f} ms/step ({(no - yes) / no:+.1%})")

        from cleangpt_jax import data as data_lib
        from cleangpt_jax.tokenizers import build_tokenizer

        cfg = tiny_config(args, 0)
        mesh = sharding.create_mesh(1)
        shakespeare = data_lib.load_dataset(cfg, build_tokenizer(cfg)).train
        path = os.path.join(tmp, "gpt2.bin")
        dtype = token_dtype(50257)
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for _ in range(10):
                f.write(rng.integers(0, 50257, 10**7, dtype=np.int64).astype(dtype).tobytes())
        gpt2 = np.memmap(path, dtype=dtype, mode="r")
        cases = ((f"tiny run (characters, B={args.batch_size} T={args.block_size})", shakespeare,
                  args.batch_size, args.block_size),
                 (f"GPT-2 sized (vocab 50257, 10^8 tokens, B={args.gpt2_batch} T=1024)", gpt2,
                  args.gpt2_batch, 1024))
        print("batch build per step (mean of 50 steps):")
        for label, stream, batch, block in cases:
            gather, transfer = build_times(stream, batch_size=batch, block_size=block, mesh=mesh)
            print(f"  {label:52s} batch_for_step {gather * 1e3:8.3f} ms   global_batch "
                  f"{transfer * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
