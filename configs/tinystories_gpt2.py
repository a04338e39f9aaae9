"""TinyStories (the original's default dataset) with the GPT-2 tokenizer: needs the HF hub.

    python -m cleangpt_jax.train --config=configs/tinystories_gpt2.py

roneneldan/TinyStories, streamed: the first 100k training stories (~20M GPT-2 tokens) and the
first 10k of its 'validation' split are tokenised once, packed with <|endoftext|> between
stories and cached (data.max_samples=None with streaming=False downloads and packs all 2.1M).
Vanilla 6 layers x 384 wide, 6 heads, context 256, batch 32 (the original's default
GPTConfig sizes, Vanilla instead of SASP; --config.model.model_type=sasp for that).

Run time, roughly (scripts/estimate_run_times.py: 1.53e+16 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~4 days on a
2-core CPU, ~3 min on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    cfg = base.get_config()
    cfg.model.model_type = "vanilla"
    cfg.model.update(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.1)
    cfg.tokenizer.type = "gpt2"
    cfg.tokenizer.name_or_path = "gpt2"
    cfg.data.update(**base.TINYSTORIES)
    cfg.train.update(batch_size=32, num_steps=10_000, learning_rate=6e-4, min_lr=6e-5,
                     warmup_steps=500, weight_decay=0.1, eval_every=500, eval_steps=50,
                     checkpoint_every=1000, log_every=100,
                     sample_prompts=("Once upon a time",), sample_max_new_tokens=200)
    return cfg
