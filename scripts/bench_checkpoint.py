"""What checkpoint checksums cost: GPT-2 124M parameters and AdamW state, saved and restored.

    python scripts/bench_checkpoint.py [--preset gpt2_124m|tiny] [--dir /tmp/ckpt_bench]

Prints, side by side: the save (Orbax, blocking until the step is final) and the SHA-256
manifest written inside it; a full restore (parameters + optimizer state, what a resumed run
does) and a parameters-only restore (what generate does), each next to the verification that
precedes it. Verification reads the files once more; right after a save they are in the page
cache, as they often are on a training host, so a cold read from disk or GCS costs more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import optax

from cleangpt_jax import checkpoint
from cleangpt_jax.config import ModelConfig
from cleangpt_jax.models import get_model

PRESETS = {
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256),
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2_124m", choices=sorted(PRESETS))
    parser.add_argument("--dir", default="/tmp/cleangpt_ckpt_bench")
    args = parser.parse_args()

    config = ModelConfig(model_type="vanilla", **PRESETS[args.preset])
    params = get_model(config=config).init(jax.random.key(0),
                                           jnp.zeros((1, 8), jnp.int32))["params"]
    opt_state = optax.adamw(1e-3).init(params)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))
    shutil.rmtree(args.dir, ignore_errors=True)

    calls = []
    real_write = checkpoint.write_checksums

    def write_checksums(step_dir):
        _, seconds = timed(lambda: real_write(step_dir))
        calls.append(seconds)

    checkpoint.write_checksums = write_checksums
    ckpt = checkpoint.Checkpointer(args.dir)
    _, save_s = timed(lambda: (ckpt.save(1, params=params, opt_state=opt_state), ckpt.wait()))
    step_dir = os.path.join(args.dir, "1")
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    rows = [("save (Orbax + manifest)", save_s, calls[0])]
    for what, items, opt in (("restore params + opt_state", ("params", "opt_state", "meta"),
                              abstract(opt_state)),
                             ("restore params only", ("params", "meta"), None)):
        _, verify_s = timed(lambda: checkpoint.checksum_problem(step_dir, items))
        _, total_s = timed(lambda: ckpt.restore(1, params=abstract(params), opt_state=opt))
        rows.append((what, total_s, verify_s))
    ckpt.close()

    print(f"{args.preset}: {n_bytes / 2**20:.0f} MiB of parameters + AdamW state, "
          f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPUs")
    print(f"{'operation':32s} {'total s':>9s} {'checksums s':>12s} {'share':>7s}")
    for what, total, sums in rows:
        print(f"{what:32s} {total:9.2f} {sums:12.2f} {sums / total:7.0%}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
