"""Token-Factored transformer (xt updated by attention only, xe by the MLP only), characters.

    python -m cleangpt_jax.train --config=configs/factored_char.py

Sizes of the original's train_factored_transformer example (6 layers x 288 wide, 6 heads,
bias, context 512, batch 16, learning rate 3e-4, gradient clipping 1.0, log every 50 steps),
on Shakespeare characters. About 6M parameters at T=512: meant for a GPU/TPU or a patient CPU;
for a quick look use --config.model.block_size=128 --config.train.num_steps=500.

Run time, roughly (scripts/estimate_run_times.py: 1.67e+15 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~9.3 h on a
2-core CPU, ~50 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "factored"
    cfg.model.update(n_layer=6, n_head=6, n_embd=288, block_size=512, dropout=0.1, bias=True)
    cfg.train.update(batch_size=16, num_steps=5000, learning_rate=3e-4, min_lr=3e-5,
                     warmup_steps=200, weight_decay=0.01, grad_clip=1.0, log_every=50,
                     eval_every=500)
    return cfg
