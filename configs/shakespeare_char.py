"""The default run: a small character-level GPT on the embedded Shakespeare plays.

    python -m cleangpt_jax.train --config=configs/shakespeare_char.py

Identical to `python -m cleangpt_jax.train` with no --config: this file returns
`cleangpt_jax.config.get_config()` unchanged, so it is the place to copy from. Sized like
nanoGPT's baby shakespeare_char for a laptop CPU (4 layers x 128 wide, 4 heads, 64-character
context): a couple of thousand steps give recognisable play text (speaker names, verse lines)
in minutes on 2 CPU cores, then samples are printed and written to WORKDIR/samples/.
"""

from cleangpt_jax import config as base


def get_config():
    return base.get_config()
