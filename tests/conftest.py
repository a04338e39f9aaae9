"""Shared pytest fixtures."""

import pytest

from cleangpt_jax.tokenizers.testing import build_local_gpt2_tokenizer


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> str:
    """Directory with a small byte-level BPE tokenizer in GPT-2 format (vocab.json + merges.txt,
    300 tokens, <|endoftext|> = 0), loadable by transformers.AutoTokenizer without the hub."""
    return build_local_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"))
