"""The causal language model skeleton every architecture shares.

    state_0 = init_state(dropout(wte[ids] + wpe[pos]))      (no wpe with ALiBi)
    state_i = block_i(state_{i-1}),  i = 1..L
    logits  = LN_f(hidden(state_L)) . wte^T                  (tied head, float32)

An architecture is a block class plus, when its residual stream is not a single array (the
Token-Factored model keeps (xt, xe)), `init_state` and `hidden`. `hidden_states[i]` is
`hidden(state_i)`: pre-LN_f, index 0 = embeddings. Labels are never shifted here: logits at t
predict token t + 1 and `cleangpt_jax.losses` does the shift.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cleangpt_jax.config import ModelConfig
from cleangpt_jax.models import layers


@flax.struct.dataclass
class ModelOutput:
    """logits (B, T, V) float32, or None when only the first k < L blocks ran;
    hidden_states: tuple of k + 1 arrays (B, T, d), or None when not asked for."""

    logits: Any = None
    hidden_states: tuple | None = None


class InputError(ValueError):
    """Model input of the wrong type, shape or range."""


class CausalLM(nn.Module):
    config: ModelConfig
    block_cls: ClassVar[type[nn.Module]]

    def setup(self):
        c = self.config
        if c.vocab_size is None:
            raise InputError("model.vocab_size is None: set it, or take it from the tokenizer "
                             "(config.model.vocab_size = tokenizer.vocab_size)")
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

    def __call__(self, input_ids, *, deterministic: bool = True,
                 output_hidden_states: bool = False, num_blocks: int | None = None,
                 positions=None) -> ModelOutput:
        """input_ids (B, T) integers. `num_blocks=k` runs only the embeddings and the first k
        blocks (no LN_f/head unless k = L). `positions` (T,) or (B, T) default to arange(T)."""
        c = self.config
        check_input_ids(input_ids, c)
        k = c.n_layer if num_blocks is None else num_blocks
        if not 0 <= k <= c.n_layer:
            raise InputError(f"num_blocks={num_blocks} is outside [0, n_layer={c.n_layer}]")
        t = input_ids.shape[1]
        if positions is None:
            positions = jnp.arange(t)

        x = self.wte(input_ids)
        if c.position_encoding == "learned":
            x = x + self.wpe(positions)
        state = self.init_state(self.drop(x, deterministic=deterministic))
        attn_bias = (layers.alibi_bias(c.n_head, positions, positions)
                     if c.position_encoding == "alibi" else None)

        hidden_states = [self.hidden(state)] if output_hidden_states else None
        for block in self.h[:k]:
            state = block(state, attn_bias=attn_bias, deterministic=deterministic)
            if output_hidden_states:
                hidden_states.append(self.hidden(state))

        logits = self.logits(self.hidden(state)) if k == c.n_layer else None
        return ModelOutput(logits=logits,
                           hidden_states=tuple(hidden_states) if output_hidden_states else None)

    def logits(self, hidden):
        """Head on a pre-LN_f hidden state: LN_f(h) . W^T, float32 (B, T, V); W = wte when tied."""
        c = self.config
        h = self.ln_f(hidden)
        w = self.wte.embedding if c.tie_embeddings else self.lm_head
        return jnp.einsum("btd,vd->btv", h, w.astype(c.compute_dtype),
                          preferred_element_type=jnp.float32)


def check_input_ids(input_ids, config: ModelConfig) -> None:
    """Clear errors for ids of the wrong dtype/rank, too long, or (when concrete) out of range."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise InputError(f"input_ids must be an integer array, got dtype {dtype}: "
                         f"pass token ids, e.g. jnp.asarray(ids, jnp.int32)")
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must have shape (batch, time), got {input_ids.shape}: "
                         f"add a batch axis with ids[None]")
    t = input_ids.shape[1]
    if t > config.max_position_embeddings:
        fix = ("crop the input to the last block_size tokens"
               if config.position_encoding == "learned"
               else "raise model.max_position_embeddings")
        raise InputError(f"sequence length {t} exceeds the model's maximum of "
                         f"{config.max_position_embeddings} positions "
                         f"({config.position_encoding} positions): {fix}")
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        ids = np.asarray(input_ids)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= config.vocab_size:
            raise InputError(f"token ids must lie in [0, vocab_size={config.vocab_size}), got "
                             f"min {lo}, max {hi}: the tokenizer and model.vocab_size disagree")
