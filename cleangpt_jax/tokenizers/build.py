"""The tokenizer a config describes (`config.tokenizer`), built for the run's data."""

from cleangpt_jax.data import data_sections, load_documents

from .base import Tokenizer
from .character import CharacterTokenizer
from .registry import create_tokenizer


def build_tokenizer(config) -> Tokenizer:
    """The tokenizer `config.tokenizer` describes.

    'character' without `name_or_path`: `CharacterTokenizer.from_text` of the documents the run
    loads (`config.data`: training and validation, so validation has no unknown characters) and
    the newline that separates them; read in chunks, so it never holds the corpus as one string.
    'character' with `name_or_path`: a saved character tokenizer. Any other type:
    `create_tokenizer(type, name_or_path=...)`, 'gpt2' by default for the 'gpt2' type.
    """
    kind = config.tokenizer.type
    name_or_path = config.tokenizer.get("name_or_path")
    if kind == "character" and not name_or_path:
        chars = set(CharacterTokenizer.document_separator_text)
        for data in data_sections(config):
            docs = load_documents(data)
            for part in (docs.train, docs.val):
                for chunk in (part.iter(batch_size=1000) if part is not None else ()):
                    chars.update(*chunk["text"])
        return create_tokenizer("character", text="".join(sorted(chars)))
    if kind == "gpt2":
        name_or_path = name_or_path or "gpt2"
    return create_tokenizer(kind, name_or_path=name_or_path)
