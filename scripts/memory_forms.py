"""Compiler-reported memory of the train step under each train.remat and loss-chunking form.

    /work/venv_tpu/bin/python scripts/memory_forms.py                        # 2 layers, v5e:2x2
    /work/venv_tpu/bin/python scripts/memory_forms.py --n_layer 12 --forms none:0,block:8192

Ahead-of-time compiles the project's own train step (`train_step.make_train_step`, the 'lm'
strategy, AdamW, donated state) for a GPT-2-shaped Vanilla model (bias, tanh-GELU, tied head,
bf16 compute, float32 parameters) over a mesh of the devices of a TPU topology (needs libtpu:
`jax[tpu]`; no TPU is used), without running it, and prints the per-device bytes of
`memory_analysis()` side by side: arguments, outputs, temporaries, and the peak estimate
arguments + outputs + temporaries - aliased (donated) bytes. One line per form
`remat:loss_chunk_tokens` (loss_chunk_tokens 0 = the plain loss over whole logits).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# Compiling needs no TPU: let several compiling processes load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from cleangpt_jax import sharding, train_step  # noqa: E402
from cleangpt_jax.config import get_config  # noqa: E402
from cleangpt_jax.models import get_model  # noqa: E402
from cleangpt_jax.optim import make_optimizer  # noqa: E402

GIB = 2 ** 30


def compiled_step(cfg, mesh, batch_size: int):
    """The AOT-compiled train step of `cfg` over `mesh` (nothing is allocated or run)."""
    model = get_model(config=cfg.model)
    optimizer, _ = make_optimizer(cfg.train, cfg.train.num_steps)
    loss_terms = train_step.get_strategy("lm", model, cfg)
    abstract, shardings = train_step.abstract_train_state(
        train_step.model_init_fn(model), optimizer, mesh)
    step = train_step.make_train_step(loss_terms, optimizer, mesh=mesh,
                                      state_shardings=shardings)
    tokens = jax.ShapeDtypeStruct((batch_size, cfg.model.block_size), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh))
    batch = {"input_ids": tokens, "attention_mask": tokens}
    return step.trace(abstract, batch).lower().compile()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--n_head", type=int, default=12)
    ap.add_argument("--block_size", type=int, default=1024)
    ap.add_argument("--vocab_size", type=int, default=50257)
    ap.add_argument("--batch_per_device", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="xla",
                    help="model.attention (default xla, to see remat and chunking alone; "
                         "'auto' is Splash on the TPU mesh)")
    ap.add_argument("--forms", default="none:0,none:8192,block:0,block:8192,matmuls:0,"
                                       "matmuls:8192",
                    help="comma-separated remat:loss_chunk_tokens pairs")
    args = ap.parse_args(argv)

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh = sharding.create_mesh(1, devices=devices)
    batch_size = args.batch_per_device * len(devices)
    print(f"{args.topology}: {len(devices)} devices; GPT-2-shaped Vanilla {args.n_layer} x "
          f"{args.n_embd}, {args.n_head} heads, T={args.block_size}, V={args.vocab_size}, "
          f"{args.dtype}, attention {args.attention!r}; {args.batch_per_device} sequences per "
          f"device (global {batch_size})")
    print(f"{'remat':8} {'chunk':>6} | {'args GiB':>8} {'out GiB':>8} {'temp GiB':>8} "
          f"{'alias GiB':>9} {'peak GiB':>8} | compile s")
    for form in args.forms.split(","):
        remat, chunk = form.split(":")
        cfg = get_config()
        cfg.model.update(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                         block_size=args.block_size, vocab_size=args.vocab_size, bias=True,
                         activation="gelu_tanh", dtype=args.dtype, attention=args.attention)
        cfg.train.update(remat=remat, loss_chunk_tokens=int(chunk), batch_size=batch_size)
        start = time.perf_counter()
        mem = compiled_step(cfg, mesh, batch_size).memory_analysis()
        seconds = time.perf_counter() - start
        a, o, t = (mem.argument_size_in_bytes, mem.output_size_in_bytes,
                   mem.temp_size_in_bytes)
        alias = mem.alias_size_in_bytes
        print(f"{remat:8} {chunk:>6} | {a / GIB:8.3f} {o / GIB:8.3f} {t / GIB:8.3f} "
              f"{alias / GIB:9.3f} {(a + o + t - alias) / GIB:8.3f} | {seconds:7.1f}",
              flush=True)


if __name__ == "__main__":
    main()
