"""A GPT-2-compatible character-level Shakespeare model: the offline distillation teacher.

    python -m cleangpt_jax.train --config=configs/gpt2_teacher_shakespeare.py --workdir=runs/teacher
    python -m cleangpt_jax.export_hf --workdir=runs/teacher --out=runs/teacher_hf

Vanilla with GPT-2's exact block (bias=True, activation='gelu_tanh', tied embeddings, learned
positions), so `export_hf` writes a `transformers.GPT2LMHeadModel` directory (plus the
character tokenizer) that distillation loads like a hub 'gpt2' without the hub. 4 layers x 256
wide, 4 heads (head size 64 as in GPT-2), context 128, batch 32, 1000 steps (4M characters,
about one pass over the corpus): 10-15 minutes on a quiet 2-core CPU.

Run time, roughly (scripts/estimate_run_times.py: 8.45e+13 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): about 18 min
(measured: 1.05 s/step on a busy 2-core CPU), ~10 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "vanilla"
    cfg.model.update(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.0, bias=True,
                     activation="gelu_tanh", tie_embeddings=True, position_encoding="learned")
    cfg.train.update(batch_size=32, num_steps=1000, learning_rate=1e-3, min_lr=1e-4,
                     warmup_steps=100, weight_decay=0.1, eval_every=250, eval_steps=20,
                     checkpoint_every=250)
    return cfg
