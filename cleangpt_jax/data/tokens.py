"""Tokenise, pack and cache: documents -> one packed token stream per split, memmapped from disk.

    data = load_dataset(config, tokenizer)        # TokenData: .train, .val (token streams)

Packing: the documents are tokenised with `datasets.Dataset.map` (batched; several processes for
big datasets) and concatenated into one stream with `tokenizer.document_separator()` between
documents (EOS for BPE tokenizers, a newline for the character tokenizer). Whitespace-only
documents are dropped; no separator follows the last document.

Cache: the streams are written to `cache_dir/<source>-<key>/{train,val}.bin` (`token_dtype`:
uint16 when the vocabulary fits, else uint32) with a `meta.json`, and opened as read-only memmaps.
`key` hashes everything that determines the streams (`cache_key`: source settings, files and
their sizes/mtimes, split settings, the tokenizer's vocabulary and separator), so a second run
with the same settings reuses it without tokenising. The directory is built under a temporary
name and renamed into place: an interrupted run never leaves a partial cache. A URL cache_dir
(gs://...): the caches live there and are memmapped from a local copy under
`default_cache_dir()/mirrors/`; one built here is uploaded with its meta.json last.

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
import tempfile
from typing import Any

import numpy as np

from cleangpt_jax import storage
from cleangpt_jax.config import ConfigError
from cleangpt_jax.data.mixtures import Mixture, make_schedule
from cleangpt_jax.data.sources import (check_data_section, data_label, data_sections,
                                       get_source, load_documents)

log = logging.getLogger(__name__)

# Bump when the packed stream's layout changes (it is part of every cache key).
PACKING_VERSION = 1
# Automatic tokenisation: one process per this many documents, at most `_MAX_AUTO_PROC`.
_DOCS_PER_PROC = 5000
_MAX_AUTO_PROC = 16


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


def _local_mirror(url: str) -> str:
    """The local directory that holds copies of the token caches under URL `url`."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(default_cache_dir(), "mirrors", digest)


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


def _tokenize_batch(batch, *, tokenizer, separator):
    """datasets.map function: non-empty documents -> token ids + separator."""
    return {"ids": [list(tokenizer.encode(t)) + separator for t in batch["text"] if t.strip()]}


def _num_proc(requested, num_documents: int) -> int:
    if requested:
        return max(1, int(requested))
    return max(1, min(os.cpu_count() or 1, _MAX_AUTO_PROC, num_documents // _DOCS_PER_PROC))


def _pack(docs, tokenizer, separator, path, dtype, *, workdir, num_proc, what) -> tuple[int, int]:
    """Tokenise `docs` and write the packed stream to `path`; returns (num_tokens,
    num_documents)."""
    import datasets
    import pyarrow.compute as pc

    procs = _num_proc(num_proc, len(docs))
    log.info("tokenising %d %s documents with %d process(es)", len(docs), what, procs)
    ids = docs.map(_tokenize_batch, batched=True, remove_columns=docs.column_names,
                   fn_kwargs={"tokenizer": tokenizer, "separator": separator},
                   features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
                   num_proc=procs if procs > 1 else None, load_from_cache_file=False,
                   cache_file_name=os.path.join(workdir, f"{what}_ids.arrow"),
                   new_fingerprint=f"{os.path.basename(workdir)}-{what}", desc=f"Tokenising {what}")
    num_tokens = 0
    with open(path, "wb") as f:
        for table in ids.with_format("arrow").iter(batch_size=16384):
            flat = pc.list_flatten(table.column("ids")).to_numpy()
            f.write(flat.astype(dtype).tobytes())
            num_tokens += flat.size
        num_tokens = max(0, num_tokens - len(separator))  # no separator after the last document
        f.truncate(num_tokens * dtype.itemsize)
    num_documents = len(ids)
    del ids
    for name in os.listdir(workdir):  # the intermediate Arrow files
        if name.startswith(f"{what}_ids"):
            os.remove(os.path.join(workdir, name))
    return num_tokens, num_documents


def _open_stream(path: str, dtype, num_tokens: int) -> np.ndarray:
    if num_tokens == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


def _build_cache(data, tokenizer, directory, description) -> None:
    """Tokenise and write `directory` (train.bin, val.bin, meta.json) atomically."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        docs = load_documents(data)
        dtype = token_dtype(tokenizer.vocab_size)
        sep = tokenizer.document_separator()
        pack = dict(workdir=tmp, num_proc=data.get("num_proc"))
        meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "key": description}
        train_path, val_path = os.path.join(tmp, "train.bin"), os.path.join(tmp, "val.bin")
        meta["train_tokens"], meta["num_documents"] = _pack(
            docs.train, tokenizer, sep, train_path, dtype, **pack, what="train")
        meta["val_tokens"], meta["num_val_documents"] = None, 0
        if docs.val is not None:
            meta["val_tokens"], meta["num_val_documents"] = _pack(
                docs.val, tokenizer, sep, val_path, dtype, **pack, what="val")
        elif docs.val_token_fraction:  # a single document: split its tokens
            n = meta["train_tokens"]
            n_val = min(n, max(1, round(n * docs.val_token_fraction)))
            stream = np.fromfile(train_path, dtype=dtype)
            stream[n - n_val:].tofile(val_path)
            with open(train_path, "r+b") as f:
                f.truncate((n - n_val) * dtype.itemsize)
            meta["train_tokens"], meta["val_tokens"] = n - n_val, n_val
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same cache first: keep theirs
            if not os.path.isfile(os.path.join(directory, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(directory) -> dict | None:
    """The cache's meta.json if the directory holds a complete cache, else None."""
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            n = meta[f"{split}_tokens"]
            path = os.path.join(directory, f"{split}.bin")
            if n is not None and os.path.getsize(path) != n * itemsize:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_length(stream, block_size: int, what: str, fix: str) -> None:
    if len(stream) < block_size:
        raise ConfigError(f"the {what} data has {len(stream)} tokens, shorter than one block "
                          f"(block_size={block_size}): {fix}")


def _load_single(data, tokenizer, cache_dir, block_size):
    key, description = cache_key(data, tokenizer)
    directory = os.path.join(cache_dir, f"{data.source}-{key}")
    meta = _read_cache(directory)
    if meta is None:
        if os.path.exists(directory):
            log.warning("token cache %s is incomplete or corrupt: rebuilding it", directory)
            shutil.rmtree(directory)
        _build_cache(data, tokenizer, directory, description)
        meta = _read_cache(directory)
        if meta is None:
            raise ConfigError(f"token cache {directory} could not be read back after writing it: "
                              "check the disk, or set data.cache_dir elsewhere")
    else:
        log.info("using token cache %s", directory)
    dtype = np.dtype(meta["dtype"])
    train = _open_stream(os.path.join(directory, "train.bin"), dtype, meta["train_tokens"])
    val = None
    if meta["val_tokens"] is not None:
        val = _open_stream(os.path.join(directory, "val.bin"), dtype, meta["val_tokens"])
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
    return TokenData(train, val, directory, meta["num_documents"], meta["num_val_documents"])


def load_dataset(config, tokenizer, *, cache_dir: str | None = None) -> TokenData:
    """The packed token streams of `config.data` under `tokenizer`, from the cache when possible.

    `cache_dir` defaults to `config.data.cache_dir`, else `default_cache_dir()`. The streams must
    hold at least one block (`config.model.block_size`) of tokens. With `data.mixture`, `train` and
    `val` are `Mixture`s of the sources' streams (each source cached on its own).
    """
    cache_dir = cache_dir or config.data.get("cache_dir") or default_cache_dir()
    remote = cache_dir if storage.is_url(cache_dir) else None
    cache_dir = _local_mirror(remote) if remote else os.path.expanduser(cache_dir)
    block_size = int(config.model.block_size)
    sections = data_sections(config)
    names = [f"{d.source}-{cache_key(d, tokenizer)[0]}" for d in sections] if remote else []
    for name in names:  # a cache in the bucket is read from a local copy
        there = storage.join(remote, name)
        if _read_cache(os.path.join(cache_dir, name)) is None and \
                storage.isfile(storage.join(there, "meta.json")):
            storage.download_dir(there, os.path.join(cache_dir, name), last="meta.json")
    parts = [_load_single(data, tokenizer, cache_dir, block_size) for data in sections]
    for name in names:  # and one built here is put there, meta.json (completeness) last
        there = storage.join(remote, name)
        if not storage.isfile(storage.join(there, "meta.json")):
            storage.upload_dir(os.path.join(cache_dir, name), there, last="meta.json")
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
