"""Token-Factored transformer with ALiBi positions (the original's FactoredALiBi), characters.

    python -m cleangpt_jax.train --config=configs/factored_alibi_char.py

No learned position table: attention scores get slope_h * (j - i), so the model runs on
contexts longer than it was trained on, up to max_position_embeddings = 4 x block_size
(`python -m cleangpt_jax.generate` / `evaluate` can go beyond block_size). use_v mixes whole
heads with an n_head x n_head matrix, as the original's ALiBi script (--use_v) did.
6 layers x 288 wide, 6 heads, context 256, batch 32.

Run time, roughly (scripts/estimate_run_times.py: 1.45e+15 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~8.0 h on a
2-core CPU, ~50 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "factored"
    cfg.model.update(n_layer=6, n_head=6, n_embd=288, block_size=256, dropout=0.1,
                     position_encoding="alibi", max_position_embeddings=1024, use_v=True)
    cfg.train.update(batch_size=32, num_steps=5000, learning_rate=3e-4, min_lr=3e-5,
                     warmup_steps=200, weight_decay=0.01, grad_clip=1.0, eval_every=500)
    return cfg
