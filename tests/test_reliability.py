"""Issue 13's reliability items: no tool writes into a run of another kind or into its own
input, and bad paths or files get one line naming them, before any work.

Each run directory is written with `write_model_workdir` (a tiny model, no training); the
refusals happen before anything is loaded or compiled, so the module costs seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ConfigError, get_config, model_config
from helpers import REPO, one_line_error
from test_generation import cli_main as generate_main
from test_train import tree_digest as snapshot  # sha256 of every file under a directory

pytestmark = pytest.mark.usefixtures("fast_compile")  # (the programs' numbers, not their speed)


def tiny_config():
    cfg = get_config()
    cfg.model.update(dict(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True))
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 'train' run and a distillation's final student ('distill'), each a model workdir."""
    from cleangpt_jax.models import get_model
    from cleangpt_jax.tokenizers.character import CharacterTokenizer

    root = tmp_path_factory.mktemp("reliability")
    tok = CharacterTokenizer("abcdefgh")
    cfg = tiny_config()
    cfg.model.vocab_size = tok.vocab_size
    model = get_model(config=model_config(cfg.model))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    paths = {kind: str(root / kind) for kind in ("train", "distill")}
    for kind, path in paths.items():
        workdir_lib.write_model_workdir(path, cfg, tok, params, kind=kind)
    (root / "corpus.txt").write_text("abcdefgh hgfedcba " * 40)
    return dict(root=root, **paths)


def distill_config(runs, teacher: str):
    """A tiny distillation of `teacher` that would run (and write) if nothing refused it."""
    from cleangpt_jax.distill.config import get_config as distill_get_config

    cfg = distill_get_config()
    cfg.model.update(dict(n_layer=1, n_head=2, n_embd=16, block_size=8))
    cfg.data.update(dict(source="text", files=str(runs["root"] / "corpus.txt"),
                         cache_dir=str(runs["root"] / "cache")))
    cfg.train.batch_size = 2
    cfg.distill.update(dict(teacher=teacher, steps_per_block=1, warmup_steps=0, eval_steps=1,
                            checkpoint_every=1))
    cfg.distill.head.steps = 1
    return cfg


def test_distill_refuses_a_training_run_and_changes_nothing(runs, tmp_path):
    """Item 1: distill --workdir=R with R a training run (recorded, or one written before
    kind.txt existed) refuses in one line and leaves R byte for byte as it was."""
    from cleangpt_jax.distill import runner

    legacy = tmp_path / "legacy"
    shutil.copytree(runs["train"], legacy)
    os.remove(legacy / workdir_lib.KIND_FILE)
    for path in (runs["train"], str(legacy)):
        before = snapshot(path)
        with pytest.raises(ConfigError) as e:
            runner.run(distill_config(runs, runs["distill"]), path)
        assert one_line_error(e) == (
            f"{os.path.abspath(path)!r} holds a train run, not a distill run: pass a new "
            f"--workdir (a distill run never writes into another kind's)")
        assert snapshot(path) == before


def test_a_distilled_student_loads_but_refuses_training(runs):
    """A distillation's final student is a model workdir that generate/evaluate load
    (`load_lm`), recorded as 'distill': `train` into it refuses and changes nothing."""
    from cleangpt_jax.loading import load_lm
    from cleangpt_jax.train_setup import prepare_run

    assert workdir_lib.run_kind(runs["distill"]) == "distill"
    assert load_lm(runs["distill"]).step == 0
    before = snapshot(runs["distill"])
    with pytest.raises(ConfigError) as e:
        prepare_run(tiny_config(), runs["distill"])
    assert one_line_error(e) == (
        f"{runs['distill']!r} holds a distill run, not a train run: pass a new --workdir (a "
        f"train run never writes into another kind's)")
    assert snapshot(runs["distill"]) == before


@pytest.mark.parametrize("kind", ["train", "distill"])
def test_distill_refuses_its_teacher_directory(runs, kind):
    """Item 2: distill --workdir=T with T the teacher's own directory (a training run or a
    distilled student) refuses and leaves T as it was."""
    from cleangpt_jax.distill import runner

    teacher = runs[kind]
    before = snapshot(teacher)
    with pytest.raises(ConfigError) as e:
        runner.run(distill_config(runs, teacher), teacher)
    assert one_line_error(e) == (
        f"--workdir {teacher!r} is the distill run's own input {teacher!r}: writing there "
        f"would replace it; pass a new --workdir")
    assert snapshot(teacher) == before


def test_export_overwrites_an_earlier_export_never_a_run(runs, tmp_path):
    """Item 3: export_hf --out=R --overwrite refuses a run directory (the exported run itself
    or another one) and changes nothing; --overwrite still replaces an earlier export."""
    from cleangpt_jax import hf

    for out in (runs["train"], runs["distill"]):
        before = snapshot(out)
        with pytest.raises(ConfigError) as e:
            hf.export_run(runs["train"], out, overwrite=True)
        kind = workdir_lib.run_kind(out)
        assert one_line_error(e) == (
            f"--out {out!r} holds a {kind} run, which an export never replaces (--overwrite "
            f"replaces an earlier export only): pass a new --out directory")
        assert snapshot(out) == before
    out = tmp_path / "hf"
    hf.export_run(runs["train"], out)
    first = snapshot(out)
    hf.export_run(runs["train"], out, overwrite=True)
    assert snapshot(out) == first and workdir_lib.run_kind(str(out)) is None


def test_train_and_evaluate_refuse_a_file_as_output_before_working(runs, tmp_path,
                                                                   fast_compile):
    """Item 10: train --workdir=FILE and evaluate --output_dir=FILE (the real CLI) fail with
    one line naming the file before any work."""
    from cleangpt_jax.train_setup import prepare_run

    file = tmp_path / "file"
    file.write_text("x")
    message = (f"--workdir cannot be created: {str(file)!r} is a file, not a directory: pass a "
               f"directory")
    for workdir in (file, file / "run"):
        with pytest.raises(ConfigError) as e:
            prepare_run(tiny_config(), str(workdir))
        assert one_line_error(e) == message
    proc = subprocess.run([sys.executable, "-m", "cleangpt_jax.evaluate",
                           f"--workdir={runs['train']}", f"--output_dir={file}"],
                          capture_output=True, text=True, cwd=REPO, env=fast_compile, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {message.replace('--workdir', '--output_dir')}"]
    assert file.read_text() == "x"


@pytest.mark.parametrize("content", ["[]", '{"model": 3}'])
def test_a_wrongly_shaped_config_json_gets_one_line(runs, tmp_path, capsys, content):
    """Item 12: train and generate on a run whose config.json is valid JSON of the wrong shape
    name the file instead of a traceback."""
    from cleangpt_jax.train_setup import prepare_run

    run = tmp_path / "run"
    shutil.copytree(runs["train"], run)
    (run / "config.json").write_text(content)
    message = (f"{run / 'config.json'} is not a run's config (a JSON object whose model, "
               f"tokenizer, data and train are objects): restore it or train into a new workdir")
    with pytest.raises(ConfigError) as e:
        prepare_run(tiny_config(), str(run))
    assert one_line_error(e) == message
    code, _, err = generate_main([f"--workdir={run}", "--prompt=a"], capsys)
    assert code == 1 and err.strip().splitlines() == [f"error: {message}"]


def test_a_config_file_that_is_not_python_is_named(tmp_path, fast_compile):
    """Item 14: train --config=FILE with a file that is not Python names the file."""
    config = tmp_path / "notes.txt"
    config.write_text("hello\n")
    proc = subprocess.run([sys.executable, "-m", "cleangpt_jax.train", f"--config={config}",
                           f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True,
                          cwd=REPO, env=fast_compile, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot load --config={config}: NameError: name 'hello' is not defined (a "
        f"config file is Python code defining get_config())"]
    assert not (tmp_path / "run").exists()


def test_misleading_messages_say_what_the_path_is(runs, tmp_path, capsys):
    """Item 18: generate --workdir=FILE says it is a file; a cleangpt_jax run passed as --hf,
    or as a teacher before its first checkpoint, says what it is and what to pass."""
    from cleangpt_jax.loading import load_lm

    file = tmp_path / "file"
    file.write_text("x")
    code, _, err = generate_main([f"--workdir={file}"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: workdir {str(file)!r} is a file, not a directory: pass the --workdir of a "
        f"training run"]
    train = runs["train"]
    code, _, err = generate_main([f"--hf={train}"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: {train!r} is a cleangpt_jax train run, not a Hugging Face GPT-2 checkpoint: "
        f"pass it as a workdir (generate --workdir={train}, a teacher path), or export one with "
        f"export_hf"]
    fresh = tmp_path / "fresh"  # a training run set up but not yet checkpointed
    fresh.mkdir()
    shutil.copy(os.path.join(train, "config.json"), fresh / "config.json")
    with pytest.raises(ConfigError) as e:
        load_lm(str(fresh))  # how distillation loads its teacher
    assert one_line_error(e) == (f"{str(fresh)!r} is a cleangpt_jax train run without a "
                                 f"checkpoint yet: train until one is written, or pass a run "
                                 f"that has one")
    assert json.loads((fresh / "config.json").read_text())["model"]["n_layer"] == 1


def test_a_prompt_outside_a_character_vocabulary_is_refused(runs, capsys):
    """Item 16: generate (the CLI, in-process) refuses a prompt with characters the run's
    character vocabulary lacks, naming them, instead of dropping them ('hé' -> 'h'); training
    refuses such a train.sample_prompts entry before it starts."""
    from cleangpt_jax.tokenizers.character import CharacterTokenizer
    from cleangpt_jax.train_setup import check_sample_settings

    code, out, err = generate_main([f"--workdir={runs['train']}", "--prompt=abéZé"], capsys)
    assert code == 1 and not out and err.strip().splitlines() == [
        "error: the prompt 'abéZé' has characters outside the tokenizer's vocabulary: 'éZ'; "
        "use only characters of the text it was built from"]
    cfg = tiny_config()
    cfg.train.update(sample_prompts=["ab", "a\u00e9"], sample_max_new_tokens=4)
    with pytest.raises(ConfigError) as e:
        check_sample_settings(cfg.train, model_config(cfg.model), CharacterTokenizer("abc"))
    assert one_line_error(e) == (
        "train.sample_prompts entry 'aé' has characters outside the tokenizer's vocabulary: "
        "'é'; change train.sample_prompts or set train.sample_max_new_tokens=0")


def test_a_read_only_workdir_or_output_dir_gets_one_line(runs, tmp_path, monkeypatch):
    """Item 13: train into, or evaluate out to, a directory that is not writable (or one to be
    created under such a parent) fails in one line naming it, before any work. The tests run
    as root, whom chmod does not stop, so os.access reports the directory read-only."""
    from cleangpt_jax.train_setup import prepare_run

    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != locked and access(p, mode))
    for path, what in ((locked, "--workdir"), (os.path.join(locked, "new"), "--output_dir")):
        with pytest.raises(ConfigError) as e:
            if what == "--workdir":
                prepare_run(tiny_config(), path)
            else:
                workdir_lib.check_output_dir(path, what)
        assert one_line_error(e) == (
            f"{what} cannot be written: the directory {locked!r} is not writable: pass a "
            f"writable directory or fix its permissions")
    assert os.listdir(locked) == []


def test_max_new_tokens_is_bounded_by_what_the_run_can_hold(runs, capsys, monkeypatch):
    """Item 11: beyond int32 positions, or outputs larger than half the device's memory: one
    line naming the most that fits, before anything is compiled."""
    from cleangpt_jax import generation

    code, _, err = generate_main([f"--workdir={runs['train']}", "--prompt=abc",
                                  "--max_new_tokens=10000000000"], capsys)
    assert code == 1 and err == ("error: max_new_tokens=10000000000 is beyond int32 positions: "
                                 "ask for at most 1073741824\n")
    monkeypatch.setattr(generation, "memory_bytes", lambda: 2**30)  # a 1 GiB device
    code, _, err = generate_main([f"--workdir={runs['train']}", "--prompt=abc",
                                  "--prompt=bad", f"--max_new_tokens={2**26 + 1}"], capsys)
    assert code == 1 and err == (  # 2 rows x 2**27 (the bucket) x 4 bytes = 1 GiB > 0.5 GiB
        f"error: max_new_tokens={2**26 + 1} needs 1.0 GiB for the outputs of 2 row(s), more "
        f"than half of this device's 1.0 GiB: ask for at most {2**26}\n")


def test_an_unreachable_hub_fails_at_once_in_one_line(runs, monkeypatch, capsys, caplog):
    """Item 21: with the hub unreachable (here: an endpoint nobody listens on), a hub
    tokenizer, model or dataset fails at once with one line naming the reason; no retries."""
    import datasets.config
    from huggingface_hub import constants

    from cleangpt_jax import hub
    from cleangpt_jax.data import load_documents
    from cleangpt_jax.tokenizers import create_tokenizer

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for module in (constants, datasets.config):  # restored after the test, with the env
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                  "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    hub.offline_reason.cache_clear()
    try:
        reason = "the Hugging Face hub cannot be reached (127.0.0.1:9: Connection refused)"
        with pytest.raises(ValueError) as e:
            create_tokenizer("gpt2")
        assert one_line_error(e) == (f"could not load tokenizer 'gpt2': {reason} and 'gpt2' "
                                     "is not in the local cache: pass a local directory, or "
                                     "retry online")
        code, _, err = generate_main(["--hf=someone/tiny-gpt2", "--prompt=a"], capsys)
        assert code == 1 and err.startswith("error: could not load model 'someone/tiny-gpt2': "
                                            f"{reason}"), err
        section = tiny_config().data
        section.update(dict(source="hf", name="someone/stories"))
        with pytest.raises(ConfigError) as e:
            load_documents(section)
        assert one_line_error(e).startswith(f"could not load dataset 'someone/stories': {reason}")
        assert not [r for r in caplog.records if "Retry" in r.getMessage()]
    finally:
        hub.offline_reason.cache_clear()


def test_reading_a_run_prints_nothing_but_the_output(runs, capsys, caplog):
    """Item 21: every checkpoint load printed Orbax's 'Given directory is read only'."""
    code, out, err = generate_main([f"--workdir={runs['train']}", "--prompt=abc",
                                    "--max_new_tokens=2", "--seed=0"], capsys)
    assert code == 0 and out.startswith("abc") and err == ""
    assert not [r for r in caplog.records if "read only" in r.getMessage()]


def test_a_resumed_writer_leaves_each_scalar_once_in_the_events_files(tmp_path):
    """Item 7: a run killed after logging past its last checkpoint, then resumed from it,
    leaves events files whose scalars (read raw, not through TensorBoard's purge) equal an
    uninterrupted run's, as metrics.jsonl's records do."""
    from cleangpt_jax.loop import MetricWriter
    from test_train import tensorboard_scalars

    def log(workdir, steps, resume_step=0):
        writer = MetricWriter(str(workdir), resume_step=resume_step)
        for step in steps:
            writer.write(step, {"train_loss": 1.0 / step})
        writer.close()

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log(straight, range(1, 9))
    log(resumed, range(1, 7))            # killed after step 6; its last checkpoint was step 4
    log(resumed, range(5, 8), resume_step=4)  # killed again after step 7, no new checkpoint
    log(resumed, range(5, 9), resume_step=4)
    assert tensorboard_scalars(resumed) == tensorboard_scalars(straight) == {
        "train_loss": list(range(1, 9))}
    assert workdir_lib.read_metrics(str(resumed)) == workdir_lib.read_metrics(str(straight))


def test_a_url_workdir_uploads_its_metrics_at_most_once_a_minute_and_at_flush(tmp_path,
                                                                              monkeypatch):
    """metrics.jsonl and the events file were uploaded whole after every record (bytes
    quadratic in the records). Now (a fake clock): the first record uploads both, the next
    ones within REMOTE_UPLOAD_SECONDS nothing, the first record past it everything, flush()
    the rest; the objects end equal to a local workdir's files for the same records."""
    from cleangpt_jax import loop, storage
    from test_train import tensorboard_scalars

    uploads, real_write_bytes = [], storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes",
                        lambda path, data: (uploads.append(path.rsplit("/", 1)[1][:10]),
                                            real_write_bytes(path, data)))
    now = [0.0]
    url, local = f"memory://metric-writer/{tmp_path.name}", tmp_path / "local"
    remote_writer = loop.MetricWriter(url, clock=lambda: now[0])
    local_writer = loop.MetricWriter(str(local), clock=lambda: now[0])

    def write(step, seconds):
        now[0] = seconds
        for writer in (remote_writer, local_writer):
            writer.write(step, {"train_loss": 1.0 / step, "lr": 3e-4 * step})

    def uploaded():
        return [json.loads(ln)["step"]
                for ln in storage.read_text(url + "/metrics.jsonl").splitlines()]

    write(1, 0.0)
    assert uploads == ["metrics.js", "events.out"] and uploaded() == [1]
    for step in range(2, 6):
        write(step, 15.0 * (step - 1) - 0.5)  # (the last at 59.5 s)
    assert len(uploads) == 2 and uploaded() == [1]
    write(6, loop.REMOTE_UPLOAD_SECONDS)
    assert len(uploads) == 4 and uploaded() == [1, 2, 3, 4, 5, 6]
    write(7, 61.0)
    write(8, 62.0)
    local_writer.flush()  # (a local workdir's files are appended per record: nothing to do)
    assert len(uploads) == 4 and uploaded() == [1, 2, 3, 4, 5, 6]
    remote_writer.flush()
    assert len(uploads) == 6 and uploaded() == list(range(1, 9))
    # The events are written when write returns: what a checkpoint's flush uploads is whole.
    assert tensorboard_scalars(storage.local_copy(url)) == tensorboard_scalars(local) == {
        "train_loss": list(range(1, 9)), "lr": list(range(1, 9))}
    remote_writer.flush()
    remote_writer.close()
    local_writer.close()
    assert len(uploads) == 6  # nothing pending
    assert storage.read_bytes(url + "/metrics.jsonl") == (local / "metrics.jsonl").read_bytes()
