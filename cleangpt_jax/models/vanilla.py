"""Vanilla: the pre-LN GPT-2 block.

    x <- x + dropout(c_proj(Attn(LN_1 x)))
    x <- x + MLP(LN_2 x)

Attn: c_attn d -> 3d (q | k | v), causal softmax(q k^T / sqrt(D)) v per head, heads
concatenated. With bias=True and activation='gelu_tanh' this is exactly GPT-2 (the teacher);
parameter names follow GPT-2's (h_i/attn/c_attn, h_i/mlp/c_fc, ...).
Decoding cache per block: 'k' (B, H, D, S), 'v' (B, H, S, D) (layers.init_kv_cache).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cleangpt_jax.config import ModelConfig
from cleangpt_jax.models import layers
from cleangpt_jax.models.base import Block, CausalLM


class SelfAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, *, attn_bias, deterministic: bool, cache=None, step=None,
                 segment_ids=None):
        """c_proj(Attn(x)), then dropout; returns (y, cache) (see layers.attention)."""
        c = self.config
        qkv = layers.dense(c, 3 * c.n_embd, "c_attn")(x)
        q, k, v = (layers.split_heads(t, c.n_head) for t in jnp.split(qkv, 3, axis=-1))
        y, cache = layers.attention(self, q, k, v, bias=attn_bias, cache=cache, step=step,
                                    deterministic=deterministic, segment_ids=segment_ids)
        y = layers.dense(c, c.n_embd, "c_proj", residual=True)(layers.merge_heads(y))
        return nn.Dropout(c.dropout)(y, deterministic=deterministic), cache


class VanillaBlock(Block):
    @nn.compact
    def __call__(self, x, *, attn_bias, deterministic: bool, cache=None, step=None,
                 segment_ids=None):
        """Returns (x, cache): the updated cache, or None without one."""
        c = self.config
        y, cache = SelfAttention(c, name="attn")(layers.LayerNorm(c, name="ln_1")(x),
                                                 attn_bias=attn_bias, deterministic=deterministic,
                                                 cache=cache, step=step, segment_ids=segment_ids)
        x = x + y
        x = x + layers.make_mlp(c)(layers.LayerNorm(c, name="ln_2")(x),
                                   deterministic=deterministic)
        return x, cache


class Vanilla(CausalLM):
    block_cls = VanillaBlock
