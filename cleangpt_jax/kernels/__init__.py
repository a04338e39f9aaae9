"""Backend-specific implementations, and the one place that chooses between them.

Every implementation computes the numbers of the plain formulation it stands for
(tests/test_kernels.py checks each); they differ only in speed, which depends on the backend.
Each lives in the file of the backend it was written for:

    cpu.py   forms written for XLA:CPU: dense products, the LayerNorm and cross-entropy
             backwards, blockwise causal attention, the decode layout, the decode loop's options
    xla.py   the generic attention paths (jax.nn.dot_product_attention, materialised softmax)
    tpu.py   Pallas Splash attention (flash attention skipping the masked tiles), also
             runnable by the Pallas interpreter on any backend ('splash_interpret')
    gpu.py   cuDNN's fused attention through jax.nn.dot_product_attention, bf16/fp16

What is chosen here, and only here (nothing else in the package reads jax.default_backend()):

    causal_attention         model.attention ('auto' or a name in ATTENTION_KERNELS), the
                             backend and what the call needs pick the implementation
                             (`choose_attention`); `attention_path` says which one a model's
                             training forward takes. Segment ids (the document mask of packed
                             sequences) are served by every implementation but cuDNN. The
                             backend is `target_backend()`: the platform of the mesh set by
                             jax.set_mesh, else the default one.
                             A program over several devices runs a Pallas kernel (Splash) only
                             when traced under jax.set_mesh(mesh), which it is shard_mapped over;
                             without one it takes the generic path.
    use_decode_layout        whether a generation call reads transposed weight copies
    decode_compiler_options  the XLA options of the generation program

Used on every backend (one implementation each): `rows_matmul`, `dense_product`, `standardize`,
`cross_entropy`, and the decode layout's `DECODE_LAYOUT` / `decode_layout`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from cleangpt_jax.kernels import cpu, gpu, tpu, xla
from cleangpt_jax.kernels.cpu import (DECODE_LAYOUT, cross_entropy, decode_layout, dense_product,
                                      rows_matmul, standardize)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What one attention call needs from an implementation (all static, from shapes).
    length, head_dim: None when not known (then no kernel with shape limits takes the call).
    shardable: a kernel XLA cannot partition itself (a Pallas call) can run, because the
    program runs on one device or a mesh is set (jax.set_mesh) to shard_map it over."""

    square: bool                 # T == S
    mask: bool                   # an explicit boolean mask (else the plain causal mask)
    bias: bool                   # an additive bias, e.g. ALiBi
    dropout: bool                # attention dropout is on
    same_head_dim: bool          # Dv == D
    length: int | None = None    # T
    head_dim: int | None = None  # D
    dtype: str = "float32"       # q's dtype, by name
    shardable: bool = True
    segments: bool = False       # segment ids: the causal mask made block-diagonal


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """An implementation of causal attention.

    fn(q, k, v, *, bias, mask, segment_ids, dropout_rate, dropout_rng) -> y: q (B, T, H, D),
    k (B, S, H, D), v (B, S, H, Dv) -> (B, T, H, Dv). supports(call): whether it can serve
    the call.
    auto_on: the backends on which 'auto' prefers it to the generic paths.
    """

    fn: Callable
    supports: Callable[[AttentionCall], bool]
    auto_on: tuple[str, ...] = ()


# The implementations model.attention can name. A new kernel is one more entry.
ATTENTION_KERNELS = {
    "cpu_blockwise": AttentionKernel(cpu.blockwise_causal_attention,
                                     lambda call: call.square and not call.mask, auto_on=("cpu",)),
    "xla": AttentionKernel(xla.dot_product_attention,
                           lambda call: not call.dropout and call.same_head_dim),
    "xla_softmax": AttentionKernel(xla.softmax_attention, lambda call: True),
    "splash": AttentionKernel(tpu.splash_attention, tpu.splash_supports, auto_on=("tpu",)),
    "splash_interpret": AttentionKernel(tpu.splash_attention_interpreted, tpu.splash_supports),
    "cudnn": AttentionKernel(gpu.cudnn_attention, gpu.cudnn_supports, auto_on=("gpu",)),
}
# What a call falls back to, in order, when the chosen implementation cannot serve it.
GENERIC_ATTENTION = ("xla", "xla_softmax")
ATTENTION_SETTINGS = ("auto", *ATTENTION_KERNELS)


def choose_attention(setting: str, backend: str, call: AttentionCall) -> str:
    """The name of the implementation that runs `call`.

    'auto': the implementations preferred on `backend` (their auto_on), else the generic ones:
    on CPU the training forward is blockwise; on TPU Splash; on GPU cuDNN for bf16/fp16;
    otherwise (and for what those cannot serve, e.g. an ALiBi bias) jax.nn.dot_product_attention;
    with attention dropout the materialised softmax. A named setting is tried first; a call it
    cannot serve (e.g. a mask for 'cpu_blockwise', dropout for 'xla') takes the generic path.
    """
    if setting == "auto":
        preferred = [name for name, k in ATTENTION_KERNELS.items() if backend in k.auto_on]
    elif setting in ATTENTION_KERNELS:
        preferred = [setting]
    else:
        raise ValueError(f"unknown attention implementation {setting!r}: choose one of "
                         f"{ATTENTION_SETTINGS}")
    return next(name for name in (*preferred, *GENERIC_ATTENTION)
                if ATTENTION_KERNELS[name].supports(call))


def causal_attention(q, k, v, *, implementation: str = "auto", bias=None, mask=None,
                     segment_ids=None, dropout_rate: float = 0.0, dropout_rng=None):
    """softmax(q k^T / sqrt(D) + bias, causal or `mask`) v per head, softmax in float32, by
    the implementation `choose_attention` picks for `target_backend()`.

    q (B, T, H, D), k (B, S, H, D), v (B, S, H, Dv) -> (B, T, H, Dv). bias broadcastable to
    (B, H, T, S) or None. mask: None for the plain causal mask (T == S), or a boolean
    broadcastable to (B, H, T, S). segment_ids (B, T) int (T == S, mask None): query t sees
    key s iff s <= t and segment_ids[b, s] == segment_ids[b, t] (the block-diagonal causal
    mask of packed documents). dropout_rate > 0 drops attention probabilities with the
    key `dropout_rng`.
    """
    if segment_ids is not None and (mask is not None or q.shape[1] != k.shape[1]):
        raise ValueError("segment_ids need self-attention (T == S) without an explicit mask")
    call = AttentionCall(square=q.shape[1] == k.shape[1], mask=mask is not None,
                         bias=bias is not None, dropout=dropout_rate > 0.0,
                         same_head_dim=q.shape[-1] == v.shape[-1], length=q.shape[1],
                         head_dim=q.shape[-1], dtype=jnp.dtype(q.dtype).name,
                         shardable=_shardable(), segments=segment_ids is not None)
    name = choose_attention(implementation, target_backend(), call)
    return ATTENTION_KERNELS[name].fn(q, k, v, bias=bias, mask=mask, segment_ids=segment_ids,
                                      dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def target_backend() -> str:
    """The platform the program being traced is for: that of the mesh set by jax.set_mesh
    (a TPU topology's mesh when compiling ahead of time on a CPU host), else the default
    backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _shardable() -> bool:
    """Whether a Pallas kernel can run in the program being traced: a mesh is set (the kernel
    is shard_mapped over it) or the default backend has a single device."""
    return not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1


def attention_path(config, length: int | None = None, backend: str | None = None,
                   segments: bool = False) -> str:
    """The implementation that the attention of a model's training forward takes.

    config: a ModelConfig (its attention setting, position encoding, dropout, head dim and
    compute dtype); length: T (default config.block_size); backend: default `target_backend()`;
    segments: the batches carry segment ids (data.document_mask: cuDNN cannot take them).
    Every architecture's training forward attends with T == S, D == Dv, the ALiBi bias when
    position_encoding == 'alibi' and dropout when config.dropout > 0. Call it under the
    jax.set_mesh of the program it describes (the mesh decides the backend and whether a
    Pallas kernel can run).
    """
    call = AttentionCall(square=True, mask=False, bias=config.position_encoding == "alibi",
                         dropout=config.dropout > 0, same_head_dim=True,
                         length=config.block_size if length is None else length,
                         head_dim=config.head_dim, dtype=config.dtype, shardable=_shardable(),
                         segments=segments)
    return choose_attention(config.attention, backend or target_backend(), call)


def use_decode_layout(batch_size: int, steps: int) -> bool:
    """Whether a generation call of `batch_size` rows and `steps` (bucketed) new tokens reads
    `decode_layout` copies: batch 1 on CPU, long enough to win back making them."""
    return (jax.default_backend() == "cpu" and batch_size == 1
            and steps >= cpu.DECODE_LAYOUT_MIN_STEPS)


def decode_compiler_options() -> dict:
    """XLA compiler options for the generation program on the default backend."""
    return dict(cpu.DECODE_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


__all__ = ["ATTENTION_KERNELS", "ATTENTION_SETTINGS", "AttentionCall", "AttentionKernel",
           "DECODE_LAYOUT", "attention_path", "causal_attention", "choose_attention",
           "cross_entropy", "decode_compiler_options", "decode_layout", "dense_product",
           "rows_matmul", "standardize", "target_backend", "use_decode_layout"]
