"""The default run: a small character-level GPT on the embedded Shakespeare plays.

    python -m cleangpt_jax.train --config=configs/shakespeare_char.py

Identical to `python -m cleangpt_jax.train` with no --config: this file returns
`cleangpt_jax.config.get_config()` unchanged, so it is the place to copy from. Sized like
nanoGPT's baby shakespeare_char for a laptop CPU (4 layers x 128 wide, 4 heads, 64-character
context): a couple of thousand steps give recognisable play text (speaker names, verse lines)
in minutes on 2 CPU cores, then samples are printed and written to WORKDIR/samples/.

Run time, roughly (scripts/estimate_run_times.py: 1.06e+13 FLOPs at the 50 GFLOP/s the default
config sustains on a 2-core CPU, and at 80 TFLOP/s, ~40% MFU of one v5e chip): about 3.5 min
(measured: 105 ms/step on a busy 2-core CPU), ~20 s on one accelerator chip.
"""

from cleangpt_jax import config as base


def get_config():
    return base.get_config()
