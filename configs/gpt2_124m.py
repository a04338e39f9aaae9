"""GPT-2 small (124M) from scratch on FineWeb-Edu, bf16 compute: one TPU v5e-8 or one H100.

    python -m cleangpt_jax.train --config=configs/gpt2_124m.py --workdir=runs/gpt2_124m
    python -m cleangpt_jax.train --config=configs/gpt2_124m.py:medium --workdir=runs/gpt2_350m
    python -m cleangpt_jax.compile --config=configs/gpt2_124m.py --topology=v5e:2x4

GPT-2's shapes (Radford et al. 2019): 12 layers x 768, 12 heads (head size 64), context
T = 1024, the GPT-2 BPE tokenizer (50,257 tokens), biases, GELU (tanh form), tied embeddings,
no dropout (one pass over the data). Parameters and AdamW moments are float32; activations and
matmuls bfloat16 (model.dtype).

Data: HuggingFaceFW/fineweb-edu, its 'sample-10BT' subset (about 10B GPT-2 tokens, downloaded
and tokenised once into the token cache, data.cache_dir); the last 0.1% of its documents are
the validation set.

Optimisation as nanoGPT / llm.c train GPT-2 124M: a global batch of 512 sequences = 524,288
tokens per update; AdamW with b1 = 0.9, b2 = 0.95, weight decay 0.1 on the weight matrices,
global-norm clipping at 1.0; learning rate 6e-4 after 700 linear warmup steps, cosine decay to
6e-5 at step 19,073 (= 10B tokens, one epoch). Memory: train.grad_accum_steps = 8 runs the
batch as 8 micro-batches of 64 sequences, i.e. 8 sequences per chip per micro-batch on a v5e-8
(16 GiB HBM per chip); on one H100 (80 GB) use --config.train.grad_accum_steps=16 (32
sequences per micro-batch). `python -m cleangpt_jax.compile` (docs/accelerators.md) tells
whether a setting fits a TPU slice before it is rented.

Presets (the text after ':' in --config=FILE:PRESET): 'small' (the default, 124M), 'medium'
(24 x 1024, 16 heads, 350M), 'large' (36 x 1280, 20 heads, 774M), 'xl' (48 x 1600, 25 heads,
1.56B), with the GPT-3 paper's learning rates for those sizes (3e-4, 2.5e-4, 2e-4). The larger
ones need more memory per chip than a v5e-8 holds as replicas: shard parameters and optimizer
state with --config.train.fsdp=8 (ZeRO-3 style, cleangpt_jax/sharding.py). 'xl' also recomputes each
block in the backward pass (train.remat='block') and runs its 48 blocks as one lax.scan
(model.scan_layers): then 4 sequences per chip fit a v5e chip with fsdp=8 (docs/benchmarks.md).

Run time, roughly (scripts/estimate_run_times.py: 8.55e+18 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): ~1980 days on a
2-core CPU, ~29.7 h on one accelerator chip.
"""

from cleangpt_jax import config as base

# preset -> (n_layer, n_head, n_embd, peak learning rate)
PRESETS = {
    "small": (12, 12, 768, 6e-4),
    "medium": (24, 16, 1024, 3e-4),
    "large": (36, 20, 1280, 2.5e-4),
    "xl": (48, 25, 1600, 2e-4),
}


def get_config(preset=None):
    """The config of one preset (None or '' = 'small')."""
    name = (preset or "small").lower()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} of configs/gpt2_124m.py: choose one of "
                         f"{sorted(PRESETS)} (--config=configs/gpt2_124m.py:medium)")
    n_layer, n_head, n_embd, learning_rate = PRESETS[name]
    cfg = base.get_config()
    cfg.model.model_type = "vanilla"
    cfg.model.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024,
                     dropout=0.0, bias=True, activation="gelu_tanh", tie_embeddings=True,
                     dtype="bfloat16", param_dtype="float32")
    cfg.tokenizer.type = "gpt2"
    cfg.tokenizer.name_or_path = "gpt2"
    cfg.data.update(source="hf", name="HuggingFaceFW/fineweb-edu", config_name="sample-10BT",
                    split="train", text_column="text", val_fraction=0.001)
    cfg.train.update(batch_size=512, grad_accum_steps=8, num_steps=19_073,
                     learning_rate=learning_rate, min_lr=learning_rate / 10, warmup_steps=700,
                     lr_schedule="cosine", weight_decay=0.1, adam_b1=0.9, adam_b2=0.95,
                     grad_clip=1.0, eval_every=500, eval_steps=20, checkpoint_every=1000,
                     log_every=10, sample_every=2000, sample_prompts=("The meaning of life",),
                     sample_max_new_tokens=100)
    if name == "xl":
        cfg.model.scan_layers = True
        cfg.train.remat = "block"
    return cfg
