"""Layers shared by every architecture: initialisers, Dense, LayerNorm, MLPs, causal attention,
ALiBi, and the KV-cache helpers used for decoding.

Shapes: B batch, T query length, S key length, H heads, D head dim, d = H * D model width.
Precision: parameters are stored in `config.param_dtype`; matmuls run in `config.dtype`;
LayerNorm, softmax and the logits are computed in float32.

KV cache: an explicit pytree (no flax 'cache' collection), passed into the model and returned
updated. Each block owns a dict of arrays ('k' (B, H, D, S) and 'v' (B, H, S, D) in the compute
dtype, plus whatever else its attention needs); `DecodeStep` carries what every block shares for
one call: the slot the T new tokens are written to, their masks, real positions and padding
flags; `cached_attention` is the decoding counterpart of `causal_attention`.
"""

from __future__ import annotations

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cleangpt_jax.config import ModelConfig

INIT_STD = 0.02


def normal_init(std: float = INIT_STD):
    return nn.initializers.normal(stddev=std)


def residual_init(config: ModelConfig):
    """Init for projections that write into the residual stream: N(0, 0.02 / sqrt(2 L))."""
    return normal_init(INIT_STD / math.sqrt(2 * config.n_layer))


def rows_matmul(x, kernel):
    """x (..., d) @ kernel (d, f) as one 2-D matmul over the flattened rows (B*T, d).

    The product of every Dense layer. The numbers are those of the plain product; the 2-D form
    lets XLA:CPU take the kernel gradient x^T g straight from g instead of first transposing the
    (B, T, f) output gradient into a copy.
    """
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())))
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


# Variable collection of decode-time weight copies (see `decode_layout`).
DECODE_LAYOUT = "decode_layout"


class Dense(nn.Module):
    """y = x W + b over the last axis: W 'kernel' (d_in, features), b 'bias' (features,).

    Parameters in `param_dtype`, the product in `dtype`. For a single row x (batch-1 decoding)
    the product reads this layer's 'kernel_t' = W^T from the `DECODE_LAYOUT` collection when
    it is there (see `decode_layout` and `row_times_kernel_t`): the same numbers, faster.
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
        x = x.astype(self.dtype)
        if x.size == x.shape[-1] and self.has_variable(DECODE_LAYOUT, "kernel_t"):
            kernel_t = self.get_variable(DECODE_LAYOUT, "kernel_t").astype(self.dtype)
            y = row_times_kernel_t(x.reshape(1, -1), kernel_t).reshape(*x.shape[:-1], -1)
        else:
            y = rows_matmul(x, kernel.astype(self.dtype))
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


def row_times_kernel_t(x, kernel_t):
    """x W for one row x (1, d_in), given kernel_t = W^T (d_out, d_in): (1, d_out).

    A batch-1 decode step is a chain of matrix-vector products bound by reading the weights.
    XLA:CPU runs x W (W row-major, (d_in, d_out)) on one core for the shapes of small models;
    reading W^T instead puts both cores on it. Per product at the 384-wide char shape: MLP
    c_proj 1536 -> 384 about 100 -> 57 us, c_attn 384 -> 1152 about 80 -> 50 us; the "W as
    stored" row of scripts/bench_generate.py measures the whole effect (1.19x tokens/s).
    d_in > d_out: one product over W^T's contiguous rows. d_in < d_out: x (W^T)^T, which XLA
    emits as its own loop over W^T, split across threads. The optimization barriers keep XLA
    from fusing the bias add and other neighbouring elementwise work into the product: it
    does so when they are absent, and the fused products ran 1.5-2x slower in the trace.
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
    every non-square Dense kernel W in `params` (same nesting), used by `Dense` for single
    rows. Made once per generation call, before the decode loop; the optimization barrier
    keeps the copy a real transposed array (XLA would otherwise fold the transpose away).
    Costs a second copy of those kernels while the call runs. Square kernels get none: their
    products measured no faster either way.
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


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale (+ bias), in float32 (eps 1e-5 as GPT-2);
    the output is cast to the compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), c.params_dtype)
        y = standardize(x.astype(jnp.float32), c.layer_norm_epsilon) * scale.astype(jnp.float32)
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


def causal_attention(q, k, v, *, bias=None, mask=None, dropout_rate: float = 0.0,
                     deterministic: bool = True, dropout_rng=None):
    """softmax(q k^T / sqrt(D) + bias, causal) v per head.

    q (B, T, H, D), k (B, S, H, D), v (B, S, H, Dv) -> (B, T, H, Dv).
    With `mask` None the mask is the plain causal one for T == S (training); a boolean `mask`
    broadcastable to (B, H, T, S) replaces it (decoding uses `cached_attention`).
    On CPU the training case runs `blockwise_causal_attention`. Elsewhere the deterministic
    path is `jax.nn.dot_product_attention` (fused kernels on GPU/TPU); with attention dropout
    the softmax is materialised so its probabilities can be dropped out. Softmax runs in
    float32 either way.
    """
    if mask is None and q.shape[1] == k.shape[1] and jax.default_backend() == "cpu":
        return blockwise_causal_attention(
            q, k, v, bias=bias, dropout_rate=0.0 if deterministic else dropout_rate,
            dropout_rng=dropout_rng)
    if deterministic or dropout_rate == 0.0:
        if q.shape[-1] == v.shape[-1]:
            return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                                is_causal=mask is None)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias
    if mask is None:
        t, s = q.shape[1], k.shape[1]
        mask = jnp.tril(jnp.ones((t, s), bool), k=s - t)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


def blockwise_causal_attention(q, k, v, *, bias=None, dropout_rate: float = 0.0,
                               dropout_rng=None, block_size: int | None = None):
    """Causal attention (T == S) one block of queries at a time; the CPU training path.

    q, k (B, T, H, D), v (B, T, H, Dv), bias (B or 1, H, T, T) or None -> (B, T, H, Dv).
    Queries [i, j) see keys [0, j) only, so the masked upper blocks are never computed, and
    each block is normalised after its value product:

        s = q_blk k_{<j}^T / sqrt(D) + bias,   p = exp(s - max s)   (0 above the diagonal)
        y_blk = (dropout(p) v_{<j}) / sum p

    which skips a pass over every (T, S) score block. Same numbers as the plain softmax up to
    rounding; on CPU it is about twice as fast as jax.nn.dot_product_attention (forward and
    backward). Blocks: 64 queries, or T / 8 when that is larger.
    """
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
        s = jnp.where(jnp.arange(end) <= jnp.arange(start, end)[:, None], s, -jnp.inf)
        p = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
        p_v = p
        if dropout_rate > 0.0:
            p_v = jnp.where(keep[:, :, start:end, :end], p / (1.0 - dropout_rate), 0.0)
        y = jnp.einsum("bhts,bhsd->bhtd", p_v.astype(v.dtype), v[:, :, :end],
                       preferred_element_type=jnp.float32)
        out.append(y / p.sum(-1, keepdims=True))
    return jnp.swapaxes(jnp.concatenate(out, axis=2), 1, 2).astype(v.dtype)


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
