"""Distillation without network: the exported Shakespeare teacher into a half-width student.

The whole offline recipe (no Hugging Face hub anywhere):

    python -m cleangpt_jax.train --config=configs/gpt2_teacher_shakespeare.py --workdir=runs/teacher
    python -m cleangpt_jax.export_hf --workdir=runs/teacher --out=runs/teacher_hf
    python -m cleangpt_jax.distill --config=configs/distill_shakespeare_offline.py --config.distill.teacher=runs/teacher_hf --workdir=runs/distill

The teacher is a GPT-2-compatible character-level model (4 blocks x 256, bias, tanh-GELU);
`export_hf` writes it as a GPT2LMHeadModel directory with its character tokenizer, which
distillation loads like a hub name. The student is a Token-Factored model of half the width
(128, 4 heads) and the same depth (layer map 1, 2, 3, 4), trained on the same plays with the
teacher's tokenizer: 4 block stages, the head (initialised as W_t S_4), then an end-to-end
stage (KL at T = 2 plus the LM loss). --config.model.model_type=vanilla|sasp switches the
student. The last line printed compares the validation perplexities of teacher and student;
`python -m cleangpt_jax.evaluate --workdir=runs/distill` reports more.

Run time, roughly (scripts/estimate_run_times.py: 6.53e+14 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~3.6 h on a
2-core CPU, ~21 s on one accelerator chip.
"""

from cleangpt_jax.distill import config as distill_config


def get_config():
    cfg = distill_config.get_config()
    cfg.model.update(model_type="factored", n_layer=4, n_head=4, n_embd=128, block_size=128,
                     dropout=0.0, bias=False)
    cfg.tokenizer.type = "character"  # informational: the teacher's tokenizer is used
    cfg.data.update(source="shakespeare", val_fraction=0.1)
    cfg.train.batch_size = 32
    d = cfg.distill
    d.teacher = "runs/teacher_hf"
    d.layer_map = "uniform"
    d.hidden_loss = "mse"
    d.steps_per_block = 300
    d.learning_rate = 2e-3
    d.weight_decay = 0.01
    d.warmup_steps = 20
    d.checkpoint_every = 100
    d.log_every = 25
    d.eval_steps = 20
    d.head.update(enabled=True, steps=300, learning_rate=2e-3, init_from_teacher=True,
                  logit_loss="kl_div", temperature=2.0, lm_weight=0.0)
    d.final.update(enabled=True, steps=600, learning_rate=1e-3, logit_loss="kl_div",
                   temperature=2.0, logit_weight=1.0, lm_weight=1.0)
    return cfg
