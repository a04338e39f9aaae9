"""Forms written for TPUs: Pallas Splash attention (jax.experimental.pallas.ops.tpu).

    splash_attention              causal attention by the Splash (sparse flash) kernel
    splash_attention_interpreted  the same kernel run by the Pallas interpreter, on any backend
    splash_supports               which calls the kernel can serve

Splash computes softmax(q k^T + causal mask) v one (block_q, block_kv) tile at a time, keeping
a running max and sum per query row (flash attention), and skips the tiles above the causal
diagonal; the backward is its own pair of kernels (dq, then dk and dv). Neither pass holds a
(T, S) score array. The kernel does not scale q: we pass q / sqrt(D).

Document masks: the kernel takes one sequence's segment ids (splash.SegmentIds, q and kv both
(T,) int32) and ands "same segment" into the causal mask, the block-diagonal causal mask of
packed documents; the tables of skipped tiles stay those of the causal mask.

Layout: the kernel takes one sequence's heads, q (H, T, D), k (H, T, D), v (H, T, D) (and its
segment ids (T,)); it is vmapped over the batch. Under a mesh (jax.set_mesh) it runs in a
shard_map that splits the batch over the mesh's axes, because XLA's partitioner cannot split a
Pallas call itself; a program over several devices without a mesh set takes the generic path.

What it cannot serve goes to the generic path (`splash_supports`): an explicit mask, an
additive bias (ALiBi), attention dropout, T != S (a decode step over a cache), Dv != D, T not
a multiple of the 128-wide tile, or a head dim that is not a multiple of 8 in (0, 256].
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

# Tile edges the kernel is compiled with, largest first: the largest that divides T is used.
# The kernel's tiles are multiples of the TPU's 128 lanes.
SPLASH_BLOCKS = (512, 256, 128)
SPLASH_MAX_HEAD_DIM = 256


def splash_block(length: int) -> int | None:
    """The tile edge for sequence length `length`: the largest of SPLASH_BLOCKS dividing it,
    or None when none does (the kernel cannot serve the call)."""
    return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


def splash_supports(call) -> bool:
    """Whether Splash can serve `call` (a kernels.AttentionCall): the causal mask over T == S
    (block-diagonal with segment ids), no bias, no dropout, Dv == D, T a multiple of a tile
    edge, a head dim that is a multiple of 8 up to SPLASH_MAX_HEAD_DIM, and a program it can
    run in (call.shardable: one device, or a mesh set to shard_map over)."""
    return (call.square and not call.mask and not call.bias and not call.dropout
            and call.same_head_dim and call.shardable and call.length is not None
            and splash_block(call.length) is not None and call.head_dim is not None
            and 0 < call.head_dim <= SPLASH_MAX_HEAD_DIM and call.head_dim % 8 == 0)


def _splash_kernel(n_head: int, length: int, interpret: bool):
    """The Splash kernel for H heads of causal (T, T) attention, one sequence at a time. Built
    in every trace: its block-sparsity tables become that trace's constants (splash caches the
    numpy work of making them). Pallas is imported here, on first use, not with the package."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = splash_block(length)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * n_head)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _batch_spec(batch_size: int, mesh) -> P:
    """The batch axis split over every axis of `mesh` when they divide it, else replicated."""
    if batch_size % mesh.size:
        return P()
    return P(tuple(mesh.axis_names))


def _splash(q, k, v, segment_ids, *, interpret: bool):
    """q, k, v (B, T, H, D), segment_ids (B, T) or None -> (B, T, H, D): Splash per sequence,
    q scaled by 1 / sqrt(D)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    batch_size, length, n_head, head_dim = q.shape
    kernel = _splash_kernel(n_head, length, interpret)
    scale = 1.0 / math.sqrt(head_dim)

    def one_sequence(q, k, v, segments=None):
        if segments is None:
            return kernel(q, k, v)
        return kernel(q, k, v, segment_ids=SegmentIds(q=segments, kv=segments))

    def per_shard(q, k, v, *segments):
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q * scale, k, v))  # (B, H, T, D)
        return jax.vmap(one_sequence)(q, k, v, *segments).transpose(0, 2, 1, 3)

    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids.astype("int32"))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_shard(*args)
    spec = _batch_spec(batch_size, mesh)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                         check_vma=False)(*args)


def splash_attention(q, k, v, *, bias=None, mask=None, segment_ids=None,
                     dropout_rate: float = 0.0, dropout_rng=None, interpret: bool = False):
    """Causal softmax(q k^T / sqrt(D)) v per head by the Splash kernel; the arguments and
    shapes of kernels.AttentionKernel. bias, mask and dropout must be off (`splash_supports`);
    segment_ids (B, T) int or None: attend only within a segment (a packed document).
    `interpret`: run the kernel in the Pallas interpreter (any backend, slow)."""
    del dropout_rng
    if bias is not None or mask is not None or dropout_rate:
        raise ValueError("splash_attention is plain causal attention: no bias, mask or dropout")
    return _splash(q, k, v, segment_ids, interpret=interpret)


def splash_attention_interpreted(q, k, v, **kwargs):
    """`splash_attention` run by the Pallas interpreter: the kernel's numbers on any backend,
    for checking it and debugging it without a TPU."""
    return splash_attention(q, k, v, interpret=True, **kwargs)
