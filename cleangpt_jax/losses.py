"""The causal language-modelling loss, the one place where labels are shifted.

Logits at position t predict token t + 1, so position t is scored against labels[t + 1]:

    loss = sum_t m[t+1] * -log softmax(logits[t])[labels[t+1]]  /  sum_t m[t+1]

where m masks padding (attention_mask == 0) and ignored targets (label == IGNORE_INDEX).
The mean is token-weighted: every real target token counts once, whatever its row. The
per-token -log softmax is `kernels.cross_entropy` (its backward written out).
"""

from __future__ import annotations

import jax.numpy as jnp

from cleangpt_jax.kernels import cross_entropy

IGNORE_INDEX = -100


def causal_lm_loss_terms(logits, labels, mask=None):
    """(sum of per-token losses, number of scored tokens), both float32 scalars.

    logits (B, T, V), labels (B, T) int, mask (B, T) (1 = real token) or None. Summing the
    terms over micro-batches or devices and dividing once gives the exact token-weighted mean.
    The last position has no target; it is scored with weight 0 rather than sliced off, which
    would copy the whole (B, T, V) logits.
    """
    logits = logits.astype(jnp.float32)
    no_target = jnp.full_like(labels[:, :1], IGNORE_INDEX)
    targets = jnp.concatenate([labels[:, 1:], no_target], axis=1)  # targets[t] = labels[t+1]
    weights = targets != IGNORE_INDEX
    if mask is not None:
        next_real = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1) > 0
        weights = weights & next_real
    nll = cross_entropy(logits, jnp.where(weights, targets, 0))
    return jnp.sum(jnp.where(weights, nll, 0.0)), jnp.sum(weights.astype(jnp.float32))


def causal_lm_loss(logits, labels, mask=None):
    """Token-weighted mean next-token cross-entropy (0 when nothing is scored)."""
    total, count = causal_lm_loss_terms(logits, labels, mask)
    return total / jnp.maximum(count, 1.0)
