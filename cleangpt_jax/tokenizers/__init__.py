"""Tokenizers, the registry that creates and loads them by name, and the one a config describes.

    tok = create_tokenizer("character", text=corpus)
    tok = create_tokenizer("gpt2", name_or_path="gpt2")
    tok = build_tokenizer(config)                      # config.tokenizer, fitted to config.data
    tok.save_pretrained(d); tok = load_tokenizer(d)

    base.py       the `Tokenizer` interface: encode/decode, batching, the separator between
                  packed documents and the fingerprint that keys the token cache;
                  `check_vocab`, the one tokenizer-versus-model vocabulary check
    character.py  one id per character;  gpt2.py  GPT-2's byte-level BPE (Hugging Face files)
    pruned.py     a tokenizer restricted to part of another's vocabulary, built by
                  `python -m cleangpt_jax.token_analysis --prune=COVERAGE`; loads like the others
    registry.py   `register_tokenizer`, `create_tokenizer`, `load_tokenizer`
    build.py      `build_tokenizer(config)`
    testing.py    a tiny local GPT-2-format tokenizer for tests (no network)
"""

from .base import MARKER_FILE, Tokenizer, check_vocab, read_marker
from .build import build_tokenizer
from .character import CharacterTokenizer
from .gpt2 import GPT2Tokenizer
from .pruned import PrunedTokenizer
from .registry import (create_tokenizer, get_tokenizer_class, load_tokenizer, register_tokenizer,
                       registered_tokenizers)

register_tokenizer("character", CharacterTokenizer)
register_tokenizer("gpt2", GPT2Tokenizer)
register_tokenizer("pruned", PrunedTokenizer)

__all__ = ["Tokenizer", "CharacterTokenizer", "GPT2Tokenizer", "PrunedTokenizer",
           "register_tokenizer", "registered_tokenizers", "get_tokenizer_class",
           "create_tokenizer", "load_tokenizer", "build_tokenizer", "check_vocab"]
