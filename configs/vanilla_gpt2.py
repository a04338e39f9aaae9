"""Vanilla (pre-LN GPT-2 block), GPT-2 BPE tokenizer, on the embedded Shakespeare plays.

    python -m cleangpt_jax.train --config=configs/vanilla_gpt2.py

Sizes of the original's train_vanilla_gpt2 example (4 layers x 128 wide, 4 heads, context 256,
batch 32, weight decay 0.01). The tokenizer is the hub's 'gpt2' (downloaded once; point
--config.tokenizer.name_or_path at a local GPT-2 tokenizer directory to stay offline).
Documents are packed with <|endoftext|> between them.

Run time, roughly (scripts/estimate_run_times.py: 1.10e+15 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~6.1 h on a
2-core CPU, ~30 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "vanilla"
    cfg.model.update(n_layer=4, n_head=4, n_embd=128, block_size=256, dropout=0.1)
    cfg.tokenizer.type = "gpt2"
    cfg.tokenizer.name_or_path = "gpt2"
    cfg.train.update(batch_size=32, num_steps=3000, learning_rate=6e-4, min_lr=6e-5,
                     warmup_steps=100, weight_decay=0.01, eval_every=250)
    return cfg
