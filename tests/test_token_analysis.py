"""Token analysis: hand-counted statistics, coverage, pruned tokenizers, the CLI."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from cleangpt_jax import token_analysis as ta
from cleangpt_jax.config import ConfigError, get_config
from cleangpt_jax.tokenizers import PrunedTokenizer, create_tokenizer, load_tokenizer
from helpers import run_tool

# Tests of what programs compute: XLA optimisations off, one compile cache (conftest).
pytestmark = pytest.mark.usefixtures("fast_compile")


def text_config(path, cache_dir):
    cfg = get_config()
    cfg.data.source, cfg.data.files, cfg.data.cache_dir = "text", str(path), str(cache_dir)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rnd = random.Random(0)
    words = ("the king and the queen had three sons who liked to walk in the woods and pick "
             "flowers for their mother").split()
    lines = [" ".join(rnd.choice(words) for _ in range(10)) + "." for _ in range(50)]
    path = tmp_path_factory.mktemp("ta") / "corpus.txt"
    path.write_text("\n".join(lines))
    return {"path": path, "lines": lines}


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    return create_tokenizer("gpt2", name_or_path=gpt2_tokenizer_dir)


# ------------------------------------------------------------------------------ statistics

def test_statistics_of_a_hand_counted_corpus(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("aab ab")
    (tmp_path / "docs" / "2.txt").write_text("ba")
    cfg = text_config(tmp_path / "docs" / "*.txt", tmp_path / "cache")
    cfg.data.val_fraction = 0.0
    tok = ta.resolve_tokenizer("character", cfg)  # <unk> <pad> <bos> <eos> '\n' ' ' a b
    assert tok.encode("\n ab") == [4, 5, 6, 7]
    out = tmp_path / "out"
    result = ta.analyze_dataset(cfg, tok, str(out), top_n=3, source="character")
    # The stream is "aab ab" "\n" "ba" (the character tokenizer's document separator is "\n"):
    # a x4, b x3, ' ' x1, '\n' x1; 9 characters, 3 words.
    assert result["total_tokens"] == 9 and result["special_tokens"] == 0
    assert result["unique_tokens"] == 4 and result["vocab_size"] == 8
    assert result["vocab_coverage"] == 0.5
    assert result["num_chars"] == 9 and result["num_words"] == 3
    assert result["tokens_per_char"] == 1.0 and result["tokens_per_word"] == 3.0
    assert result["top_tokens"] == [
        {"id": 6, "token": "a", "count": 4, "fraction": 4 / 9},
        {"id": 7, "token": "b", "count": 3, "fraction": 3 / 9},
        {"id": 4, "token": "\n", "count": 1, "fraction": 1 / 9}]  # ties: lower id first
    # coverage(n) = 4/9, 7/9, 8/9, 9/9
    assert result["coverage_thresholds"] == {"0.5": 2, "0.8": 3, "0.9": 4, "0.95": 4,
                                             "0.99": 4, "0.999": 4}
    assert result["data"] == {"source": f"text:{tmp_path / 'docs' / '*.txt'}",
                              "num_documents": 2}
    assert tuple(result) == ta.RESULT_KEYS and result["pruned"] is None
    assert json.loads((out / ta.JSON_FILE).read_text()) == result

    # One document split into train and validation inside a word ("aab a" | "b") still has
    # 2 words; two documents in separate splits do not run together.
    cfg.data.files, cfg.data.val_fraction = str(tmp_path / "docs" / "1.txt"), 0.2
    split = ta.analyze_dataset(cfg, tok, str(out))
    assert (split["total_tokens"], split["num_words"]) == (6, 2)
    cfg.data.files, cfg.data.val_fraction = str(tmp_path / "docs" / "*.txt"), 0.5
    two = ta.analyze_dataset(cfg, tok, str(out))
    assert (two["total_tokens"], two["num_words"]) == (8, 3)


def test_coverage_curve_and_thresholds():
    counts = np.array([0, 5, 3, 2, 0])
    np.testing.assert_allclose(ta.coverage_curve(counts), [0.5, 0.8, 1.0, 1.0, 1.0])
    assert [ta.vocab_size_for_coverage(counts, q) for q in (0.5, 0.8, 0.81, 0.999, 1.0)] == \
        [1, 2, 3, 3, 3]
    with pytest.raises(ConfigError, match="empty"):
        ta.coverage_curve(np.zeros(3, np.int64))
    with pytest.raises(ConfigError, match="another tokenizer"):
        ta.count_tokens([np.array([0, 1, 7])], vocab_size=5)


def test_words_are_counted_across_chunks_and_streams(monkeypatch):
    tok = create_tokenizer("character", text="ab cd")
    ids = np.array(tok.encode("ab cd ab"))
    monkeypatch.setattr(ta, "_CHUNK", 3)  # chunk boundaries inside words
    # A document split mid-word into train and validation streams is still one text.
    assert ta.text_length([ids[:4], ids[4:]], tok) == (8, 3)
    # A special token (here eos) separates documents, so it ends a word.
    with_eos = np.concatenate([ids[:2], [tok.eos_token_id], ids[:2]])
    assert ta.text_length([with_eos], tok) == (4, 2)


# ------------------------------------------------------------------------------ pruning

def test_pruned_gpt2_tokenizer_keeps_specials_once_and_round_trips(corpus, gpt2, tmp_path):
    assert gpt2.pad_token_id == gpt2.eos_token_id == gpt2.bos_token_id == gpt2.unk_token_id == 0
    ids = np.concatenate([gpt2.encode(line) + [gpt2.eos_token_id] for line in corpus["lines"]])
    counts = np.bincount(ids, minlength=gpt2.vocab_size)
    pruned = ta.prune_tokenizer(gpt2, counts, 0.9)

    # <|endoftext|> once (pad = eos = bos), then the added <unk>, then tokens by frequency.
    n2o = pruned.new_to_old
    assert n2o[0] == 0 and n2o[1] == -1 and list(n2o).count(0) == 1
    assert pruned.pad_token_id == pruned.eos_token_id == pruned.bos_token_id == 0
    assert pruned.unk_token_id == 1
    assert len(set(n2o.tolist())) == len(n2o) == pruned.vocab_size < gpt2.vocab_size
    kept = pruned.kept_base_ids
    np.testing.assert_array_equal(pruned.old_to_new[kept], np.flatnonzero(n2o >= 0))
    regular = n2o[2:]
    assert np.all(np.diff(counts[regular]) <= 0)  # most frequent first

    # The kept tokens cover the requested share, and one fewer would not.
    total = counts.sum()
    assert counts[kept].sum() / total == pytest.approx(pruned.coverage)
    assert pruned.coverage >= 0.9
    assert (counts[kept].sum() - counts[regular[-1]]) / total < 0.9

    # Covered text round-trips; anything else becomes <unk>.
    covered = [line for line in corpus["lines"] if np.isin(gpt2.encode(line), kept).all()]
    assert covered
    for line in covered:
        assert pruned.decode(pruned.encode(line)) == line
        assert len(pruned.encode(line)) == len(gpt2.encode(line))
    odd = "Zyx!? " + covered[0]
    assert pruned.unk_token_id in pruned.encode(odd)
    assert max(pruned.encode(odd)) < pruned.vocab_size
    assert pruned.decode(pruned.encode(odd), skip_special_tokens=False).startswith("<unk>")
    assert pruned.decode(pruned.encode(odd)).endswith(covered[0])

    # Saved and loaded through the tokenizer registry, as a training config would load it.
    directory = tmp_path / "pruned"
    pruned.save_pretrained(directory)
    for loaded in (load_tokenizer(directory),
                   create_tokenizer("pruned", name_or_path=directory),
                   ta.resolve_tokenizer(str(directory), None)):
        assert isinstance(loaded, PrunedTokenizer)
        np.testing.assert_array_equal(loaded.new_to_old, n2o)
        assert loaded.encode(odd) == pruned.encode(odd)
        assert loaded.decode(loaded.encode(covered[0])) == covered[0]
    saved = json.loads((directory / PrunedTokenizer.VOCAB_FILE).read_text())
    assert saved["old_to_new"] == pruned.old_to_new.tolist()


def test_pruned_character_tokenizer_keeps_its_own_unk():
    tok = create_tokenizer("character", text="aab ab\n")
    counts = np.bincount(tok.encode("aab ab\n"), minlength=tok.vocab_size)
    pruned = ta.prune_tokenizer(tok, counts, 0.8)  # a, b, '\n' cover 6/7
    assert pruned.new_to_old.tolist() == [0, 1, 2, 3, 6, 7, 4]  # specials, then by frequency
    assert pruned.unk_token_id == 0 and pruned.coverage == pytest.approx(6 / 7)
    assert pruned.decode(pruned.encode("ab ba"), skip_special_tokens=False) == "ab<unk>ba"
    assert pruned.decode(pruned.encode("aab\nb")) == "aab\nb"
    assert ta.prune_tokenizer(tok, counts, 1.0).coverage == 1.0
    for bad in (0.0, 1.5, "x"):
        with pytest.raises(ConfigError, match="--prune must be a coverage"):
            ta.prune_tokenizer(tok, counts, bad)


def test_tokenizer_flag_accepts_a_workdir(corpus, tmp_path):
    tok = create_tokenizer("character", text="abc")
    run = tmp_path / "run"
    tok.save_pretrained(run / "tokenizer")
    (run / "config.json").write_text("{}")
    assert ta.resolve_tokenizer(str(run), None).encode("cab") == tok.encode("cab")
    with pytest.raises(ValueError, match="does not exist"):
        ta.resolve_tokenizer(str(tmp_path / "missing" / "dir"), None)


def test_empty_dataset_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n \n")
    cfg = text_config(path, tmp_path / "cache")
    with pytest.raises(ConfigError, match="empty") as e:
        ta.analyze_dataset(cfg, create_tokenizer("character", text="ab"), str(tmp_path / "out"))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the CLI

def test_cli_writes_json_plots_and_a_pruned_tokenizer(corpus, tmp_path, capsys, monkeypatch):
    """The command line in-process (`run_tool`: its own flag parsing, errors, exit code)."""
    out = tmp_path / "analysis"
    code, stdout, stderr = run_tool(
        ta.run, ["token_analysis", "--tokenizer=character",
                 "--config.data.source=text", f"--config.data.files={corpus['path']}",
                 f"--config.data.cache_dir={tmp_path / 'cache'}", "--prune=0.9", "--top_n=5",
                 f"--output_dir={out}"], capsys, monkeypatch)
    assert code == 0, stderr[-3000:]
    result = json.loads((out / ta.JSON_FILE).read_text())
    assert tuple(result) == ta.RESULT_KEYS
    text = corpus["path"].read_text()
    chars = sorted(set(text) | {"\n"})
    assert result["tokenizer"] == {"type": "character", "vocab_size": 4 + len(chars),
                                   "source": "character"}
    # One document (a character per token), split 90/10 into train and validation.
    assert result["total_tokens"] == result["num_chars"] == len(text)
    assert result["num_words"] == len(text.split()) and result["special_tokens"] == 0
    assert result["unique_tokens"] == len(set(text))
    top = result["top_tokens"]
    assert len(top) == 5 and top[0] == {"id": 4 + chars.index(" "), "token": " ",
                                        "count": text.count(" "),
                                        "fraction": text.count(" ") / len(text)}
    assert list(result["coverage_thresholds"]) == ["0.5", "0.8", "0.9", "0.95", "0.99", "0.999"]
    assert result["files"] == {"json": ta.JSON_FILE, "top_tokens_plot": ta.TOP_TOKENS_PLOT,
                               "coverage_plot": ta.COVERAGE_PLOT}
    for name in (ta.TOP_TOKENS_PLOT, ta.COVERAGE_PLOT):
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100
    p = result["pruned"]
    assert p["requested_coverage"] == 0.9 and p["coverage"] >= 0.9
    pruned = load_tokenizer(out / p["directory"])
    assert isinstance(pruned, PrunedTokenizer) and pruned.vocab_size == p["vocab_size"]
    assert pruned.unk_token_id == p["unk_token_id"] == 0  # the character tokenizer's own <unk>
    kept = "".join(pruned.base.decode([i]) for i in pruned.kept_base_ids)
    covered = " ".join(w for w in text.split() if set(w) <= set(kept))
    assert covered and pruned.decode(pruned.encode(covered)) == covered
    assert pruned.decode(pruned.encode(text)) != text  # what was pruned is lost
    assert f"{result['total_tokens']} tokens" in stdout
