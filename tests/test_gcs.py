"""Runs that live in a bucket: every tool on gs:// paths, against a local GCS emulator.

One tiny training run goes to gs://; a copy of it is killed with SIGKILL mid-run and rerun,
and must end bitwise equal to it (parameters, optimizer state and metric records). generate,
evaluate, export_hf, import_hf and a distillation (teacher and workdir both on gs://) read and
write the bucket; a damaged checkpoint object is detected and moved aside; a workdir of another
kind is refused; a missing bucket and an unreachable endpoint fail with one line naming the
URL. The emulator (tests/gcs_emulator.py) starts once; every run shares one persistent
compilation cache (XLA's optimisation off), so the subprocess compiles nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from cleangpt_jax import metrics, storage, trainer
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.checkpoint import Checkpointer, path_str
from cleangpt_jax.config import ConfigError, get_config
from gcs_emulator import emulator_env, free_port, gcs_emulator  # noqa: F401 (the fixture)
from helpers import QUIET_RUN, REPO, one_line_error, persistent_compile_cache, run_tool

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness. ") * 30
# Steps of the run; the killed copy dies building the batch of step 5, after checkpoint 4's
# asynchronous save began, which waits for checkpoint 2's to finish: 2 is always complete.
N, KILL_AT = 6, 5
TRAIN = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
         "model.dropout": 0.1, "train.batch_size": 4, "train.num_steps": N,
         "train.warmup_steps": 2, "train.learning_rate": 1e-2, "train.log_every": 1,
         "train.eval_every": 0, "train.checkpoint_every": 2,
         "train.max_checkpoints_to_keep": 0, "train.sample_max_new_tokens": 0, **QUIET_RUN,
         "data.source": "text", "data.val_fraction": 0.1}
KILLER = """
import os, signal, sys, runpy
from cleangpt_jax import data as data_lib
real = data_lib.batch_for_step
def batch_for_step(tokens, *, step, **kw):
    if step == int(os.environ["KILL_AT_BATCH"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tokens, step=step, **kw)
data_lib.batch_for_step = batch_for_step
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""


def flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def records(workdir) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    return metrics.untimed(workdir_lib.read_metrics(workdir))


def arrays(workdir, step: int) -> dict[str, np.ndarray]:
    """Every array (parameters and optimizer state) of checkpoint `step`, as saved."""
    import orbax.checkpoint as ocp

    out = {}
    for item in ("params", "opt_state"):
        tree = ocp.PyTreeCheckpointer().restore(
            storage.join(workdir_lib.checkpoint_dir(workdir), str(step), item))
        out.update({f"{item}/{path_str(p)}": np.asarray(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]})
    return out


@pytest.fixture(scope="module")
def env(gcs_emulator, tmp_path_factory):  # noqa: F811
    """The corpus in the bucket, a local token cache, one compilation cache, and the reference
    run: N steps trained in process into gs://, every checkpoint kept."""
    root = tmp_path_factory.mktemp("gcs")
    data = gcs_emulator.new_url("data")
    storage.write_text(data + "/corpus.txt", TEXT)
    overrides = {**TRAIN, "data.files": data + "/*.txt", "data.cache_dir": data + "/tokens"}
    local_cache, os.environ["CLEANGPT_JAX_CACHE"] = (os.environ.get("CLEANGPT_JAX_CACHE"),
                                                     str(root / "cache"))
    try:
        with persistent_compile_cache(str(root / "jit_cache"), fast_compile=True) as sub_env:
            reference = gcs_emulator.new_url("reference")
            config = get_config()
            config.update_from_flattened_dict(overrides)
            trainer.train_and_evaluate(config, reference)
            yield types.SimpleNamespace(emulator=gcs_emulator, root=root, overrides=overrides,
                                        reference=reference, data=data,
                                        sub_env=dict(sub_env, **gcs_emulator.env))
    finally:
        if local_cache is None:
            os.environ.pop("CLEANGPT_JAX_CACHE")
        else:
            os.environ["CLEANGPT_JAX_CACHE"] = local_cache


def test_a_run_in_a_bucket_leaves_everything_there_and_no_local_folder(env):
    """config, kind, tokenizer, metrics, TensorBoard events and every checkpoint (with its
    checksums) are objects under the URL; nothing named 'gs:' appears locally."""
    names = storage.listdir(env.reference)
    assert {"config.json", "kind.txt", "tokenizer", "metrics.jsonl",
            "checkpoints"} <= set(names), names
    assert any(n.startswith("events.out.tfevents") for n in names), names
    ckpts = workdir_lib.checkpoint_dir(env.reference)
    assert [n for n in storage.listdir(ckpts) if n.isdigit()] == ["2", "4", "6"]
    assert storage.isfile(storage.join(ckpts, "6", "checksums.json"))
    assert [r["step"] for r in records(env.reference) if "train_loss" in r] == list(range(1, N + 1))
    assert not os.path.exists(os.path.join(REPO, "gs:")) and not os.path.exists("gs:")
    caches = storage.listdir(env.data + "/tokens")  # the token cache, built once, in the bucket
    assert len(caches) == 1 and set(storage.listdir(f"{env.data}/tokens/{caches[0]}")) == {
        "meta.json", "train.bin", "val.bin"}


@pytest.fixture(scope="module")
def resumed(env):
    """A copy of the reference run killed with SIGKILL while the batch of step KILL_AT is built
    (checkpoint 2 saved), then rerun in process: what it saved, compared with the reference
    at once (later tests damage its checkpoints)."""
    workdir = env.emulator.new_url("killed")
    # (batches built in the loop: with data.prefetch the kill would come steps earlier)
    args = [f"--workdir={workdir}", *flags(env.overrides), "--config.data.prefetch=0"]
    killed = subprocess.run([sys.executable, "-c", KILLER, "cleangpt_jax.train", *args],
                            cwd=REPO, env=dict(env.sub_env, KILL_AT_BATCH=str(KILL_AT),
                                               CLEANGPT_JAX_CACHE=str(env.root / "host2")),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    saved = [n for n in storage.listdir(workdir_lib.checkpoint_dir(workdir)) if n.isdigit()]
    assert "2" in saved and "6" not in saved, saved
    assert os.listdir(env.root / "host2" / "tokens" / "mirror")  # read from the bucket
    config = get_config()
    config.update_from_flattened_dict(env.overrides)
    trainer.train_and_evaluate(config, workdir)  # the rerun, in process
    equal = {}
    for step in (4, 6):
        mine, ref = arrays(workdir, step), arrays(env.reference, step)
        equal[step] = mine.keys() == ref.keys() and all(np.array_equal(mine[k], ref[k])
                                                        for k in ref)
    equal["records"] = records(workdir) == records(env.reference)
    print(f"\ngs:// kill-resume: {N} steps, killed at the batch of step {KILL_AT} with "
          f"checkpoints {saved} saved; bitwise equal to the uninterrupted run: {equal} "
          f"({len(records(workdir))} metric records)", file=sys.__stdout__, flush=True)
    return types.SimpleNamespace(workdir=workdir, equal=equal)


def test_killed_mid_run_in_a_bucket_and_rerun_equals_the_uninterrupted_run(resumed):
    """Every checkpoint the rerun saved (4, 6: parameters and optimizer state) and the metric
    records are bitwise the uninterrupted run's."""
    assert resumed.equal == {4: True, 6: True, "records": True}


def test_generate_evaluate_export_and_import_read_and_write_the_bucket(env, capsys,
                                                                       monkeypatch):
    from cleangpt_jax import evaluate, export_hf, generate, import_hf, loading

    code, out, err = run_tool(generate.run, ["generate", f"--workdir={env.reference}",
                                             "--prompt=It was", "--max_new_tokens=4",
                                             "--temperature=0"], capsys, monkeypatch)
    assert code == 0 and "It was" in out, err
    code, out, err = run_tool(evaluate.run, ["evaluate", f"--workdir={env.reference}",
                                             "--teacher=none", "--config.eval.max_new_tokens=0",
                                             "--config.eval.num_batches=1"], capsys, monkeypatch)
    assert code == 0, err
    report = storage.join(env.reference, "eval", "report.md")
    assert f"report: {report}" in out and "perplexity" in storage.read_text(report).lower()
    exported = env.emulator.new_url("hf")
    code, out, err = run_tool(export_hf.run, ["export_hf", f"--workdir={env.reference}",
                                              f"--out={exported}"], capsys, monkeypatch)
    assert code == 0, err
    assert {"config.json", "model.safetensors"} <= set(storage.listdir(exported))
    imported = env.emulator.new_url("imported")
    code, out, err = run_tool(import_hf.run, ["import_hf", f"--name_or_path={exported}",
                                              f"--workdir={imported}"], capsys, monkeypatch)
    assert code == 0, err
    flat = lambda lm: {path_str(p): np.asarray(x)  # noqa: E731
                       for p, x in jax.tree_util.tree_flatten_with_path(lm.params)[0]}
    imported_params, trained = flat(loading.load_lm(imported)), flat(loading.load_lm(env.reference))
    assert all(np.array_equal(imported_params[k], trained[k]) for k in trained)
    env.imported = imported


def test_distillation_with_teacher_and_workdir_in_the_bucket(env):
    from cleangpt_jax.distill import config as distill_config
    from cleangpt_jax.distill import records as distill_records
    from cleangpt_jax.distill import runner

    teacher = getattr(env, "imported", env.reference)
    workdir = env.emulator.new_url("distill")
    cfg = distill_config.get_config()
    cfg.update_from_flattened_dict({
        "model.model_type": "vanilla", "model.n_layer": 1, "model.n_head": 2,
        "model.n_embd": 16, "model.block_size": 16, "train.batch_size": 4,
        "data.source": "text", "data.val_fraction": 0.1, "data.files": env.overrides["data.files"],
        "data.cache_dir": env.overrides["data.cache_dir"], "distill.teacher": teacher,
        "distill.steps_per_block": 2, "distill.head.enabled": False,
        "distill.final.enabled": False,
        "distill.warmup_steps": 0, "distill.checkpoint_every": 1, "distill.log_every": 1,
        "distill.eval_steps": 0, **QUIET_RUN})
    summary = runner.run(cfg, workdir, progress=False)
    assert [m["name"] for m in distill_records.read_manifest(workdir)] == [
        m["name"] for m in summary["stages"]]
    assert workdir_lib.run_kind(workdir) == "distill"
    assert workdir_lib.load_run(workdir).step == sum(m["steps"] for m in summary["stages"])
    assert storage.isfile(storage.join(workdir, distill_records.HF_DIR, "model.safetensors"))
    with pytest.raises(ConfigError) as e:  # a training run never writes into a distillation
        workdir_lib.check_kind(workdir, "train")
    assert "holds a distill run" in one_line_error(e)


def test_a_damaged_checkpoint_object_is_moved_aside_and_the_previous_step_used(env, resumed):
    """Flip one byte of the newest step's largest params object (its size kept): the
    checksums catch it, the step moves to checkpoints_unreadable/ in the bucket, step 4 is
    restored."""
    ckpts = workdir_lib.checkpoint_dir(resumed.workdir)
    fs, _ = storage._fs(ckpts)
    objects = fs.find(storage._fs(storage.join(ckpts, "6", "params"))[1], detail=True)
    victim = max(objects, key=lambda k: objects[k]["size"])
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(data))
    run = workdir_lib.load_run(env.reference)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.params)
    checkpointer = Checkpointer(ckpts)
    try:
        restored = checkpointer.restore_latest(params=abstract)
    finally:
        checkpointer.close()
    assert restored.step == 4
    assert storage.listdir(ckpts + "_unreadable") == ["6"]
    assert [n for n in storage.listdir(ckpts) if n.isdigit()] == ["2", "4"]


def test_a_missing_bucket_or_an_unreachable_endpoint_is_one_line_naming_the_url(
        env, capsys, monkeypatch):
    from cleangpt_jax import generate, train

    missing = "gs://no-such-bucket-here/run"
    code, out, err = run_tool(train.run, ["train", f"--workdir={missing}",
                                          *flags(env.overrides)], capsys, monkeypatch)
    assert code != 0 and err.count("\n") == 1 and missing in err, err
    assert not os.path.exists("gs:")
    dead = f"http://127.0.0.1:{free_port()}"
    for key, value in emulator_env(dead).items():
        monkeypatch.setenv(key, value)
    code, out, err = run_tool(generate.run, ["generate", f"--workdir={env.reference}",
                                             "--prompt=It"], capsys, monkeypatch)
    assert code != 0 and err.count("\n") == 1 and env.reference in err, err


def test_local_paths_and_memory_urls_behave_alike(tmp_path):
    """The path functions on a local directory and on memory:// (no emulator needed), walk_files
    listing files at any depth and nothing for a file or a missing path; a write_with whose
    writer fails leaves the file as it was and no temporary file."""
    for root in (str(tmp_path / "local"), "memory://storage-test/run"):
        storage.makedirs(root)
        storage.write_text(storage.join(root, "a.json"), json.dumps({"x": 1}))
        storage.makedirs(storage.join(root, "d"))
        storage.write_bytes(storage.join(root, "d", "b.bin"), b"\x00\x01")
        assert sorted(storage.listdir(root)) == ["a.json", "d"]
        assert storage.walk_files(root) == ["a.json", "d/b.bin"]
        assert storage.walk_files(storage.join(root, "a.json")) == storage.walk_files(
            storage.join(root, "missing")) == []
        assert storage.isfile(storage.join(root, "a.json")) and storage.isdir(
            storage.join(root, "d"))
        assert json.loads(storage.read_text(storage.join(root, "a.json"))) == {"x": 1}
        storage.move(storage.join(root, "d"), storage.join(root, "e"))
        assert sorted(storage.listdir(root)) == ["a.json", "e"]
        assert storage.read_bytes(storage.join(root, "e", "b.bin")) == b"\x00\x01"
        assert sorted(os.listdir(storage.local_copy(root))) == ["a.json", "e"]

        def fail_halfway(f):
            f.write(b"half")
            raise KeyError("write failed")
        with pytest.raises(KeyError, match="write failed"):  # the old contents stay, no leftover
            storage.write_with(storage.join(root, "e", "b.bin"), fail_halfway)
        storage.write_with(storage.join(root, "e", "c.npy"), lambda f: np.save(f, np.arange(3)))
        assert sorted(storage.listdir(storage.join(root, "e"))) == ["b.bin", "c.npy"]
        assert storage.read_bytes(storage.join(root, "e", "b.bin")) == b"\x00\x01"
        assert storage.read_bytes(storage.join(root, "e", "c.npy"))[-24:] == np.arange(
            3).tobytes()
        storage.remove_tree(storage.join(root, "e"))
        storage.remove_tree(storage.join(root, "e"))  # (a missing directory: nothing to do)
        assert storage.listdir(root) == ["a.json"]
    assert storage.absolute("gs://b/run/") == "gs://b/run" and not storage.is_url("/x/gs://y")
    assert storage.join("gs://b", "run", "c") == "gs://b/run/c"


def test_a_bucket_object_appears_only_when_its_writer_returns(gcs_emulator):  # noqa: F811
    """storage.write_with streams into a gs:// upload committed only when the writer returns:
    a stream of several upload chunks arrives whole, and a writer that fails after sending
    chunks leaves the previous object as it was, with nothing beside it."""
    url = gcs_emulator.new_url("write-with")
    path = storage.join(url, "stream.bin")
    data = np.arange(3_000_000, dtype=np.int32).tobytes()  # 12 MB: three 5 MiB upload chunks

    def write_in_pieces(f):
        for i in range(0, len(data), 1_000_000):
            f.write(data[i:i + 1_000_000])

    storage.write_with(path, write_in_pieces)
    assert storage.read_bytes(path) == data

    def fail_after_the_chunks(f):
        write_in_pieces(f)
        write_in_pieces(f)
        raise KeyError("write failed")

    with pytest.raises(KeyError, match="write failed"):
        storage.write_with(path, fail_after_the_chunks)
    assert storage.read_bytes(path) == data
    assert storage.listdir(url) == ["stream.bin"]
