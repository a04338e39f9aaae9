"""Forms written for NVIDIA GPUs: cuDNN's fused (flash) attention.

    cudnn_attention   jax.nn.dot_product_attention(..., implementation='cudnn'), causal
    cudnn_supports    which calls it can serve

cuDNN computes softmax(q k^T / sqrt(D) + causal mask) v tile by tile, without a (T, S) score
array, forward and backward. It runs in bf16 or fp16 only; other dtypes, an explicit mask, a
bias (ALiBi), attention dropout, T != S, Dv != D, or a head dim that is not a multiple of 8
up to CUDNN_MAX_HEAD_DIM go to the generic path.

Document masks (segment ids) also go to the generic path. In jax 0.10.2,
jax.nn.dot_product_attention(implementation='cudnn') takes no segment ids: a boolean mask is
turned into a dense (B, 1, T, S) additive bias (fused_attention_stablehlo.combine_bias_and_mask)
whose gradient the backward always computes, so the mask would cost a (T, S) array per row
each way; cuDNN's packed form (q_offsets / per-segment lengths) is reachable only through
jax._src.cudnn, not the public API.
"""

from __future__ import annotations

import jax

CUDNN_DTYPES = ("bfloat16", "float16")
# cuDNN's flash attention takes head dims up to 128 before Hopper (256 from Hopper on).
CUDNN_MAX_HEAD_DIM = 128


def cudnn_supports(call) -> bool:
    """Whether cuDNN can serve `call` (a kernels.AttentionCall): plain causal, T == S, no
    bias, no segment ids, no dropout, Dv == D, bf16/fp16, a head dim that is a multiple of 8
    up to CUDNN_MAX_HEAD_DIM."""
    return (call.square and not call.mask and not call.segments and not call.bias
            and not call.dropout
            and call.same_head_dim and call.dtype in CUDNN_DTYPES
            and call.head_dim is not None and 0 < call.head_dim <= CUDNN_MAX_HEAD_DIM
            and call.head_dim % 8 == 0)


def cudnn_attention(q, k, v, *, bias=None, mask=None, segment_ids=None,
                    dropout_rate: float = 0.0, dropout_rng=None):
    """Causal softmax(q k^T / sqrt(D)) v by cuDNN; the arguments and shapes of
    kernels.AttentionKernel. bias, mask, segment ids and dropout must be off
    (`cudnn_supports`)."""
    del dropout_rng
    if bias is not None or mask is not None or segment_ids is not None or dropout_rate:
        raise ValueError("cudnn_attention is plain causal attention: no bias, mask, segment "
                         "ids or dropout")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
