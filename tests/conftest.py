"""Shared pytest fixtures."""

import pytest

from cleangpt_jax.tokenizers.testing import build_local_gpt2_tokenizer
from helpers import persistent_compile_cache


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> str:
    """Directory with a small byte-level BPE tokenizer in GPT-2 format (vocab.json + merges.txt,
    300 tokens, <|endoftext|> = 0), loadable by transformers.AutoTokenizer without the hub."""
    return build_local_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"))


@pytest.fixture(scope="module")
def fast_compile(tmp_path_factory) -> dict[str, str]:
    """For a module whose tests check what programs compute, not how fast: XLA's optimisation
    passes off (~3x cheaper compiles) and one persistent compilation cache, in a fresh
    directory, for the module and the subprocesses it starts with the yielded environment.
    Opt in with `pytestmark = pytest.mark.usefixtures("fast_compile")`."""
    path = str(tmp_path_factory.mktemp("jit_cache"))
    with persistent_compile_cache(path, fast_compile=True) as env:
        yield env
