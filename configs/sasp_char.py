"""SASP (shaped attention, parallel branches), character tokenizer, on Shakespeare.

    python -m cleangpt_jax.train --config=configs/sasp_char.py

As the original's train_sasp_char example: use_proj=use_v=True (value and output projections on
top of the shaped attention A = beta*softmax + alpha*I - gamma*M_C), 4 layers x 128 wide,
4 heads, context 256, batch 32, learning rate 5e-4, weight decay 0.01 (never on the SASP
scalars alpha/beta/gamma/beta_sa/beta_ff, biases or norms).

Run time, roughly (scripts/estimate_run_times.py: 1.56e+14 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~52 min on a
2-core CPU, ~30 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "sasp"
    cfg.model.update(n_layer=4, n_head=4, n_embd=128, block_size=256, dropout=0.1,
                     use_proj=True, use_v=True)
    cfg.train.update(batch_size=32, num_steps=3000, learning_rate=5e-4, min_lr=5e-5,
                     warmup_steps=100, weight_decay=0.01, eval_every=250)
    return cfg
