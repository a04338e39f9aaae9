"""Token-Factored transformer, GPT-2 BPE tokenizer, on Shakespeare.

    python -m cleangpt_jax.train --config=configs/factored_gpt2.py

The original's train_factored_transformer example (6 layers x 288 wide, 6 heads, bias,
context 512, batch 16, learning rate 3e-4, clipping 1.0) with the GPT-2 tokenizer it used.
The original trained on 100k TinyStories; for that add --config.data.source=hf
--config.data.name=roneneldan/TinyStories --config.data.max_samples=100000
--config.data.val_split=validation (or see configs/tinystories_gpt2.py). The tokenizer is the
hub's 'gpt2' (or --config.tokenizer.name_or_path=DIR for a local copy).

Run time, roughly (scripts/estimate_run_times.py: 5.22e+15 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~29.0 h on a
2-core CPU, ~65 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "factored"
    cfg.model.update(n_layer=6, n_head=6, n_embd=288, block_size=512, dropout=0.1, bias=True)
    cfg.tokenizer.type = "gpt2"
    cfg.tokenizer.name_or_path = "gpt2"
    cfg.train.update(batch_size=16, num_steps=5000, learning_rate=3e-4, min_lr=3e-5,
                     warmup_steps=200, weight_decay=0.01, grad_clip=1.0, log_every=50,
                     eval_every=500)
    return cfg
