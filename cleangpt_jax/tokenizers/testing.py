"""A small local GPT-2-format tokenizer for tests (the Hugging Face hub is not needed)."""

import json
import os

DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "She liked to walk in the woods and pick flowers for her mother.",
    "The king and the queen had three sons, and the youngest was the bravest of them all.",
    "It was the best of times, it was the worst of times.",
    "To be, or not to be, that is the question.",
    "All happy families are alike; each unhappy family is unhappy in its own way.",
    "In the beginning the universe was created. This has made a lot of people very angry.",
    "Hello world! Hello there, how are you today?",
    "The model reads the text one token at a time and predicts the next token.",
)


def build_local_gpt2_tokenizer(directory, texts=None, vocab_size: int = 300) -> str:
    """Train a byte-level BPE on `texts` and save it in GPT-2 format; returns `directory`.

    Writes vocab.json + merges.txt + tokenizer_config.json, so that
    `transformers.AutoTokenizer.from_pretrained(directory)` gives a GPT2TokenizerFast
    with bos = eos = unk = "<|endoftext|>" (id 0). The vocab holds the 256 byte
    tokens, the special token and up to vocab_size - 257 merges (fewer if `texts`
    is too small). Deterministic and fast (milliseconds).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    eot = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eot], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts or DEFAULT_TEXTS), trainer=trainer)

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tok.model.save(directory)  # vocab.json + merges.txt
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot,
              "unk_token": eot, "add_prefix_space": False, "add_bos_token": False,
              "model_max_length": 1024}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return directory
