"""Helpers shared by the test modules.

run_tool: a tool's command line run in-process (its own flag parsing, errors and exit code,
without a subprocess's seconds of imports). persistent_compile_cache: compiling, not running,
is what the tiny runs in these tests cost; with one persistent XLA cache per module each
program compiles once, in the test process or in any CLI subprocess. one_line_error: the
message of a raised project error, checked to be the one line the standards ask for.
GPT2_TOKENIZER_DIR: GPT-2's real tokenizer, committed under tests/data.
"""

from __future__ import annotations

import contextlib
import os
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GPT-2's real tokenizer (vocab.json + merges.txt, 50,257 tokens), committed so that tests and
# scripts have it without the hub: scripts/build_gpt2_tokenizer.py built it from openai-whisper's
# sdist (tests/data/gpt2_tokenizer/README.md). Scripts outside tests/ use the same path relative
# to the repository root.
GPT2_TOKENIZER_DIR = os.path.join(REPO, "tests", "data", "gpt2_tokenizer")


# XLA flags of every test process (conftest.py sets them for pytest's own processes, and the
# environments below pass them on): XLA:CPU's elemental emitters instead of its fusion
# emitters compile the tests' small programs in about half the time, and one LLVM module
# instead of up to 32 parts compiled in parallel saves another ~13% on two cores.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"


def xla_flags(*more: str) -> str:
    """XLA_FLAGS for a test subprocess: TEST_XLA_FLAGS plus `more` (e.g. a device count)."""
    return " ".join((TEST_XLA_FLAGS, *more))


@contextlib.contextmanager
def persistent_compile_cache(path: str, *, fast_compile: bool = False):
    """Inside the block this process caches every compiled program under `path`; yields the
    environment for subprocesses that share the cache (CPU, this checkout on PYTHONPATH,
    TEST_XLA_FLAGS and no other XLA_FLAGS from the caller). fast_compile turns XLA's
    optimisation passes off: ~3x cheaper compiles, still millisecond steps, and bitwise
    comparisons stay valid between programs compiled the same way. The previous settings are
    restored afterwards."""
    flags = {"jax_compilation_cache_dir": path,
             "jax_persistent_cache_min_compile_time_secs": 0.0,
             "jax_persistent_cache_min_entry_size_bytes": -1,
             "jax_compilation_cache_max_size": 2**32}  # a size limit turns on file locking
    if fast_compile:
        flags["jax_disable_most_optimizations"] = True
    old = {k: getattr(jax.config, k) if hasattr(jax.config, k) else jax.config.read(k)
           for k in flags}  # (jax_disable_most_optimizations has no attribute)
    for k, v in flags.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=path,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
               JAX_COMPILATION_CACHE_MAX_SIZE=str(2**32),
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    if fast_compile:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    env["XLA_FLAGS"] = xla_flags()
    try:
        yield env
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


# What the tests' runs leave out, unless they check it: the end-of-run picture (tests/test_plot.py
# checks it) and the CPU matmul that measures the MFU's peak (tests/test_observe.py checks it).
# About a second of CPU per run otherwise.
QUIET_RUN = {"train.curves": False, "train.peak_flops": 1e12}


def one_line_error(excinfo) -> str:
    """The message of `pytest.raises(...)`'s exception, asserted to be one line."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def run_tool(run, argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`run` (a tool's `python -m` entry point, e.g. cleangpt_jax.train.run) in-process on the
    command line `argv` (argv[0] the program), its flags on a private FlagValues (`cli.run`):
    (exit code, stdout, stderr). The log verbosity and the environment variables the tool sets
    (hub.offline_reason's HF_HUB_OFFLINE) are restored afterwards."""
    from absl import flags, logging

    monkeypatch.setattr(sys, "argv", list(argv))
    environ, verbosity = dict(os.environ), logging.get_verbosity()
    capsys.readouterr()
    code = 0
    try:
        run(flag_values=flags.FlagValues())
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    finally:
        logging.set_verbosity(verbosity)
        os.environ.clear()
        os.environ.update(environ)
    out = capsys.readouterr()
    return code, out.out, out.err
