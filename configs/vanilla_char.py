"""Vanilla (pre-LN GPT-2 block), character tokenizer, on the embedded Shakespeare plays.

    python -m cleangpt_jax.train --config=configs/vanilla_char.py

Sizes of the original's train_vanilla_char example (4 layers x 128 wide, 4 heads, context 256,
batch 32, weight decay 0.01); the original trained on 1000 TinyStories, this one on Shakespeare
so it runs offline (for TinyStories: --config.data.source=hf
--config.data.name=roneneldan/TinyStories --config.data.max_samples=1000).

Run time, roughly (scripts/estimate_run_times.py: 1.56e+14 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~52 min on a
2-core CPU, ~30 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "vanilla"
    cfg.model.update(n_layer=4, n_head=4, n_embd=128, block_size=256, dropout=0.1)
    cfg.train.update(batch_size=32, num_steps=3000, learning_rate=1e-3, min_lr=1e-4,
                     warmup_steps=100, weight_decay=0.01, eval_every=250)
    return cfg
