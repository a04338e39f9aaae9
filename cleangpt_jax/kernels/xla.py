"""The generic attention paths, for any backend XLA compiles to.

    dot_product_attention   jax.nn.dot_product_attention (XLA picks fused kernels on GPU/TPU)
    softmax_attention       the softmax materialised, so its probabilities can be dropped out

Both compute softmax(q k^T / sqrt(D) + bias, mask) v per head with the softmax in float32.
q (B, T, H, D), k (B, S, H, D), v (B, S, H, Dv) -> (B, T, H, Dv); bias broadcastable to
(B, H, T, S) or None; mask a boolean broadcastable to (B, H, T, S), or None for the plain
causal mask (key s seen by query t when s <= t; every caller has T == S then). segment_ids
(B, T) int (T == S, mask None) makes the causal mask block-diagonal (`segment_mask`).

    segment_mask   same_segment[b, 0, t, s] = segment_ids[b, t] == segment_ids[b, s]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def segment_mask(q_segment_ids, k_segment_ids):
    """(B, 1, T, S) bool: query t may see key s only inside its own segment (document),
    q_segment_ids[b, t] == k_segment_ids[b, s]; q (B, T), k (B, S) integer ids."""
    return (q_segment_ids[:, :, None] == k_segment_ids[:, None, :])[:, None]


def dot_product_attention(q, k, v, *, bias=None, mask=None, segment_ids=None,
                          dropout_rate: float = 0.0, dropout_rng=None):
    """jax.nn.dot_product_attention; no dropout (dropout_rate must be 0) and Dv == D. With
    segment_ids the mask is causal and `segment_mask` (attend iff same segment and s <= t)."""
    del dropout_rng
    if dropout_rate:
        raise ValueError("dot_product_attention has no attention dropout: use softmax_attention")
    causal = mask is None
    if segment_ids is not None:
        mask = segment_mask(segment_ids, segment_ids)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal)


def softmax_attention(q, k, v, *, bias=None, mask=None, segment_ids=None,
                      dropout_rate: float = 0.0, dropout_rng=None):
    """The materialised softmax: p = softmax(s) (B, H, T, S), then dropout(p) v when
    `dropout_rate` > 0 (entries kept with probability 1 - rate, scaled by 1 / (1 - rate))."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias
    if mask is None:
        t, s = q.shape[1], k.shape[1]
        mask = jnp.tril(jnp.ones((t, s), bool), k=s - t)
        if segment_ids is not None:
            mask = mask & segment_mask(segment_ids, segment_ids)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)
