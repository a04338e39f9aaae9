"""The causal language-modelling loss, the one place where labels are shifted, and the
vocabulary-chunked form of the losses over logits.

Logits at position t predict token t + 1, so position t is scored against labels[t + 1]:

    loss = sum_t m[t+1] * -log softmax(logits[t])[labels[t+1]]  /  sum_t m[t+1]

where m masks padding (attention_mask == 0) and ignored targets (label == IGNORE_INDEX).
The mean is token-weighted: every real target token counts once, whatever its row. The
per-token -log softmax is `kernels.cross_entropy` (its backward written out).

Chunked form. A loss over logits = head(hidden) of (B, T, V) float32 can be computed from the
hidden states (B, T, d) and the head instead (`lm_loss_terms`, and distillation's
`logit_loss_terms`): `chunked_token_sum` runs the head on (B, c) tokens at a time, so neither
pass holds more than one (B, c, V) chunk of logits. The rule (`chunk_positions`): with
train.loss_chunk_tokens = N > 0 and B * T > N tokens, c = max(1, N // B) positions per chunk
(T padded up to a multiple of c with weight-0 positions); otherwise the plain form. Chunks
split positions, not rows, so the batch axis keeps its sharding.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cleangpt_jax.kernels import cross_entropy

IGNORE_INDEX = -100


def next_token_targets(labels, mask=None):
    """(targets, weights), both (B, T): targets[t] = labels[t + 1] (0 where not scored) and
    weights[t] = 1.0 where position t has a real, non-ignored next token, else 0.0. The last
    position has no target; it gets weight 0 rather than being sliced off, which would copy
    the whole (B, T, V) logits."""
    no_target = jnp.full_like(labels[:, :1], IGNORE_INDEX)
    targets = jnp.concatenate([labels[:, 1:], no_target], axis=1)  # targets[t] = labels[t+1]
    scored = targets != IGNORE_INDEX
    if mask is not None:
        next_real = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1) > 0
        scored = scored & next_real
    return jnp.where(scored, targets, 0), scored.astype(jnp.float32)


def causal_lm_loss_terms(logits, labels, mask=None):
    """(sum of per-token losses, number of scored tokens), both float32 scalars.

    logits (B, T, V), labels (B, T) int, mask (B, T) (1 = real token) or None. Summing the
    terms over micro-batches or devices and dividing once gives the exact token-weighted mean.
    """
    targets, weights = next_token_targets(labels, mask)
    nll = cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(weights > 0, nll, 0.0)), jnp.sum(weights)


def causal_lm_loss(logits, labels, mask=None):
    """Token-weighted mean next-token cross-entropy (0 when nothing is scored)."""
    total, count = causal_lm_loss_terms(logits, labels, mask)
    return total / jnp.maximum(count, 1.0)


def lm_loss_terms(head: Callable, head_params, hidden, labels, mask=None, *,
                  chunk_tokens: int = 0):
    """`causal_lm_loss_terms(head(head_params, hidden), labels, mask)`, chunked by the rule
    of `chunk_positions`. hidden (B, T, d) pre-head states; head(params, h (B, c, d)) ->
    logits (B, c, V) (models.base.head_fn)."""
    c = chunk_positions(hidden.shape[:2], chunk_tokens)
    if c is None:
        return causal_lm_loss_terms(head(head_params, hidden), labels, mask)
    targets, weights = next_token_targets(labels, mask)

    def per_token(params, h, _, tgt):
        return cross_entropy(head(params, h), tgt)

    total = chunked_token_sum(per_token, head_params, hidden, None, targets, weights, c)
    return total, jnp.sum(weights)


# ---------------------------------------------------------------------------- chunking
def chunk_positions(batch_time: tuple[int, int], chunk_tokens: int) -> int | None:
    """Positions per chunk for a (B, T) batch under train.loss_chunk_tokens = N, or None for
    the plain form (N = 0, or B * T <= N: the whole logits are no bigger than one chunk)."""
    b, t = batch_time
    if not chunk_tokens or b * t <= chunk_tokens:
        return None
    return max(1, chunk_tokens // b)


def chunked_token_sum(per_token: Callable, params, rows, frozen, frozen_rows, weights,
                      chunk: int):
    """sum_{b,t} weights[b, t] * per_token(params, rows, frozen, frozen_rows)[b, t], float32,
    evaluated on positions [i c, (i + 1) c) at a time.

    rows, frozen_rows: pytrees of (B, T, ...) arrays; weights (B, T) float; params, frozen:
    pytrees; per_token(params, rows_chunk, frozen, frozen_rows_chunk) -> (B, c). Differentiable
    in params and rows only (frozen, frozen_rows and weights get no gradient). A custom VJP:
    the forward pass of a differentiated call takes each chunk's gradients with jax.vjp as it
    goes (sum_i d params_i, and d rows per chunk), so the backward pass only scales them by
    the incoming cotangent; the chunk's logits never outlive its loop iteration and the head
    runs once forward and once backward, as in the plain form.
    """
    t = weights.shape[1]
    n = -(-t // chunk)

    def split(x):  # (B, T, ...) -> (n, B, c, ...), padded with zeros (weight 0)
        x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 0, 1)

    def unsplit(x):  # the inverse of split
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape(x.shape[0], n * chunk, *x.shape[3:])[:, :t]

    def chunk_sum(p, r, frozen_, fr, w):
        return jnp.sum(per_token(p, r, frozen_, fr).astype(jnp.float32) * w)

    @jax.custom_vjp
    def total(p, r, frozen_, fr, w):
        def body(acc, xs):
            return acc + chunk_sum(p, xs[0], frozen_, xs[1], xs[2]), None

        xs = jax.tree.map(split, (r, fr, w))
        return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]

    def total_fwd(p, r, frozen_, fr, w):
        def body(carry, xs):
            acc, grad_p = carry
            r_c, fr_c, w_c = xs
            value, vjp = jax.vjp(lambda p_, r_: chunk_sum(p_, r_, frozen_, fr_c, w_c), p, r_c)
            d_p, d_r = vjp(jnp.ones_like(value))
            return (acc + value, jax.tree.map(jnp.add, grad_p, d_p)), d_r

        zeros = jax.tree.map(jnp.zeros_like, p)
        xs = jax.tree.map(split, (r, fr, w))
        (acc, grad_p), grad_r = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
        return acc, (grad_p, jax.tree.map(unsplit, grad_r))

    def total_bwd(residuals, g):
        grad_p, grad_r = residuals
        scale = lambda x: (g * x).astype(x.dtype)  # noqa: E731
        return (jax.tree.map(scale, grad_p), jax.tree.map(scale, grad_r), None, None, None)

    total.defvjp(total_fwd, total_bwd)
    return total(params, rows, frozen, frozen_rows, weights)
