"""The persistent compilation cache every tool turns on: a rerun or a resume loads its
compiled programs from disk instead of compiling them again.

    with compile_cache.persistent_cache():      # what `cli.run` wraps each tool's main in
        ...

Where (first that applies):
    jax_compilation_cache_dir already set       kept: JAX_COMPILATION_CACHE_DIR in the
                                                environment, or a caller's jax.config.update
    CLEANGPT_JAX_COMPILATION_CACHE=off          no persistent cache
    CLEANGPT_JAX_COMPILATION_CACHE=PATH         PATH
    otherwise                                   $CLEANGPT_JAX_CACHE/jax_cache, else
                                                ~/.cache/cleangpt_jax/jax_cache

jax stores a program there when compiling it took at least
jax_persistent_cache_min_compile_time_secs (1 s by default: the train and distillation steps,
not the small helpers). The setting is restored when the block ends, so a tool run in-process
(the tests' run_tool) leaves the caller's jax configuration as it found it.
"""

from __future__ import annotations

import contextlib
import os

ENV = "CLEANGPT_JAX_COMPILATION_CACHE"
OFF = "off"


def cache_dir() -> str | None:
    """The directory the tools cache compiled programs in (see the module docstring); None
    when the cache is off or jax's own setting is kept."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() == OFF:
        return None
    if setting:
        return os.path.expanduser(setting)
    root = (os.environ.get("CLEANGPT_JAX_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "cleangpt_jax"))
    return os.path.join(root, "jax_cache")


@contextlib.contextmanager
def persistent_cache():
    """Inside the block jax caches compiled programs in `cache_dir()` unless
    jax_compilation_cache_dir was already set; yields the directory in use (None: none)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    path = None if current else cache_dir()
    if path is None:
        yield current or None
        return
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # (jax reads the setting once, at its first compile)
    try:
        yield path
    finally:
        jax.config.update("jax_compilation_cache_dir", current)
        compilation_cache.reset_cache()
