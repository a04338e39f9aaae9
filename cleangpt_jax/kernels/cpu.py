"""Forms written for XLA:CPU: the same numbers as the plain formulations, in the shape XLA:CPU
compiles fastest. `cleangpt_jax.kernels` decides where each one is used; docs/benchmarks.md
holds what they measured.

    rows_matmul                  x W as one 2-D product over the flattened rows
    dense_product                x W, reading W^T for a single row when a decode copy exists
    decode_layout                the W^T copies for batch-1 decoding (DECODE_LAYOUT collection)
    standardize                  (x - mean) / sqrt(var + eps), backward written out
    cross_entropy                logsumexp(z) - z[target], backward written out
    blockwise_causal_attention   causal attention one block of queries at a time
    DECODE_COMPILER_OPTIONS      XLA:CPU options for the generation loop

Shapes: B batch, T query length, S key length, H heads, D head dim.
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp

# Variable collection of decode-time weight copies (see `decode_layout`).
DECODE_LAYOUT = "decode_layout"

# Batch-1 generation calls make `decode_layout` copies only when they decode at least this many
# (bucketed) tokens: making the copies costs a number of decode steps, which shorter calls do
# not win back.
DECODE_LAYOUT_MIN_STEPS = 64

# XLA:CPU's default copy insertion copies every cache buffer at each decode step, because the
# step reads the cache before updating it in place; its region analysis proves the in-place
# update safe.
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def rows_matmul(x, w, *, w_transposed: bool = False, preferred_element_type=None):
    """x (..., d) @ w (d, f), or @ w^T for w (f, d) when `w_transposed`, as one 2-D matmul over
    the flattened rows (B*T, d); (..., f) in x's dtype or `preferred_element_type`.

    The numbers are those of the plain product; the 2-D form lets XLA:CPU take the kernel
    gradient x^T g straight from g instead of first transposing the (B, T, f) output gradient
    into a copy.
    """
    contract = 1 if w_transposed else 0
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (contract,)), ((), ())),
                            preferred_element_type=preferred_element_type)
    return y.reshape(*x.shape[:-1], w.shape[1 - contract])


def dense_product(x, kernel, kernel_t=None):
    """x (..., d_in) @ kernel (d_in, d_out) -> (..., d_out).

    For a single row x (batch-1 decoding) with kernel_t = W^T from `decode_layout`, the
    product reads kernel_t (`row_times_kernel_t`); otherwise it is `rows_matmul`.
    """
    if kernel_t is not None and x.size == x.shape[-1]:
        y = row_times_kernel_t(x.reshape(1, -1), kernel_t.astype(x.dtype))
        return y.reshape(*x.shape[:-1], -1)
    return rows_matmul(x, kernel)


def row_times_kernel_t(x, kernel_t):
    """x W for one row x (1, d_in), given kernel_t = W^T (d_out, d_in): (1, d_out).

    A batch-1 decode step is a chain of matrix-vector products bound by reading the weights.
    XLA:CPU runs x W (W row-major, (d_in, d_out)) on one core for the shapes of small models;
    reading W^T instead puts both cores on it. d_in > d_out: one product over W^T's contiguous
    rows. d_in < d_out: x (W^T)^T, which XLA emits as its own loop over W^T, split across
    threads. The optimization barriers keep XLA from fusing the bias add and other
    neighbouring elementwise work into the product: fused, the products run slower.
    """
    d_out, d_in = kernel_t.shape
    x = jax.lax.optimization_barrier(x)
    if d_in > d_out:
        y = jax.lax.dot_general(x, kernel_t, (((1,), (1,)), ((), ())))
    else:
        y = jax.lax.dot_general(x, kernel_t.T, (((1,), (0,)), ((), ())))
    return jax.lax.optimization_barrier(y)


def decode_layout(params) -> dict:
    """The `DECODE_LAYOUT` collection for batch-1 decoding on XLA:CPU: {'kernel_t': W^T} for
    every non-square Dense kernel W in `params` (same nesting), read by `dense_product` for
    single rows. Made once per generation call, before the decode loop; the optimization
    barrier keeps the copy a real transposed array (XLA would otherwise fold the transpose
    away). Costs a second copy of those kernels while the call runs. Square kernels get none:
    their products are no faster either way.
    """
    def walk(tree):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                sub = walk(value)
                if sub:
                    out[name] = sub
            elif name == "kernel" and value.ndim == 2 and value.shape[0] != value.shape[1]:
                out["kernel_t"] = jax.lax.optimization_barrier(value.T)
        return out

    return walk(flax.core.unfreeze(params))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def standardize(x, eps: float):
    """x_hat = (x - mean) / sqrt(var + eps) over the last axis."""
    return _standardize_fwd(x, eps)[0]


def _standardize_fwd(x, eps):
    mean = x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
    x_hat = (x - mean) * rstd
    return x_hat, (x_hat, rstd)


def _standardize_bwd(eps, residuals, g):
    """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)).

    Written out, the backward is one expression XLA fuses into a single pass. Autodiff's
    version is a sum of broadcast terms; the residual-stream gradient built from those was
    recomputed by XLA:CPU inside every earlier layer's backward (quadratic in depth).
    """
    del eps
    x_hat, rstd = residuals
    mean_g = g.mean(-1, keepdims=True)
    mean_gx = (g * x_hat).mean(-1, keepdims=True)
    return (rstd * (g - mean_g - x_hat * mean_gx),)


standardize.defvjp(_standardize_fwd, _standardize_bwd)


@jax.custom_vjp
def cross_entropy(logits, targets):
    """-log softmax(logits)[target] = logsumexp(logits) - logits[target], per position.

    logits (..., V) float, targets (...) int in [0, V). The gradient is written out,

        d logits = g * (softmax(logits) - onehot(target)),

    so the backward is one pass over the (..., V) logits (autodiff's version adds a
    scatter into a zero (..., V) array and a second pass).
    """
    return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
    peak = jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True)) + peak
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    return (lse - picked)[..., 0], (logits, targets, lse)


def _cross_entropy_bwd(residuals, g):
    logits, targets, lse = residuals
    onehot = targets[..., None] == jnp.arange(logits.shape[-1])
    return g[..., None] * (jnp.exp(logits - lse) - onehot), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def blockwise_causal_attention(q, k, v, *, bias=None, mask=None, segment_ids=None,
                               dropout_rate: float = 0.0, dropout_rng=None,
                               block_size: int | None = None):
    """Causal attention (T == S, the plain causal mask) one block of queries at a time.

    q, k (B, T, H, D), v (B, T, H, Dv), bias (B or 1, H, T, T) or None -> (B, T, H, Dv);
    `mask` must be None. Queries [i, j) see keys [0, j) only, so the masked upper blocks are
    never computed, and each block is normalised after its value product:

        s = q_blk k_{<j}^T / sqrt(D) + bias,   p = exp(s - max s)   (0 above the diagonal)
        y_blk = (dropout(p) v_{<j}) / sum p

    segment_ids (B, T) int or None: p is also 0 where query and key lie in different segments
    (documents), the block-diagonal causal mask; every query sees at least itself.

    which skips a pass over every (T, S) score block. Same numbers as the plain softmax up to
    rounding; dropout with `dropout_rng` drops the same entries as `xla.softmax_attention`
    with the same key. Blocks: 64 queries, or T / 8 when that is larger.
    """
    if mask is not None:
        raise ValueError("blockwise_causal_attention applies the causal mask itself: mask=None")
    t = q.shape[1]
    block_size = block_size or max(64, -(-t // 8))
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, H, T, D): heads as batch axis
    if dropout_rate > 0.0:  # the materialised path's mask: the same key drops the same entries
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                    (q.shape[0], q.shape[1], t, t))
    out = []
    for start in range(0, t, block_size):
        end = min(start + block_size, t)
        s = jnp.einsum("bhtd,bhsd->bhts", q[:, :, start:end], k[:, :, :end],
                       preferred_element_type=jnp.float32) * scale
        if bias is not None:
            s = s + bias[:, :, start:end, :end]
        allowed = jnp.arange(end) <= jnp.arange(start, end)[:, None]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, None, start:end, None]
                                 == segment_ids[:, None, None, :end])
        s = jnp.where(allowed, s, -jnp.inf)
        p = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
        p_v = p
        if dropout_rate > 0.0:
            p_v = jnp.where(keep[:, :, start:end, :end], p / (1.0 - dropout_rate), 0.0)
        y = jnp.einsum("bhts,bhsd->bhtd", p_v.astype(v.dtype), v[:, :, :end],
                       preferred_element_type=jnp.float32)
        out.append(y / p.sum(-1, keepdims=True))
    return jnp.swapaxes(jnp.concatenate(out, axis=2), 1, 2).astype(v.dtype)
