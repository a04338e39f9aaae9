"""Tokenise, pack and cache: documents -> one packed token stream per split, memmapped from disk.

    data = load_dataset(config, tokenizer)        # TokenData: .train, .val (token streams)

Packing: each document's ids are followed by `tokenizer.document_separator()` (EOS for BPE
tokenizers, a newline for the character tokenizer) and the documents concatenated into one
stream. Whitespace-only documents are dropped; no separator follows the last document.

Cache: the streams are written to `cache_dir/<source>-<key>/{train,val}.bin` (`token_dtype`:
uint16 when the vocabulary fits, else uint32) with a `meta.json`, and opened as read-only memmaps
(a cache on a URL such as gs:// is copied to a local mirror first). `key` hashes everything that
determines the streams (`cache_key`: source settings, files and their sizes/mtimes, split
settings, the tokenizer's vocabulary and separator), so a second run with the same settings
reuses it without tokenising. A missing cache is built once per pod by all its processes
(`shards.build_cache`: each tokenises its share of the documents, process 0 packs, meta.json
last), through `cleangpt_jax.storage` on any filesystem; a reader never sees a partial cache.

`tokenizer` here is a `cleangpt_jax.tokenizers.Tokenizer` (encode, vocab_size, fingerprint,
document_separator).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import numpy as np

from cleangpt_jax import storage
from cleangpt_jax.config import ConfigError
from cleangpt_jax.data import shards
from cleangpt_jax.data.mixtures import Mixture, make_schedule
from cleangpt_jax.data.sources import (check_data_section, data_label, data_sections,
                                       get_source, load_documents)

log = logging.getLogger(__name__)

# Bump when the packed stream's layout changes (it is part of every cache key).
PACKING_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TokenData:
    """Packed token streams: 1-D read-only memmaps (or `Mixture`s when `data.mixture` is set).

    `val` is None when the run has no validation data (val_fraction=0 and no val_split).
    `cache_path` is the cache directory (a tuple of them, one per source, for a mixture).
    `num_documents` / `num_val_documents` count the non-empty documents packed.
    """

    train: Any
    val: Any
    cache_path: str | tuple[str, ...]
    num_documents: int
    num_val_documents: int = 0


def token_dtype(vocab_size: int):
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def default_cache_dir() -> str:
    """$CLEANGPT_JAX_CACHE, else ~/.cache/cleangpt_jax (token caches live in its `tokens/`)."""
    root = (os.environ.get("CLEANGPT_JAX_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "cleangpt_jax"))
    return os.path.join(root, "tokens")


def cache_key(data, tokenizer) -> tuple[str, dict]:
    """(hash, the JSON-able description it hashes) of everything that determines the token
    streams of the data section `data` under `tokenizer`."""
    check_data_section(data)
    description = {
        "packing": PACKING_VERSION,
        "source": data.source,
        "documents": get_source(data.source).fingerprint(data),
        "text_column": data.get("text_column"),
        "max_samples": data.get("max_samples"),
        "val_split": data.get("val_split"),
        "val_fraction": None if data.get("val_split") else (data.get("val_fraction") or 0.0),
        "tokenizer": {"type": tokenizer.tokenizer_type, "files": tokenizer.fingerprint(),
                      "separator": tokenizer.document_separator()},
    }
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16], description


def _open_stream(path, dtype, num_tokens: int) -> np.ndarray:
    if num_tokens == 0:
        return np.zeros(0, dtype)
    return np.memmap(os.fspath(path), dtype=dtype, mode="r", shape=(num_tokens,))


def _size(path: str) -> int:
    """The size in bytes of file `path` (local or a URL)."""
    size, _version = storage.file_version(path)
    return size


def _read_cache(directory: str) -> dict | None:
    """The cache's meta.json if the directory holds a complete cache, else None. (A URL that
    cannot be read, as opposed to a file not there, is `storage`'s one-line ConfigError.)"""
    try:
        meta = json.loads(storage.read_text(storage.join(directory, "meta.json")))
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            n = meta[f"{split}_tokens"]
            if n is not None and _size(storage.join(directory, f"{split}.bin")) != n * itemsize:
                return None
        return meta
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _local_copy(directory: str, meta: dict) -> str:
    """`directory` when local, else its streams copied (once, atomically) to
    `default_cache_dir()/mirror/<name>`, for memmapping (the name holds the cache key)."""
    if not storage.is_url(directory):
        return directory
    local = os.path.join(default_cache_dir(), "mirror", storage.basename(directory))
    os.makedirs(local, exist_ok=True)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        n, source = meta[f"{split}_tokens"], storage.join(directory, f"{split}.bin")
        target = os.path.join(local, f"{split}.bin")
        if n is not None and not (os.path.exists(target)
                                  and os.path.getsize(target) == n * itemsize):
            log.info("copying %s to %s", source, target)
            storage.write_with(target, lambda f, source=source: _copy_into(source, f))
    return local


def _copy_into(source: str, file) -> None:
    """Stream file `source` (a URL) into the open binary `file`, 16 MiB at a time."""
    with storage.open_file(source, "rb") as remote:
        shutil.copyfileobj(remote, file, 16 << 20)


def _processes_sharing(cache_dir: str) -> tuple[int, int]:
    """(process_index, process_count) for building a missing cache: JAX's, when every process
    sees the files process 0 writes in `cache_dir` (a bucket, a shared disk); else (0, 1), each
    process building its own cache (a local disk per host). With several processes this is a
    collective: every process calls it."""
    import jax

    if not jax.distributed.is_initialized():  # (one process; its backend is left unstarted)
        return 0, 1
    count = jax.process_count()
    if count == 1:
        return 0, 1
    from jax.experimental import multihost_utils

    token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.uint8))
    probe = storage.join(cache_dir, f".shared-{bytes(np.asarray(token, np.uint8)).hex()}")
    if jax.process_index() == 0:
        storage.makedirs(cache_dir)
        storage.write_text(probe, "written by process 0")
    multihost_utils.process_allgather(np.int32(0))  # (a barrier: the probe is written)
    seen = multihost_utils.process_allgather(np.int32(storage.exists(probe)))
    if jax.process_index() == 0:
        try:
            storage.remove(probe)
        except FileNotFoundError:
            pass
    if np.all(seen):
        return jax.process_index(), count
    log.warning("%d of %d processes do not see the token cache directory %s: each process builds "
                "its own cache; set data.cache_dir to a path all of them share (gs://bucket/"
                "cache) to tokenise once", int(count - np.sum(seen)), count, cache_dir)
    return 0, 1


def _check_wait_seconds(value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"data.cache_wait_seconds must be a positive number of seconds, got "
                          f"{value!r}")


def _check_length(stream, block_size: int, what: str, fix: str) -> None:
    if len(stream) < block_size:
        raise ConfigError(f"the {what} data has {len(stream)} tokens, shorter than one block "
                          f"(block_size={block_size}): {fix}")


def _load_single(data, tokenizer, cache_dir: str, block_size, processes):
    key, description = cache_key(data, tokenizer)
    directory = storage.join(cache_dir, f"{data.source}-{key}")
    meta = _read_cache(directory)
    if meta is None:
        process_index, process_count = processes
        shards.build_cache(load_documents(data), tokenizer, directory, description,
                           dtype=token_dtype(tokenizer.vocab_size), source=data.source,
                           num_proc=data.get("num_proc"), process_index=process_index,
                           process_count=process_count,
                           wait_seconds=float(data.cache_wait_seconds),
                           is_complete=lambda: _read_cache(directory) is not None)
        meta = _read_cache(directory)
        if meta is None:
            raise ConfigError(f"token cache {directory} could not be read back after writing it: "
                              "check the disk, or set data.cache_dir elsewhere")
    else:
        log.info("using token cache %s", directory)
    local = _local_copy(directory, meta)
    dtype = np.dtype(meta["dtype"])
    train = _open_stream(os.path.join(local, "train.bin"), dtype, meta["train_tokens"])
    val = None
    if meta["val_tokens"] is not None:
        val = _open_stream(os.path.join(local, "val.bin"), dtype, meta["val_tokens"])
    if meta["num_documents"] == 0:
        raise ConfigError(f"the dataset is empty (source={data.source!r}: every document is "
                          "blank): check data.name/data.files/data.split/data.text_column")
    _check_length(train, block_size, "training",
                  "add data (data.max_samples, data.files), lower data.val_fraction or "
                  "model.block_size")
    if val is not None:
        _check_length(val, block_size, "validation",
                      "raise data.val_fraction, use a bigger data.val_split or lower "
                      "model.block_size")
    return TokenData(train, val, directory, meta["num_documents"],
                     meta["num_val_documents"])


def load_dataset(config, tokenizer, *, cache_dir: str | None = None,
                 process_index: int | None = None, process_count: int | None = None) -> TokenData:
    """The packed token streams of `config.data` under `tokenizer`, from the cache when possible.

    `cache_dir` (a local path or a URL such as gs://bucket/cache) defaults to
    `config.data.cache_dir`, else `default_cache_dir()`. A missing cache is built by all the
    processes together (`shards`: each tokenises its share, process 0 packs, the others wait);
    `process_index` / `process_count` default to JAX's when all processes see `cache_dir`, else
    to (0, 1) (each builds its own); passed explicitly, the caller vouches that `cache_dir` is
    shared. The streams must hold at least one block (`config.model.block_size`) of tokens.
    With `data.mixture`, `train` and `val` are `Mixture`s of the sources' streams (each source
    cached on its own).
    """
    cache_dir = os.fspath(cache_dir or config.data.get("cache_dir") or default_cache_dir())
    if not storage.is_url(cache_dir):
        cache_dir = os.path.expanduser(cache_dir)
    if process_index is None or process_count is None:
        process_index, process_count = _processes_sharing(cache_dir)
    _check_wait_seconds(config.data.cache_wait_seconds)
    block_size = int(config.model.block_size)
    sections = data_sections(config)
    parts = [_load_single(data, tokenizer, cache_dir, block_size,
                          (process_index, process_count)) for data in sections]
    mixture = config.data.get("mixture")
    if not mixture:
        return parts[0]
    schedule = make_schedule(mixture.get("schedule") or {}, len(parts))
    names = tuple(data_label(d) for d in sections)
    has_val = all(p.val is not None for p in parts)
    return TokenData(
        train=Mixture(tuple(p.train for p in parts), schedule, names),
        val=Mixture(tuple(p.val for p in parts), schedule, names) if has_val else None,
        cache_path=tuple(p.cache_path for p in parts),
        num_documents=sum(p.num_documents for p in parts),
        num_val_documents=sum(p.num_val_documents for p in parts))
