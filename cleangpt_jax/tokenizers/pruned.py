"""A tokenizer restricted to part of another tokenizer's vocabulary (`token_analysis --prune`).

    pruned = PrunedTokenizer(base, new_to_old=[0, -1, 17, 5, ...])
    pruned.save_pretrained(d); load_tokenizer(d)          # registered as 'pruned'

`new_to_old[i]` is the base id behind new id i, or -1 for an added `<unk>`. Every base id not
kept encodes to the unknown token:

    encode(text) = [old_to_new[j] for j in base.encode(text)],
    old_to_new[j] = i if new_to_old[i] == j else unk_token_id

so text whose base tokens are all kept round-trips exactly, and a model trained with the pruned
tokenizer needs only len(new_to_old) embedding rows. `cleangpt_jax.token_analysis.prune_tokenizer`
builds the layout from token counts: the base's special tokens first, each distinct id once
(GPT-2's pad = eos = bos = <|endoftext|> is one token), then `<unk>` unless the base has an
unknown token of its own distinct from those, then the kept tokens by frequency.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from .base import Tokenizer, ids_to_list, read_marker, write_marker
from .registry import get_tokenizer_class


class PrunedTokenizer(Tokenizer):
    """`base` restricted to the ids in `new_to_old` (see the module docstring).

    decode maps new ids back to base ids; an added `<unk>` decodes to '<unk>', or to nothing with
    skip_special_tokens. Saved flat into one directory: the base tokenizer's own files,
    `pruned_vocab.json` ({new_to_old, old_to_new, coverage}; old_to_new is derived, saved for
    readers that remap ids or embedding rows) and the marker (type 'pruned', the base's marker
    keys, `base_tokenizer_type`).
    """

    tokenizer_type = "pruned"
    UNK = "<unk>"
    VOCAB_FILE = "pruned_vocab.json"

    def __init__(self, base: Tokenizer, new_to_old: Sequence[int], *,
                 coverage: float | None = None):
        new_to_old = np.asarray(list(new_to_old), np.int64)
        if new_to_old.ndim != 1 or not new_to_old.size:
            raise ValueError("new_to_old must be a non-empty list of base token ids")
        real = new_to_old[new_to_old >= 0]
        if ((new_to_old < -1).any() or (new_to_old == -1).sum() > 1
                or (real >= base.vocab_size).any() or len(np.unique(real)) != len(real)):
            raise ValueError(f"new_to_old must hold distinct base ids in [0, {base.vocab_size}) "
                             f"and at most one -1 (the added <unk>)")
        self.base, self.new_to_old, self.coverage = base, new_to_old, coverage
        added_unk = np.flatnonzero(new_to_old == -1)
        if added_unk.size:
            self.unk_token_id = int(added_unk[0])
        elif base.unk_token_id is not None and base.unk_token_id in real:
            self.unk_token_id = int(np.flatnonzero(new_to_old == base.unk_token_id)[0])
        else:
            raise ValueError("the pruned vocabulary needs an unknown token: keep the base's unk "
                             "token or add -1 (<unk>) to new_to_old")
        self.old_to_new = np.full(base.vocab_size, self.unk_token_id, np.int64)
        self.old_to_new[real] = np.flatnonzero(new_to_old >= 0)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            old = getattr(base, name)
            if old is not None and old not in real:
                raise ValueError(f"the base's {name}={old} is not kept: special tokens must stay "
                                 f"in a pruned vocabulary")
            setattr(self, name, None if old is None else int(self.old_to_new[old]))
        self.model_max_length = base.model_max_length
        self._added_unk = bool(added_unk.size)

    @classmethod
    def create(cls, *, name_or_path=None, **kwargs) -> "PrunedTokenizer":
        """`create_tokenizer('pruned', name_or_path=DIR)`: a saved pruned tokenizer (so a config's
        tokenizer section can name one: type='pruned', name_or_path=DIR)."""
        if name_or_path is None or kwargs:
            raise ValueError("a pruned tokenizer is built with token_analysis.prune_tokenizer() "
                             "(or --prune) and loaded with name_or_path=DIR, its saved directory")
        return cls.from_pretrained(name_or_path)

    @property
    def vocab_size(self) -> int:
        return len(self.new_to_old)

    @property
    def kept_base_ids(self) -> np.ndarray:
        """The base ids that have a new id of their own (the added <unk> excluded)."""
        return self.new_to_old[self.new_to_old >= 0]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        old = np.asarray(self.base.encode(text, add_special_tokens=add_special_tokens), np.int64)
        return self.old_to_new[old].tolist()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = np.asarray(ids_to_list(ids), np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids out of range for vocab_size={self.vocab_size}")
        if not self._added_unk:
            return self.base.decode(self.new_to_old[ids], skip_special_tokens=skip_special_tokens)
        parts, unk = [], "" if skip_special_tokens else self.UNK
        for k, run in enumerate(np.split(ids, np.flatnonzero(ids == self.unk_token_id))):
            if k > 0:  # the run starts at an unknown token
                parts.append(unk)
                run = run[1:]
            if run.size:
                parts.append(self.base.decode(self.new_to_old[run],
                                              skip_special_tokens=skip_special_tokens))
        return "".join(parts)

    def save_pretrained(self, directory) -> str:
        directory = os.fspath(directory)
        self.base.save_pretrained(directory)
        base_marker = read_marker(directory) or {}
        with open(os.path.join(directory, self.VOCAB_FILE), "w", encoding="utf-8") as f:
            json.dump({"new_to_old": self.new_to_old.tolist(),
                       "old_to_new": self.old_to_new.tolist(), "coverage": self.coverage}, f)
        extra = {k: v for k, v in base_marker.items() if k != "tokenizer_type"}
        write_marker(directory, self.tokenizer_type, **extra,
                     base_tokenizer_type=self.base.tokenizer_type)
        return directory

    @classmethod
    def from_pretrained(cls, directory_or_name) -> "PrunedTokenizer":
        directory = os.fspath(directory_or_name)
        marker = read_marker(directory) if os.path.isdir(directory) else None
        path = os.path.join(directory, cls.VOCAB_FILE)
        if not marker or not os.path.isfile(path) or "base_tokenizer_type" not in marker:
            raise ValueError(f"no pruned tokenizer in {directory!r}: expected {cls.VOCAB_FILE} "
                             f"and the marker written by PrunedTokenizer.save_pretrained")
        base = get_tokenizer_class(marker["base_tokenizer_type"]).from_pretrained(directory)
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return cls(base, saved["new_to_old"], coverage=saved.get("coverage"))
