"""Distillation losses: one registry of per-token losses, one masked token mean.

A loss compares student and teacher vectors at every position and returns a (B, T) array;
`distillation_loss` averages it over real (non-padding) tokens. The same registry serves the
hidden-state stages (stitch_k(h_s[k]) against h_t[map(k)], vectors of width d_t) and the logit
stages (vectors of width V):

    mse     mean_i (s_i - t_i)^2
    cosine  1 - <s, t> / (|s| |t|)
    kl_div  T^2 * KL(softmax(t / T) || softmax(s / T))     (per token, never summed over time)
    ce      -log softmax(s)[argmax t]                        (cross-entropy on the teacher's argmax)

The logit stages give `logit_stage_loss` the two models' final hidden states and heads instead
of their logits: it runs both heads on chunks of tokens (cleangpt_jax.losses.chunked_token_sum,
train.loss_chunk_tokens), so no (B, T, V) logits array exists in either pass.

Add your own (the original tutorial's mixed MSE + cosine, say) and name it in the config:

    @register_loss("mse_cosine")
    def mse_cosine(student, teacher, temperature):
        return LOSSES["mse"](student, teacher, temperature) + LOSSES["cosine"](student, teacher,
                                                                              temperature)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cleangpt_jax.kernels import cross_entropy
from cleangpt_jax.losses import chunk_positions, chunked_token_sum, next_token_targets
from cleangpt_jax.registry import Registry

LossFn = Callable[[jax.Array, jax.Array, float], jax.Array]
LOSSES = Registry("distillation loss", "losses")
register_loss = LOSSES.register  # register_loss(name)(fn(student, teacher, temperature) -> (B, T))


def get_loss(name: str) -> LossFn:
    """The registered loss `name` (case-insensitive); ConfigError names the registered ones."""
    return LOSSES[name]


def distillation_loss(loss: str | LossFn, student, teacher, mask=None,
                      temperature: float = 1.0):
    """Mean of the per-token loss (a registered name or a function) over real tokens.

    student/teacher (B, T, n), mask (B, T) with 1 = real token (None: every token counts):
        sum_bt mask[b, t] * loss(student, teacher)[b, t] / sum_bt mask[b, t]
    """
    fn = get_loss(loss) if isinstance(loss, str) else loss
    per_token = fn(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                   temperature)
    if mask is None:
        return per_token.mean()
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def logit_stage_loss(loss: str | LossFn, student_head: Callable, student_params,
                     student_hidden, teacher_head: Callable, teacher_params, teacher_hidden,
                     labels, mask=None, temperature: float = 1.0, *, logit_weight: float = 1.0,
                     lm_weight: float = 0.0, chunk_tokens: int = 0):
    """The head and final stages' loss, a float32 scalar:

        logit_weight * distillation_loss(loss, s_logits, t_logits, mask, temperature)
          + lm_weight * causal_lm_loss(s_logits, labels, mask)

    with logits = head(head_params, hidden): hidden (B, T, d_s) / (B, T, d_t), heads as
    models.base.head_fn, labels (B, T). Both terms are one per-token sum (each token weighted
    by its term's weight over its term's token count, which no parameter changes), so the
    student's head runs once per chunk (losses.chunk_positions' rule). The teacher side gets
    no gradient."""
    fn = get_loss(loss) if isinstance(loss, str) else loss
    teacher_params, teacher_hidden = jax.lax.stop_gradient((teacher_params, teacher_hidden))
    mask = (jnp.ones(student_hidden.shape[:2], jnp.float32) if mask is None
            else jnp.asarray(mask, jnp.float32))
    logit_weights = logit_weight * mask / jnp.maximum(jnp.sum(mask), 1.0)
    targets, lm_weights = next_token_targets(labels, mask)
    lm_weights = lm_weight * lm_weights / jnp.maximum(jnp.sum(lm_weights), 1.0)

    def per_token(s_params, s_hidden, t_params, rows):
        t_hidden, targets, logit_weights, lm_weights = rows
        s_logits = student_head(s_params, s_hidden).astype(jnp.float32)
        t_logits = teacher_head(t_params, t_hidden).astype(jnp.float32)
        out = logit_weights * fn(s_logits, t_logits, temperature)
        if lm_weight:
            out = out + lm_weights * cross_entropy(s_logits, targets)
        return out

    rows = (teacher_hidden, targets, logit_weights, lm_weights)
    ones = jnp.ones(mask.shape, jnp.float32)
    c = chunk_positions(student_hidden.shape[:2], chunk_tokens)
    if c is None:
        return jnp.sum(per_token(student_params, student_hidden, teacher_params, rows))
    return chunked_token_sum(per_token, student_params, student_hidden, teacher_params, rows,
                             ones, c)


@register_loss("mse")
def mse(student, teacher, temperature):
    return jnp.mean(jnp.square(student - teacher), axis=-1)


@register_loss("cosine")
def cosine(student, teacher, temperature):
    eps = 1e-8
    dot = jnp.sum(student * teacher, axis=-1)
    norms = jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1)
    return 1.0 - dot / jnp.maximum(norms, eps)


@register_loss("kl_div")
def kl_div(student, teacher, temperature):
    log_p_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_p_student = jax.nn.log_softmax(student / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return kl * temperature ** 2


@register_loss("ce")
def ce(student, teacher, temperature):
    target = jnp.argmax(teacher, axis=-1)
    log_p = jax.nn.log_softmax(student, axis=-1)
    return -jnp.take_along_axis(log_p, target[..., None], axis=-1)[..., 0]
