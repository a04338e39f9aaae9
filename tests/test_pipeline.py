"""The pod-scale input pipeline: the token cache built once by several processes, streams read
lazily, batches prefetched in a background thread.

The two-process build shares a bucket of the local GCS emulator (tests/gcs_emulator.py): process
1 is a subprocess started when the module's first test asks for it, so it imports and tokenises
while the in-process tests run; the last test is process 0.
"""

import json
import os
import subprocess
import sys
import threading
import time
import types

import datasets
import numpy as np
import pytest

from cleangpt_jax import data as data_lib
from cleangpt_jax import storage
from cleangpt_jax.config import ConfigError, get_config
from cleangpt_jax.data import shards
from cleangpt_jax.tokenizers import CharacterTokenizer
from gcs_emulator import gcs_emulator  # noqa: F401  (the fixture)
from helpers import REPO

# 13 documents, one of them blank; validation: the last 3. With 2 documents per shard: 5
# training shards and 2 validation shards, dealt to the processes alternately.
DOCS = [f"document {i}: " + "abcdefgh"[: 1 + i % 7] * (i + 1) for i in range(13)]
DOCS[4] = "   "
DOCS_PER_SHARD = 2
# What each of 2 processes tokenises: training shards 0, 2, 4 / 1, 3, validation 0 / 1.
PROCESS_DOCS = (DOCS[0:2] + DOCS[5:6] + DOCS[8:10] + DOCS[10:12],
                DOCS[2:4] + DOCS[6:8] + DOCS[12:13])
CHARS = "".join(sorted(set("".join(DOCS) + "\n")))


class CountingTokenizer(CharacterTokenizer):
    """A character tokenizer that records every text it encodes (in `log`, and appended to the
    file `log_path` when given); the document separator ("\\n") is not recorded."""

    def __init__(self, chars, log_path=None):
        super().__init__(chars)
        self.log, self.log_path = [], log_path

    def encode(self, text, add_special_tokens=False):
        if text != self.document_separator_text:
            self.log.append(text)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(text) + "\n")
        return super().encode(text, add_special_tokens)


def make_config(files, **data):
    cfg = get_config()
    cfg.model.block_size = 4
    cfg.data.update(dict(source="text", files=files, val_fraction=0.2, num_proc=1), **data)
    return cfg


def write_docs(directory):
    os.makedirs(directory, exist_ok=True)
    for i, text in enumerate(DOCS):
        with open(os.path.join(directory, f"doc{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(directory, "*.txt")


def cache_files(path) -> dict[str, bytes]:
    """The cache directory's files and their bytes (local or a URL)."""
    return {name: storage.read_bytes(storage.join(path, name)) for name in storage.listdir(path)}


WORKER = r"""
import json, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["tests"])
import cleangpt_jax.storage  # (gcsfs set up for the emulator)
from cleangpt_jax import data as data_lib
from cleangpt_jax.data import shards
from test_pipeline import CountingTokenizer, make_config
shards.DOCS_PER_SHARD = args["docs_per_shard"]
tok = CountingTokenizer(args["chars"], log_path=args["log"])
data = data_lib.load_dataset(make_config(args["files"]), tok, cache_dir=args["cache_dir"],
                             process_index=args["process"], process_count=2)
print("RESULT " + json.dumps({"cache_path": data.cache_path, "train": len(data.train)}))
"""


@pytest.fixture(scope="module")
def second_process(tmp_path_factory, gcs_emulator):
    """Process 1 of 2 building a token cache in a shared bucket of the GCS emulator, started
    now (process 0 is the test process, in the test that collects it)."""
    storage.configure_gcs_emulator()  # (the emulator's variables are set now)
    root = tmp_path_factory.mktemp("two")
    args = {"tests": os.path.dirname(__file__), "docs_per_shard": DOCS_PER_SHARD, "chars": CHARS,
            "log": str(root / "encoded1.jsonl"), "files": write_docs(root / "docs"),
            "cache_dir": gcs_emulator.new_url("cache"), "process": 1}
    out = open(root / "out1", "w+")
    env = dict(os.environ, **gcs_emulator.env, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               CLEANGPT_JAX_CACHE=str(root / "local1"))  # (the local copy of a gs:// cache)
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(args)], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    yield types.SimpleNamespace(proc=proc, out=out, root=root, **args)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    out.close()


@pytest.fixture()
def small_shards(monkeypatch):
    monkeypatch.setattr(shards, "DOCS_PER_SHARD", DOCS_PER_SHARD)


def single_process_cache(tmp_path, files, tokenizer=None):
    tokenizer = tokenizer or CountingTokenizer(CHARS)
    data = data_lib.load_dataset(make_config(files), tokenizer, cache_dir=tmp_path / "single",
                                 process_index=0, process_count=1)
    return data, tokenizer


# ------------------------------------------------------------------------------ the cache
def test_a_crashed_process_leaves_shards_the_pods_next_build_reuses(tmp_path, small_shards,
                                                                    second_process):
    """Process 1 of 2 tokenises its shards and gives up waiting for process 0 (a one-line
    error); rerun, it finds its shards and tokenises nothing; process 0 then tokenises only its
    own, packs without waiting and writes the cache a single process writes. Leftover temporary
    files are ignored. Alone, process 0 waits for process 1's shards and names them."""
    files = write_docs(tmp_path / "docs")
    cfg = make_config(files, cache_wait_seconds=0.2)

    def build(process_index, tok):
        return data_lib.load_dataset(cfg, tok, cache_dir=tmp_path / "cache",
                                     process_index=process_index, process_count=2)

    for expected in (PROCESS_DOCS[1], []):  # the crashed run, its rerun
        tok = CountingTokenizer(CHARS)
        with pytest.raises(ConfigError) as e:
            build(1, tok)
        assert tok.log == expected
        assert "\n" not in str(e.value) and "process 0 to write the token cache" in str(e.value)
        assert "raise data.cache_wait_seconds" in str(e.value)
    (work,) = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".shards-2")]
    assert sorted(p.name for p in work.iterdir()) == [
        "train-000001.npz", "train-000003.npz", "val-000001.npz"]
    (work / ".train-000000.npz.tmp-crashed").write_bytes(b"half a shard")
    tok = CountingTokenizer(CHARS)
    data = build(0, tok)
    assert tok.log == PROCESS_DOCS[0]
    reference, _ = single_process_cache(tmp_path, files)
    assert cache_files(data.cache_path) == cache_files(reference.cache_path)
    assert os.listdir(tmp_path / "cache") == [os.path.basename(data.cache_path)]

    with pytest.raises(ConfigError, match=r"shard\(s\) in .* from process\(es\) \[1\]"):
        data_lib.load_dataset(make_config(files, val_fraction=0.0, cache_wait_seconds=0.2),
                              CountingTokenizer(CHARS), cache_dir=tmp_path / "other",
                              process_index=0, process_count=2)


def test_the_packed_streams_are_the_documents_joined_by_separators(tmp_path, small_shards):
    files = write_docs(tmp_path / "docs")
    data, tok = single_process_cache(tmp_path, files)
    non_blank = [d for d in DOCS if d.strip()]
    assert sorted(tok.log) == sorted(non_blank)  # each document once, blanks never
    n_val = round(len(DOCS) * 0.2)  # the last 3 of the 13 documents
    assert "".join(map(tok.itos.__getitem__, data.train)) == "\n".join(
        d for d in DOCS[:-n_val] if d.strip())
    assert "".join(map(tok.itos.__getitem__, data.val)) == "\n".join(DOCS[-n_val:])
    assert (data.num_documents, data.num_val_documents) == (9, 3)


# ---------------------------------------------------------------------------- streaming
def test_a_stream_is_tokenised_while_it_is_read(tmp_path, small_shards, monkeypatch):
    """A streamed source whose generator fails when a shard's worth of documents has been read
    and not tokenised: the build holds one shard's texts at most, never all max_samples, and
    gives a stream's split (the first max_samples documents, the last val_fraction of them
    validation)."""
    docs = [f"story {i} " + "ab" * (i % 5) for i in range(40)]
    tok = CountingTokenizer(sorted(set("".join(docs) + "\n")))
    held = []  # documents read and not yet tokenised, when each document is read
    # (datasets' IterableDataset would import torch, seconds, only to share a counter with
    # torch's data-loader workers)
    monkeypatch.setattr(datasets.config, "TORCH_AVAILABLE", False)

    def generate():
        start = len(tok.log)
        for i, doc in enumerate(docs):
            held.append(i - (len(tok.log) - start))
            if held[-1] >= DOCS_PER_SHARD:
                raise AssertionError(f"{held[-1]} documents read and not tokenised")
            yield {"id": i, "story": doc}

    def load(data):
        return datasets.IterableDataset.from_generator(generate), None

    monkeypatch.setitem(data_lib.SOURCES, "stream", data_lib.Source(
        load=load, fingerprint=lambda data: {"docs": len(docs)}))
    cfg = make_config(None, source="stream", streaming=True, max_samples=30, val_fraction=0.1)
    data = data_lib.load_dataset(cfg, tok, cache_dir=tmp_path / "cache", process_index=0,
                                 process_count=1)
    assert tok.log == docs[:30] and max(held) == DOCS_PER_SHARD - 1
    decode = lambda ids: "".join(map(tok.itos.__getitem__, ids))  # noqa: E731
    assert decode(data.train) == "\n".join(docs[:27])
    assert decode(data.val) == "\n".join(docs[27:30])


# ----------------------------------------------------------------------------- prefetch
def window_batches(stream, **kw):
    return lambda step: data_lib.batch_for_step(stream, seed=7, step=step, global_batch_size=4,
                                                block_size=8, **kw)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_gives_batch_for_steps_batches_in_order_from_any_step(depth):
    stream = np.arange(8 * 50 + 3, dtype=np.uint16)
    make = window_batches(stream)
    for start in (0, 11):
        with data_lib.Prefetcher(make, start=start, stop=start + 15, depth=depth) as batches:
            for step in range(start, start + 15):
                got, want = batches.get(step), make(step)
                assert got.keys() == want.keys()
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key])
            with pytest.raises(ValueError, match="batch of step 3 asked for"):
                batches.get(3)


def test_prefetch_stays_bounded_reraises_and_shuts_down():
    built, lock = [], threading.Lock()

    def make(step):
        with lock:
            built.append(step)
        if step == 6:
            raise KeyError("no batch 6")
        return step

    batches = data_lib.Prefetcher(make, start=0, stop=100, depth=2)
    assert batches.get(0) == 0
    time.sleep(0.2)
    # the one taken, two in the queue, one built and waiting for room
    assert built == [0, 1, 2, 3]
    assert [batches.get(s) for s in range(1, 6)] == [1, 2, 3, 4, 5]
    with pytest.raises(KeyError, match="no batch 6"):
        batches.get(6)
    thread = batches._thread
    batches.close()
    assert not thread.is_alive() and built == list(range(7))

    # a loop that stops early: close() ends the thread, nothing is built afterwards
    built.clear()
    with data_lib.Prefetcher(lambda s: built.append(s) or s, start=10, stop=10**6,
                             depth=4) as batches:
        assert batches.get(10) == 10
        thread = batches._thread
    n = len(built)
    time.sleep(0.05)
    assert not thread.is_alive() and len(built) == n <= 6


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_prefetch_setting_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=r"data.prefetch must be an integer >= 0") as e:
        data_lib.Prefetcher(lambda step: step, start=0, stop=5, depth=value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------- two processes
def test_two_processes_tokenise_each_document_once_into_the_single_process_cache(
        second_process, tmp_path, small_shards, monkeypatch):
    """This process (0) and a subprocess (1) build one cache in a gs:// bucket: each tokenises
    its own shards, so every document exactly once over both, and the cache is a single local
    process's, bitwise."""
    monkeypatch.setenv("CLEANGPT_JAX_CACHE", str(second_process.root / "local0"))
    first = CountingTokenizer(CHARS)
    mine = data_lib.load_dataset(make_config(second_process.files), first,
                                 cache_dir=second_process.cache_dir, process_index=0,
                                 process_count=2)
    second_process.proc.wait(timeout=120)
    second_process.out.seek(0)
    text = second_process.out.read()
    assert second_process.proc.returncode == 0, text[-3000:]
    theirs = json.loads(text.split("RESULT ", 1)[1])
    with open(second_process.log, encoding="utf-8") as f:
        logs = (first.log, [json.loads(line) for line in f])
    non_blank = [d for d in DOCS if d.strip()]
    assert logs == PROCESS_DOCS
    assert sorted(logs[0] + logs[1]) == sorted(non_blank)
    print(f"tokenised: process 0 {len(logs[0])} documents, process 1 {len(logs[1])}, "
          f"of {len(non_blank)} non-blank")
    assert theirs["cache_path"] == mine.cache_path and mine.cache_path.startswith("gs://")
    reference, tok = single_process_cache(tmp_path, second_process.files)
    assert sorted(tok.log) == sorted(non_blank)
    shared = cache_files(mine.cache_path)
    assert shared == cache_files(reference.cache_path)
    assert sorted(shared) == ["meta.json", "train.bin", "val.bin"]
    assert storage.listdir(second_process.cache_dir) == [os.path.basename(mine.cache_path)]
