"""The causal language-modelling loss, the one place where labels are shifted.

Logits at position t predict token t + 1, so position t is scored against labels[t + 1]:

    loss = sum_t m[t+1] * -log softmax(logits[t])[labels[t+1]]  /  sum_t m[t+1]

where m masks padding (attention_mask == 0) and ignored targets (label == IGNORE_INDEX).
The mean is token-weighted: every real target token counts once, whatever its row.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def causal_lm_loss_terms(logits, labels, mask=None):
    """(sum of per-token losses, number of scored tokens), both float32 scalars.

    logits (B, T, V), labels (B, T) int, mask (B, T) (1 = real token) or None. Summing the
    terms over micro-batches or devices and dividing once gives the exact token-weighted mean.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    weights = targets != IGNORE_INDEX
    if mask is not None:
        weights = weights & (mask[:, 1:] > 0)
    safe_targets = jnp.where(weights, targets, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe_targets)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def causal_lm_loss(logits, labels, mask=None):
    """Token-weighted mean next-token cross-entropy (0 when nothing is scored)."""
    total, count = causal_lm_loss_terms(logits, labels, mask)
    return total / jnp.maximum(count, 1.0)
