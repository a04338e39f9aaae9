"""EleutherAI's lm-evaluation-harness on cleangpt_jax models (the `lm_eval` extra).

    python -m cleangpt_jax.lm_eval --model cleangpt_jax --model_args workdir=runs/default \
        --tasks wikitext,lambada_openai --batch_size 16
    python -m cleangpt_jax.lm_eval --model cleangpt_jax --model_args hf=runs/teacher_hf ...

    import cleangpt_jax.lm_eval                      # registers the model name "cleangpt_jax"
    lm_eval.simple_evaluate(model="cleangpt_jax", model_args="workdir=runs/x", tasks=[...])

The harness looks models up by name in `lm_eval.api.registry` and imports only its own: it has
no plug-in entry point for outside models. Importing this module registers "cleangpt_jax", and
`python -m cleangpt_jax.lm_eval ARGS` is the harness's `lm_eval ARGS` command with it
registered (every other flag as the harness documents it: --tasks, --num_fewshot, --limit,
--include_path for YAML tasks over local files, --output_path, ...).

model_args: exactly one of workdir=DIR (a training or distillation run; step=N picks a
checkpoint, default the latest) or hf=DIR (a Hugging Face GPT-2 directory or hub name, through
`cleangpt_jax.hf`); dtype=float32|bfloat16 (default: the run's own, float32 for GPT-2);
max_length=N (default: the model's longest sequence, block_size for learned positions,
max_position_embeddings for ALiBi). The harness's --batch_size (an integer) sets the rows of
every compiled call.

What each request returns (the semantics of `lm_eval.api.model.LM` and its `hf` backend):
    loglikelihood(ctx, cont)   (sum_i log p(cont_i | ctx, cont_<i), whether every cont_i is the
                               argmax); the input is the last L + 1 tokens of ctx + cont minus
                               the last, L = max_length; an empty ctx is the EOS token
    loglikelihood_rolling(s)   log p(s | EOS), summed over the disjoint windows of
                               `lm_eval.utils.get_rolling_token_windows` (every token scored
                               once, each with as much context as L allows)
    generate_until(ctx, kw)    the KV-cache generator (`cleangpt_jax.generation.generate`):
                               greedy unless kw's do_sample, at most kw's max_gen_toks (256)
                               new tokens after the last L - max_gen_toks context tokens, cut at
                               the first of kw's `until` strings; the EOS token ends a row

Compiled shapes: scoring runs (batch_size, T) calls, T a power of two >= 16 (at most L): rows
right-padded (causal attention keeps padding out of every scored position), missing rows
filled with padding; so at most log2(L) - 3 programs compile, whatever the task.
Single process only (the harness's own data parallelism is not wired up).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cleangpt_jax.config import ConfigError
from cleangpt_jax.generation import bucket, generate

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval import utils as harness_utils
except ImportError as e:  # pragma: no cover -- the extra is not installed
    raise ImportError(f"{e}: the lm-evaluation-harness adapter needs the `lm_eval` extra: "
                      f"pip install -e '.[lm_eval]'") from None

MODEL_NAME = "cleangpt_jax"
MIN_WIDTH = 16           # the shortest compiled scoring length
DEFAULT_GEN_TOKENS = 256  # max_gen_toks when a task sets none (the harness's default)


@functools.partial(jax.jit, static_argnames="model")
def token_logprobs(params, input_ids, targets, *, model):
    """Per position t of input_ids (B, T): log p(targets[:, t] | input_ids[:, :t+1]) (B, T)
    float32, and whether targets[:, t] is the argmax there (B, T) bool."""
    logits = model.apply({"params": params}, input_ids).logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets


@register_model(MODEL_NAME)
class CleanGPTLM(TemplateLM):
    """A cleangpt_jax model as an lm-evaluation-harness LM (see the module docstring)."""

    def __init__(self, workdir: str | None = None, hf: str | None = None,
                 step: int | None = None, dtype: str | None = None,
                 max_length: int | None = None, batch_size: int | str = 8, **unused):
        super().__init__()
        from cleangpt_jax.loading import load_lm

        if (workdir is None) == (hf is None):
            raise ConfigError("model_args needs exactly one of workdir=DIR (a cleangpt_jax run) "
                              "or hf=DIR (a Hugging Face GPT-2 directory)")
        if str(batch_size).startswith("auto"):
            batch_size = 8  # compiled shapes are fixed: one size, not a search
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.lm = load_lm(workdir or hf, kind="workdir" if workdir else "hf",
                          step=None if step is None else int(step), dtype=dtype)
        c = self.lm.config
        longest = c.block_size if c.position_encoding == "learned" else c.max_position_embeddings
        self._max_length = int(max_length or longest)
        if not 0 < self._max_length <= longest:
            raise ConfigError(f"max_length={max_length} must lie in [1, {longest}] (the model's "
                              f"longest sequence)")
        self.tokenizer = self.lm.tokenizer
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"{workdir or hf}: its tokenizer has no EOS token, which the "
                              f"harness needs as the context of an empty prompt")

    # ------------------------------------------------------------------ the harness's hooks
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "tokenizer_type", None) or "cleangpt_jax"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---------------------------------------------------------------------------- scoring
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(cont | ctx), greedy) of every (ctx, cont) token pair, in order; rows
        sorted by length into batches of batch_size rows padded to bucketed widths."""
        L, B = self.max_length, self.batch_size
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("a loglikelihood request has an empty continuation")
            full = (list(ctx) + list(cont))[-(L + 1):]
            rows.append((full[:-1], full[1:], min(len(cont), len(full) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        pad = self.tokenizer.pad_token_id
        pad = self.eot_token_id if pad is None else int(pad)
        for start in range(0, len(order), B):
            chunk = order[start:start + B]
            width = min(bucket(len(rows[chunk[0]][0]), MIN_WIDTH), L)
            ids = np.full((B, width), pad, np.int32)
            targets = np.full((B, width), pad, np.int32)
            for r, i in enumerate(chunk):
                inp, tgt, _ = rows[i]
                ids[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
            logp, greedy = jax.device_get(token_logprobs(
                self.lm.params, jnp.asarray(ids), jnp.asarray(targets), model=self.lm.model))
            for r, i in enumerate(chunk):
                n, k = len(rows[i][0]), rows[i][2]
                out[i] = (float(np.sum(logp[r, n - k:n], dtype=np.float64)),
                          bool(np.all(greedy[r, n - k:n])))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(harness_utils.make_disjoint_window,
                                 harness_utils.get_rolling_token_windows(
                                     token_list=self.tok_encode(string),
                                     prefix_token=self.prefix_token_id,
                                     max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(windows)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with equal settings run together, batch_size rows at a time (a short last
        batch is filled with copies of its first row, so the compiled shape stays)."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for n, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_GEN_TOKENS))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            if not sample:
                temperature = 0.0
            key = (max_new, temperature, kwargs.get("top_k"), kwargs.get("top_p"))
            settings.append((context, until, key))
            groups.setdefault(key, []).append(n)
        out: list[str | None] = [None] * len(requests)
        for (max_new, temperature, top_k, top_p), members in groups.items():
            keep = max(self.max_length - max_new, 1)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok_encode(settings[i][0])[-keep:] or [self.eot_token_id]
                           for i in chunk]
                prompts += [prompts[0]] * (self.batch_size - len(prompts))
                gen = generate(self.lm.model, self.lm.params, prompts, max_new,
                               temperature=temperature, top_k=top_k, top_p=top_p, rng=0,
                               eos_token_id=self.eot_token_id)
                tokens, lengths = jax.device_get((gen.tokens, gen.lengths))
                for r, i in enumerate(chunk):
                    row = [t for t in tokens[r, :lengths[r]].tolist() if t != self.eot_token_id]
                    text = self.tok_decode(row)
                    for stop in settings[i][1]:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv: list[str] | None = None) -> None:
    """The harness's command line with "cleangpt_jax" registered (this module's import)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
