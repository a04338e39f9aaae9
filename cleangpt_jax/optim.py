"""Optimizer and learning-rate schedule built from the `train` config section.

    optimizer, schedule = make_optimizer(config.train, num_steps)

AdamW (decoupled weight decay, Loshchilov & Hutter) after global-norm clipping:

    g <- g * min(1, grad_clip / ||g||_2)                      (identity when grad_clip <= 0)
    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2       (bias-corrected m_hat, v_hat)
    w <- w - lr(s) * (m_hat / (sqrt(v_hat) + eps) + wd * mask(w) * w)

mask(w) = 1 only for weights of rank >= 2 (matmul kernels, embeddings, head-mixing matrices):
biases, LayerNorm scales/offsets and the scalar gains of SASP (alpha, beta, gamma, beta_sa,
beta_ff) are never decayed.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cleangpt_jax.config import ConfigError

LR_SCHEDULES = ("cosine", "linear", "constant")


def lr_schedule(train_cfg: Any, num_steps: int) -> optax.Schedule:
    """lr(s) for optimizer step s = 0, 1, ... (the update that produces step s + 1). A
    non-finite or out-of-order learning_rate / min_lr is a ConfigError here, before any step.

    With peak lr, W = warmup_steps, N = num_steps and p = clip((s - W) / (N - W), 0, 1):

        s <  W :  lr * (s + 1) / W                           (linear warmup, reaches lr at W-1)
        s >= W :  cosine    min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
                  linear    lr + (min_lr - lr) * p
                  constant  lr
    """
    peak = float(train_cfg.learning_rate)
    floor = float(train_cfg.min_lr)
    warmup = int(train_cfg.warmup_steps)
    kind = str(train_cfg.lr_schedule).lower()
    if kind not in LR_SCHEDULES:
        raise ConfigError(f"unknown train.lr_schedule {train_cfg.lr_schedule!r}: choose one of "
                          f"{LR_SCHEDULES}")
    if not (math.isfinite(peak) and math.isfinite(floor)):
        raise ConfigError(f"train.learning_rate and train.min_lr must be finite numbers, got "
                          f"learning_rate={peak}, min_lr={floor}: set them to numbers like "
                          f"1e-3 and 1e-4")
    if peak <= 0 or floor < 0 or floor > peak:
        raise ConfigError(f"need 0 <= train.min_lr <= train.learning_rate and learning_rate > 0, "
                          f"got min_lr={floor}, learning_rate={peak}")
    if warmup < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {warmup}")
    decay_steps = max(int(num_steps) - warmup, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        p = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif kind == "linear":
            decayed = peak + (floor - peak) * p
        else:
            decayed = jnp.full_like(p, peak)
        if warmup == 0:
            return decayed
        return jnp.where(s < warmup, peak * (s + 1.0) / warmup, decayed)

    return schedule


def weight_decay_mask(params):
    """True for the leaves AdamW decays: weights of rank >= 2 only."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(train_cfg: Any, num_steps: int, *, mask=weight_decay_mask):
    """(optax transformation, schedule) from learning_rate, min_lr, warmup_steps, lr_schedule,
    grad_clip, weight_decay, adam_b1, adam_b2 and adam_eps of `train_cfg` (every key is
    required: the defaults live in config.get_config). `mask` picks the decayed leaves.

    grad_clip <= 0 puts optax.identity where the clipping goes: both hold an EmptyState, so
    the optimizer state has one structure whether clipping is on or off, and a run resumes
    after grad_clip is switched between 0 and a positive value."""
    schedule = lr_schedule(train_cfg, num_steps)
    clip = float(train_cfg.grad_clip or 0.0)
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=float(train_cfg.adam_b1), b2=float(train_cfg.adam_b2),
                    eps=float(train_cfg.adam_eps), weight_decay=float(train_cfg.weight_decay),
                    mask=mask)), schedule
