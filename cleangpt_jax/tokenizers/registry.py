"""The registry of tokenizer types: create a tokenizer by type name, load a saved one.

The built-in types ('character', 'gpt2', 'pruned') are registered by the package's __init__.
"""

import os

from cleangpt_jax import storage

from .base import MARKER_FILE, Tokenizer, read_marker
from .gpt2 import GPT2Tokenizer, has_hf_tokenizer_files

_REGISTRY: dict[str, type[Tokenizer]] = {}


def register_tokenizer(name: str, cls: type[Tokenizer] | None = None):
    """Register `cls` under `name` (case-insensitive); also a decorator:
    @register_tokenizer("name").

    A class without its own `tokenizer_type` gets `name` as its tokenizer_type.
    """
    if cls is None:
        return lambda c: register_tokenizer(name, c)
    if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
        raise TypeError(f"{cls!r} is not a Tokenizer subclass")
    key = name.lower()
    if _REGISTRY.get(key, cls) is not cls:
        raise ValueError(f"tokenizer type {key!r} is already registered to "
                         f"{_REGISTRY[key].__name__}")
    if cls.__dict__.get("tokenizer_type") is None:
        cls.tokenizer_type = key
    _REGISTRY[key] = cls
    return cls


def registered_tokenizers() -> list[str]:
    """Sorted names of the registered tokenizer types."""
    return sorted(_REGISTRY)


def get_tokenizer_class(tokenizer_type: str) -> type[Tokenizer]:
    """The class registered under `tokenizer_type` (case-insensitive)."""
    cls = _REGISTRY.get(str(tokenizer_type).lower())
    if cls is None:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; "
                         f"registered: {', '.join(registered_tokenizers())}")
    return cls


def create_tokenizer(tokenizer_type: str, **kwargs) -> Tokenizer:
    """Build a tokenizer of a registered type, e.g. ("character", text=...) or
    ("gpt2", name_or_path=...)."""
    return get_tokenizer_class(tokenizer_type).create(**kwargs)


def load_tokenizer(directory) -> Tokenizer:
    """Load a tokenizer saved with `save_pretrained`, choosing the class from its marker file.

    A directory without a marker but with vocab.json + merges.txt or tokenizer.json loads as gpt2.
    """
    directory = os.fspath(directory)
    if storage.is_url(directory):  # (tokenizer libraries read local files: a local copy)
        if not storage.isdir(directory):
            raise ValueError(f"tokenizer directory {directory!r} does not exist")
        directory = storage.local_copy(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"tokenizer directory {directory!r} does not exist")
    marker = read_marker(directory)
    if marker is not None:
        return get_tokenizer_class(marker["tokenizer_type"]).from_pretrained(directory)
    if has_hf_tokenizer_files(directory):
        return GPT2Tokenizer.from_pretrained(directory)
    raise ValueError(f"no tokenizer in {directory!r}: expected {MARKER_FILE} "
                     "(written by save_pretrained) or vocab.json + merges.txt or tokenizer.json")
