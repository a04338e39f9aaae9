"""Stitching layers: stitch_k maps the student's hidden state k (width d_s) into the teacher's
space (width d_t) before the hidden-state loss, as TinyBERT's learned projection.

    stitch_k(h) = h W_k + b_k,   W_k = I when d_s = d_t, Xavier-uniform otherwise; b_k = 0.

With stitching off the widths must match and stitch_k is the identity (no parameters).
Parameters live in one dict keyed `stitch_<k>`, k = 1..L_s.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def identity_init(key, shape, dtype=jnp.float32):
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class Stitch(nn.Module):
    """h W + b, d_s -> d_t, float32; params {'kernel': (d_s, d_t), 'bias': (d_t,)}."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, h):
        init = (identity_init if h.shape[-1] == self.features
                else nn.initializers.xavier_uniform())
        kernel = self.param("kernel", init, (h.shape[-1], self.features), jnp.float32)
        y = h.astype(jnp.float32) @ kernel
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


def stitch_name(k: int) -> str:
    return f"stitch_{k}"


def init_stitching(rng, n_blocks: int, d_student: int, d_teacher: int, use_bias: bool) -> dict:
    """Parameters of stitch_1..stitch_L (one PRNG key each)."""
    module = Stitch(d_teacher, use_bias)
    dummy = jnp.zeros((1, 1, d_student), jnp.float32)
    return {stitch_name(k): module.init(key, dummy)["params"]
            for k, key in zip(range(1, n_blocks + 1), jax.random.split(rng, n_blocks))}


def apply_stitch(stitch_params: dict | None, k: int, h, d_teacher: int, use_bias: bool):
    """stitch_k(h), or h itself when stitching is off (`stitch_params` None)."""
    if stitch_params is None:
        return h.astype(jnp.float32)
    return Stitch(d_teacher, use_bias).apply({"params": stitch_params[stitch_name(k)]}, h)
