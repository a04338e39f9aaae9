"""Tests for cleangpt_jax.tokenizers: character and GPT-2 tokenizers, batching, save/load,
the document separator, the registry."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from cleangpt_jax.tokenizers import (CharacterTokenizer, GPT2Tokenizer, Tokenizer,
                                     create_tokenizer, load_tokenizer, register_tokenizer,
                                     registered_tokenizers)
from cleangpt_jax.tokenizers.base import MARKER_FILE, ids_to_list, write_marker

TEXTS = ["hello world", "The quick brown fox.", "héllo wörld 日本語 🙂", "",
         "a , b . c !  two  spaces\n"]
CORPUS = "\n".join(TEXTS)
EOT = "<|endoftext|>"


@pytest.fixture
def char_tok():
    return CharacterTokenizer.from_text(CORPUS)


@pytest.fixture
def gpt2_tok(gpt2_tokenizer_dir):
    return create_tokenizer("gpt2", name_or_path=gpt2_tokenizer_dir)


@pytest.fixture(params=["character", "gpt2"])
def any_tok(request):
    return request.getfixturevalue({"character": "char_tok", "gpt2": "gpt2_tok"}[request.param])


# ---------------------------------------------------------------- character

def test_char_vocab_is_specials_then_sorted_chars(char_tok):
    assert char_tok.itos[:4] == ["<unk>", "<pad>", "<bos>", "<eos>"]
    assert (char_tok.unk_token_id, char_tok.pad_token_id, char_tok.bos_token_id,
            char_tok.eos_token_id) == (0, 1, 2, 3)
    assert char_tok.itos[4:] == sorted(set(CORPUS))
    assert char_tok.vocab_size == 4 + len(set(CORPUS))
    # the order of the text does not matter
    assert CharacterTokenizer.from_text(CORPUS[::-1]).stoi == char_tok.stoi


@pytest.mark.parametrize("text", TEXTS)
def test_char_round_trip(char_tok, text):
    ids = char_tok.encode(text)
    assert len(ids) == len(text) and min(ids, default=4) >= 4
    assert char_tok.decode(ids) == text
    wrapped = char_tok.encode(text, add_special_tokens=True)
    assert wrapped == [2, *ids, 3]
    assert char_tok.decode(wrapped) == text
    assert char_tok.decode(wrapped, skip_special_tokens=False) == f"<bos>{text}<eos>"


def test_char_unknown_chars_map_to_unk(char_tok):
    ids = char_tok.encode("hZe€")
    assert ids == [char_tok.stoi["h"], 0, char_tok.stoi["e"], 0]
    assert char_tok.decode(ids) == "he"
    assert char_tok.decode(ids, skip_special_tokens=False) == "h<unk>e<unk>"
    assert char_tok.unknown_characters("hZe€Z") == "Z€"  # prompts holding any are refused


def test_char_extra_special_tokens_and_validation():
    tok = CharacterTokenizer("ba", special_tokens=["<sep>"])
    assert tok.itos == ["<unk>", "<pad>", "<bos>", "<eos>", "<sep>", "b", "a"]
    assert tok.decode([5, 4, 6]) == "ba"
    assert tok.decode([5, 4, 6], skip_special_tokens=False) == "b<sep>a"
    with pytest.raises(ValueError, match="single characters"):
        CharacterTokenizer(["ab"])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([7])


def test_char_save_load_round_trip(tmp_path):
    tok = CharacterTokenizer.from_text(CORPUS, special_tokens=["<sep>", "¶"], model_max_length=64)
    tok.save_pretrained(tmp_path)
    with open(tmp_path / "vocab.json", encoding="utf-8") as f:
        assert json.load(f) == tok.stoi
    with open(tmp_path / MARKER_FILE) as f:
        assert json.load(f)["tokenizer_type"] == "character"
    for loaded in (CharacterTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path),
                   create_tokenizer("character", name_or_path=tmp_path)):
        assert type(loaded) is CharacterTokenizer
        assert loaded.itos == tok.itos and loaded.special_tokens == tok.special_tokens
        assert loaded.vocab_size == tok.vocab_size and loaded.model_max_length == 64
        for text in TEXTS:
            assert (loaded.encode(text, add_special_tokens=True)
                    == tok.encode(text, add_special_tokens=True))


def test_char_from_pretrained_rejects_foreign_vocab(tmp_path):
    with open(tmp_path / "vocab.json", "w") as f:
        json.dump({"a": 0, "b": 1}, f)
    with pytest.raises(ValueError, match="not a CharacterTokenizer vocabulary"):
        CharacterTokenizer.from_pretrained(tmp_path)


def test_create_character_tokenizer_variants():
    assert create_tokenizer("character", text="cab").itos[4:] == ["a", "b", "c"]
    assert create_tokenizer("CHARACTER", chars="cab").itos[4:] == ["c", "a", "b"]
    for kwargs in ({}, {"text": "ab", "chars": "ab"}):
        with pytest.raises(ValueError, match="exactly one of"):
            create_tokenizer("character", **kwargs)


# ---------------------------------------------------------------- gpt2

def test_local_gpt2_dir_is_gpt2_format(gpt2_tokenizer_dir):
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(gpt2_tokenizer_dir))
    hf = transformers.AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    assert isinstance(hf, transformers.GPT2TokenizerFast)
    assert hf.bos_token == hf.eos_token == hf.unk_token == EOT
    assert len(hf) == 300


def test_gpt2_ids_match_hf_and_raw_bpe(gpt2_tokenizer_dir, gpt2_tok):
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    d = gpt2_tokenizer_dir
    hf = transformers.AutoTokenizer.from_pretrained(d)
    raw = RawTokenizer(models.BPE.from_file(os.path.join(d, "vocab.json"),
                                            os.path.join(d, "merges.txt")))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert isinstance(gpt2_tok, GPT2Tokenizer) and gpt2_tok.hf_tokenizer.eos_token == EOT
    for text in TEXTS + [" leading space", "The king and the queen"]:
        ids = gpt2_tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False) == raw.encode(text).ids
    # merges are used
    assert len(gpt2_tok.encode("The quick brown fox jumps")) < len("The quick brown fox jumps")


def test_gpt2_specials_and_round_trip(gpt2_tok):
    eot = gpt2_tok.hf_tokenizer.convert_tokens_to_ids(EOT)
    assert (gpt2_tok.eos_token_id == gpt2_tok.bos_token_id == gpt2_tok.unk_token_id
            == gpt2_tok.pad_token_id == eot)
    assert gpt2_tok.vocab_size == 300 and gpt2_tok.model_max_length == 1024
    for text in TEXTS:
        ids = gpt2_tok.encode(text)
        assert eot not in ids
        assert gpt2_tok.decode(ids) == text
        assert gpt2_tok.encode(text, add_special_tokens=True) == [eot, *ids]
        assert gpt2_tok.decode([*ids, eot]) == text
        assert gpt2_tok.decode([*ids, eot], skip_special_tokens=False) == text + EOT


def test_gpt2_encode_adds_specials_only_when_asked(gpt2_tokenizer_dir):
    tok = GPT2Tokenizer(gpt2_tokenizer_dir, add_bos_token=True)  # HF itself would now prepend bos
    hf_ids = tok.hf_tokenizer.encode("hello")
    assert hf_ids[0] == tok.bos_token_id
    assert tok.encode("hello") == hf_ids[1:]
    assert tok.encode("hello", add_special_tokens=True) == hf_ids


def test_gpt2_save_load_round_trip(gpt2_tok, tmp_path):
    gpt2_tok.save_pretrained(tmp_path / "saved")
    with open(tmp_path / "saved" / MARKER_FILE) as f:
        assert json.load(f)["tokenizer_type"] == "gpt2"
    def specials(t):
        return t.pad_token_id, t.eos_token_id, t.bos_token_id, t.unk_token_id

    saved = tmp_path / "saved"
    for loaded in (GPT2Tokenizer.from_pretrained(saved), load_tokenizer(saved)):
        assert type(loaded) is GPT2Tokenizer
        assert loaded.vocab_size == gpt2_tok.vocab_size
        assert specials(loaded) == specials(gpt2_tok)
        for text in TEXTS:
            assert (loaded.encode(text, add_special_tokens=True)
                    == gpt2_tok.encode(text, add_special_tokens=True))


def test_gpt2_minimal_dir_of_vocab_and_merges_loads_like_the_full_one(gpt2_tokenizer_dir,
                                                                       gpt2_tok, tmp_path):
    """Issue 13 item 25: vocab.json + merges.txt alone (no tokenizer_config.json) loads."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(gpt2_tokenizer_dir, name), tmp_path)
    minimal = create_tokenizer("gpt2", name_or_path=tmp_path)
    assert minimal.vocab_size == gpt2_tok.vocab_size == 300
    assert (minimal.eos_token_id, minimal.bos_token_id, minimal.unk_token_id,
            minimal.pad_token_id) == (0, 0, 0, 0)
    for text in TEXTS + [f"two{EOT}docs"]:
        assert minimal.encode(text, add_special_tokens=True) == \
            gpt2_tok.encode(text, add_special_tokens=True)
        assert minimal.decode(minimal.encode(text)) == gpt2_tok.decode(gpt2_tok.encode(text))


def test_local_gpt2_directories_load_like_autotokenizer_without_it(gpt2_tokenizer_dir,
                                                                     gpt2_tok, tmp_path):
    """A local directory loads with the class AutoTokenizer would pick, named directly (not
    AutoTokenizer, which imports torch): the fixture, a save_pretrained copy, the same next to
    a GPT-2 model config, a character tokenizer's HF export. Same class, ids, specials and
    decoding as AutoTokenizer.from_pretrained gives."""
    from cleangpt_jax.tokenizers.gpt2 import _local_tokenizer_class

    saved = gpt2_tok.save_pretrained(tmp_path / "saved")
    with_model = shutil.copytree(gpt2_tokenizer_dir, tmp_path / "with_model")
    transformers.GPT2Config(vocab_size=300, n_layer=1, n_embd=8, n_head=2).save_pretrained(
        with_model)
    char = CharacterTokenizer.from_text("".join(TEXTS))
    char.to_hf_tokenizer().save_pretrained(tmp_path / "char_hf")
    texts = TEXTS + [f"two{EOT}docs", " leading space", "unseen \u00e9\u4e2d"]
    for directory in (gpt2_tokenizer_dir, saved, with_model, tmp_path / "char_hf"):
        directory = str(directory)
        assert _local_tokenizer_class(directory) is not transformers.AutoTokenizer, directory
        auto = transformers.AutoTokenizer.from_pretrained(directory)
        mine = GPT2Tokenizer(directory)
        hf = mine.hf_tokenizer
        assert type(hf) is type(auto), directory
        assert len(hf) == len(auto) and hf.get_vocab() == auto.get_vocab()
        assert hf.model_max_length == auto.model_max_length
        for name in ("bos", "eos", "unk", "pad"):
            assert getattr(hf, f"{name}_token_id") == getattr(auto, f"{name}_token_id") or (
                name == "pad" and auto.pad_token_id is None
                and hf.pad_token_id == auto.eos_token_id), (directory, name)
        for text in texts:
            ids = auto.encode(text, add_special_tokens=False)
            assert hf.encode(text, add_special_tokens=False) == ids, (directory, text)
            assert hf.encode(text) == auto.encode(text)
            for skip in (True, False):
                assert mine.decode(ids, skip_special_tokens=skip) == auto.decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert _local_tokenizer_class("gpt2") is transformers.AutoTokenizer  # a hub name


def test_load_tokenizer_falls_back_to_gpt2_without_marker(gpt2_tokenizer_dir):
    assert not os.path.exists(os.path.join(gpt2_tokenizer_dir, MARKER_FILE))
    assert isinstance(load_tokenizer(gpt2_tokenizer_dir), GPT2Tokenizer)


def test_gpt2_missing_or_empty_dir_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(ValueError) as e:
        GPT2Tokenizer(missing)
    msg = str(e.value)
    assert missing in msg and "does not exist" in msg
    assert "vocab.json + merges.txt or tokenizer.json" in msg
    assert "\n" not in msg and e.value.__cause__ is None
    with pytest.raises(ValueError, match="holds no tokenizer files.*vocab.json \\+ merges.txt "
                                         "or tokenizer.json"):
        create_tokenizer("gpt2", name_or_path=tmp_path)


# ---------------------------------------------------------------- shared behaviour

def test_decode_accepts_lists_numpy_and_jax(any_tok):
    text = "héllo world"
    ids = any_tok.encode(text)
    for arr in (ids, np.array(ids, np.int32), jnp.array(ids, jnp.int32)):
        assert any_tok.decode(arr) == text
    with pytest.raises(ValueError, match="1-D"):
        any_tok.decode(np.array([ids]))
    assert ids_to_list(np.array([], np.int32)) == []


def test_batch_longest_padding(any_tok):
    batch = any_tok(TEXTS, add_special_tokens=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    seqs = [any_tok.encode(t, add_special_tokens=True) for t in TEXTS]
    assert ids.dtype == mask.dtype == np.int32
    assert ids.shape == mask.shape == (len(TEXTS), max(map(len, seqs)))
    for row_ids, row_mask, seq in zip(ids, mask, seqs):
        assert row_ids[:len(seq)].tolist() == seq
        assert (row_ids[len(seq):] == any_tok.pad_token_id).all()
        assert row_mask.tolist() == [1] * len(seq) + [0] * (ids.shape[1] - len(seq))
    assert any_tok.decode_batch(ids) == TEXTS


def test_batch_max_length_and_truncation(any_tok):
    seqs = [any_tok.encode(t) for t in TEXTS]
    n = sorted(map(len, seqs))[len(seqs) // 2]  # some sequences longer than n, some shorter
    assert 0 < n < max(map(len, seqs))
    batch = any_tok.encode_batch(TEXTS, padding="max_length", max_length=n, truncation=True)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(TEXTS), n)
    for row_ids, row_mask, seq in zip(batch["input_ids"], batch["attention_mask"], seqs):
        k = min(len(seq), n)
        assert row_ids.tolist() == seq[:k] + [any_tok.pad_token_id] * (n - k)
        assert row_mask.tolist() == [1] * k + [0] * (n - k)
    wide = any_tok.encode_batch(TEXTS, padding="max_length", max_length=100)
    assert wide["input_ids"].shape == (len(TEXTS), 100)
    assert wide["attention_mask"].sum() == sum(map(len, seqs))
    with pytest.raises(ValueError, match="truncation=True"):
        any_tok.encode_batch(TEXTS, padding="max_length", max_length=n)
    with pytest.raises(ValueError, match="padding must be"):
        any_tok.encode_batch(TEXTS, padding="right")


def test_batch_single_text_and_default_max_length(char_tok, gpt2_tok):
    single = char_tok("hello")
    assert single["input_ids"].tolist() == [char_tok.encode("hello")]
    assert single["attention_mask"].tolist() == [[1] * 5]
    with pytest.raises(ValueError, match="max_length is required"):
        char_tok(["hello"], padding="max_length")  # no model_max_length
    assert gpt2_tok(["hi"], padding="max_length")["input_ids"].shape == (1, 1024)


# ---------------------------------------------------------------- packing support

def test_document_separator_is_a_newline_for_characters_else_eos(char_tok, gpt2_tok):
    assert char_tok.document_separator() == char_tok.encode("\n")
    assert gpt2_tok.document_separator() == [gpt2_tok.eos_token_id]

    class NoEos(CharacterTokenizer):
        document_separator_text = None
        eos_token_id = None

    with pytest.raises(ValueError, match="NoEos has no EOS token to separate documents"):
        NoEos("ab").document_separator()


def test_fingerprint_follows_the_vocabulary_not_the_directory(gpt2_tok, tmp_path):
    copy = GPT2Tokenizer.from_pretrained(gpt2_tok.save_pretrained(tmp_path / "copy"))
    assert copy.fingerprint() == gpt2_tok.fingerprint()
    assert (CharacterTokenizer.from_text("abc").fingerprint()
            != CharacterTokenizer.from_text("abd").fingerprint())


# ---------------------------------------------------------------- registry

def test_register_custom_tokenizer(tmp_path):
    @register_tokenizer("Bytes-Test")
    class ByteTokenizer(Tokenizer):
        """UTF-8 bytes as ids; 256 = pad."""
        pad_token_id = eos_token_id = 256

        def __init__(self, offset=0):
            self.offset = offset

        def encode(self, text, add_special_tokens=False):
            return list(text.encode("utf-8"))

        def decode(self, ids, skip_special_tokens=True):
            return bytes(i for i in ids_to_list(ids) if i < 256).decode("utf-8")

        @property
        def vocab_size(self):
            return 257

        def save_pretrained(self, directory):
            os.makedirs(directory, exist_ok=True)
            write_marker(directory, self.tokenizer_type)
            return directory

        @classmethod
        def from_pretrained(cls, directory_or_name):
            return cls()

    assert ByteTokenizer.tokenizer_type == "bytes-test" and "bytes-test" in registered_tokenizers()
    tok = create_tokenizer("BYTES-TEST", offset=3)
    assert type(tok) is ByteTokenizer and tok.offset == 3
    assert tok(["é", "a"])["input_ids"].tolist() == [[195, 169], [97, 256]]
    assert type(load_tokenizer(tok.save_pretrained(tmp_path / "b"))) is ByteTokenizer
    # re-registering is a no-op
    assert register_tokenizer("bytes-test", ByteTokenizer) is ByteTokenizer
    with pytest.raises(ValueError, match="already registered"):
        register_tokenizer("bytes-test", CharacterTokenizer)
    with pytest.raises(TypeError):
        register_tokenizer("not-a-tokenizer", dict)


def test_unknown_tokenizer_type_lists_registered_names(tmp_path):
    with pytest.raises(ValueError,
                       match="unknown tokenizer type 'nope'; registered: .*character.*gpt2"):
        create_tokenizer("nope")
    write_marker(tmp_path, "nope")
    with pytest.raises(ValueError, match="unknown tokenizer type 'nope'; registered: .*character"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_empty_or_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError,
                       match=f"no tokenizer in '{tmp_path}': expected {MARKER_FILE}.*vocab.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
