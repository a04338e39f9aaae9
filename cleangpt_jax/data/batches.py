"""Batches as a pure function of (seed, step): the index shuffle, training and eval batches.

    batch = batch_for_step(data.train, seed=0, step=s, global_batch_size=B, block_size=T)
    for batch in eval_batches(data.val, global_batch_size=B, block_size=T, num_batches=20): ...

The stream is cut into W = len // T non-overlapping windows. Global row g of step s
(g = s * B + row) reads window `shuffle_index(g mod W)` of epoch g // W, a pseudo-random
permutation of the windows chosen by (seed, epoch). A batch is therefore a pure function of
(seed, step): a resumed run sees exactly the batches of an uninterrupted one, each epoch visits
every window once, and each process builds only its own rows. For a `Mixture`, each row's source
is drawn from the schedule's weights at that step, deterministically from (seed, step, row).

Document masks (data.document_mask): `with_segment_ids` adds each row's segment ids, computed
from its tokens alone (`segment_ids`), so batches stay a pure function of (seed, step).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cleangpt_jax.config import ConfigError
from cleangpt_jax.data.mixtures import Mixture

_FEISTEL_ROUNDS = 6
_WINDOWS, _MIXTURE = 1, 2  # stream tags for the seeds, so window order and source draws differ


def _mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def shuffle_index(index, n: int, key: Sequence[int]) -> np.ndarray:
    """perm(index) for a pseudo-random permutation `perm` of range(n) chosen by `key` (ints >= 0).

    A Feistel network over 2h bits (2^(2h) >= n) is a bijection of range(2^(2h)); "cycle walking"
    (re-applying it while the result is >= n) restricts it to a bijection of range(n). Costs O(1)
    per index and no memory, so a step's windows are computed without materialising the epoch's
    permutation (the same idea as Grain's index_shuffle).
    """
    index = np.atleast_1d(np.asarray(index, dtype=np.uint64))
    if n <= 1:
        return np.zeros(index.shape, np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence(list(key)).generate_state(_FEISTEL_ROUNDS, dtype=np.uint64)

    def permute(x):
        left, right = x >> np.uint64(half), x & low
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & low)
        return (left << np.uint64(half)) | right

    out = permute(index)
    while (outside := out >= n).any():
        out[outside] = permute(out[outside])
    return out.astype(np.int64)


def _seed(seed) -> int:
    return int(seed) % 2**63


def _num_windows(tokens, block_size: int) -> int:
    return len(tokens) // block_size


def _streams(tokens) -> tuple:
    return tokens.streams if isinstance(tokens, Mixture) else (tokens,)


def _check_batch_args(tokens, global_batch_size, block_size, process_index, process_count,
                      step=0):
    if not (isinstance(block_size, (int, np.integer)) and block_size > 0):
        raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
    if not (isinstance(global_batch_size, (int, np.integer)) and global_batch_size > 0):
        raise ConfigError(f"the global batch size must be a positive integer, "
                          f"got {global_batch_size!r}")
    if not (isinstance(process_count, (int, np.integer)) and process_count > 0
            and 0 <= process_index < process_count):
        raise ConfigError(f"process_index={process_index} is not in "
                          f"[0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ConfigError(f"the global batch size {global_batch_size} (train.batch_size) is not "
                          f"divisible by the process count {process_count}: use a multiple of "
                          f"{process_count}")
    if step < 0:
        raise ConfigError(f"step must be >= 0, got {step}")
    for i, stream in enumerate(_streams(tokens)):
        if _num_windows(stream, block_size) == 0:
            what = "the token stream" if len(_streams(tokens)) == 1 else f"mixture source {i}"
            raise ConfigError(f"{what} has {len(stream)} tokens, shorter than one block "
                              f"(block_size={block_size}): add data or lower model.block_size")


def _process_rows(global_batch_size, process_index, process_count) -> np.ndarray:
    per_process = global_batch_size // process_count
    return np.arange(process_index * per_process, (process_index + 1) * per_process,
                     dtype=np.int64)


def _windows_for_rows(rows: np.ndarray, num_windows: int, seed: int, stream: int) -> np.ndarray:
    """Window index of each global row number: epoch rows // W, shuffled position rows % W."""
    epochs, positions = rows // num_windows, rows % num_windows
    windows = np.empty_like(rows)
    for epoch in np.unique(epochs):
        at = epochs == epoch
        key = (seed, _WINDOWS, stream, int(epoch))
        windows[at] = shuffle_index(positions[at], num_windows, key)
    return windows


def _mixture_sources(mixture: Mixture, *, seed: int, step: int,
                     global_batch_size: int) -> np.ndarray:
    """The source index of each global row of `step` (int64, shape (global_batch_size,)): row r
    reads source k when u_r falls in the k-th interval of the cumulative weights at `step`, with
    u uniform in [0, 1) drawn from (seed, step)."""
    u = np.random.default_rng([_seed(seed), _MIXTURE, int(step)]).random(global_batch_size)
    cumulative = np.cumsum(mixture.weights(step))
    return np.minimum(np.searchsorted(cumulative / cumulative[-1], u, side="right"),
                      len(mixture.streams) - 1).astype(np.int64)


def _gather(stream, windows: np.ndarray, block_size: int) -> np.ndarray:
    if windows.size == 0:
        return np.zeros((0, block_size), np.int32)
    return np.asarray(stream[windows[:, None] * block_size + np.arange(block_size)],
                      dtype=np.int32)


def batch_for_step(tokens, *, seed: int, step: int, global_batch_size: int, block_size: int,
                   process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`: a pure function of (seed, step).

    tokens: a 1-D token stream (or a `Mixture`). Returns input_ids int32
    (global_batch_size // process_count, block_size) and attention_mask (ones, same shape).
    Process p holds global rows [p * B/P, (p + 1) * B/P), so the processes' rows concatenated in
    process order are the single-process batch. Global row g = step * B + row reads the window at
    position g mod W of epoch g // W (W = len(tokens) // block_size windows, shuffled per epoch).
    """
    _check_batch_args(tokens, global_batch_size, block_size, process_index, process_count, step)
    seed = _seed(seed)
    rows = _process_rows(global_batch_size, process_index, process_count)
    global_rows = int(step) * global_batch_size + rows
    streams = _streams(tokens)
    if isinstance(tokens, Mixture):
        sources = _mixture_sources(tokens, seed=seed, step=step,
                                   global_batch_size=global_batch_size)[rows]
    else:
        sources = np.zeros(rows.shape, np.int64)
    input_ids = np.empty((rows.size, block_size), np.int32)
    for k, stream in enumerate(streams):
        at = sources == k
        windows = _windows_for_rows(global_rows[at], _num_windows(stream, block_size), seed, k)
        input_ids[at] = _gather(stream, windows, block_size)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}


def steps_per_epoch(tokens, global_batch_size: int, block_size: int) -> int:
    """Steps for one pass over the training windows: ceil(W / B) (W summed over a mixture's
    sources).

    When B does not divide W, the last step of an epoch finishes with rows of the next epoch.
    """
    total = sum(_num_windows(s, block_size) for s in _streams(tokens))
    return max(1, math.ceil(total / global_batch_size))


def eval_batches(tokens, *, global_batch_size: int, block_size: int,
                 num_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches: the stream's windows in order from its start (this process's
    rows).

    Global eval row j reads window j (for a `Mixture` of K sources: source j mod K, window j // K,
    so each source counts equally). Rows past the end of the data repeat window 0 with
    attention_mask 0, so a token-weighted loss counts every real window exactly once. At most
    `num_batches` batches (None: as many as cover the data) and never a batch of padding only.
    """
    _check_batch_args(tokens, global_batch_size, block_size, process_index, process_count)
    streams = _streams(tokens)
    num_sources = len(streams)
    windows_per_source = [_num_windows(s, block_size) for s in streams]
    needed = math.ceil(num_sources * max(windows_per_source) / global_batch_size)
    num_batches = needed if num_batches is None else min(int(num_batches), needed)
    rows = _process_rows(global_batch_size, process_index, process_count)
    batches = []
    for i in range(num_batches):
        global_rows = i * global_batch_size + rows
        sources, windows = global_rows % num_sources, global_rows // num_sources
        input_ids = np.empty((rows.size, block_size), np.int32)
        mask = np.zeros((rows.size, block_size), np.int32)
        for k, stream in enumerate(streams):
            at = sources == k
            real = windows[at] < windows_per_source[k]
            input_ids[at] = _gather(stream, np.where(real, windows[at], 0), block_size)
            mask[at] = real[:, None]
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def document_separator_id(data, tokenizer) -> int | None:
    """The token that separates packed documents when data section `data` asks for document
    masks (data.document_mask), else None. The separator must be one token (it is for the
    tokenizers here: EOS, or the character tokenizer's newline, which makes every line of a
    character-level corpus its own document)."""
    if not data.get("document_mask"):  # absent from the config.json of older runs
        return None
    separator = tokenizer.document_separator()
    if len(separator) != 1:
        raise ConfigError(f"data.document_mask needs a one-token document separator, the "
                          f"tokenizer's is {separator}: set data.document_mask=False")
    return int(separator[0])


def segment_ids(input_ids, separator: int) -> np.ndarray:
    """(B, T) int32: the index of each position's document within its row, 0 for the document
    the row begins in. A separator begins the document that follows it (as a BOS token does):

        segment_ids[b, t] = #{t' in (0, t] : input_ids[b, t'] == separator}

    so the token before a separator predicts it from its own document (learning where a
    document ends), and the separator predicts the next document's first token from itself
    alone. Every target is then predicted from its own document's tokens only.
    """
    is_separator = np.asarray(input_ids) == separator
    return (np.cumsum(is_separator, axis=1) - is_separator[:, :1]).astype(np.int32)


def with_segment_ids(batch: dict, separator: int | None) -> dict:
    """`batch` with 'segment_ids' (`segment_ids` of its input_ids) added; unchanged when
    `separator` is None (no document masks)."""
    if separator is None:
        return batch
    return {**batch, "segment_ids": segment_ids(batch["input_ids"], separator)}
