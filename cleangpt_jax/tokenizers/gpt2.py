"""GPT-2 byte-level BPE tokenizer: a thin wrapper over a Hugging Face fast tokenizer."""

import json
import os
import re

from .base import Tokenizer, ids_to_list, write_marker

_HUB_NAME = re.compile(r"[A-Za-z0-9_][\w.-]*(/[\w.-]+)?")  # "gpt2" or "org/name"
_EXPECTED = "expected a directory with vocab.json + merges.txt or tokenizer.json"


def has_hf_tokenizer_files(directory) -> bool:
    """Whether `directory` holds a GPT-2-style HF tokenizer (vocab.json + merges.txt, or
    tokenizer.json)."""
    has = lambda name: os.path.isfile(os.path.join(directory, name))
    return (has("vocab.json") and has("merges.txt")) or has("tokenizer.json")


def _is_minimal_gpt2_dir(path) -> bool:
    """Whether `path` is a directory in the minimal GPT-2 format: vocab.json + merges.txt with
    neither tokenizer.json nor tokenizer_config.json to name the tokenizer class."""
    has = lambda name: os.path.isfile(os.path.join(path, name))
    return (os.path.isdir(path) and has("vocab.json") and has("merges.txt")
            and not has("tokenizer.json") and not has("tokenizer_config.json"))


def _local_tokenizer_class(path):
    """The class `transformers.AutoTokenizer` picks for `path`, imported without AutoTokenizer
    where that is certain: AutoTokenizer imports torch (through the model configs), seconds of
    start-up that reading a tokenizer does not need. A local directory whose
    tokenizer_config.json names a GPT-2 or plain fast tokenizer class, without remote code,
    next to no model config or a GPT-2 one, loads with that class (AutoTokenizer resolves it
    to the same class); anything else, hub names included, goes through AutoTokenizer."""
    def read_json(name):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    tokenizer_config = read_json("tokenizer_config.json") if os.path.isdir(path) else None
    model_config = read_json("config.json") if os.path.isfile(
        os.path.join(path, "config.json")) else {"model_type": "gpt2"}
    if (isinstance(tokenizer_config, dict) and "auto_map" not in tokenizer_config
            and isinstance(model_config, dict) and model_config.get("model_type") == "gpt2"
            and "tokenizer_class" not in model_config and "auto_map" not in model_config):
        named = tokenizer_config.get("tokenizer_class")
        if named in ("GPT2Tokenizer", "GPT2TokenizerFast"):
            from transformers import GPT2TokenizerFast
            return GPT2TokenizerFast
        if named in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            from transformers import PreTrainedTokenizerFast
            return PreTrainedTokenizerFast
    from transformers import AutoTokenizer  # slow import (torch), only when needed
    return AutoTokenizer


def _load_hf_tokenizer(name_or_path: str, **kwargs):
    """`transformers.AutoTokenizer.from_pretrained`, failing with a one-line ValueError. A
    directory holding only vocab.json + merges.txt (the minimal GPT-2 form) is read as
    `GPT2TokenizerFast(vocab_file, merges_file)` reads it: GPT-2's <|endoftext|> specials."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not has_hf_tokenizer_files(path):
            raise ValueError(f"tokenizer directory {path!r} holds no tokenizer files: {_EXPECTED}")
    elif os.path.exists(path):
        raise ValueError(f"{path!r} is a file: {_EXPECTED}, or a Hugging Face hub name like 'gpt2'")
    elif not _HUB_NAME.fullmatch(name_or_path):
        raise ValueError(f"tokenizer directory {path!r} does not exist: {_EXPECTED}")
    from cleangpt_jax import hub

    offline = "" if os.path.isdir(path) else hub.offline_error("tokenizer", name_or_path)
    try:
        if _is_minimal_gpt2_dir(path):  # AutoTokenizer cannot tell it is GPT-2
            from transformers import GPT2TokenizerFast

            return GPT2TokenizerFast(os.path.join(path, "vocab.json"),
                                     os.path.join(path, "merges.txt"), **kwargs)
        return _local_tokenizer_class(path).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = ("local directory" if os.path.isdir(path)
                 else "not a local directory; Hugging Face hub lookup")
        raise ValueError(offline or f"could not load tokenizer {name_or_path!r} ({where} "
                         f"failed: {reason})") from None


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE via `transformers.AutoTokenizer` (the fast, Rust-backed tokenizer).

    `name_or_path` is a Hugging Face hub name ("gpt2", needs network) or a local
    directory with vocab.json + merges.txt or tokenizer.json. When the HF
    tokenizer has no pad token, pad = eos (also set on `hf_tokenizer`, so its own
    padding works). `encode` adds no special tokens unless asked; with
    add_special_tokens=True it prepends bos.
    """

    tokenizer_type = "gpt2"

    def __init__(self, name_or_path="gpt2", **hf_kwargs):
        self.name_or_path = os.fspath(name_or_path)
        self.hf_tokenizer = hf = _load_hf_tokenizer(self.name_or_path, **hf_kwargs)
        if hf.pad_token is None and hf.eos_token is not None:
            hf.pad_token = hf.eos_token
        self.pad_token_id, self.eos_token_id = hf.pad_token_id, hf.eos_token_id
        self.bos_token_id, self.unk_token_id = hf.bos_token_id, hf.unk_token_id
        # HF uses a huge sentinel for "no limit"
        self.model_max_length = hf.model_max_length if hf.model_max_length < 1e12 else None

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)  # base vocab + added tokens

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.hf_tokenizer.encode(text, add_special_tokens=False)
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(ids_to_list(ids), skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)

    def save_pretrained(self, directory) -> str:
        """HF `save_pretrained` files plus the marker file."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.hf_tokenizer.save_pretrained(directory)
        write_marker(directory, self.tokenizer_type, name_or_path=self.name_or_path)
        return directory

    @classmethod
    def from_pretrained(cls, directory_or_name) -> "GPT2Tokenizer":
        return cls(directory_or_name)
