"""How long each configs/*.py run takes, roughly: its matmul FLOPs over a throughput.

    JAX_PLATFORMS=cpu python scripts/estimate_run_times.py --cpu_flops=2.5e10 --chip_flops=8e13

FLOPs of a training run: num_steps x batch_size x block_size x (6 N + 12 L H Q T)
(`metrics.train_flops_per_token`; N from the model's abstract parameters, a character
vocabulary taken as Shakespeare's 65). A distillation run: every stage's steps x tokens x
(6 N_student + 2 N_teacher + the attention terms), an upper bound (a block stage trains one
block and runs the teacher only up to its layer); an epoch of 100k TinyStories stories is
taken as 22M GPT-2 tokens. Evaluation and sampling are left out.

--cpu_flops: the FLOP/s a 2-core CPU sustains on these models, measured from a run's logged
tokens/s (`step_time_s` x flops/token); --chip_flops: one accelerator chip's sustained FLOP/s
(e.g. 40% MFU of a v5e's 197 TFLOP/s). Small models cannot use a chip fully: a step is taken
as at least --min_step_s there.
"""

from __future__ import annotations

import argparse
import glob
import os

import jax
import jax.numpy as jnp

from cleangpt_jax import metrics
from cleangpt_jax.config import load_config_file, model_config
from cleangpt_jax.models import get_model

CHAR_VOCAB = 65
GPT2_VOCAB = 50257
EPOCH_TOKENS = 22e6  # an epoch of the epoch-based configs: 100k TinyStories, ~220 tokens each


def lm_params(model_cfg) -> int:
    model = get_model(config=model_cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 8), jnp.int32))["params"])
    return metrics.lm_param_count(shapes)


def vocab(cfg) -> int:
    if cfg.model.vocab_size:
        return int(cfg.model.vocab_size)
    return GPT2_VOCAB if cfg.tokenizer.type == "gpt2" or "distill" in cfg else CHAR_VOCAB


def run_flops(cfg) -> tuple[float, int]:
    """(total FLOPs, optimizer steps) of a config's run."""
    m = model_config(cfg.model, vocab_size=vocab(cfg))
    tokens = cfg.train.batch_size * m.block_size
    if "distill" not in cfg:
        steps = int(cfg.train.num_steps)  # (num_epochs configs: see their docstrings)
        return steps * tokens * metrics.train_flops_per_token(lm_params(m), m), steps
    d = cfg.distill
    epoch = EPOCH_TOKENS / tokens  # steps per epoch (epoch-based configs)
    per_block = (d.epochs_per_block * epoch if d.epochs_per_block else d.steps_per_block)
    steps = (per_block * m.n_layer if isinstance(per_block, (int, float)) else sum(per_block))
    for stage in (d.head, d.final):
        if stage.enabled:
            steps += stage.epochs * epoch if stage.epochs else stage.steps
    steps = int(steps)
    teacher = model_config(dict(model_type="vanilla", n_layer=12, n_head=12, n_embd=768,
                                block_size=m.block_size, vocab_size=GPT2_VOCAB, bias=True))
    if not str(d.teacher).startswith("gpt2"):  # the offline Shakespeare teacher
        teacher = model_config(dict(model_type="vanilla", n_layer=4, n_head=4, n_embd=256,
                                    block_size=m.block_size, vocab_size=m.vocab_size, bias=True))
    per_token = (metrics.train_flops_per_token(lm_params(m), m)
                 + metrics.forward_flops_per_token(lm_params(teacher), teacher.n_layer, teacher))
    return steps * tokens * per_token, steps


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu_flops", type=float, required=True)
    p.add_argument("--chip_flops", type=float, default=8e13)
    p.add_argument("--min_step_s", type=float, default=0.01)
    args = p.parse_args()
    for path in sorted(glob.glob("configs/*.py")):
        cfg = load_config_file(path)
        flops, steps = run_flops(cfg)
        chip = max(flops / args.chip_flops, steps * args.min_step_s)
        print(f"{os.path.basename(path):34} {steps:>7} steps  {flops:9.2e} FLOPs  "
              f"2-core CPU ~{human(flops / args.cpu_flops):>8}  one chip ~{human(chip):>7}")


if __name__ == "__main__":
    main()
