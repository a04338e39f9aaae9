"""Text generation with a KV cache: prefill and every decode step in one compiled XLA program.

    ids, text = run_generation(model, params, tokenizer, "Once upon a time", max_new_tokens=100)
    out = generate(model, params, input_ids, 100, temperature=0.8, top_k=50,
                   rng=jax.random.key(0), prompt_lengths=lengths, eos_token_id=eos)
    out.tokens   # (B, 100) new tokens, pad_token_id after a row's EOS;  out.lengths (B,)

How one call runs:
1. Host: row b's prompt (any length; rows may differ) is left-padded to P = a power of two
   >= its longest row (at least 8), so every prompt length in (P/2, P] reuses one compiled
   program; max_new_tokens is rounded up the same way (the loop stops at the real count). The
   cache gets start[b] = P - len_b: row b's tokens sit at slots [start_b, ...) with positions
   slot - start_b, which is exactly what the row computes alone (see models/base.py).
2. Prefill: one forward of the (B, P) prompts fills every block's cache; the head runs on the
   last position only.
3. Decode, inside `lax.while_loop`: draw token i from the logits (`sampling.sample`, key
   fold_in(rng, i)), write it, run it as a (B, 1) forward against the cache. A row that drew
   eos_token_id emits pad_token_id from then on; the loop ends when every row is done or after
   max_new_tokens. There is no host round trip per token.
4. Learned positions past block_size (the sliding window): the reference is the cropped
   uncached forward, which sees the last block_size tokens at positions 0..block_size-1. Each
   step past that point shifts every token's position embedding, so no cached key stays valid;
   exactness therefore costs a full forward per token there: a second while_loop re-prefills
   the last block_size tokens (into a fresh cache, one forward) for each further token. The
   switch happens for the whole batch when its longest row passes block_size; shorter rows
   compute the same numbers either way. Prompts longer than block_size are cropped to their
   last block_size tokens (the earlier ones can never be seen).
5. ALiBi depends on position differences only, so the cache stays valid; a row may reach
   max_position_embeddings tokens (prompt + new) and asking for more is an error.

Recompilation: the program is specialised on the batch size, the two buckets, the model and
the static settings (greedy or not, top_k, whether top_p is set, return_logits); temperature,
top_p's value, the seed, eos/pad ids and the prompts themselves are traced. `program()` is the
jitted function; tests/test_generation.py counts its compiles with jax.monitoring.
Speed: a decode step is bound by reading the weights (batch 1) and the cache; the cache layout
and `layers.cached_attention` let it read both in place (see models/layers.py). The backend
decides two things (`cleangpt_jax.kernels`): the program's compiler options, and whether a
call first makes transposed copies of the Dense kernels (`kernels.decode_layout`, batch 1 on
CPU, for calls long enough to win back the copying).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cleangpt_jax import kernels, sampling
from cleangpt_jax.config import ConfigError
from cleangpt_jax.tokenizers import check_vocab



@flax.struct.dataclass
class GenerationOutput:
    """tokens (B, N) int32: the new tokens, pad_token_id after a row's EOS;
    lengths (B,) int32: new tokens per row, its EOS included;
    logits (B, N, V) float32 with return_logits: the raw logits token i was drawn from."""

    tokens: jax.Array
    lengths: jax.Array
    logits: jax.Array | None = None


def bucket(n: int, minimum: int = 8) -> int:
    """The compiled length for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def check_generation_args(max_new_tokens, temperature=1.0, top_k=None, top_p=None) -> None:
    """The one check of the generation settings: a one-line ConfigError for a value that
    cannot work (the samplers in `cleangpt_jax.sampling` assume these ranges)."""
    if (not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool)
            or max_new_tokens <= 0):
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ConfigError(f"temperature must be a number >= 0 (0 = greedy), "
                          f"got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool)
                          or top_k < 0):
        raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or isinstance(top_p, bool)
                          or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p must be in (0, 1] (1 or unset = off), got {top_p!r}: "
                          f"e.g. top_p=0.9 keeps the tokens holding 90% of the probability")


def memory_bytes() -> int:
    """The memory of the first local device (its allocator's limit), else the host's RAM."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_output_fits(batch: int, prompt_width: int, max_new_tokens: int, logits_width: int):
    """Refuse, in one line, a max_new_tokens whose outputs the run cannot hold: positions and
    token indices are int32, and the program's (B, bucket(N)) int32 tokens (plus float32
    (B, bucket(N), V) logits when returned) must fit in half the device's memory (the rest is
    the weights', the cache's and the host copy's)."""
    if bucket(max_new_tokens) > 2**30:  # (prompt_width <= 2**30 too)
        raise ConfigError(f"max_new_tokens={max_new_tokens} is beyond int32 positions: ask for "
                          f"at most {2**30}")
    per_token = batch * 4 * (1 + logits_width)
    budget = memory_bytes() // 2
    if bucket(max_new_tokens) * per_token > budget:
        most = 1 << max(0, (budget // per_token).bit_length() - 1)  # the largest bucket that fits
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} needs {bucket(max_new_tokens) * per_token / 2**30:.1f}"
            f" GiB for the outputs of {batch} row(s), more than half of this device's "
            f"{2 * budget / 2**30:.1f} GiB: ask for at most {most}")


def generate(model, params, input_ids, max_new_tokens: int, *, temperature=1.0,
             top_k: int | None = None, top_p=None, rng=None, prompt_lengths=None,
             attention_mask=None, eos_token_id: int | None = None,
             pad_token_id: int | None = None, bos_token_id: int | None = None,
             return_logits: bool = False) -> GenerationOutput:
    """Generate `max_new_tokens` tokens after each prompt row.

    input_ids: (B, T) or (T,) token ids, or a list of B rows of any lengths (unpadded). A row's
      prompt is all of it, or (with an array) its first prompt_lengths[b] tokens (right
      padding), or the positions where attention_mask is 1 (any padding side). An empty row
      starts from bos_token_id (else eos_token_id). The prompts are left-padded once, here.
    temperature / top_k / top_p: see `cleangpt_jax.sampling` (temperature 0 = greedy).
    rng: a jax PRNG key or an int seed (default 0); the same key gives the same tokens.
    eos_token_id: a row stops after drawing it; its later tokens are pad_token_id (default:
      eos_token_id, else 0).
    """
    c = model.config
    check_generation_args(max_new_tokens, temperature, top_k, top_p)
    n_new = int(max_new_tokens)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    rows = _prompt_rows(input_ids, prompt_lengths, attention_mask)
    seed_id = bos_token_id if bos_token_id is not None else eos_token_id
    for b, row in enumerate(rows):
        if row.size == 0:
            if seed_id is None:
                raise ConfigError(f"prompt row {b} is empty and there is no bos_token_id or "
                                  f"eos_token_id to start it from: pass one, or a prompt")
            rows[b] = np.asarray([seed_id], np.int64)
    for name, tid in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tid is not None and not 0 <= tid < c.vocab_size:
            raise ConfigError(f"{name}={tid} is outside [0, vocab_size={c.vocab_size})")
    lo = min(int(r.min()) for r in rows)
    hi = max(int(r.max()) for r in rows)
    if lo < 0 or hi >= c.vocab_size:
        raise ConfigError(f"prompt token ids must lie in [0, vocab_size={c.vocab_size}), got "
                          f"min {lo}, max {hi}: the tokenizer and the model disagree")

    if c.position_encoding == "learned":
        rows = [r[-c.block_size:] for r in rows]
        limit = c.block_size
    else:
        longest = max(len(r) for r in rows)
        if longest + n_new > c.max_position_embeddings:
            raise ConfigError(
                f"a prompt of {longest} tokens plus max_new_tokens={n_new} needs "
                f"{longest + n_new} positions, more than model.max_position_embeddings="
                f"{c.max_position_embeddings}: lower max_new_tokens, shorten the prompt, or use "
                f"a model trained with a larger max_position_embeddings")
        limit = c.max_position_embeddings
    lengths = np.asarray([len(r) for r in rows])
    width = min(bucket(lengths.max()), limit)
    check_output_fits(len(rows), width, n_new, c.vocab_size if return_logits else 0)
    prompt = np.full((len(rows), width), pad_token_id, np.int32)
    for b, r in enumerate(rows):
        prompt[b, width - len(r):] = r
    steps = bucket(n_new)
    windowed = c.position_encoding == "learned" and width + steps > c.block_size
    cache_len = width + (min(steps, c.block_size) if c.position_encoding == "learned" else steps)

    if rng is None:
        rng = 0
    if isinstance(rng, numbers.Integral):
        rng = jax.random.key(int(rng))
    greedy_only = temperature == 0
    # Settings that filter nothing compile to the same program as leaving them out.
    if greedy_only or (top_k is not None and top_k >= c.vocab_size):
        top_k = None
    if greedy_only or (top_p is not None and top_p >= 1.0):
        top_p = None
    tokens, logits = program()(
        params, jnp.asarray(prompt), jnp.asarray(width - lengths, jnp.int32),
        jnp.int32(n_new), jnp.float32(temperature if not greedy_only else 1.0),
        None if top_p is None else jnp.float32(top_p), rng,
        jnp.int32(-1 if eos_token_id is None else eos_token_id), jnp.int32(pad_token_id),
        model=model, cache_len=cache_len, steps=steps, windowed=windowed,
        top_k=int(top_k) if top_k else None, greedy_only=greedy_only,
        return_logits=return_logits, decode_layout=kernels.use_decode_layout(len(rows), steps))
    tokens = tokens[:, :n_new]
    if eos_token_id is None:
        counts = jnp.full((tokens.shape[0],), n_new, jnp.int32)
    else:
        is_eos = tokens == eos_token_id
        counts = jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1) + 1, n_new).astype(jnp.int32)
    return GenerationOutput(tokens=tokens, lengths=counts,
                            logits=None if logits is None else logits[:, :n_new])


def _prompt_rows(input_ids, prompt_lengths, attention_mask) -> list[np.ndarray]:
    """Each row's prompt tokens as a 1-D int array (host side)."""
    if isinstance(input_ids, (list, tuple)) and input_ids and all(
            np.ndim(row) == 1 for row in input_ids):
        if prompt_lengths is not None or attention_mask is not None:
            raise ConfigError("prompt_lengths and attention_mask describe a padded (batch, "
                              "time) array: pass unpadded rows without them")
        rows = [np.asarray(row) for row in input_ids]
        if any(row.size and not np.issubdtype(row.dtype, np.integer) for row in rows):
            raise ConfigError("input_ids rows must hold integer token ids")
        return [row.astype(np.int64) for row in rows]
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ConfigError(f"input_ids must have shape (batch, time) or (time,), got "
                          f"{ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if prompt_lengths is not None and attention_mask is not None:
        raise ConfigError("pass prompt_lengths or attention_mask, not both")
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}:"
                              f" they must match")
        return [row[m > 0].astype(np.int64) for row, m in zip(ids, mask)]
    if prompt_lengths is None:
        return [row.astype(np.int64) for row in ids]
    lengths = np.asarray(prompt_lengths).reshape(-1)
    if lengths.shape[0] != ids.shape[0] or (lengths < 0).any() or (lengths > ids.shape[1]).any():
        raise ConfigError(f"prompt_lengths must hold one length in [0, {ids.shape[1]}] per "
                          f"row of input_ids ({ids.shape[0]} rows), got {lengths.tolist()}")
    return [row[:n].astype(np.int64) for row, n in zip(ids, lengths)]


def _generate_program(params, prompt, start, n_new, temperature, top_p, rng, eos, pad, *,
                       model, cache_len: int, steps: int, windowed: bool, top_k: int | None,
                       greedy_only: bool, return_logits: bool, decode_layout: bool):
    """The whole generation as one program: prefill, then the decode loop(s).

    prompt (B, P) left-padded, start (B,) = P - prompt length. Returns the (B, steps) new tokens
    (only the first n_new are drawn) and, with return_logits, their (B, steps, V) logits.
    decode_layout: decode with `kernels.decode_layout` copies of the weights.
    """
    c = model.config
    batch, width = prompt.shape
    variables = {"params": params}
    if decode_layout:
        variables[kernels.DECODE_LAYOUT] = kernels.decode_layout(params)

    def forward(ids, cache):
        out = model.apply(variables, ids, cache=cache, last_logits_only=True)
        return out.logits[:, 0], out.cache

    logits, cache = forward(prompt, model.init_cache(batch, cache_len, start))
    state = dict(
        i=jnp.zeros((), jnp.int32), logits=logits, cache=cache,
        history=jnp.concatenate([prompt, jnp.full((batch, steps), pad, jnp.int32)], axis=1),
        done=jnp.zeros((batch,), bool),
        all_logits=(jnp.zeros((batch, steps, logits.shape[-1]), jnp.float32)
                    if return_logits else None))

    def choose(s):
        """Draw token i into the history; returns it (B,) and the new state."""
        i = s["i"]
        if greedy_only:
            tok = sampling.greedy(s["logits"])
        else:
            tok = sampling.sample(jax.random.fold_in(rng, i), s["logits"],
                                  temperature=temperature, top_k=top_k, top_p=top_p)
        tok = jnp.where(s["done"], pad, tok)
        s = {**s, "history": jax.lax.dynamic_update_slice(s["history"], tok[:, None],
                                                          (0, width + i)),
             "done": s["done"] | (tok == eos)}
        if return_logits:
            s["all_logits"] = jax.lax.dynamic_update_slice(
                s["all_logits"], s["logits"][:, None], (0, i, 0))
        return tok, s

    def cached_step(tok, s):
        return forward(tok[:, None], s["cache"])

    def window_step(tok, s):
        """Learned positions past block_size: the cropped forward of the last block_size tokens."""
        w0 = width + s["i"] + 1 - c.block_size
        window = jax.lax.dynamic_slice_in_dim(s["history"], w0, c.block_size, axis=1)
        logits, _ = forward(window, model.init_cache(batch, c.block_size,
                                                      jnp.maximum(start - w0, 0)))
        return logits, s["cache"]

    def run(s, step, fits):
        def cond(s):
            return (s["i"] < n_new - 1) & ~jnp.all(s["done"]) & fits(s["i"])

        def body(s):
            tok, s = choose(s)
            logits, cache = step(tok, s)
            return {**s, "i": s["i"] + 1, "logits": logits, "cache": cache}

        return jax.lax.while_loop(cond, body, s)

    if c.position_encoding == "learned":
        # Feeding token i makes the longest row width + i + 1 - min(start) tokens long.
        fits = lambda i: width + i + 1 - jnp.min(start) <= c.block_size  # noqa: E731
    else:
        fits = lambda i: True  # noqa: E731
    state = run(state, cached_step, fits)
    if windowed:
        state = run(state, window_step, lambda i: True)
    _, state = choose(state)
    return state["history"][:, width:], state["all_logits"]


_STATIC = ("model", "cache_len", "steps", "windowed", "top_k", "greedy_only", "return_logits",
           "decode_layout")
_programs: dict[tuple, object] = {}


def program():
    """The jitted generation program with the default backend's compiler options
    (`kernels.decode_compiler_options`)."""
    options = kernels.decode_compiler_options()
    key = tuple(sorted(options.items()))
    if key not in _programs:
        _programs[key] = jax.jit(_generate_program, static_argnames=_STATIC,
                                 compiler_options=options or None)
    return _programs[key]


def check_prompt(tokenizer, text: str, *, what: str = "the prompt",
                 fix: str = "use only characters of the text it was built from") -> None:
    """ConfigError naming the characters of `text` outside the tokenizer's vocabulary: they
    would encode to its unknown token and vanish from the decoded text, so a prompt holding
    any is refused rather than silently changed."""
    unknown = tokenizer.unknown_characters(text)
    if unknown:
        raise ConfigError(f"{what} {text!r} has characters outside the tokenizer's vocabulary: "
                          f"{unknown!r}; {fix}")


def run_generation(model, params, tokenizer, prompt_text, max_new_tokens=50, temperature=0.8,
                   top_k=50, top_p=None, seed=0):
    """Generate from text: returns (token_ids, text).

    token_ids: the prompt's ids followed by the new ones (up to and including EOS), a list of
    ints; text: tokenizer.decode(token_ids, skip_special_tokens=True). An empty prompt starts
    from the tokenizer's BOS (else EOS) token. A list of prompts is generated as one batch and
    gives a list of id lists and a list of texts. A prompt with characters the tokenizer has
    no token for is a ConfigError (`check_prompt`).
    """
    single = isinstance(prompt_text, str)
    texts: Sequence[str] = [prompt_text] if single else list(prompt_text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"prompt_text must be a string or a non-empty list of strings, "
                          f"got {prompt_text!r}")
    check_vocab(tokenizer.vocab_size, model.config.vocab_size,
                fix="use the tokenizer the model was trained with")
    start_id = (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                else tokenizer.eos_token_id)
    for t in texts:
        check_prompt(tokenizer, t)
    prompts = [list(tokenizer.encode(t)) for t in texts]
    for p in prompts:
        if not p:
            if start_id is None:
                raise ConfigError("the prompt is empty and the tokenizer has no BOS or EOS "
                                  "token to start from: give a prompt")
            p.append(start_id)
    out = generate(model, params, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, rng=jax.random.key(seed), eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    tokens, counts = np.asarray(out.tokens), np.asarray(out.lengths)
    token_ids = [p + tokens[b, :counts[b]].tolist() for b, p in enumerate(prompts)]
    decoded = [tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
    return (token_ids[0], decoded[0]) if single else (token_ids, decoded)
