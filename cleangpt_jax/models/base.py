"""The causal language model skeleton every architecture shares.

    state_0 = init_state(dropout(wte[ids] + wpe[pos]))      (no wpe with ALiBi)
    state_i = block_i(state_{i-1}),  i = 1..L
    logits  = LN_f(hidden(state_L)) . wte^T                  (tied head, float32)

`remat` (the `train.remat` setting) rematerialises each block in the backward pass under a
`jax.checkpoint` policy (`REMAT_POLICIES`); `config.scan_layers` runs blocks 1..k as one
`lax.scan` over their stacked parameters (`_scan_blocks`). The parameter tree is the same for
every setting (one subtree h_i per block).
`head=False` stops before LN_f and the head: the losses then run the head themselves, chunk by
chunk (`head_fn` / `head_params`, cleangpt_jax.losses), never holding (B, T, V) logits.

An architecture is a block class plus, when its residual stream is not a single array (the
Token-Factored model keeps (xt, xe)), `init_state` and `hidden`. `hidden_states[i]` is
`hidden(state_i)`: pre-LN_f, index 0 = embeddings. Labels are never shifted here: logits at t
predict token t + 1 and `cleangpt_jax.losses` does the shift.

Decoding with a KV cache (explicit and functional, not a flax 'cache' collection, so a whole
generation loop is one pure jitted function and the cache is an ordinary loop carry):

    cache = model.init_cache(B, S, start=pad)        # start[b]: left-padding length of row b
    out = model.apply(v, prompt, cache=cache)        # prefill: writes slots [0, P)
    out = model.apply(v, next_ids, cache=out.cache)  # decode: (B, 1), writes slot P, P + 1, ...

Row b's real tokens live in slots [start[b], index); their positions are slot - start[b], so a
left-padded batch computes exactly what each row computes alone. Learned positions cap a row at
block_size real tokens (cache.index - start <= block_size); ALiBi biases depend only on slot
differences. Each block class provides `init_cache(config, B, S) -> dict`, accepts
`cache=`/`step=` (a `layers.DecodeStep`) and returns (state, its updated cache dict), the cache
being None when it was called without one.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cleangpt_jax import kernels
from cleangpt_jax.config import ConfigError, ModelConfig, remat_setting
from cleangpt_jax.models import layers


@flax.struct.dataclass
class ModelOutput:
    """logits (B, T, V) float32 ((B, 1, V) with last_logits_only), or None when only the first
    k < L blocks ran or head=False; hidden_states: tuple of k + 1 arrays (B, T, d), or None
    when not asked for; cache: the updated `Cache` when one was passed in, else None;
    last_hidden_state: with head=False, hidden(state_k) (B, T, d), the pre-LN_f state after the
    last block that ran (what `head_fn` takes), else None."""

    logits: Any = None
    hidden_states: tuple | None = None
    cache: Any = None
    last_hidden_state: Any = None


@flax.struct.dataclass
class Cache:
    """Decoding state of a whole model.

    layers: one dict of arrays per block (its keys/values, e.g. 'k' (B, H, D, S), 'v').
    index:  () int32, number of slots written; the next call writes [index, index + T).
    start:  (B,) int32, slot of each row's first real token (its left-padding length).
    fresh:  static, True until the first call writes to it (that call skips the empty cache).
    """

    layers: tuple
    index: Any
    start: Any
    fresh: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def length(self) -> int:
        """S, the number of slots (every block's cache has 'k' (B, H, D, S))."""
        return self.layers[0]["k"].shape[-1]



class Block(nn.Module):
    """One transformer block, the unit `CausalLM` stacks. Every block is called as

        state, cache = block(state, attn_bias=..., deterministic=..., cache=None, step=None,
                             segment_ids=None)

    and returns its updated cache, or None when called without one. `init_cache(config, B, S)`
    makes one block's empty cache: keys and values (`layers.init_kv_cache`) unless a block
    needs more."""

    config: ModelConfig
    init_cache = staticmethod(layers.init_kv_cache)


# train.remat -> the jax.checkpoint policy of each block's backward pass ('none': no remat).
# 'block' saves nothing: the backward reruns the whole block from its input. 'matmuls' saves
# the outputs of matmuls without batch dimensions, i.e. the dense projections (q/k/v, output,
# MLP), which are 2-D (B*T, d) products here, and recomputes the cheap elementwise work and
# the attention scores and probabilities (batched (B, H, T, S) products, the largest
# activations at long T); checkpoint_dots would keep those too.
REMAT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                  "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# The top-level parameters `logits` reads (lm_head exists only with an untied head).
HEAD_PARAMS = ("wte", "ln_f", "lm_head")


def _call_block(block, state, attn_bias, deterministic, cache, step, segment_ids=None):
    """block(state, ...) with positional arguments, so nn.remat can hold `deterministic`
    static (jax.checkpoint traces keyword arguments)."""
    return block(state, attn_bias=attn_bias, deterministic=deterministic, cache=cache,
                 step=step, segment_ids=segment_ids)


class CausalLM(nn.Module):
    config: ModelConfig
    remat: str = "none"  # a key of REMAT_POLICIES, or 'none'
    block_cls: ClassVar[type[Block]]

    def setup(self):
        c = self.config
        if c.vocab_size is None:
            raise ConfigError("model.vocab_size is None: set it, or take it from the tokenizer "
                              "(config.model.vocab_size = tokenizer.vocab_size)")
        remat = remat_setting(self.remat)
        self.call_block = _call_block if remat == "none" else nn.remat(
            _call_block, static_argnums=(3,), policy=REMAT_POLICIES[remat])
        # The residual stream stays float32; only matmul inputs are cast to the compute dtype.
        emb = dict(embedding_init=layers.normal_init(), dtype=jnp.float32,
                   param_dtype=c.params_dtype)
        self.wte = nn.Embed(c.vocab_size, c.n_embd, **emb)
        if c.position_encoding == "learned":
            self.wpe = nn.Embed(c.block_size, c.n_embd, **emb)
        self.drop = nn.Dropout(c.dropout)
        self.h = [self.block_cls(c) for _ in range(c.n_layer)]
        self.ln_f = layers.LayerNorm(c)
        if not c.tie_embeddings:
            self.lm_head = self.param("lm_head", layers.normal_init(), (c.vocab_size, c.n_embd),
                                      c.params_dtype)

    # Hooks for architectures with more than one residual stream.
    def init_state(self, x):
        return x

    def hidden(self, state):
        return state

    def init_cache(self, batch_size: int, max_length: int, start=None) -> Cache:
        """An empty cache of `max_length` slots for `batch_size` rows (no parameters needed:
        callable on an unbound module). `start` (B,) = left-padding length of each row."""
        c = self.config
        start = (jnp.zeros((batch_size,), jnp.int32) if start is None
                 else jnp.asarray(start, jnp.int32).reshape(batch_size))
        return Cache(layers=tuple(self.block_cls.init_cache(c, batch_size, max_length)
                                  for _ in range(c.n_layer)),
                     index=jnp.zeros((), jnp.int32), start=start, fresh=True)

    def __call__(self, input_ids, *, deterministic: bool = True,
                 output_hidden_states: bool = False, num_blocks: int | None = None,
                 positions=None, cache: Cache | None = None,
                 last_logits_only: bool = False, head: bool = True,
                 segment_ids=None) -> ModelOutput:
        """input_ids (B, T) integers. `num_blocks=k` runs only the embeddings and the first k
        blocks (no LN_f/head unless k = L). `positions` (T,) or (B, T) default to arange(T)
        (with a cache: slot - cache.start). `cache` (from `init_cache`) makes this a decoding
        call: the T tokens attend to the cached ones and the output carries the updated cache.
        `last_logits_only` computes the head for the last position only: logits (B, 1, V).
        `head=False` skips LN_f and the head (logits None; see last_hidden_state).
        `segment_ids` (B, T) int (data.document_mask; no cache): packed documents, a token
        attends only to earlier tokens of its own segment, and learned positions (when
        `positions` is not given) restart at 0 in each segment, so each document computes what
        it computes alone (ALiBi already does: it reads position differences only)."""
        c = self.config
        check_input_ids(input_ids, c)
        k = c.n_layer if num_blocks is None else num_blocks
        if not 0 <= k <= c.n_layer:
            raise ConfigError(f"num_blocks={num_blocks} is outside [0, n_layer={c.n_layer}]")
        if cache is not None and k != c.n_layer:
            raise ConfigError("num_blocks cannot be combined with cache: a cache holds every block")
        if segment_ids is not None and (cache is not None
                                        or segment_ids.shape != input_ids.shape):
            raise ConfigError(f"segment_ids must have input_ids' shape {input_ids.shape} and "
                              f"no cache: a decoding row holds one document")
        t = input_ids.shape[1]
        step = None
        if cache is not None:
            step = self._decode_step(cache, t, positions)
            positions = step.positions
        elif positions is None:
            positions = jnp.arange(t)
            if segment_ids is not None and c.position_encoding == "learned":
                positions = layers.segment_positions(segment_ids)

        x = self.wte(input_ids)
        if c.position_encoding == "learned":
            x = x + self.wpe(positions)
        state = self.init_state(self.drop(x, deterministic=deterministic))
        attn_bias = None  # with a cache, the step carries the ALiBi biases
        if cache is None and c.position_encoding == "alibi":
            attn_bias = layers.alibi_bias(c.n_head, positions, positions)

        hidden_states = [self.hidden(state)] if output_hidden_states else None
        new_layers = []
        if c.scan_layers and cache is None and k > 1 and not self.is_initializing():
            state, states = self._scan_blocks(state, attn_bias, deterministic, k, segment_ids)
            if output_hidden_states:
                hidden_states += [self.hidden(jax.tree.map(lambda a: a[i], states))
                                  for i in range(k)]
        else:
            for i, block in enumerate(self.h[:k]):
                state, layer_cache = self.call_block(
                    block, state, attn_bias, deterministic,
                    None if cache is None else cache.layers[i], step, segment_ids)
                new_layers.append(layer_cache)
                if output_hidden_states:
                    hidden_states.append(self.hidden(state))

        logits = None
        last_hidden = None if head else self.hidden(state)
        if k == c.n_layer and head:
            hidden = self.hidden(state)
            logits = self.logits(hidden[:, -1:] if last_logits_only else hidden)
        if cache is not None:
            cache = cache.replace(layers=tuple(new_layers), index=cache.index + t, fresh=False)
        return ModelOutput(logits=logits,
                           hidden_states=tuple(hidden_states) if output_hidden_states else None,
                           cache=cache, last_hidden_state=last_hidden)

    def _scan_blocks(self, state, attn_bias, deterministic: bool, k: int, segment_ids):
        """Blocks 1..k as one `lax.scan` (model.scan_layers): XLA compiles one block instead of
        k, and under FSDP gathers one block's weights at a time. The parameters stay one
        subtree per block (h_0, h_1, ...); they are stacked here, (k, ...) per leaf, and their
        gradients flow back through the stack. Returns (state_k, the states after each block
        stacked on a leading axis of k). Dropout draws block i's masks from
        fold_in(rng, i), not from the unrolled form's per-block streams."""
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                               *(self.h[i].variables["params"] for i in range(k)))
        block = self.block_cls(self.config, parent=None)
        rng = None if deterministic else self.make_rng("dropout")

        def body(carry, xs):
            params, i = xs
            rngs = None if rng is None else {"dropout": jax.random.fold_in(rng, i)}
            carry, _ = block.apply({"params": params}, carry, attn_bias=attn_bias,
                                   deterministic=deterministic, segment_ids=segment_ids,
                                   rngs=rngs)
            return carry, carry

        remat = remat_setting(self.remat)
        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        return jax.lax.scan(body, state, (stacked, jnp.arange(k)))

    def _decode_step(self, cache: Cache, t: int, positions):
        """The shared `DecodeStep` for T new tokens written at cache.index."""
        c = self.config
        slots = cache.index + jnp.arange(t, dtype=jnp.int32)              # (T,)
        key_slots = jnp.arange(cache.length, dtype=jnp.int32)             # (S,)
        start = cache.start[:, None]                                      # (B, 1)
        real = slots[None, :] >= start                                    # (B, T)
        if positions is None:
            positions = jnp.maximum(slots[None, :] - start, 0)
        positions = jnp.broadcast_to(positions, real.shape).astype(jnp.int32)
        cache_mask = cache_bias = new_bias = None
        if not cache.fresh:
            cache_mask = ((key_slots < cache.index)[None, None, :]
                          & (key_slots[None, None, :] >= start[:, :, None]))[:, None]
            cache_mask = jnp.broadcast_to(cache_mask, (real.shape[0], 1, t, cache.length))
        new_mask = (jnp.tril(jnp.ones((t, t), bool))[None] & real[:, None, :])[:, None]
        if c.position_encoding == "alibi":  # depends on position differences = slot differences
            new_bias = layers.alibi_bias(c.n_head, slots, slots)
            if not cache.fresh:
                cache_bias = layers.alibi_bias(c.n_head, slots, key_slots)
        return layers.DecodeStep(index=cache.index, cache_mask=cache_mask, new_mask=new_mask,
                                 real=real, positions=positions, cache_bias=cache_bias,
                                 new_bias=new_bias)

    def logits(self, hidden):
        """Head on a pre-LN_f hidden state: LN_f(h) . W^T, float32 (B, T, V); W = wte when tied."""
        c = self.config
        h = self.ln_f(hidden)
        w = self.wte.embedding if c.tie_embeddings else self.lm_head
        return kernels.rows_matmul(h, w.astype(c.compute_dtype), w_transposed=True,
                                   preferred_element_type=jnp.float32)


def head_params(params) -> dict:
    """The part of a CausalLM parameter tree that `logits` reads (wte, ln_f, lm_head)."""
    return {name: params[name] for name in HEAD_PARAMS if name in params}


def head_fn(model: CausalLM):
    """head(head_params(params), hidden (..., d)) = model.logits(hidden) (..., V) float32: the
    model's head as a pure function of its own parameters (the chunked losses call it per
    chunk of tokens)."""
    return functools.partial(_apply_head, model)


def _apply_head(model, params, hidden):
    return model.apply({"params": params}, hidden, method="logits")


def check_input_ids(input_ids, config: ModelConfig) -> None:
    """Clear errors for ids of the wrong dtype/rank, too long, or (when concrete) out of range."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ConfigError(f"input_ids must be an integer array, got dtype {dtype}: "
                          f"pass token ids, e.g. jnp.asarray(ids, jnp.int32)")
    if input_ids.ndim != 2:
        raise ConfigError(f"input_ids must have shape (batch, time), got {input_ids.shape}: "
                          f"add a batch axis with ids[None]")
    t = input_ids.shape[1]
    if t > config.max_position_embeddings:
        fix = ("crop the input to the last block_size tokens"
               if config.position_encoding == "learned"
               else "raise model.max_position_embeddings")
        raise ConfigError(f"sequence length {t} exceeds the model's maximum of "
                          f"{config.max_position_embeddings} positions "
                          f"({config.position_encoding} positions): {fix}")
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        ids = np.asarray(input_ids)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ConfigError(f"token ids must lie in [0, vocab_size={config.vocab_size}), got "
                              f"min {lo}, max {hi}: the tokenizer and model.vocab_size disagree")
