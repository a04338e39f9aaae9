"""Tokenizer interface shared by every tokenizer in cleangpt_jax.

A tokenizer maps text to a list of integer token ids and back. Concrete
tokenizers implement `encode`, `decode`, `vocab_size`, `save_pretrained` and
`from_pretrained`; batching (padding, truncation, attention masks), the separator put
between packed documents and the fingerprint that keys the token cache live here.
A saved tokenizer directory always holds a marker file, `cleangpt_tokenizer.json`,
recording which registered tokenizer class wrote it.
"""

import abc
import hashlib
import json
import os
import tempfile

import numpy as np

from cleangpt_jax.config import ConfigError

MARKER_FILE = "cleangpt_tokenizer.json"


def ids_to_list(ids) -> list[int]:
    """A 1-D sequence of token ids (list, tuple, numpy or jax array) as a list of Python ints."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64).tolist()


def write_marker(directory, tokenizer_type: str, **extra) -> None:
    """Write the marker file that tells `load_tokenizer` which class saved `directory`."""
    with open(os.path.join(directory, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_type": tokenizer_type, **extra}, f, indent=2, ensure_ascii=False)


def read_marker(directory) -> dict | None:
    """The contents of the marker file in `directory`, or None when there is none."""
    path = os.path.join(directory, MARKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer(abc.ABC):
    """Abstract text <-> token-id mapping.

    Subclasses set `tokenizer_type` (their registry name) and the special token
    ids `pad_token_id`, `eos_token_id`, `bos_token_id`, `unk_token_id` (None when
    the tokenizer has no such token). `model_max_length` is the longest sequence
    the tokenizer is meant for, or None for no limit. `document_separator_text` is the
    text put between two documents of a packed stream, or None to put EOS there.
    """

    tokenizer_type: str | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    unk_token_id: int | None = None
    model_max_length: int | None = None
    document_separator_text: str | None = None

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, also the tokenizer's bos/eos tokens."""

    @abc.abstractmethod
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D sequence of token ids (list, numpy or jax array)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are 0 .. vocab_size-1)."""

    def unknown_characters(self, text: str) -> str:
        """The characters of `text` this tokenizer has no token for (encode turns them into
        its unknown token), each once, in order of appearance; "" for tokenizers that encode
        any text (the default)."""
        return ""

    @abc.abstractmethod
    def save_pretrained(self, directory) -> str:
        """Save to `directory` (created if needed), marker file included; returns the directory."""

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, directory_or_name) -> "Tokenizer":
        """Load a tokenizer saved by `save_pretrained` (or, where supported, a named one)."""

    @classmethod
    def create(cls, **kwargs) -> "Tokenizer":
        """Build from `create_tokenizer` keyword arguments; by default `cls(**kwargs)`."""
        return cls(**kwargs)

    def encode_batch(self, texts, *, padding: str = "longest", max_length: int | None = None,
                     truncation: bool = False, add_special_tokens: bool = False) -> dict:
        """Encode one text or a list of texts into right-padded int32 arrays.

        Returns {"input_ids": [B, T], "attention_mask": [B, T]}, where padded
        positions hold `pad_token_id` in input_ids and 0 in attention_mask.
        padding="longest" pads to the longest sequence of the batch;
        padding="max_length" pads to `max_length` (default `model_max_length`).
        truncation=True cuts sequences to `max_length`; without it a sequence
        longer than the padded length is an error.
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if self.pad_token_id is None:
            raise ValueError(f"{type(self).__name__} has no pad token, cannot pad a batch")
        if max_length is None and (padding == "max_length" or truncation):
            max_length = self.model_max_length
            if max_length is None:
                raise ValueError("max_length is required for padding='max_length' or truncation "
                                 "(this tokenizer has no model_max_length)")
        seqs = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if truncation:
            seqs = [s[:max_length] for s in seqs]
        longest = max(map(len, seqs), default=0)
        width = max_length if padding == "max_length" else longest
        if longest > width:
            raise ValueError(f"a sequence has {longest} tokens, more than max_length={width}; "
                             "pass truncation=True")
        input_ids = np.full((len(seqs), width), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(seqs), width), dtype=np.int32)
        for i, s in enumerate(seqs):
            input_ids[i, :len(s)] = s
            attention_mask[i, :len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, texts, **kwargs) -> dict:
        """Same as `encode_batch`: one text or many in, padded input_ids/attention_mask out."""
        return self.encode_batch(texts, **kwargs)

    def decode_batch(self, batch_ids, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of a [B, T] array (or list of id lists)."""
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch_ids]

    def document_separator(self) -> list[int]:
        """Token ids put between two packed documents: `document_separator_text` encoded, else
        [eos]."""
        if self.document_separator_text is not None:
            return list(self.encode(self.document_separator_text))
        if self.eos_token_id is None:
            raise ValueError(f"{type(self).__name__} has no EOS token to separate documents: add "
                             "one, or set its document_separator_text")
        return [int(self.eos_token_id)]

    def fingerprint(self) -> str:
        """A hash of what the tokenizer maps text to: its type, size and saved vocabulary files
        (not where it came from)."""
        digest = hashlib.sha256(f"{self.tokenizer_type}:{self.vocab_size}".encode())
        with tempfile.TemporaryDirectory() as d:
            self.save_pretrained(d)
            for name in sorted(os.listdir(d)):
                # The marker and *_config.json record provenance (paths, flags), not the mapping;
                # the special ids that matter (the separator) are part of the cache key.
                if name.endswith("config.json") or name == MARKER_FILE:
                    continue
                with open(os.path.join(d, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
        return digest.hexdigest()[:16]

    def __repr__(self):
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int, *, fix: str,
                where: str = "") -> None:
    """Refuse a tokenizer whose ids do not all index the model's embedding table.

    Token ids are 0 .. V_tok - 1 and the embedding has V_model rows, so the pair works only if
    V_tok <= V_model (a larger model vocabulary is padding). `where` names the pair in the
    message, `fix` says what to do; the one-line message reads
    "tokenizer vocab_size V_tok > model vocab_size V_model (where): fix".
    """
    if tokenizer_vocab_size > model_vocab_size:
        where = f" ({where})" if where else ""
        raise ConfigError(f"tokenizer vocab_size {tokenizer_vocab_size} > model vocab_size "
                          f"{model_vocab_size}{where}: {fix}")
