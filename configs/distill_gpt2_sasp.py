"""GPT-2 (12 blocks x 768) distilled into a 6-block, 384-wide SASP student on TinyStories.

    python -m cleangpt_jax.distill --config=configs/distill_gpt2_sasp.py --workdir=runs/distill_sasp

Student blocks 1..6 learn teacher blocks 2, 4, ..., 12 (the uniform layer map) through
384 -> 768 stitching layers, 3000 steps each; then the head (KL at T = 2, initialised as
W_gpt2 S_6) and an end-to-end stage in the DistilGPT2 manner (all parameters, KL + LM loss).
SASP with values and projections (use_v, use_proj), as the original's SASP examples. Needs
the Hugging Face hub (teacher and data). Rerunning the command resumes.

Run time, roughly (scripts/estimate_run_times.py: 1.13e+17 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~26 days on a
2-core CPU, ~23 min on one accelerator chip.
"""

from cleangpt_jax.config import TINYSTORIES
from cleangpt_jax.distill import config as distill_config


def get_config():
    cfg = distill_config.get_config()
    cfg.model.update(model_type="sasp", n_layer=6, n_head=6, n_embd=384, block_size=256,
                     dropout=0.0, use_v=True, use_proj=True)
    cfg.data.update(**TINYSTORIES)
    cfg.train.batch_size = 32
    d = cfg.distill
    d.teacher = "gpt2"
    d.layer_map = "uniform"
    d.steps_per_block = 3000
    d.learning_rate = 1e-3
    d.warmup_steps = 100
    d.checkpoint_every = 500
    d.log_every = 50
    d.head.update(steps=3000, learning_rate=1e-3, logit_loss="kl_div", temperature=2.0)
    d.final.update(enabled=True, steps=10_000, learning_rate=3e-4, logit_loss="kl_div",
                   temperature=2.0, logit_weight=1.0, lm_weight=1.0)
    return cfg
