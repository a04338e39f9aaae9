"""Shared pytest fixtures, and the order in which pytest-xdist hands out the test files."""

import os

from helpers import TEST_XLA_FLAGS

# Before any test starts JAX's CPU backend (which reads XLA_FLAGS once).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), TEST_XLA_FLAGS]))

import pytest  # noqa: E402

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


# The longest files first (measured with --durations=0), the rest in their usual order: with
# `-n auto --dist loadfile` each worker takes the next whole file when it is free, so starting
# with the long ones lets the workers finish together. xdist would otherwise reorder the files
# by their number of tests, which says little about their time.
LONGEST_FIRST = ["test_train.py", "test_docs.py", "test_fault_injection.py",
                 "test_distill_study.py", "test_distill.py", "test_generation.py",
                 "test_memory_forms.py", "test_compile.py", "test_gcs.py", "test_notebook.py",
                 "test_hf.py", "test_evaluation.py", "test_configs.py", "test_models.py",
                 "test_attention_kernels.py", "test_kernels.py", "test_distill_units.py",
                 "test_document_mask.py", "test_observe.py", "test_reliability.py",
                 "test_gpt2_vocab.py", "test_plot.py", "test_lm_eval.py"]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(item.fspath), len(rank)))
