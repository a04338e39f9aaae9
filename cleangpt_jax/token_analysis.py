r"""Token usage of a dataset under a tokenizer, and vocabulary pruning.

    python -m cleangpt_jax.token_analysis --tokenizer=gpt2 --config.data.source=hf \
        --config.data.name=roneneldan/TinyStories --config.data.max_samples=1000 --prune=0.95
    python -m cleangpt_jax.token_analysis --tokenizer=character      # the Shakespeare default

--tokenizer is 'character' (a character tokenizer built from the data), a directory (a training
workdir's tokenizer, a tokenizer saved by cleangpt_jax, a pruned one included, or an HF tokenizer
directory) or a Hugging Face hub name such as 'gpt2'; without it the config's tokenizer section
is used. The data are the config's data section (`--config=FILE`,
`--config.data.key=value`), packed exactly as training packs them (`cleangpt_jax.data`); the
training and validation streams are analysed together.

Statistics, with c_v the number of occurrences of token id v in the N tokens of the stream:

    unique_tokens       #{v : c_v > 0};   vocab_coverage = unique_tokens / vocab_size
    tokens_per_char     text tokens / characters of the decoded text
    tokens_per_word     text tokens / whitespace-separated words of the decoded text
                        (text tokens: all but the special tokens, e.g. document separators)
    coverage(n)         sum of the n largest c_v / N: the share of the stream the n most
                        frequent tokens cover
    vocab size for q    min { n : coverage(n) >= q },  q in COVERAGE_LEVELS

Outputs in --output_dir (default ./token_analysis):

    token_analysis.json  keys (RESULT_KEYS): tokenizer {type, vocab_size, source}, data
                         {source, num_documents}, total_tokens, special_tokens (occurrences),
                         unique_tokens, vocab_size, vocab_coverage, num_chars, num_words,
                         tokens_per_char, tokens_per_word, top_tokens [{id, token, count,
                         fraction}], coverage_thresholds {"0.5": n, ..., "0.999": n},
                         pruned (null or {directory, requested_coverage, coverage, vocab_size,
                         unk_token_id}), files {json, top_tokens_plot, coverage_plot}
    top_tokens.png       the 100 most frequent tokens, log-scale counts
    coverage.png         coverage(n) against n, with the COVERAGE_LEVELS marked
    pruned_tokenizer/    with --prune=q: the pruned tokenizer (below)

Pruning (`prune_tokenizer`, `cleangpt_jax.tokenizers.PrunedTokenizer`): keep the base's special
tokens once each (GPT-2's pad = eos = bos = <|endoftext|> is one token), add `<unk>` unless the
base has an unknown token of its own, then add regular tokens by descending count until the
kept tokens cover q of the stream or more (special tokens count as covered); every other token
encodes to the unknown token. pruned_vocab.json holds the new->old and old->new id maps. Load it
with `load_tokenizer(DIR)`, or train with it: --config.tokenizer.type=pruned
--config.tokenizer.name_or_path=DIR.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from cleangpt_jax import storage
from cleangpt_jax.config import ConfigError
from cleangpt_jax.plot import save_png
from cleangpt_jax.tokenizers import PrunedTokenizer, Tokenizer, build_tokenizer, load_tokenizer

COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
JSON_FILE = "token_analysis.json"
TOP_TOKENS_PLOT = "top_tokens.png"
COVERAGE_PLOT = "coverage.png"
PRUNED_DIR = "pruned_tokenizer"
RESULT_KEYS = ("tokenizer", "data", "total_tokens", "special_tokens", "unique_tokens",
               "vocab_size", "vocab_coverage", "num_chars", "num_words", "tokens_per_char",
               "tokens_per_word", "top_tokens", "coverage_thresholds", "pruned", "files")
_CHUNK = 1 << 20  # tokens per read of a (memmapped) stream


# ------------------------------------------------------------------------------ statistics

def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The distinct ids of the tokenizer's unk/pad/bos/eos tokens, ascending."""
    ids = (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id,
           tokenizer.eos_token_id)
    return sorted({int(i) for i in ids if i is not None})


def count_tokens(streams: Iterable, vocab_size: int) -> np.ndarray:
    """counts[v] = occurrences of id v over all `streams` (1-D id arrays, memmaps welcome)."""
    counts = np.zeros(vocab_size, np.int64)
    for stream in streams:
        for start in range(0, len(stream), _CHUNK):
            part = np.asarray(stream[start:start + _CHUNK]).astype(np.int64)
            if part.size and (part.min() < 0 or part.max() >= vocab_size):
                raise ConfigError(f"the stream holds token id {int(part.max())} but the tokenizer "
                                  f"has only {vocab_size} ids: the data were tokenized with "
                                  "another tokenizer")
            counts += np.bincount(part, minlength=vocab_size)
    return counts


def text_length(streams: Iterable, tokenizer: Tokenizer) -> tuple[int, int]:
    """(characters, whitespace-separated words) of the decoded streams, special tokens dropped.

    The streams are read as one text, in order (`text_groups` says which streams continue each
    other), and decoded a chunk at a time; a special token (a document separator) ends a word,
    a chunk boundary does not.
    """
    special = np.asarray(special_token_ids(tokenizer), np.int64)
    chars = words = 0
    in_word = False
    for stream in streams:
        for start in range(0, len(stream), _CHUNK):
            part = np.asarray(stream[start:start + _CHUNK]).astype(np.int64)
            for k, piece in enumerate(np.split(part, np.flatnonzero(np.isin(part, special)))):
                if k > 0:  # the piece starts at a special token: a document boundary
                    in_word, piece = False, piece[1:]
                if piece.size == 0:
                    continue
                text = tokenizer.decode(piece, skip_special_tokens=True)
                if not text:
                    continue
                n = len(text.split())
                if n and in_word and not text[0].isspace():
                    n -= 1  # the word continues from the previous chunk
                chars, words = chars + len(text), words + n
                in_word = not text[-1].isspace()
    return chars, words


def text_groups(data) -> list[list]:
    """The streams of `data` (a `cleangpt_jax.data.TokenData`) as texts to read one after another:
    [[train, val]] when the validation stream is the tail of a single document split by tokens
    (a word may straddle the split), else one text per stream (each ends at a document end)."""
    parts = [p for p in (data.train, data.val) if p is not None]
    if data.val is not None and data.num_val_documents == 0 and not hasattr(data.train, "streams"):
        return [parts]
    return [[s] for part in parts for s in getattr(part, "streams", (part,))]


def coverage_curve(counts: np.ndarray) -> np.ndarray:
    """curve[n - 1] = coverage(n): the share of tokens the n most frequent ids cover."""
    counts = np.asarray(counts, np.int64)
    total = counts.sum()
    if total == 0:
        raise ConfigError("there are no tokens to analyse: the dataset is empty")
    return np.cumsum(np.sort(counts)[::-1]) / total


def vocab_size_for_coverage(counts: np.ndarray, q: float) -> int:
    """min { n : coverage(n) >= q }."""
    curve = coverage_curve(counts)
    return int(min(np.searchsorted(curve, q, side="left") + 1, len(curve)))


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)], skip_special_tokens=False)


def token_stats(counts: np.ndarray, tokenizer: Tokenizer, *, num_chars: int, num_words: int,
                top_n: int = 20) -> dict:
    """The statistics of the module docstring as a JSON-able dict (without `files`, `pruned`)."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        raise ConfigError("there are no tokens to analyse: the dataset is empty")
    special = int(counts[special_token_ids(tokenizer)].sum())
    text_tokens = total - special
    top = np.argsort(-counts, kind="stable")[:top_n]
    return {
        "total_tokens": total,
        "special_tokens": special,
        "unique_tokens": int((counts > 0).sum()),
        "vocab_size": int(len(counts)),
        "vocab_coverage": float((counts > 0).sum() / len(counts)),
        "num_chars": int(num_chars),
        "num_words": int(num_words),
        "tokens_per_char": text_tokens / num_chars if num_chars else None,
        "tokens_per_word": text_tokens / num_words if num_words else None,
        "top_tokens": [{"id": int(i), "token": token_text(tokenizer, i), "count": int(counts[i]),
                        "fraction": float(counts[i] / total)} for i in top if counts[i] > 0],
        "coverage_thresholds": {str(q): vocab_size_for_coverage(counts, q)
                                for q in COVERAGE_LEVELS},
    }


# ------------------------------------------------------------------------------ plots

def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg canvas)

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def plot_top_tokens(counts: np.ndarray, tokenizer: Tokenizer, path: str, n: int = 100) -> str:
    """Bar chart of the n most frequent tokens' counts on a log scale."""
    counts = np.asarray(counts)
    top = [i for i in np.argsort(-counts, kind="stable")[:n] if counts[i] > 0]
    fig, ax = _figure()
    ax.bar(range(len(top)), counts[top], color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("token rank")
    ax.set_ylabel("occurrences (log scale)")
    ax.set_title(f"The {len(top)} most frequent tokens")
    ticks = range(0, len(top), max(1, len(top) // 25))
    ax.set_xticks(list(ticks), [repr(token_text(tokenizer, top[i]))[1:-1].replace(" ", "\u2423")[:8]
                                  for i in ticks],
                  rotation=90, fontsize=7)
    return save_png(fig, path)


def plot_coverage(counts: np.ndarray, path: str) -> str:
    """coverage(n) against the number of most frequent tokens kept, n (log scale)."""
    curve = coverage_curve(counts)
    unique = int((np.asarray(counts) > 0).sum())
    fig, ax = _figure()
    n = np.arange(1, unique + 1)
    ax.plot(n, curve[:unique], color="tab:blue")
    needed = {q: vocab_size_for_coverage(counts, q) for q in COVERAGE_LEVELS}
    ax.plot(list(needed.values()), [curve[k - 1] for k in needed.values()], "o",
            color="tab:orange")
    ax.text(0.98, 0.04, "coverage: vocab size\n" + "\n".join(f"{q:g}: {k}" for q, k in
                                                             needed.items()),
            transform=ax.transAxes, ha="right", va="bottom", fontsize=9, family="monospace",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "gray"})
    ax.set_xscale("log")
    ax.set_xlabel("vocabulary size n (most frequent tokens kept)")
    ax.set_ylabel("share of the token stream covered")
    ax.set_title("Vocabulary coverage")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


# ------------------------------------------------------------------------------ pruning

def check_coverage(coverage) -> None:
    if not (isinstance(coverage, (int, float)) and 0.0 < coverage <= 1.0):
        raise ConfigError(f"--prune must be a coverage in (0, 1], got {coverage!r}: e.g. "
                          "--prune=0.95 keeps the tokens covering 95% of the data")


def prune_tokenizer(tokenizer: Tokenizer, counts: np.ndarray, coverage: float) -> PrunedTokenizer:
    """The smallest frequency-ordered vocabulary covering `coverage` of the counted stream.

    Special tokens are always kept (and count as covered); regular tokens are added by
    descending count (ties: lower id first) until covered / total >= coverage.
    """
    check_coverage(coverage)
    counts = np.asarray(counts, np.int64)
    if len(counts) != tokenizer.vocab_size:
        raise ConfigError(f"counts has {len(counts)} entries for a vocabulary of "
                          f"{tokenizer.vocab_size}")
    total = counts.sum()
    if total == 0:
        raise ConfigError("there are no tokens to prune on: the dataset is empty")
    special = special_token_ids(tokenizer)
    regular = np.setdiff1d(np.flatnonzero(counts > 0), special)
    regular = regular[np.argsort(-counts[regular], kind="stable")]
    covered = counts[special].sum() + np.concatenate([[0], np.cumsum(counts[regular])])
    n = int(np.argmax(covered / total >= coverage))  # covered[-1] == total, so one exists
    own_unk = (tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in
               {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id})
    new_to_old = special + ([] if own_unk else [-1]) + regular[:n].tolist()
    return PrunedTokenizer(tokenizer, new_to_old, coverage=float(covered[n] / total))


# ------------------------------------------------------------------------------ a dataset

def resolve_tokenizer(spec: str | None, config) -> Tokenizer:
    """The tokenizer --tokenizer names.

    None: the config's tokenizer section (`tokenizers.build_tokenizer`). 'character': a
    character tokenizer of the data. A directory: a training workdir (its tokenizer/), a saved
    tokenizer of any registered type (a pruned one included) or an HF tokenizer directory.
    Anything else: a Hugging Face hub name ('gpt2', 'distilgpt2', ...), loaded as a GPT-2-style
    tokenizer (needs the network the first time).
    """
    from cleangpt_jax.tokenizers import create_tokenizer

    if spec is None:
        return build_tokenizer(config)
    if spec == "character":
        with config.unlocked():
            config.tokenizer.type, config.tokenizer.name_or_path = "character", None
        return build_tokenizer(config)
    if storage.isdir(spec):
        workdir_tokenizer = storage.join(spec, "tokenizer")
        if storage.isdir(workdir_tokenizer) and storage.isfile(storage.join(spec, "config.json")):
            spec = workdir_tokenizer
        return load_tokenizer(spec)
    return create_tokenizer("gpt2", name_or_path=spec)  # a missing path fails in one line there


def analyze_dataset(config, tokenizer: Tokenizer, output_dir: str, *,
                    prune: float | None = None, top_n: int = 20, source: str = "") -> dict:
    """Analyse the config's data under `tokenizer`; write JSON, plots (and the pruned
    tokenizer with `prune`) into `output_dir`; returns the JSON dict. A URL `output_dir`
    (gs://...): written locally, then each file in one upload."""
    from cleangpt_jax.data import data_label, load_dataset

    if storage.is_url(output_dir):
        local = storage.scratch_dir("token-analysis-")
        result = analyze_dataset(config, tokenizer, local, prune=prune, top_n=top_n,
                                 source=source)
        storage.upload_dir(local, output_dir)
        return result
    if prune is not None:
        check_coverage(prune)
    if top_n < 0:
        raise ConfigError(f"--top_n must be >= 0, got {top_n}")
    config = type(config)(config.to_dict())
    config.model.block_size = 1  # any non-empty stream can be analysed
    data = load_dataset(config, tokenizer)
    groups = text_groups(data)
    counts = count_tokens([s for group in groups for s in group], tokenizer.vocab_size)
    chars = words = 0
    for group in groups:
        c, w = text_length(group, tokenizer)
        chars, words = chars + c, words + w
    stats = token_stats(counts, tokenizer, num_chars=chars, num_words=words, top_n=top_n)
    result = {"tokenizer": {"type": tokenizer.tokenizer_type, "vocab_size": tokenizer.vocab_size,
                            "source": source},
              "data": {"source": data_label(config.data),
                       "num_documents": data.num_documents + data.num_val_documents},
              **stats, "pruned": None}
    os.makedirs(output_dir, exist_ok=True)
    if prune is not None:
        pruned = prune_tokenizer(tokenizer, counts, prune)
        pruned.save_pretrained(os.path.join(output_dir, PRUNED_DIR))
        result["pruned"] = {"directory": PRUNED_DIR, "requested_coverage": prune,
                            "coverage": pruned.coverage, "vocab_size": pruned.vocab_size,
                            "unk_token_id": pruned.unk_token_id}
    result["files"] = {"json": JSON_FILE, "top_tokens_plot": TOP_TOKENS_PLOT,
                       "coverage_plot": COVERAGE_PLOT}
    plot_top_tokens(counts, tokenizer, os.path.join(output_dir, TOP_TOKENS_PLOT))
    plot_coverage(counts, os.path.join(output_dir, COVERAGE_PLOT))
    with open(os.path.join(output_dir, JSON_FILE), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return result


# ------------------------------------------------------------------------------ the CLI

def run(flag_values=None):
    """`python -m cleangpt_jax.token_analysis`: flags are defined here, not at import, so the
    library can be imported next to other CLIs. A test passes private `flag_values` to run it
    in-process on `sys.argv` (`cli.run`)."""
    from absl import flags
    from ml_collections import config_flags

    from cleangpt_jax import cli
    from cleangpt_jax import config as config_lib

    values = flags.FLAGS if flag_values is None else flag_values
    d = {"flag_values": values}

    def define_config(values):
        return config_flags.DEFINE_config_file(
            "config", default=config_lib.__file__, lock_config=True,
            help_string="Config file with get_config() (default: cleangpt_jax/config.py); its "
                        "data and tokenizer sections are used. Override with "
                        "--config.data.key=value.", flag_values=values)

    tok_flag = flags.DEFINE_string("tokenizer", None, "'character' (built from the data), a "
                                   "directory (workdir, saved or HF tokenizer) or a hub name "
                                   "such as 'gpt2' (default: the config's tokenizer section).", **d)
    out_flag = flags.DEFINE_string("output_dir", "token_analysis", "Where the outputs go.", **d)
    prune_flag = flags.DEFINE_float("prune", None, "Build a pruned tokenizer keeping the most "
                                    "frequent tokens that cover this share of the data, e.g. 0.95.",
                                    **d)
    top_flag = flags.DEFINE_integer("top_n", 20, "How many of the most frequent tokens to list.",
                                   **d)

    @cli.tool(usage="--tokenizer=gpt2 --config.data.max_samples=1000",
              errors=(ValueError, OSError))  # project errors are ValueErrors with the fix in them
    def main(argv, flag_values=values):
        config = cli.config_flag_value(flag_values=flag_values)
        storage.check_reachable(out_flag.value, "--output_dir")
        tokenizer = resolve_tokenizer(tok_flag.value, config)
        result = analyze_dataset(config, tokenizer, out_flag.value, prune=prune_flag.value,
                                 top_n=top_flag.value,
                                 source=tok_flag.value or str(config.tokenizer.type))
        print(f"{result['total_tokens']} tokens, {result['unique_tokens']} unique of "
              f"{result['vocab_size']} ({result['vocab_coverage']:.1%} of the vocabulary)")
        print("vocabulary size for coverage: " + ", ".join(
            f"{q}: {n}" for q, n in result["coverage_thresholds"].items()))
        if result["pruned"]:
            p = result["pruned"]
            print(f"pruned tokenizer: {p['vocab_size']} tokens cover {p['coverage']:.4f} -> "
                  f"{storage.join(out_flag.value, p['directory'])}")
        print(f"outputs: {out_flag.value}")

    cli.run(main, define_flags=define_config, flag_values=flag_values)


if __name__ == "__main__":
    run()
