"""SASP (shaped attention, parallel branches), GPT-2 BPE tokenizer, on Shakespeare.

    python -m cleangpt_jax.train --config=configs/sasp_gpt2.py

As the original's train_sasp_gpt2 example: use_proj=use_v=True, 4 layers x 128 wide, 4 heads,
context 256, batch 32, learning rate 5e-4, weight decay 0.01. The tokenizer is the hub's 'gpt2'
(or --config.tokenizer.name_or_path=DIR for a local copy).

Run time, roughly (scripts/estimate_run_times.py: 1.10e+15 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~6.1 h on a
2-core CPU, ~30 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "sasp"
    cfg.model.update(n_layer=4, n_head=4, n_embd=128, block_size=256, dropout=0.1,
                     use_proj=True, use_v=True)
    cfg.tokenizer.type = "gpt2"
    cfg.tokenizer.name_or_path = "gpt2"
    cfg.train.update(batch_size=32, num_steps=3000, learning_rate=5e-4, min_lr=5e-5,
                     warmup_steps=100, weight_decay=0.01, eval_every=250)
    return cfg
