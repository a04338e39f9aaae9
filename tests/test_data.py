"""The data package: the Shakespeare corpus, packing, the token cache, batches, mixtures, bad
input."""

import json
import os

import datasets
import numpy as np
import pytest

from cleangpt_jax import data as data_lib
from cleangpt_jax.config import ConfigError, get_config
from cleangpt_jax.data import corpus
from cleangpt_jax.tokenizers import CharacterTokenizer, build_tokenizer, create_tokenizer
from cleangpt_jax.tokenizers.testing import build_local_gpt2_tokenizer

DOCS = ["The quick brown fox jumps over the lazy dog.",
        "Once upon a time, there was a little girl.",
        "To be, or not to be, that is the question.",
        "Hello world! Hello there, how are you today?"]


@pytest.fixture(scope="module")
def bpe(gpt2_tokenizer_dir):
    return create_tokenizer("gpt2", name_or_path=gpt2_tokenizer_dir)


def make_config(block_size=8, tokenizer="gpt2", **data):
    cfg = get_config()
    cfg.model.block_size = block_size
    cfg.tokenizer.type = tokenizer
    for key, value in data.items():
        cfg.data[key] = value
    return cfg


def write_files(directory, texts, suffix=".txt"):
    os.makedirs(directory, exist_ok=True)
    for i, text in enumerate(texts):
        with open(os.path.join(directory, f"doc{i:02d}{suffix}"), "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(directory, f"*{suffix}")


def packed(tokenizer, docs):
    """The reference packed stream: the documents' ids joined by EOS."""
    out = []
    for i, doc in enumerate(docs):
        out += ([tokenizer.eos_token_id] if i else []) + tokenizer.encode(doc)
    return np.asarray(out)


def save_dataset(path, **splits):
    splits = {k: datasets.Dataset.from_dict(v) for k, v in splits.items()}
    datasets.DatasetDict(splits).save_to_disk(path)
    return str(path)


# ---------------------------------------------------------------- the embedded Shakespeare corpus


def test_shakespeare_corpus_is_plain_play_text():
    plays = corpus.shakespeare_plays()
    text = corpus.shakespeare_text()
    assert len(plays) == len(corpus.play_files()) >= 37 and len(text) > 4_000_000
    assert [name for name, _ in plays] == [p.stem for p in corpus.play_files()]
    assert "To be, or not to be: that is the question:" in text
    assert "\nHAMLET:\n" in text and "\nACT I\n" in text
    assert "\nSCENE I. Elsinore. A platform before the castle.\n" in text
    for marker in ("**", "#", "_Enter", "_", "*", "\\[", "  \n", "\n\n\n"):
        assert marker not in text, marker


def test_default_config_trains_on_shakespeare_characters(tmp_path):
    cfg = get_config()
    tok = build_tokenizer(cfg)
    assert isinstance(tok, CharacterTokenizer) and 70 < tok.vocab_size < 100
    data = data_lib.load_dataset(cfg, tok, cache_dir=tmp_path)
    assert (data.num_documents, data.num_val_documents) == (len(corpus.play_files()) - 4, 4)
    # no separator at the split
    assert len(data.train) + len(data.val) == len(corpus.shakespeare_text()) - 1
    assert tok.decode(data.train[:26]) == "A Midsummer Night's Dream\n"
    assert tok.decode(data.val[:15]) == "Macbeth\n\nACT I\n"  # the last 10% of the plays
    assert tok.unk_token_id not in np.asarray(data.val)


def test_markdown_to_text_exact():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter HORATIO and\nMARCELLUS_\n\n"
          "**HORATIO**  \nFriends to this ground.  \n__\\[Aside]_  \n"
          "And liegemen\\--to the Dane.\n\n\n")
    assert corpus.markdown_to_text(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter HORATIO and\nMARCELLUS\n\n"
        "HORATIO:\nFriends to this ground.\n[Aside]\nAnd liegemen--to the Dane.\n")


# ---------------------------------------------------------------- packing


def test_bpe_packing_puts_eos_between_documents(tmp_path, bpe):
    # a blank document is dropped
    glob = write_files(tmp_path / "docs", DOCS[:2] + ["  \n", DOCS[2]])
    data = data_lib.load_dataset(make_config(source="text", files=glob, val_fraction=0.0), bpe,
                                 cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.train, packed(bpe, [DOCS[0], DOCS[1], DOCS[2]]))
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert data.val is None and data.num_documents == 3
    assert np.count_nonzero(np.asarray(data.train) == bpe.eos_token_id) == 2


def test_character_packing_joins_documents_with_newlines(tmp_path):
    cfg = make_config(tokenizer="character", source="text",
                      files=write_files(tmp_path / "d", ["ab a", "ba"]), val_fraction=0.0,
                      block_size=2)
    tok = build_tokenizer(cfg)
    assert isinstance(tok, CharacterTokenizer) and set(tok.itos[4:]) == {"a", "b", " ", "\n"}
    data = data_lib.load_dataset(cfg, tok, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.train, tok.encode("ab a\nba"))


def test_tokenising_in_several_processes_gives_the_same_stream(tmp_path, bpe):
    docs = [f"{DOCS[i % 4]} Number {i}." for i in range(12)]
    glob = write_files(tmp_path / "docs", docs)
    one = data_lib.load_dataset(make_config(source="text", files=glob, num_proc=1), bpe,
                                cache_dir=tmp_path / "c1")
    two = data_lib.load_dataset(make_config(source="text", files=glob, num_proc=2), bpe,
                                cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(one.train, two.train)
    np.testing.assert_array_equal(one.val, two.val)
    # val_fraction 0.1 of 12: 1 doc
    np.testing.assert_array_equal(one.train, packed(bpe, docs[:11]))
    np.testing.assert_array_equal(one.val, packed(bpe, docs[11:]))


# ---------------------------------------------------------------- the cache


def count_encode_calls(monkeypatch, tokenizer):
    calls = []
    original = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode",
                        lambda text, **kw: calls.append(text) or original(text, **kw))
    return calls


def test_cache_is_reused_without_tokenising(tmp_path, bpe, monkeypatch):
    cfg = make_config(source="text", files=write_files(tmp_path / "docs", DOCS))
    calls = count_encode_calls(monkeypatch, bpe)
    first = data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")
    assert sorted(calls) == sorted(DOCS)
    calls.clear()
    second = data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")
    assert calls == [] and second.cache_path == first.cache_path
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)
    # no temp dirs
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(first.cache_path)]


def test_cache_key_follows_what_determines_the_stream(tmp_path, bpe):
    glob = write_files(tmp_path / "docs", DOCS)
    def path(cfg, tok=bpe):
        return data_lib.load_dataset(cfg, tok, cache_dir=tmp_path / "cache").cache_path

    base = path(make_config(source="text", files=glob))
    assert path(make_config(source="text", files=glob)) == base
    # num_proc does not change the stream
    assert path(make_config(source="text", files=glob, num_proc=2)) == base
    assert path(make_config(source="text", files=glob, max_samples=3)) != base
    assert path(make_config(source="text", files=glob, val_fraction=0.5)) != base
    smaller_bpe = create_tokenizer(
        "gpt2", name_or_path=build_local_gpt2_tokenizer(tmp_path / "bpe280", vocab_size=280))
    assert path(make_config(source="text", files=glob), smaller_bpe) != base
    chars = CharacterTokenizer.from_text("".join(DOCS))
    assert path(make_config(source="text", files=glob), chars) != base
    # the same tokenizer loaded from another directory keeps the key
    copy = bpe.save_pretrained(tmp_path / "tok_copy")
    copied = create_tokenizer("gpt2", name_or_path=copy)
    assert path(make_config(source="text", files=glob), copied) == base
    with open(tmp_path / "docs" / "doc00.txt", "a") as f:  # an edited file is a new stream
        f.write(" More.")
    assert path(make_config(source="text", files=glob)) != base


class InterruptedOn:
    """`tokenizer`, except that encoding `text` raises KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self, tokenizer, text):
        self.tokenizer, self.text = tokenizer, text

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text, *args, **kwargs):
        if text == self.text:
            raise KeyboardInterrupt
        return self.tokenizer.encode(text, *args, **kwargs)


def test_interrupted_cache_build_leaves_nothing_behind(tmp_path, bpe):
    """Ctrl-C while the validation documents are tokenised (train.bin already written): no
    cache, complete or partial, is left, and the next load builds the whole cache."""
    cfg = make_config(source="text", files=write_files(tmp_path / "docs", DOCS))
    with pytest.raises(KeyboardInterrupt):  # DOCS[3] is the validation document
        data_lib.load_dataset(cfg, InterruptedOn(bpe, DOCS[3]), cache_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []
    data = data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.train, packed(bpe, DOCS[:3]))
    np.testing.assert_array_equal(data.val, packed(bpe, DOCS[3:]))


# ---------------------------------------------------------------- documents


@pytest.mark.parametrize("columns, expected", [
    ({"id": [1, 2], "story": ["s1", "s2"], "text": ["t1", "t2"]}, "t"),
    ({"id": [1, 2], "title": ["x", "y"], "story": ["s1", "s2"]}, "s"),
    ({"id": [1, 2], "body": ["b1", "b2"], "other": ["o1", "o2"]}, "b"),
])
def test_text_column_auto_detection(tmp_path, columns, expected):
    saved = save_dataset(tmp_path / "ds", train=columns)
    docs = data_lib.load_documents(make_config(source="hf", name=saved, val_fraction=0.0).data)
    assert docs.train["text"] == [f"{expected}1", f"{expected}2"]


def test_missing_text_column_error_names_the_columns(tmp_path, bpe):
    saved = save_dataset(tmp_path / "ds", train={"id": [1], "body": ["b"]})
    with pytest.raises(ConfigError, match=r"data.text_column='content'.*\['id', 'body'\]"):
        data_lib.load_dataset(make_config(source="hf", name=saved, text_column="content"), bpe,
                              cache_dir=tmp_path / "cache")
    saved = save_dataset(tmp_path / "ints", train={"id": [1], "n": [2]})
    with pytest.raises(ConfigError, match="no string column"):
        data_lib.load_documents(make_config(source="hf", name=saved).data)


def test_max_samples_keeps_the_first_documents(tmp_path, bpe):
    glob = write_files(tmp_path / "docs", DOCS)
    cfg = make_config(source="text", files=glob, max_samples=2, val_fraction=0.0)
    data = data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.train, packed(bpe, DOCS[:2]))


def test_hf_json_builder_with_local_files_and_streaming(tmp_path, bpe):
    with open(tmp_path / "a.jsonl", "w") as f:
        for i, doc in enumerate(DOCS):
            f.write(json.dumps({"id": i, "story": doc}) + "\n")
    cfg = make_config(source="hf", name="json", files=str(tmp_path / "a.jsonl"), val_fraction=0.25)
    data = data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.train, packed(bpe, DOCS[:3]))
    np.testing.assert_array_equal(data.val, packed(bpe, DOCS[3:]))
    cfg.data.streaming, cfg.data.max_samples = True, 2
    data = data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(data.train, packed(bpe, DOCS[:1]))
    np.testing.assert_array_equal(data.val, packed(bpe, DOCS[1:2]))
    cfg.data.max_samples = None
    with pytest.raises(ConfigError, match="streaming=True needs data.max_samples"):
        data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")


def test_named_validation_split_versus_val_fraction(tmp_path, bpe):
    saved = save_dataset(tmp_path / "ds", train={"text": DOCS[:3]}, validation={"text": DOCS[3:]})
    named = data_lib.load_dataset(make_config(source="hf", name=saved, val_split="validation"), bpe,
                                  cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(named.train, packed(bpe, DOCS[:3]))
    np.testing.assert_array_equal(named.val, packed(bpe, DOCS[3:]))
    assert (named.num_documents, named.num_val_documents) == (3, 1)
    fraction = data_lib.load_dataset(make_config(source="hf", name=saved, val_fraction=1 / 3), bpe,
                                     cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(fraction.train, packed(bpe, DOCS[:2]))
    np.testing.assert_array_equal(fraction.val, packed(bpe, DOCS[2:3]))
    with pytest.raises(ConfigError,
                       match=r"split 'test' not in .*\['train', 'validation'\]"):
        data_lib.load_dataset(make_config(source="hf", name=saved, val_split="test"), bpe,
                              cache_dir=tmp_path / "c")


def test_single_document_splits_its_tokens(tmp_path, bpe):
    text = " ".join(DOCS * 3)
    cfg = make_config(source="text", files=write_files(tmp_path / "docs", [text]), val_fraction=0.2)
    data = data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")
    ids = bpe.encode(text)
    n_val = round(0.2 * len(ids))
    np.testing.assert_array_equal(data.train, ids[:-n_val])
    np.testing.assert_array_equal(data.val, ids[-n_val:])


# ---------------------------------------------------------------- batches


def window_stream(num_windows, block_size):
    """A stream whose window w holds w * block_size ... (w + 1) * block_size - 1 (plus a ragged
    tail)."""
    return np.arange(num_windows * block_size + block_size // 2, dtype=np.uint32)


def windows_of(batch, block_size):
    ids = batch["input_ids"]
    assert np.all(ids % block_size == np.arange(block_size))  # whole, aligned windows
    return ids[:, 0] // block_size


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = window_stream(50, 8)
    def batch(seed, step):
        return data_lib.batch_for_step(tokens, seed=seed, step=step, global_batch_size=4,
                                       block_size=8)["input_ids"]

    b = data_lib.batch_for_step(tokens, seed=0, step=3, global_batch_size=4, block_size=8)
    assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (4, 8)
    np.testing.assert_array_equal(b["attention_mask"], np.ones((4, 8), np.int32))
    np.testing.assert_array_equal(batch(0, 3), batch(0, 3))
    assert not np.array_equal(batch(0, 3), batch(0, 4))
    assert not np.array_equal(batch(0, 3), batch(1, 3))


def test_process_slices_concatenate_to_the_global_batch():
    tokens = window_stream(37, 4)
    for step in (0, 5, 9):  # 9 * 8 rows crosses the epoch boundary at 37
        full = data_lib.batch_for_step(tokens, seed=2, step=step, global_batch_size=8,
                                       block_size=4)["input_ids"]
        for count in (2, 4, 8):
            parts = [data_lib.batch_for_step(tokens, seed=2, step=step, global_batch_size=8,
                                             block_size=4, process_index=p,
                                             process_count=count)["input_ids"]
                     for p in range(count)]
            assert parts[0].shape == (8 // count, 4)
            np.testing.assert_array_equal(np.concatenate(parts), full)
    with pytest.raises(ConfigError,
                       match="batch size 8 .* not divisible by the process count 3"):
        data_lib.batch_for_step(tokens, seed=0, step=0, global_batch_size=8, block_size=4,
                                process_count=3)


@pytest.mark.parametrize("num_windows, batch_size", [(48, 8), (37, 8), (5, 8)])
def test_each_epoch_visits_every_window_once(num_windows, batch_size):
    tokens = window_stream(num_windows, 8)
    steps = data_lib.steps_per_epoch(tokens, batch_size, 8)
    assert steps == -(-num_windows // batch_size)
    seen = np.concatenate([
        windows_of(data_lib.batch_for_step(tokens, seed=7, step=s, global_batch_size=batch_size,
                                           block_size=8), 8)
        for s in range(3 * steps)])
    for epoch in range(2):  # rows g of epoch e are g in [e * W, (e + 1) * W)
        rows = seen[epoch * num_windows:(epoch + 1) * num_windows]
        assert sorted(rows) == list(range(num_windows))
    if num_windows > batch_size:
        # reshuffled
        assert not np.array_equal(seen[:num_windows], seen[num_windows:2 * num_windows])
        assert not np.array_equal(seen[:num_windows], np.arange(num_windows))


def test_shuffle_index_is_a_permutation():
    for n in (1, 2, 3, 7, 64, 1000):
        perm = data_lib.shuffle_index(np.arange(n), n, (0, 1))
        assert sorted(perm) == list(range(n))
    assert not np.array_equal(data_lib.shuffle_index(np.arange(1000), 1000, (0, 1)),
                              data_lib.shuffle_index(np.arange(1000), 1000, (0, 2)))


def test_eval_batches_cover_the_validation_stream_in_order():
    tokens = window_stream(10, 4)
    batches = data_lib.eval_batches(tokens, global_batch_size=4, block_size=4, num_batches=100)
    assert len(batches) == 3  # ceil(10 / 4): never a batch of padding only
    ids = np.concatenate([b["input_ids"] for b in batches])
    mask = np.concatenate([b["attention_mask"] for b in batches])
    np.testing.assert_array_equal(ids[:10].reshape(-1), np.arange(40))
    np.testing.assert_array_equal(mask.min(axis=1), [1] * 10 + [0] * 2)
    assert len(data_lib.eval_batches(tokens, global_batch_size=4, block_size=4, num_batches=2)) == 2
    halves = [data_lib.eval_batches(tokens, global_batch_size=4, block_size=4, num_batches=3,
                                    process_index=p,
                              process_count=2) for p in range(2)]
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([h[i]["input_ids"] for h in halves]),
                                      batches[i]["input_ids"])


# ---------------------------------------------------------------- mixtures


def test_schedule_weights_at_chosen_steps():
    linear = data_lib.make_schedule({"type": "linear", "start_weights": [1, 0],
                                     "end_weights": [1, 3],
                               "transition_steps": 100, "start_step": 50}, 2)
    np.testing.assert_allclose(linear(0), [1, 0])
    np.testing.assert_allclose(linear(50), [1, 0])
    np.testing.assert_allclose(linear(100), [1 / 2.5, 1.5 / 2.5])
    np.testing.assert_allclose(linear(10_000), [0.25, 0.75])
    step = data_lib.make_schedule(
        {"type": "step", "boundaries": [(0, [1, 0, 0]), (10, [0, 1, 1]), (20, [0, 0, 2])]}, 3)
    np.testing.assert_allclose(step(9), [1, 0, 0])
    np.testing.assert_allclose(step(10), [0, 0.5, 0.5])
    np.testing.assert_allclose(step(25), [0, 0, 1])
    expo = data_lib.make_schedule(
        {"type": "exponential", "weights": [1, 1], "decay_rates": [0.01, 0.0]}, 2)
    np.testing.assert_allclose(expo(100), [np.exp(-1) / (1 + np.exp(-1)), 1 / (1 + np.exp(-1))])
    np.testing.assert_allclose(expo(10**6), [0, 1])  # no underflow to 0/0
    np.testing.assert_allclose(data_lib.make_schedule({"weights": [3, 1]}, 2)(7), [0.75, 0.25])
    with pytest.raises(ConfigError, match="unknown mixture schedule type 'cosine'"):
        data_lib.make_schedule({"type": "cosine"}, 2)
    with pytest.raises(ConfigError, match="3 weights, the mixture 2 sources"):
        data_lib.make_schedule({"weights": [1, 1, 1]}, 2)
    with pytest.raises(ConfigError, match="must start at step 0"):
        data_lib.make_schedule({"type": "step", "boundaries": [(5, [1, 1])]}, 2)


def test_mixture_rows_follow_the_schedule():
    a, b = window_stream(40, 4), window_stream(30, 4) + 100_000  # b's tokens are >= 100000
    schedule = data_lib.make_schedule({"type": "linear", "start_weights": [1, 0],
                                       "end_weights": [0.2, 0.8],
                                 "transition_steps": 100}, 2)
    mix = data_lib.Mixture((a, b), schedule)

    def fraction_from_b(steps):
        rows = np.concatenate([data_lib.batch_for_step(mix, seed=3, step=s, global_batch_size=32,
                                                       block_size=4)["input_ids"] for s in steps])
        assert np.all(rows % 4 == np.arange(4) % 4)
        return np.mean(rows[:, 0] >= 100_000)

    assert fraction_from_b(range(0, 1)) == 0.0
    assert abs(fraction_from_b(range(200, 260)) - 0.8) < 0.05  # 1920 rows: 4.5 sigma
    assert abs(fraction_from_b(range(50, 51)) - 0.4) < 0.25
    mid = data_lib.batch_for_step(mix, seed=3, step=50, global_batch_size=32,
                                  block_size=4)["input_ids"]
    np.testing.assert_array_equal(mid, data_lib.batch_for_step(mix, seed=3, step=50,
                                                               global_batch_size=32,
                                                         block_size=4)["input_ids"])
    parts = [data_lib.batch_for_step(mix, seed=3, step=50, global_batch_size=32, block_size=4,
                                     process_index=p,
                               process_count=4)["input_ids"] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), mid)
    assert data_lib.steps_per_epoch(mix, 10, 4) == 7  # (40 + 30) windows / 10


def test_load_dataset_builds_a_mixture_from_the_config(tmp_path, bpe):
    cfg = make_config(source="text", files=write_files(tmp_path / "a", DOCS[:2]), val_fraction=0.5)
    cfg.data.mixture = {"sources": [{}, {"files": write_files(tmp_path / "b", DOCS[2:])}],
                        "schedule": {"type": "exponential", "weights": [1, 1],
                                     "decay_rates": [0.1, 0]}}
    data = data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")
    assert isinstance(data.train, data_lib.Mixture) and len(data.cache_path) == 2
    np.testing.assert_array_equal(data.train.streams[0], packed(bpe, DOCS[:1]))
    np.testing.assert_array_equal(data.train.streams[1], packed(bpe, DOCS[2:3]))
    np.testing.assert_allclose(data.train.weights(10),
                               [np.exp(-1) / (1 + np.exp(-1)), 1 / (1 + np.exp(-1))])
    batches = data_lib.eval_batches(data.val, global_batch_size=2, block_size=8)
    first = batches[0]["input_ids"]  # eval rows alternate sources
    np.testing.assert_array_equal(first[0], data.val.streams[0][:8])
    np.testing.assert_array_equal(first[1], data.val.streams[1][:8])
    cfg.data.mixture = {"sources": [{"filez": "x"}]}
    with pytest.raises(ConfigError, match=r"sources\[0\] has unknown key\(s\) \['filez'\]"):
        data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")


def test_data_label_names_the_source():
    assert data_lib.data_label(make_config().data) == "shakespeare"
    assert data_lib.data_label(make_config(source="text", files="a/*.txt").data) == "text:a/*.txt"
    assert data_lib.data_label(make_config(source="hf", name="json", files="x.jsonl").data) == (
        "hf:json")
    cfg = make_config()
    cfg.data.mixture = {"sources": [{}, {"source": "text", "files": "b.txt"}]}
    assert data_lib.data_label(cfg.data) == "mixture"
    assert [data_lib.data_label(d) for d in data_lib.data_sections(cfg)] == [
        "shakespeare", "text:b.txt"]


# ---------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors(tmp_path, bpe, monkeypatch):
    load = lambda cfg: data_lib.load_dataset(cfg, bpe, cache_dir=tmp_path / "cache")  # noqa: E731
    with pytest.raises(ConfigError,
                       match="no files match data.files pattern '.*nothing/\\*.txt'"):
        load(make_config(source="text", files=f"{tmp_path}/nothing/*.txt"))
    with pytest.raises(ConfigError, match="unknown data.source 'web'"):
        load(make_config(source="web"))
    with pytest.raises(ConfigError, match="the dataset is empty"):
        load(make_config(source="text", files=write_files(tmp_path / "blank", ["", " \n"])))
    no_rows = datasets.Dataset.from_dict(
        {"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
    empty = data_lib.Source(load=lambda data: (no_rows, None),
                            fingerprint=lambda data: {})
    monkeypatch.setitem(data_lib.SOURCES, "empty", empty)
    with pytest.raises(ConfigError, match="the dataset is empty"):
        load(make_config(source="empty"))
    short = write_files(tmp_path / "short", ["Hello world"])
    with pytest.raises(ConfigError, match=r"training data has \d+ tokens, shorter than "
                                                 r"one block \(block_size=64\)"):
        load(make_config(source="text", files=short, val_fraction=0.0, block_size=64))
    with pytest.raises(ConfigError, match="val_split='validation' needs source='hf'"):
        load(make_config(source="text", files=short, val_split="validation"))
    with pytest.raises(ConfigError, match="shorter than one block"):
        data_lib.batch_for_step(np.arange(5), seed=0, step=0, global_batch_size=2, block_size=8)


def test_token_dtype_fits_the_vocabulary():
    assert data_lib.token_dtype(300) == np.uint16 and data_lib.token_dtype(65_536) == np.uint16
    assert data_lib.token_dtype(65_537) == np.uint32 and data_lib.token_dtype(100_000) == np.uint32
