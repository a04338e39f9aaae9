"""GPT-2 distilled into a 6-block GPT-2 of its own width: a DistilGPT2-shaped Vanilla student.

    python -m cleangpt_jax.distill --config=configs/distill_gpt2_vanilla.py --workdir=runs/distill_vanilla

The student has GPT-2's exact block (bias, tanh-GELU) at width 768, so its stitching layers
start as the identity and the head stage starts from a copy of GPT-2's ln_f and head. Student
block k learns teacher block 2k; then the head (KL at T = 2) and an end-to-end stage (KL + LM
loss, DistilGPT2's recipe). The result is also exported to WORKDIR/hf, which
`transformers.GPT2LMHeadModel.from_pretrained` loads. Needs the Hugging Face hub (teacher and
TinyStories). Rerunning the command resumes.

Run time, roughly (scripts/estimate_run_times.py: 1.49e+17 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~34 days on a
2-core CPU, ~31 min on one accelerator chip.
"""

from cleangpt_jax.config import TINYSTORIES
from cleangpt_jax.distill import config as distill_config


def get_config():
    cfg = distill_config.get_config()
    cfg.model.update(model_type="vanilla", n_layer=6, n_head=12, n_embd=768, block_size=256,
                     dropout=0.1, bias=True, activation="gelu_tanh")
    cfg.data.update(**TINYSTORIES)
    cfg.train.batch_size = 32
    d = cfg.distill
    d.teacher = "gpt2"
    d.layer_map = "uniform"  # 2, 4, 6, 8, 10, 12
    d.steps_per_block = 2000
    d.learning_rate = 3e-4
    d.warmup_steps = 100
    d.checkpoint_every = 500
    d.log_every = 50
    d.head.update(steps=2000, learning_rate=3e-4, init_from_teacher=True)
    d.final.update(enabled=True, steps=10_000, learning_rate=1e-4, logit_loss="kl_div",
                   temperature=2.0, logit_weight=1.0, lm_weight=1.0)
    return cfg
