"""Layers shared by every architecture: initialisers, Dense, LayerNorm, MLPs, causal attention,
ALiBi, and the KV-cache helpers used for decoding.

Shapes: B batch, T query length, S key length, H heads, D head dim, d = H * D model width.
Precision: parameters are stored in `config.param_dtype`; matmuls run in `config.dtype`;
LayerNorm, softmax and the logits are computed in float32. The products, the LayerNorm's
standardisation and the attention without a cache run through `cleangpt_jax.kernels`, which
holds the backend-specific forms and chooses between them.

KV cache: an explicit pytree (no flax 'cache' collection), passed into the model and returned
updated. Each block owns a dict of arrays ('k' (B, H, D, S) and 'v' (B, H, S, D) in the compute
dtype, plus whatever else its attention needs); `DecodeStep` carries what every block shares for
one call: the slot the T new tokens are written to, their masks, real positions and padding
flags. `attention` returns (y, cache) with or without one (cache None without), and so does
every attention module and block built on it.
"""

from __future__ import annotations

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cleangpt_jax import kernels
from cleangpt_jax.config import ModelConfig

INIT_STD = 0.02


def normal_init(std: float = INIT_STD):
    return nn.initializers.normal(stddev=std)


def residual_init(config: ModelConfig):
    """Init for projections that write into the residual stream: N(0, 0.02 / sqrt(2 L))."""
    return normal_init(INIT_STD / math.sqrt(2 * config.n_layer))


class Dense(nn.Module):
    """y = x W + b over the last axis: W 'kernel' (d_in, features), b 'bias' (features,).

    Parameters in `param_dtype`, the product in `dtype` (`kernels.dense_product`). A
    generation call may provide W^T as 'kernel_t' in the `kernels.DECODE_LAYOUT` collection;
    the product then reads it for single rows (the same numbers).
    """

    features: int
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        kernel_t = self.get_variable(kernels.DECODE_LAYOUT, "kernel_t")
        y = kernels.dense_product(x.astype(self.dtype), kernel.astype(self.dtype), kernel_t)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense(config: ModelConfig, features: int, name: str, *, residual: bool = False,
          kernel_init=None) -> Dense:
    """Dense layer with the project's init (N(0, 0.02), zero bias) and precision settings."""
    if kernel_init is None:
        kernel_init = residual_init(config) if residual else normal_init()
    return Dense(features, use_bias=config.bias, dtype=config.compute_dtype,
                 param_dtype=config.params_dtype, kernel_init=kernel_init, name=name)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale (+ bias), in float32 (eps 1e-5 as GPT-2);
    the output is cast to the compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), c.params_dtype)
        y = kernels.standardize(x.astype(jnp.float32), c.layer_norm_epsilon)
        y = y * scale.astype(jnp.float32)
        if c.bias:
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],),
                               c.params_dtype).astype(jnp.float32)
        return y.astype(c.compute_dtype)


def activation(config: ModelConfig):
    return {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
            "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}[config.activation]


class MLP(nn.Module):
    """c_proj(act(c_fc x)), d -> 4d -> d, then dropout."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        c = self.config
        h = activation(c)(dense(c, 4 * c.n_embd, "c_fc")(x))
        y = dense(c, c.n_embd, "c_proj", residual=True)(h)
        return nn.Dropout(c.dropout)(y, deterministic=deterministic)


def gated_mlp_width(n_embd: int) -> int:
    """LLaMA-style hidden width: int(2.1/3 * 4d) rounded up to a multiple of 8."""
    n = int(2.1 / 3 * 4 * n_embd)
    return -(-n // 8) * 8


class GatedMLP(nn.Module):
    """c_proj(act(c_gate x) * c_fc x), d -> gated_mlp_width(d) -> d, then dropout."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        c = self.config
        n = gated_mlp_width(c.n_embd)
        h = activation(c)(dense(c, n, "c_gate")(x)) * dense(c, n, "c_fc")(x)
        y = dense(c, c.n_embd, "c_proj", residual=True)(h)
        return nn.Dropout(c.dropout)(y, deterministic=deterministic)


def make_mlp(config: ModelConfig, name: str = "mlp") -> nn.Module:
    return (GatedMLP if config.llama_mlp else MLP)(config, name=name)


def alibi_slopes(n_head: int) -> np.ndarray:
    """Reference ALiBi slopes (Press et al.): 2^(-8 h / n) for n a power of two; otherwise the
    slopes of the nearest lower power of two followed by every other slope of the next one."""

    def power_of_2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return np.asarray(power_of_2(n_head), np.float32)
    closest = 2 ** math.floor(math.log2(n_head))
    extra = alibi_slopes(2 * closest)[0::2][: n_head - closest]
    return np.asarray(power_of_2(closest) + list(extra), np.float32)


def alibi_bias(n_head: int, q_positions, k_positions):
    """ALiBi bias slope_h * (j - i), shape (B or 1, H, T, S), float32.

    Positions are (T,) / (S,) or batched (B, T) / (B, S). Entries above the causal diagonal are
    positive and must be masked by the caller (every attention here is causal).
    """
    q_positions = jnp.atleast_2d(q_positions)
    k_positions = jnp.atleast_2d(k_positions)
    rel = (k_positions[:, None, None, :] - q_positions[:, None, :, None]).astype(jnp.float32)
    return jnp.asarray(alibi_slopes(n_head))[None, :, None, None] * rel


def attention(module: nn.Module, q, k, v, *, bias=None, deterministic: bool = True, cache=None,
              step=None, segment_ids=None):
    """Causal self-attention softmax(q k^T / sqrt(D) + bias) v per head; returns (y, cache).

    q, k (B, T, H, D), v (B, T, H, Dv) -> y (B, T, H, Dv); `module` is the calling attention
    module (its `config`, and its 'dropout' key). Without a cache the T tokens attend to each
    other (`kernels.causal_attention`, implementation `config.attention`), bias
    (B or 1, H, T, T) or None, dropout on the probabilities unless `deterministic` or
    config.dropout = 0, and the returned cache is None; segment_ids (B, T) or None keeps each
    token's attention inside its own segment (document). With a cache they also attend to the
    cached tokens (`cached_attention`, the bias comes from `step`) and the cache comes back
    updated.
    """
    if cache is not None:
        return cached_attention(q, k, v, cache, step)
    c = module.config
    dropout = not deterministic and c.dropout > 0
    y = kernels.causal_attention(q, k, v, implementation=c.attention, bias=bias,
                                 segment_ids=segment_ids,
                                 dropout_rate=c.dropout if dropout else 0.0,
                                 dropout_rng=module.make_rng("dropout") if dropout else None)
    return y, None


def segment_starts(segment_ids):
    """(B, T) int32: the index of the first position of each position's segment, i.e. the
    last t' <= t where a new segment begins (t' = 0, or segment_ids changes at t')."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    begins = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(begins, t, 0), axis=1)


def segment_positions(segment_ids):
    """(B, T) int32: each position's index within its segment, t - segment_starts(t)."""
    return jnp.arange(segment_ids.shape[1], dtype=jnp.int32) - segment_starts(segment_ids)


def split_heads(x, n_head: int):
    """(B, T, d) -> (B, T, H, d / H)."""
    return x.reshape(*x.shape[:-1], n_head, x.shape[-1] // n_head)


def merge_heads(x):
    """(B, T, H, D) -> (B, T, H * D)."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


@flax.struct.dataclass
class DecodeStep:
    """What every block needs to run T new tokens against its KV cache (built by CausalLM).

    index:      () int32, cache slot of the first new token (new tokens fill [index, index + T)).
    cache_mask: (B, 1, T, S) bool, new token t sees cached slot s: a real token of an earlier
                call (start <= s < index); None when the cache is still empty (a prefill).
    new_mask:   (B, 1, T, T) bool, new token t sees new token u: u <= t and u is real.
    real:       (B, T) bool, the new token is real (False for left padding).
    positions:  (B, T) int32, position of each new token among its row's real tokens.
    cache_bias, new_bias: ALiBi biases (1, H, T, S) and (1, H, T, T) for the same pairs, or None.
    """

    index: jax.Array
    cache_mask: jax.Array
    new_mask: jax.Array
    real: jax.Array
    positions: jax.Array
    cache_bias: jax.Array | None = None
    new_bias: jax.Array | None = None


def init_kv_cache(config: ModelConfig, batch_size: int, length: int) -> dict:
    """Zero buffers in the compute dtype: 'k' (B, H, D, S) (keys transposed) and 'v'
    (B, H, S, D). This is the layout the decoding matmuls read (q k^T and p v), so a decode
    step reads the cache in place, without a transposed copy of it per layer."""
    h, d = config.n_head, config.head_dim
    return {"k": jnp.zeros((batch_size, h, d, length), config.compute_dtype),
            "v": jnp.zeros((batch_size, h, length, d), config.compute_dtype)}


def update_kv_cache(cache: dict, k, v, index) -> dict:
    """Write k, v (B, T, H, D) into slots [index, index + T); returns the updated cache dict.
    The cache length S is static; the written slots are dynamic."""
    k = jnp.transpose(k, (0, 2, 3, 1)).astype(cache["k"].dtype)      # (B, H, D, T)
    v = jnp.transpose(v, (0, 2, 1, 3)).astype(cache["v"].dtype)      # (B, H, T, D)
    return {**cache, "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k, index, 3),
            "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v, index, 2)}


def cached_attention(q, k, v, cache: dict, step: DecodeStep):
    """Causal attention of T new tokens over the cached ones and themselves; returns
    (y (B, T, H, Dv), cache with k, v written at step.index).

    q, k (B, T, H, D), v (B, T, H, Dv); cache 'k' (B, H, D, S), 'v' (B, H, S, Dv) hold the
    earlier tokens. The softmax runs over both key blocks at once (one max, one sum), so
    nothing is concatenated and the matmuls read the cache before it is updated: the update
    is the step's only write to it, and XLA can do it in place. Inference only (no dropout).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    neg = jnp.finfo(jnp.float32).min
    s_new = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if step.new_bias is not None:
        s_new = s_new + step.new_bias
    s_new = jnp.where(step.new_mask, s_new, neg)
    m = s_new.max(-1, keepdims=True)
    if step.cache_mask is not None:
        qh = jnp.swapaxes(q, 1, 2)                                                # (B, H, T, D)
        s_cache = jnp.matmul(qh, cache["k"], preferred_element_type=jnp.float32) * scale
        if step.cache_bias is not None:
            s_cache = s_cache + step.cache_bias
        s_cache = jnp.where(step.cache_mask, s_cache, neg)
        m = jnp.maximum(m, s_cache.max(-1, keepdims=True))
    p_new = jnp.exp(s_new - m)
    total = p_new.sum(-1, keepdims=True)                                          # (B, H, T, 1)
    y = jnp.einsum("bhts,bshd->bhtd", p_new.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
    if step.cache_mask is not None:
        p_cache = jnp.exp(s_cache - m)
        total = total + p_cache.sum(-1, keepdims=True)
        y = y + jnp.matmul(p_cache.astype(v.dtype), cache["v"],
                           preferred_element_type=jnp.float32)
    y = jnp.swapaxes(y / total, 1, 2).astype(v.dtype)
    return y, update_kv_cache(cache, k, v, step.index)
