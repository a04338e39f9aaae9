"""The token cache's build, once per pod: every process tokenises its share, process 0 packs.

    build_cache(docs, tokenizer, directory, description, dtype=..., process_index=p,
                process_count=P, ...)

The documents of each part ('train', and 'val' when validation is a separate set) are cut into
shards of `DOCS_PER_SHARD` consecutive documents; process p tokenises the shards j with
j mod P == p (with `num_proc` local workers) into `<cache_dir>/.<name>.shards-<S>/<part>-<j>.npz`
(the shard's ids, each non-empty document followed by the separator, and each document's token
count, 0 for a blank one). Process 0 waits for every shard, concatenates them in document order
into the cache's train.bin / val.bin (no separator after the last document) and writes
meta.json last; the others wait for meta.json. So each document is tokenised exactly once
across the pod, and the cache is the same bytes whatever the process count.

Atomic on any filesystem (`cleangpt_jax.storage`: local, gs://, ...): every file is written
in one step (`storage.write_with`, `storage.write_bytes`), a local one under a temporary name
and renamed into place, an object in one upload committed when its writer returns (it
appears only once complete), and a cache counts as complete only once its meta.json exists and the streams have
the sizes it records. The processes never write the same file with different contents, so two
of them cannot corrupt each other. A pod's crashed process leaves finished shards (reused by the
pod's next build: they are named by the cache key and the shard size, and skipped when present)
and temporary files (ignored). A single process builds in a private directory, removed when it
finishes or fails, so independent runs building the same cache at once never share a shard.

A stream (`data.streaming`) is read once, lazily, by every process: each holds the texts of one
of its shards at a time (2 x num_proc with local workers), so memory stays bounded whatever
`max_samples` is. Its validation documents
(the last `val_document_fraction` of them) are cut off when its length is known, after reading.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import multiprocessing
import os
import time
import uuid
from typing import Callable, Iterator

import numpy as np

from cleangpt_jax import storage
from cleangpt_jax.config import ConfigError

log = logging.getLogger(__name__)

# Documents per shard: the unit of work that processes share and a crashed build keeps.
DOCS_PER_SHARD = 1000
# Polling for other processes' files: the first interval, doubled up to the last.
_POLL_FIRST_S, _POLL_MAX_S = 0.05, 1.0


def _names(directory: str) -> set[str]:
    """The names in `directory`; none when it does not exist (an object store has no empty
    directories)."""
    try:
        return set(storage.listdir(directory))
    except FileNotFoundError:
        return set()


def _shard_name(part: str, shard: int) -> str:
    return f"{part}-{shard:06d}.npz"


def _num_shards(num_documents: int) -> int:
    return -(-num_documents // DOCS_PER_SHARD)


# ----------------------------------------------------------------------------- tokenising
def _texts_of_shards(docs, mine: Callable[[int], bool], counted: list) -> Iterator:
    """(shard, texts) for the shards `mine` accepts, lazily; `counted[0]` is set to the number of
    documents once the generator is exhausted. A `datasets.Dataset` is read shard by shard; a
    stream (anything else iterable) is read once, keeping one shard's texts at a time."""
    import datasets

    if isinstance(docs, datasets.Dataset):
        counted[0] = len(docs)
        for shard in range(_num_shards(len(docs))):
            if mine(shard):
                yield shard, docs[shard * DOCS_PER_SHARD:(shard + 1) * DOCS_PER_SHARD]["text"]
        return
    texts, n = [], 0
    for n, row in enumerate(docs, start=1):
        shard = (n - 1) // DOCS_PER_SHARD
        if mine(shard):
            texts.append(row["text"])
        if n % DOCS_PER_SHARD == 0 and texts:
            yield shard, texts
            texts = []
    counted[0] = n
    if texts:
        yield _num_shards(n) - 1, texts


def tokenize_shard(tokenizer, separator, dtype, texts) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths): the non-empty texts' ids, each followed by `separator`, concatenated
    (`dtype`), and each text's token count (int64; 0 for a whitespace-only text)."""
    pieces = [np.asarray(list(tokenizer.encode(t)) + separator, dtype) if t.strip()
              else np.zeros(0, dtype) for t in texts]
    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype), lengths


class _ShardWriter:
    """Tokenises one shard's texts and writes its file (also run in forked workers)."""

    def __init__(self, tokenizer, separator, dtype, work: str, part: str):
        self.tokenizer, self.separator, self.dtype = tokenizer, separator, dtype
        self.work, self.part = work, part

    def __call__(self, shard: int, texts) -> None:
        ids, lengths = tokenize_shard(self.tokenizer, self.separator, self.dtype, texts)
        storage.write_with(storage.join(self.work, _shard_name(self.part, shard)),
                           lambda f: np.savez(f, ids=ids, lengths=lengths))


_WORKER: _ShardWriter | None = None  # the forked worker's writer (set by _init_worker)


def _init_worker(writer: _ShardWriter) -> None:
    global _WORKER
    _WORKER = writer


def _run_worker(shard: int, texts) -> None:
    _WORKER(shard, texts)


def _write_shards(jobs: Iterator, writer: _ShardWriter, procs: int) -> None:
    """writer(shard, texts) for every job, in this process or in `procs` forked workers (at
    most 2 * procs shards' texts in flight, so a stream is never read far ahead)."""
    if procs <= 1:
        for shard, texts in jobs:
            writer(shard, texts)
        return
    # fork: the workers inherit the tokenizer instead of unpickling it
    with multiprocessing.get_context("fork").Pool(procs, _init_worker, (writer,)) as pool:
        pending = collections.deque()
        for shard, texts in jobs:
            pending.append(pool.apply_async(_run_worker, (shard, texts)))
            while len(pending) >= 2 * procs:
                pending.popleft().get()
        while pending:
            pending.popleft().get()


def _tokenize_part(docs, part, writer_args, *, process_index, process_count, procs) -> int:
    """Write this process's missing shards of `docs`; returns the number of documents."""
    present = _names(writer_args[3])
    mine = lambda shard: (shard % process_count == process_index  # noqa: E731
                          and _shard_name(part, shard) not in present)
    counted = [0]
    _write_shards(_texts_of_shards(docs, mine, counted), _ShardWriter(*writer_args, part), procs)
    return counted[0]


# ------------------------------------------------------------------------------ packing
def _read_shard(path: str, key: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(path)))[key]


def _pieces(shards: list[str], lengths: list[np.ndarray], first: int, last: int,
            separator_length: int) -> Iterator[np.ndarray]:
    """The packed tokens of documents [first, last) (over the shards, in order), the separator
    after the last document dropped, as consecutive arrays."""
    doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    remaining = max(0, int(doc_lengths[first:last].sum()) - separator_length)
    start = 0
    for path, shard_lengths in zip(shards, lengths):
        lo, hi = max(first, start) - start, min(last, start + len(shard_lengths)) - start
        start += len(shard_lengths)
        if lo >= hi or remaining == 0:
            continue
        offsets = np.concatenate([[0], np.cumsum(shard_lengths)])
        piece = _read_shard(path, "ids")[offsets[lo]:offsets[hi]][:remaining]
        remaining -= len(piece)
        yield piece


def _window(pieces: Iterator[np.ndarray], begin: int, end: int) -> Iterator[np.ndarray]:
    """Tokens [begin, end) of the stream that `pieces` concatenate."""
    at = 0
    for piece in pieces:
        lo, hi = max(begin - at, 0), min(end - at, len(piece))
        at += len(piece)
        if lo < hi:
            yield piece[lo:hi]


def _write_stream(path: str, pieces: Iterator[np.ndarray], dtype) -> int:
    """Write the pieces to `path` (atomically); returns the number of tokens."""
    count = [0]

    def write(f):
        for piece in pieces:
            f.write(piece.astype(dtype, copy=False).tobytes())
            count[0] += len(piece)
    storage.write_with(path, write)
    return count[0]


def _split_point(n: int, fraction: float) -> int:
    """Documents that stay in training when the last `fraction` of n (> 1) are validation."""
    return n - min(n - 1, max(1, round(n * fraction)))


def _pack(docs, counts, work, directory, dtype, separator) -> dict:
    """Concatenate the shards into directory/{train,val}.bin; returns meta's stream fields."""
    shards = {part: [storage.join(work, _shard_name(part, j)) for j in range(_num_shards(n))]
              for part, n in counts.items()}
    lengths = {part: [_read_shard(p, "lengths") for p in paths] for part, paths in shards.items()}
    n = counts["train"]

    def pieces(part, first, last):
        return _pieces(shards[part], lengths[part], first, last, len(separator))

    def non_empty(part, first, last):
        return int((np.concatenate(lengths[part])[first:last] > 0).sum())

    def write(name, stream):
        return _write_stream(storage.join(directory, f"{name}.bin"), stream, dtype)

    out = {"val_tokens": None, "num_val_documents": 0}
    train_docs = n
    if "val" in counts:  # a named validation split
        out["val_tokens"] = write("val", pieces("val", 0, counts["val"]))
        out["num_val_documents"] = non_empty("val", 0, counts["val"])
    elif docs.val_document_fraction and n > 1:  # a stream's last documents
        train_docs = _split_point(n, docs.val_document_fraction)
        out["val_tokens"] = write("val", pieces("train", train_docs, n))
        out["num_val_documents"] = non_empty("train", train_docs, n)
    token_fraction = docs.val_token_fraction or (docs.val_document_fraction if n == 1 else 0.0)
    if token_fraction:  # a single document: its last tokens are validation
        total = max(0, int(np.concatenate(lengths["train"]).sum()) - len(separator))
        n_val = min(total, max(1, round(total * token_fraction)))
        out["val_tokens"] = write("val", _window(pieces("train", 0, n), total - n_val, total))
        out["train_tokens"] = write("train", _window(pieces("train", 0, n), 0, total - n_val))
    else:
        out["train_tokens"] = write("train", pieces("train", 0, train_docs))
    out["num_documents"] = non_empty("train", 0, train_docs)
    order = ("train_tokens", "num_documents", "val_tokens", "num_val_documents")
    return {key: out[key] for key in order}


# ------------------------------------------------------------------------------ the build
def wait_for(done: Callable[[], bool], what: Callable[[], str], timeout_s: float) -> None:
    """Poll `done()` (backing off from 0.05 s to 1 s) until it holds; ConfigError naming
    `what()` after `timeout_s` seconds."""
    deadline, interval = time.monotonic() + timeout_s, _POLL_FIRST_S
    while not done():
        if time.monotonic() > deadline:
            raise ConfigError(f"waited {timeout_s:.0f}s for {what()}: check the other processes' "
                              "logs (one may have failed), or raise data.cache_wait_seconds")
        time.sleep(interval)
        interval = min(2 * interval, _POLL_MAX_S)


def build_cache(docs, tokenizer, directory: str, description: dict, *, dtype,
                source: str, num_proc: int, process_index: int, process_count: int,
                wait_seconds: float, is_complete: Callable[[], bool]) -> None:
    """Build the cache `directory` (train.bin, val.bin, meta.json; tokens of `dtype`) together
    with the other processes (see the module docstring); returns once it is complete. `docs` is
    a `sources.Documents`; `is_complete()` tells whether the cache is complete (another run may
    finish it first)."""
    separator = tokenizer.document_separator()
    if process_count > 1:  # shared by the pod's processes (and kept for its next build)
        work_name = f".{storage.basename(directory)}.shards-{DOCS_PER_SHARD}"
    else:  # private: another run building the same cache never shares a file with this one
        work_name = f".{storage.basename(directory)}.build-{uuid.uuid4().hex[:12]}"
    work = storage.join(storage.parent(directory), work_name)
    storage.makedirs(work)
    parts = {"train": docs.train, **({"val": docs.val} if docs.val is not None else {})}
    try:
        counts = {}
        for part, part_docs in parts.items():
            procs = _num_proc(num_proc, part_docs)
            log.info("process %d/%d: tokenising its %s shards with %d process(es)",
                     process_index, process_count, part, procs)
            counts[part] = _tokenize_part(
                part_docs, part, (tokenizer, separator, dtype, work),
                process_index=process_index, process_count=process_count, procs=procs)
        if counts["train"] == 0:  # (a stream; every process knows it)
            raise ConfigError(f"the dataset is empty (source={source!r}): "
                              "check data.name/data.files/data.split")
        if process_index != 0:
            wait_for(is_complete, lambda: f"process 0 to write the token cache {directory}",
                     wait_seconds)
            return
        pending = [_shard_name(part, j) for part, n in counts.items()
                   for j in range(_num_shards(n))]

        def missing(first_only=True):
            """The shards not written yet (from the first missing one on, when first_only).
            Each is looked up by name: a filesystem's cached listing may predate it."""
            while pending and storage.exists(storage.join(work, pending[0])):
                pending.pop(0)
            if not first_only:
                pending[:] = [name for name in pending
                              if not storage.exists(storage.join(work, name))]
            return pending

        def missing_text():
            names = missing(first_only=False)
            if not names:  # (all written just now)
                return f"the token cache {directory}"
            owners = sorted({int(name[-10:-4]) % process_count for name in names})
            return (f"{len(names)} token-cache shard(s) in {work} ({names[0]}, ...) from "
                    f"process(es) {owners}")

        wait_for(lambda: is_complete() or not missing(), missing_text, wait_seconds)
        if not is_complete():
            storage.makedirs(directory)
            meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "key": description}
            meta.update(_pack(docs, counts, work, directory, dtype, separator))
            text = json.dumps(meta, indent=1, default=str)
            storage.write_bytes(storage.join(directory, "meta.json"), text.encode())
        storage.remove_tree(work)
    except BaseException:
        if process_count == 1:
            storage.remove_tree(work)
        raise


# Automatic tokenisation: one local worker per this many documents, at most `_MAX_AUTO_PROC`.
_DOCS_PER_PROC = 5000
_MAX_AUTO_PROC = 16


def _num_proc(requested, docs) -> int:
    """Local tokenising workers: `requested`, else one per 5000 documents (a stream: 1)."""
    if requested:
        return max(1, int(requested))
    try:
        num_documents = len(docs)
    except TypeError:  # a stream
        return 1
    return max(1, min(os.cpu_count() or 1, _MAX_AUTO_PROC, num_documents // _DOCS_PER_PROC))
