"""Token-Factored transformer: two residual streams, xt (token-like) and xe (contextual).

    xt_0 = dropout(wte[ids] + wpe[pos]),  xe_0 = 0
    per block:
        h  = LN_1(xt + xe);  q, k = c_attn(h)            (d -> 2d, no value/output matrices)
        xt <- xt + causal_attention(q, k, V = head-split xt)
        xe <- xe + MLP(LN_2(xt + xe))                      (with the updated xt)
    logits = head(LN_f(xt + xe));  the hidden state (for distillation) is xt + xe.

xt changes only through attention and xe only through the MLP. With position_encoding='alibi'
(the original's FactoredALiBi) there is no wpe and scores get slope_h * (j - i).
`use_v` / `use_proj` mix whole heads with H x H matrices (the original's Kronecker lift by I_D):
    V[h] = sum_g W_v[h, g] xt[g],   y[h] <- sum_g W_o[h, g] y[g]  (then dropout).
Decoding cache per block: 'k' (B, H, D, S) and 'v' (B, H, S, D), v being the head-split xt
(mixed with `use_v`) that entered the block.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cleangpt_jax.config import ModelConfig
from cleangpt_jax.models import layers
from cleangpt_jax.models.base import Block, CausalLM


def mix_heads(matrix, x):
    """sum_g matrix[h, g] x[..., g, :]  for x (B, T, H, D)."""
    return jnp.einsum("hg,btgd->bthd", matrix.astype(x.dtype), x)


class FactoredAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, h, xt, *, attn_bias, deterministic: bool, cache=None, step=None,
                 segment_ids=None):
        """Attention with V = head-split xt (mixed with use_v, output mixed with use_proj);
        returns (y, cache) (see layers.attention)."""
        c = self.config
        qk = layers.dense(c, 2 * c.n_embd, "c_attn")(h)
        q, k = (layers.split_heads(t, c.n_head) for t in jnp.split(qk, 2, axis=-1))
        v = layers.split_heads(xt.astype(c.compute_dtype), c.n_head)
        if c.use_v:
            v = mix_heads(self.param("v_mix", layers.normal_init(), (c.n_head, c.n_head),
                                     c.params_dtype), v)
        y, cache = layers.attention(self, q, k, v, bias=attn_bias, cache=cache, step=step,
                                    deterministic=deterministic, segment_ids=segment_ids)
        if c.use_proj:
            y = mix_heads(self.param("proj_mix", layers.residual_init(c), (c.n_head, c.n_head),
                                     c.params_dtype), y)
            y = nn.Dropout(c.dropout)(y, deterministic=deterministic)
        return layers.merge_heads(y), cache


class FactoredBlock(Block):
    @nn.compact
    def __call__(self, state, *, attn_bias, deterministic: bool, cache=None, step=None,
                 segment_ids=None):
        """Returns ((xt, xe), cache): the updated cache, or None without one."""
        c = self.config
        xt, xe = state
        h = layers.LayerNorm(c, name="ln_1")(xt + xe)
        y, cache = FactoredAttention(c, name="attn")(h, xt, attn_bias=attn_bias,
                                                     deterministic=deterministic, cache=cache,
                                                     step=step, segment_ids=segment_ids)
        xt = xt + y
        xe = xe + layers.make_mlp(c)(layers.LayerNorm(c, name="ln_2")(xt + xe),
                                     deterministic=deterministic)
        return (xt, xe), cache


class Factored(CausalLM):
    block_cls = FactoredBlock

    def init_state(self, x):
        return x, jnp.zeros_like(x)

    def hidden(self, state):
        xt, xe = state
        return xt + xe
