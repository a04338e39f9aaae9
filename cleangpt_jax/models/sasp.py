"""SASP: simplified attention sub-block with projections (shaped attention, parallel branches).

    h = LN x
    x <- x + beta_SA * SA(h) + beta_FF * MLP(h)

Shaped attention per head, with learnable scalars alpha, beta, gamma (init 1, 0.1, 0.1):
    A = beta * softmax(causal(q k^T / sqrt(D))) + alpha * I - gamma * M_C,
    M_C[i, j] = 1 / (i + 1) for j <= i (the causal averaging matrix).
A V is computed without any T x T matrix beyond the attention kernel itself:
    A V = beta * attention(q, k, V) + alpha * V - gamma * cummean(V),
    cummean(V)[i] = mean(V[0..i]).
c_attn maps d -> 2d (q, k), or d -> 3d with `use_v`; without `use_v`, V is the head-split h.
The k (and v) columns of c_attn start at zero, so q k^T = 0, softmax = M_C and A = alpha * I at
init (beta = gamma). Heads are concatenated, then c_proj only with `use_proj`.
Attention dropout applies to the softmax term only (the original dropped out all of A).

Packed documents (segment ids): the softmax is masked block-diagonally, and M_C becomes the
same block-diagonal causal averaging, M_C[i, j] = 1 / (i - s_i + 1) for s_i <= j <= i (s_i the
first position of i's document), so cummean(V) restarts at each document. This is exactly the
softmax of zero scores under the document mask, so A = alpha * I at init still holds, and every
document computes what it computes alone.

Decoding cache per block: 'k' (B, H, D, S), 'v' (B, H, S, D) (v is the head-split h without
`use_v`) and
'v_sum' (B, H, D) float32, the running sum of V over the row's real tokens, so that
cummean(V)[i] = (v_sum + V[i]) / (position_i + 1) costs O(1) per new token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cleangpt_jax.config import ModelConfig
from cleangpt_jax.models import layers
from cleangpt_jax.models.base import Block, CausalLM


def zero_key_value_init(n_embd: int):
    """c_attn kernel init: q columns N(0, 0.02), k (and v) columns zero."""

    def init(key, shape, dtype):
        kernel = layers.normal_init()(key, shape, dtype)
        return kernel.at[:, n_embd:].set(0)

    return init


def cummean(v, segment_ids=None):
    """Running mean along time: out[:, i] = mean(v[:, :i + 1]).  v (B, T, H, D).

    With segment_ids (B, T): the mean restarts at each segment, out[:, i] = mean(v[:, s_i:i + 1])
    with s_i the first position of i's segment (a segmented scan: no sum crosses a boundary).
    """
    v32 = v.astype(jnp.float32)
    if segment_ids is None:
        counts = jnp.arange(1, v.shape[1] + 1, dtype=jnp.float32)[None, :, None, None]
        return (jnp.cumsum(v32, axis=1) / counts).astype(v.dtype)
    positions = layers.segment_positions(segment_ids)                    # (B, T)
    begins = (positions == 0)[:, :, None, None]

    def add_unless_restarted(left, right):
        (sum_l, begins_l), (sum_r, begins_r) = left, right
        return jnp.where(begins_r, sum_r, sum_l + sum_r), begins_l | begins_r

    sums, _ = jax.lax.associative_scan(add_unless_restarted, (v32, begins), axis=1)
    counts = (positions + 1).astype(jnp.float32)[:, :, None, None]
    return (sums / counts).astype(v.dtype)


def cached_cummean(v, prev_sum, step):
    """cummean for T new tokens continuing a row: mean of V over the row's real tokens so far.

    v (B, T, H, D); prev_sum (B, H, D) float32 = sum of V over the cached real tokens;
    step: layers.DecodeStep (padding is left out of the sum; a real token at position p divides
    by p + 1). Returns (cummean (B, T, H, D), updated sum (B, H, D) float32).
    """
    real = step.real[:, :, None, None]
    sums = prev_sum[:, None] + jnp.cumsum(jnp.where(real, v.astype(jnp.float32), 0.0), axis=1)
    counts = (step.positions + 1).astype(jnp.float32)[:, :, None, None]
    return (sums / counts).astype(v.dtype), sums[:, -1]


def init_cache(config: ModelConfig, batch_size: int, length: int) -> dict:
    """k, v (layers.init_kv_cache) and the running sum of V, 'v_sum' (B, H, D) float32."""
    return {**layers.init_kv_cache(config, batch_size, length),
            "v_sum": jnp.zeros((batch_size, config.n_head, config.head_dim), jnp.float32)}


class ShapedAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, h, *, attn_bias, deterministic: bool, cache=None, step=None,
                 segment_ids=None):
        """beta softmax-attention + alpha V - gamma cummean(V) (then c_proj with use_proj);
        returns (y, cache) (see layers.attention)."""
        c = self.config
        n_out = (3 if c.use_v else 2) * c.n_embd
        qkv = layers.dense(c, n_out, "c_attn", kernel_init=zero_key_value_init(c.n_embd))(h)
        parts = jnp.split(qkv, 3 if c.use_v else 2, axis=-1)
        q, k = (layers.split_heads(t, c.n_head) for t in parts[:2])
        v = layers.split_heads(parts[2] if c.use_v else h, c.n_head)

        scalar = lambda name, value: self.param(  # noqa: E731
            name, nn.initializers.constant(value), (), jnp.float32)
        alpha, beta, gamma = scalar("alpha", 1.0), scalar("beta", 0.1), scalar("gamma", 0.1)

        if cache is None:
            mean = cummean(v, segment_ids)
        else:
            mean, v_sum = cached_cummean(v, cache["v_sum"], step)
        attn, cache = layers.attention(self, q, k, v, bias=attn_bias, cache=cache, step=step,
                                       deterministic=deterministic, segment_ids=segment_ids)
        if cache is not None:
            cache["v_sum"] = v_sum
        dt = c.compute_dtype
        y = beta.astype(dt) * attn + alpha.astype(dt) * v - gamma.astype(dt) * mean
        y = layers.merge_heads(y)
        if c.use_proj:
            y = layers.dense(c, c.n_embd, "c_proj", residual=True)(y)
        return y, cache


class SASPBlock(Block):
    init_cache = staticmethod(init_cache)

    @nn.compact
    def __call__(self, x, *, attn_bias, deterministic: bool, cache=None, step=None,
                 segment_ids=None):
        """Returns (x, cache): the updated cache, or None without one."""
        c = self.config
        h = layers.LayerNorm(c, name="ln_1")(x)
        beta_sa = self.param("beta_sa", nn.initializers.constant(1.0), (), jnp.float32)
        beta_ff = self.param("beta_ff", nn.initializers.constant(0.2), (), jnp.float32)
        sa, cache = ShapedAttention(c, name="attn")(h, attn_bias=attn_bias,
                                                    deterministic=deterministic, cache=cache,
                                                    step=step, segment_ids=segment_ids)
        ff = layers.make_mlp(c)(h, deterministic=deterministic)
        x = x + beta_sa * sa.astype(jnp.float32) + beta_ff * ff.astype(jnp.float32)
        return x, cache


class SASP(CausalLM):
    block_cls = SASPBlock
