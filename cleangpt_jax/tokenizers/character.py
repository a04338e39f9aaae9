"""Character-level tokenizer: one token id per Unicode code point."""

import json
import os

from .base import Tokenizer, ids_to_list, read_marker, write_marker

DEFAULT_SPECIAL_TOKENS = ("<unk>", "<pad>", "<bos>", "<eos>")


class CharacterTokenizer(Tokenizer):
    """Maps each character to its own id.

    Ids: <unk>=0, <pad>=1, <bos>=2, <eos>=3, then the extra `special_tokens`,
    then `chars` in the order given. Characters outside the vocabulary encode
    to <unk> (`unknown_characters` names them; prompts holding any are refused). Special
    tokens are never parsed out of text: "<eos>" in a string is five characters.
    """

    tokenizer_type = "character"
    document_separator_text = "\n"
    unk_token_id, pad_token_id, bos_token_id, eos_token_id = 0, 1, 2, 3

    def __init__(self, chars, *, special_tokens=(), model_max_length: int | None = None):
        chars = list(dict.fromkeys(chars))  # dedupe, keep order
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars must be single characters")
        extra = [t for t in special_tokens if t not in DEFAULT_SPECIAL_TOKENS]
        specials = list(DEFAULT_SPECIAL_TOKENS) + extra
        if len(set(specials)) != len(specials) or set(specials) & set(chars):
            raise ValueError(f"special tokens {specials} must be distinct from each other and "
                             "from chars")
        self.special_tokens = specials
        self.itos = specials + chars
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.model_max_length = model_max_length

    @classmethod
    def from_text(cls, text: str, **kwargs) -> "CharacterTokenizer":
        """Vocabulary = the sorted set of characters in `text` (deterministic)."""
        return cls(sorted(set(text)), **kwargs)

    @classmethod
    def create(cls, *, text=None, name_or_path=None, chars=None,
               **kwargs) -> "CharacterTokenizer":
        """`create_tokenizer('character', ...)`: exactly one of text=, name_or_path= (a saved
        directory), chars=."""
        options = (("text", text), ("name_or_path", name_or_path), ("chars", chars))
        given = [k for k, v in options if v is not None]
        if len(given) != 1:
            raise ValueError(f"character tokenizer needs exactly one of text=, name_or_path=, "
                             f"chars= (got {given})")
        if text is not None:
            return cls.from_text(text, **kwargs)
        if name_or_path is not None:
            return cls.from_pretrained(name_or_path)
        return cls(chars, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.stoi.get(c, self.unk_token_id) for c in text]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def unknown_characters(self, text: str) -> str:
        return "".join(dict.fromkeys(c for c in text if c not in self.stoi))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids_to_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range for vocab_size={self.vocab_size}")
        n_special = len(self.special_tokens)
        return "".join(self.itos[i] for i in ids if not (skip_special_tokens and i < n_special))

    def save_pretrained(self, directory) -> str:
        """Write vocab.json (token -> id) and the marker file."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.stoi, f, indent=0, ensure_ascii=False)
        write_marker(directory, self.tokenizer_type, special_tokens=self.special_tokens,
                     model_max_length=self.model_max_length)
        return directory

    def to_hf_tokenizer(self):
        """This vocabulary as a `transformers.PreTrainedTokenizerFast` (one WordLevel token per
        character, unknown characters -> <unk>, decoding concatenates), for directories that
        `AutoTokenizer` must load (`hf.export_gpt2`). Same ids as `encode` for text without
        special-token strings: HF parses "<eos>" in text as the token, we as five characters."""
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as RawTokenizer
        from transformers import PreTrainedTokenizerFast

        raw = RawTokenizer(models.WordLevel(vocab=self.stoi, unk_token=self.itos[0]))
        raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        raw.decoder = decoders.Fuse()
        unk, pad, bos, eos = DEFAULT_SPECIAL_TOKENS
        extra = {} if self.model_max_length is None else {
            "model_max_length": self.model_max_length}
        return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token=unk, pad_token=pad,
                                       bos_token=bos, eos_token=eos, **extra)

    @classmethod
    def from_pretrained(cls, directory_or_name) -> "CharacterTokenizer":
        directory = os.fspath(directory_or_name)
        path = os.path.join(directory, "vocab.json")
        if not os.path.isfile(path):
            raise ValueError(f"no character tokenizer in {directory!r}: expected vocab.json "
                             "(token -> id)")
        with open(path, encoding="utf-8") as f:
            stoi = json.load(f)
        marker = read_marker(directory) or {}
        tokens = sorted(stoi, key=stoi.get)
        specials = marker.get("special_tokens") or [t for t in tokens if len(t) != 1]
        tok = cls([t for t in tokens if t not in specials], special_tokens=specials,
                  model_max_length=marker.get("model_max_length"))
        if tok.stoi != stoi:
            raise ValueError(f"{path!r} is not a CharacterTokenizer vocabulary (ids must be "
                             f"{list(DEFAULT_SPECIAL_TOKENS)}, extra specials, then chars)")
        return tok
