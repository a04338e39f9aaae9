"""Choosing the next token from logits: the one sampler every generation path uses.

All functions are pure, take (B, V) float logits and act on each row independently:

    z = logits / temperature                        (temperature = 0 means greedy: argmax)
    z = top_k_filter(z, k)                          keep the k largest logits of each row
    z = top_p_filter(z, p)                          keep each row's nucleus: its smallest set of
                                                    most likely tokens whose probability >= p
    next_token = categorical(softmax(z))            (B,) int32

`sample` applies the steps in that order (temperature -> top-k -> top-p, the original's
`combined` strategy, with top-p computed per row: the original's broke for batch > 1). Dropped
tokens get -inf, so they are never drawn. Ties at a cutoff are kept (top-k may then keep more
than k tokens). With top-k on, top-p's nucleus is that of all of top-k's survivors, ties
included, computed from the k sorted values and the count of ties (no sort over the whole
vocabulary); top-p alone sorts each row once.

`temperature` and `top_p` may be traced scalars (changing them does not recompile a jitted
caller); `top_k` sets a shape and must be a Python int (0 or None = off). The ranges (temperature
>= 0, top_k >= 0, top_p in (0, 1]) are checked once, by `generation.check_generation_args`.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def greedy(logits):
    """The most likely token of each row: (B, V) -> (B,) int32 (first index on ties)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def apply_temperature(logits, temperature):
    """logits / temperature in float32 (temperature > 0)."""
    return logits.astype(jnp.float32) / temperature


def top_k_filter(logits, k: int | None):
    """-inf outside the k largest logits of each row (k = 0, None or >= V: unchanged)."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def _nucleus_cutoff(sorted_logits, p, extra_ties=0):
    """Smallest logit kept by top-p, per row, from logits sorted in descending order (B, n).

    Token i (in sorted order) is kept when the probability of the tokens before it is < p, so the
    most likely token is always kept and the kept set is the smallest one reaching p.
    `extra_ties` (B, 1) counts further tokens equal to each row's last sorted logit (top-k's ties
    beyond the k sorted values): they join the softmax, so the nucleus is that of the whole kept
    set (they come last in sorted order; if one is kept, so is the equal last sorted logit).
    """
    z = sorted_logits.astype(jnp.float32)
    e = jnp.exp(z - z[..., :1])
    total = jnp.sum(e, axis=-1, keepdims=True) + extra_ties * e[..., -1:]
    probs = e / total
    cum = jnp.cumsum(probs, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    keep = (before < p) | (p >= 1.0)
    return jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)


def top_p_filter(logits, p):
    """-inf outside each row's nucleus: the smallest set of most likely tokens with total
    probability >= p (p in (0, 1]; p = 1 keeps everything). Probabilities are softmax(logits)."""
    if p is None:
        return logits
    sorted_logits = -jnp.sort(-logits, axis=-1)
    return jnp.where(logits >= _nucleus_cutoff(sorted_logits, p), logits, -jnp.inf)


def filter_logits(logits, *, temperature=1.0, top_k: int | None = None, top_p=None):
    """temperature -> top-k -> top-p, in float32; -inf marks the tokens that cannot be drawn."""
    z = apply_temperature(logits, temperature)
    k = top_k if top_k and top_k < z.shape[-1] else None
    if k is None:
        return top_p_filter(z, top_p)
    top = jax.lax.top_k(z, k)[0]                          # (B, k), descending
    cutoff = top[..., -1:]
    if top_p is not None:
        # Top-k keeps every tie of the k-th value: the nucleus is over all of them.
        ties = jnp.sum(z >= cutoff, axis=-1, keepdims=True) - k
        cutoff = jnp.maximum(cutoff, _nucleus_cutoff(top, top_p, ties))
    return jnp.where(z >= cutoff, z, -jnp.inf)


def sample(rng, logits, *, temperature=1.0, top_k: int | None = None, top_p=None):
    """Draw the next token of each row: (B, V) logits -> (B,) int32.

    temperature = 0 gives the argmax (no randomness). A traced temperature selects between the
    two per call, so it can change without recompiling.
    """
    if isinstance(temperature, numbers.Real) and temperature == 0:
        return greedy(logits)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    z = filter_logits(logits, temperature=safe_t, top_k=top_k, top_p=top_p)
    drawn = jax.random.categorical(rng, z, axis=-1).astype(jnp.int32)
    if isinstance(temperature, numbers.Real):
        return drawn
    return jnp.where(temperature > 0, drawn, greedy(logits))
