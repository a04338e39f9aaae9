"""Fault injection: kill -9, damaged checkpoints, a read-only workdir, runs handed to the wrong
tool. Nothing may be lost, and what survives must be what an uninterrupted run has.

    python -m pytest tests/test_fault_injection.py -q              # prints its counts at the end
    FAULT_SEED=7 python -m pytest tests/test_fault_injection.py -q # other kill points

Kills: a training run and a distillation (a block, the head and the final stage) are each run as
a chain of CLI processes killed with SIGKILL (no cleanup, as a preempted VM) at points drawn from
FAULT_SEED: at the batch of a chosen step, or inside a checkpoint save (its files written, the
step not yet visible). Each process reruns the same command; after every rerun, the checkpoints
it wrote must equal the uninterrupted run's bit for bit, and at the end so must the parameters,
metrics.jsonl and the TensorBoard scalars. Corruptions: bytes flipped (sizes kept), files
truncated or deleted in a saved step must be detected, moved aside, and the previous step used.
Cost: every run is tiny and shares one persistent compilation cache (XLA's optimisation off),
so a rerun compiles nothing; the module's time is mostly process start-up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import types
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cleangpt_jax import trainer
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.checkpoint import CHECKSUMS_FILE, CheckpointError, path_str
from cleangpt_jax.config import ConfigError, get_config
from cleangpt_jax.distill import config as distill_config
from cleangpt_jax.distill import records, runner
from helpers import QUIET_RUN, REPO, one_line_error, persistent_compile_cache

SEED = int(os.environ.get("FAULT_SEED", "0"))
COUNTS = {"kills": 0, "kills_bitwise_equal": 0, "corruptions": 0, "corruptions_detected": 0,
          "refusals": 0, "refusals_unchanged": 0}
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness. ") * 30

# Kill points: KILL_AT_BATCH=s kills when the batch of (0-based, global) step s is built;
# KILL_IN_SAVE=<dir name>/<step> kills inside that step's save, after its files are written
# and before Orbax renames it into place (where checksums.json is written).
KILLER = """
import os, signal, sys
from cleangpt_jax import checkpoint, data as data_lib
at_batch, in_save = os.environ.get("KILL_AT_BATCH"), os.environ.get("KILL_IN_SAVE")
real_batch, real_checksums = data_lib.batch_for_step, checkpoint.write_checksums
def batch_for_step(tokens, *, step, **kw):
    if at_batch is not None and step == int(at_batch):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_batch(tokens, step=step, **kw)
def write_checksums(step_dir):
    where, step = in_save.rsplit("/", 1) if in_save else ("", "")
    name, parent = os.path.basename(str(step_dir)), os.path.basename(os.path.dirname(str(step_dir)))
    if in_save and parent == where and name.split(".")[0] == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_checksums(step_dir)
data_lib.batch_for_step, checkpoint.write_checksums = batch_for_step, write_checksums
import runpy
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__")
"""

TRAIN = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
         "model.dropout": 0.1, "train.batch_size": 4, "train.num_steps": 10,
         "train.warmup_steps": 2, "train.learning_rate": 1e-2, "train.log_every": 3,
         "train.eval_every": 5, "train.eval_steps": 1, "train.checkpoint_every": 2,
         "train.max_checkpoints_to_keep": 0, "train.sample_max_new_tokens": 0,
         "data.source": "text", "data.val_fraction": 0.1, **QUIET_RUN}
DISTILL = {"model.model_type": "vanilla", "model.n_layer": 1, "model.n_head": 2,
           "model.n_embd": 16, "model.block_size": 16, "model.dropout": 0.1,
           "train.batch_size": 4, "data.source": "text", "data.val_fraction": 0.1,
           "distill.steps_per_block": 3, "distill.head.steps": 3, "distill.final.steps": 3,
           "distill.final.enabled": True, "distill.final.logit_loss": "ce",
           "distill.warmup_steps": 0,
           "distill.learning_rate": 3e-3, "distill.checkpoint_every": 1, "distill.log_every": 1,
           "distill.eval_steps": 1, **QUIET_RUN}
DISTILL_STAGES = (("block_1", 0, 3), ("head", 3, 6), ("final", 6, 9))  # (global steps)


def flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def configured(cfg, overrides: dict):
    cfg.update_from_flattened_dict(overrides)
    return cfg


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A corpus, a token cache and one persistent compilation cache (optimisation off) for this
    module and its subprocesses: every run compared bitwise is compiled with these settings."""
    root = tmp_path_factory.mktemp("faults")
    (root / "corpus.txt").write_text(TEXT)
    common = {"data.files": str(root / "corpus.txt"), "data.cache_dir": str(root / "tokens")}
    with persistent_compile_cache(str(root / "jit_cache"), fast_compile=True) as sub_env:
        yield types.SimpleNamespace(root=root, sub_env=sub_env, common=common,
                                    rng=random.Random(SEED))


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nfault injection (FAULT_SEED={SEED}): {COUNTS['kills']} kills, "
          f"{COUNTS['kills_bitwise_equal']} bitwise equal; {COUNTS['corruptions']} corruptions, "
          f"{COUNTS['corruptions_detected']} detected; {COUNTS['refusals']} wrong-tool or "
          f"read-only runs, {COUNTS['refusals_unchanged']} refused with nothing changed",
          file=sys.__stdout__, flush=True)


def run_cli(env, module: str, args: list[str], kill: dict | None = None):
    """Run `python -m module args` (through KILLER when `kill` names a point)."""
    command = ([sys.executable, "-c", KILLER, module, *args] if kill
               else [sys.executable, "-m", module, *args])
    return subprocess.run(command, cwd=REPO, env=dict(env.sub_env, **(kill or {})),
                          capture_output=True, text=True, timeout=300)


def metric_records(workdir) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    from cleangpt_jax.metrics import untimed

    return untimed(workdir_lib.read_metrics(str(workdir)))


def stored(step_dir) -> dict[str, np.ndarray]:
    """Every array of a checkpoint step (parameters and optimizer state), read back as saved."""
    out = {}
    for item in ("params", "opt_state"):
        if os.path.isdir(os.path.join(step_dir, item)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Sharding info not provided": one device
                tree = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, item))
            out.update({f"{item}/{path_str(p)}": np.asarray(x)
                        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]})
    return out


def steps(directory) -> set[int]:
    return {int(n) for n in os.listdir(directory) if n.isdigit()} if os.path.isdir(
        directory) else set()


def same_steps(directory, reference_directory, chosen) -> bool:
    """Whether the `chosen` steps hold bitwise the same arrays in both directories."""
    for step in chosen:
        a = stored(os.path.join(directory, str(step)))
        b = stored(os.path.join(reference_directory, str(step)))
        if a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a):
            return False
    return True


def mtimes(directories) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for top in directories for d, _, files in os.walk(top) for f in files}


def kill_chain(env, module, args, kills, directories: dict[str, tuple[str, str]],
               finished=lambda: []):
    """Run the command once per kill point (each killed there), then once to the end. A kill
    counts as recovered when every checkpoint step the next process saved (in each of
    `directories`: name -> (this run's, the reference's)) that the reference kept equals the
    reference's bitwise. `finished()`: directories no later process may touch (a
    distillation's completed stages)."""
    def saved():
        return {name: steps(mine) for name, (mine, _) in directories.items()}

    before, outputs = saved(), []
    for i, kill in enumerate([*kills, None]):
        finished_dirs = finished()
        finished_files = mtimes(finished_dirs)
        done = run_cli(env, module, args, kill)
        assert mtimes(finished_dirs) == finished_files, "a finished stage was written again"
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == (-9 if kill else 0), (kill, outputs[-1][-3000:])
        after = saved()
        if i > 0:  # the process that resumed after kill i-1
            COUNTS["kills"] += 1
            equal = all(same_steps(*directories[n], sorted(  # (stages keep their last 2)
                (after[n] - before[n]) & steps(directories[n][1]))) for n in after)
            COUNTS["kills_bitwise_equal"] += equal
            assert equal, (kills[i - 1], outputs[-1][-3000:])
        before = after
    return outputs


# --------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def train_reference(env):
    """The uninterrupted tiny training run (in process), every checkpoint kept."""
    overrides = {**TRAIN, **env.common}
    workdir = env.root / "train_reference"
    trainer.train_and_evaluate(configured(get_config(), overrides), str(workdir))
    assert steps(workdir / "checkpoints") == {2, 4, 6, 8, 10}  # (max_checkpoints_to_keep=0)
    return types.SimpleNamespace(workdir=workdir, overrides=overrides)


def test_training_killed_anywhere_resumes_bitwise(env, train_reference):
    """Two kills: at a batch before the first checkpoint, and inside a later checkpoint's save
    (the step before it was saved inside a log_every=3 window, so the rerun resumes mid-window).
    Each rerun continues where the last checkpoint left it; what it saves, its metrics records
    and TensorBoard scalars equal the uninterrupted run's."""
    from test_train import tensorboard_scalars

    rng = env.rng
    kills = [{"KILL_AT_BATCH": str(rng.randrange(0, 2))},                   # before step 2's save
             {"KILL_IN_SAVE": f"checkpoints/{rng.choice([4, 6, 8])}"}]  # (resumes mid-window)
    workdir = env.root / "train_killed"
    args = [f"--workdir={workdir}", *flags(train_reference.overrides)]
    kill_chain(env, "cleangpt_jax.train", args, kills, {"checkpoints": (
        str(workdir / "checkpoints"), str(train_reference.workdir / "checkpoints"))})
    assert steps(workdir / "checkpoints") == steps(train_reference.workdir / "checkpoints")
    assert metric_records(workdir) == metric_records(train_reference.workdir)
    assert tensorboard_scalars(workdir) == tensorboard_scalars(train_reference.workdir)
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(workdir / "checkpoints"))


# ----------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def distill_reference(env, gpt2_tokenizer_dir):
    """A random 2-block GPT-2 teacher (exported as Hugging Face writes it) and the
    uninterrupted tiny distillation of it (in process) into a 1-block student: block_1, head
    and final stages of 3 steps each, every step checkpointed."""
    import jax.numpy as jnp

    from cleangpt_jax import hf
    from cleangpt_jax.config import ModelConfig
    from cleangpt_jax.models import get_model
    from cleangpt_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    teacher_config = ModelConfig(model_type="vanilla", vocab_size=tokenizer.vocab_size,
                                 n_layer=2, n_head=2, n_embd=32, block_size=32)
    params = get_model(config=teacher_config).init(
        jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    teacher = hf.export_gpt2(teacher_config, params, str(env.root / "teacher"), tokenizer)
    overrides = {**DISTILL, **env.common, "distill.teacher": teacher}
    workdir = env.root / "distill_reference"
    runner.run(configured(distill_config.get_config(), overrides), str(workdir), progress=False)
    return types.SimpleNamespace(workdir=workdir, overrides=overrides)


def test_distillation_killed_in_every_stage_kind_resumes_bitwise(env, distill_reference):
    """A kill in a block stage, in the head stage and in the final stage, one of them inside a
    stage checkpoint's save: every rerun resumes the stage it was in (and says so) without
    touching a completed stage, and the stage checkpoints, the final student, metrics.jsonl
    and the manifest equal the uninterrupted run's."""
    rng = env.rng
    in_save = rng.randrange(len(DISTILL_STAGES))  # which kind gets killed inside a save
    kills = []
    for i, (name, first, last) in enumerate(DISTILL_STAGES):
        if i == in_save:
            kills.append({"KILL_IN_SAVE": f"{name}/{rng.randrange(1, last - first + 1)}"})
        else:
            kills.append({"KILL_AT_BATCH": str(rng.randrange(first, last))})
    workdir = env.root / "distill_killed"
    args = [f"--workdir={workdir}", *flags(distill_reference.overrides)]
    stages = lambda w: {n: str(w / "stages" / n) for n, _, _ in DISTILL_STAGES}  # noqa: E731
    mine, theirs = stages(workdir), stages(distill_reference.workdir)
    completed = lambda: [mine[m["name"]] for m in records.read_manifest(workdir)]  # noqa: E731
    outputs = kill_chain(env, "cleangpt_jax.distill", args, kills,
                         {n: (mine[n], theirs[n]) for n in mine}, finished=completed)
    for before, output in zip(kills, outputs[1:]):  # each rerun says where it continues
        assert "Completed stages [" in output or "Resuming stage" in output, (before, output)
    assert "validation perplexity: teacher" in outputs[-1]
    for name in mine:
        assert steps(mine[name]) == steps(theirs[name]), name
    assert same_steps(workdir / "checkpoints", distill_reference.workdir / "checkpoints",
                      steps(distill_reference.workdir / "checkpoints"))
    assert metric_records(workdir) == metric_records(distill_reference.workdir)
    assert records.read_manifest(workdir) == records.read_manifest(distill_reference.workdir)


# ------------------------------------------------------------------------------ corruption
def flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(0, os.path.getsize(path) // 2))


def largest_file(directory) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


CORRUPTIONS = {  # what is done to which item of the newest step
    "params bit flip": ("params", flip_byte),
    "params truncated": ("params", truncate),
    "params file deleted": ("params", os.remove),
    "optimizer state bit flip": ("opt_state", flip_byte),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_damaged_newest_step_is_detected_moved_aside_and_the_previous_used(
        case, env, train_reference, tmp_path, capsys):
    """Training resumes from the step before a damaged one (the damaged step moved to
    checkpoints_unreadable/, nothing deleted) and ends where the uninterrupted run did;
    generate refuses a step whose parameters are damaged in one line that offers the others."""
    from test_generation import cli_main as generate_main

    item, damage = CORRUPTIONS[case]
    workdir = tmp_path / "run"
    shutil.copytree(train_reference.workdir, workdir)
    newest = max(steps(workdir / "checkpoints"))
    COUNTS["corruptions"] += 1
    damage(largest_file(workdir / "checkpoints" / str(newest) / item))

    code, _, err = generate_main([f"--workdir={workdir}", "--prompt=It",
                                  "--max_new_tokens=2"], capsys)
    if item == "opt_state":  # generate reads (and verifies) the parameters only
        assert code == 0, err
    else:
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"checkpoint step {newest}" in err and "can be chosen with --step" in err, err

    cfg = configured(get_config(), train_reference.overrides)
    trainer.train_and_evaluate(cfg, str(workdir))
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    detected = (len(warning) == 1 and f"checkpoint step {newest}" in warning[0]
                and os.path.isdir(workdir / "checkpoints_unreadable" / str(newest)))
    COUNTS["corruptions_detected"] += detected
    assert detected, err
    assert "fails its checksums" in warning[0], warning[0]
    assert same_steps(workdir / "checkpoints", train_reference.workdir / "checkpoints",
                      [newest])  # retrained from the step before: the same numbers again


def test_an_old_step_without_checksums_still_falls_back_quietly(env, train_reference, tmp_path):
    """A step written before checksums existed is read unverified; a truncated array file in it
    is still caught (Orbax cannot read it), moved aside and the previous step used, with one
    warning line and without the coroutine tracebacks its abandoned reads used to print."""
    workdir = tmp_path / "old"
    shutil.copytree(train_reference.workdir, workdir)
    newest = max(steps(workdir / "checkpoints"))
    for step in steps(workdir / "checkpoints"):
        os.remove(workdir / "checkpoints" / str(step) / CHECKSUMS_FILE)
    step_dir = workdir / "checkpoints" / str(newest)
    for item in ("params", "opt_state"):
        for d, _, files in os.walk(step_dir / item):
            for f in files:
                if os.path.basename(d) == "d":
                    truncate(os.path.join(d, f))
    COUNTS["corruptions"] += 1
    done = run_cli(env, "cleangpt_jax.train", [f"--workdir={workdir}",
                                               *flags(train_reference.overrides)])
    assert done.returncode == 0, done.stderr[-3000:]
    detected = (os.path.isdir(workdir / "checkpoints_unreadable" / str(newest))
                and f"Resuming from step {newest - 2}" in done.stdout)
    COUNTS["corruptions_detected"] += detected
    assert detected, done.stdout + done.stderr
    warnings_ = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings_) == 1 and "is unreadable" in warnings_[0], done.stderr
    # The abandoned reads' Orbax coroutines are silenced. (TensorStore's callbacks into the
    # closed event loop can still print a few tracebacks here: they bypass Python's hooks.)
    assert "Exception ignored" not in done.stderr, done.stderr


# ---------------------------------------------------------------- refusals: nothing changes
def test_read_only_workdirs_and_runs_handed_to_the_wrong_tool_change_nothing(
        env, train_reference, distill_reference, tmp_path, monkeypatch, capsys):
    """train into a read-only workdir; distill into a training run or into its teacher's
    directory; train into a distillation; export_hf over a run: each is refused in one line
    before any work, and every file of the directories involved is as it was."""
    from cleangpt_jax import hf
    from test_train import tree_digest

    train_run, distill_run = tmp_path / "train", tmp_path / "distill"
    shutil.copytree(train_reference.workdir, train_run)
    shutil.copytree(distill_reference.workdir, distill_run)
    teacher = distill_reference.overrides["distill.teacher"]
    train_cfg = lambda: configured(get_config(), train_reference.overrides)  # noqa: E731
    distill_cfg = lambda **o: configured(distill_config.get_config(),  # noqa: E731
                                         {**distill_reference.overrides, **o})

    def read_only(path):
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: (
            os.path.abspath(p) != os.path.abspath(path) and access(p, mode)))

    cases = {
        "train into a read-only workdir": (
            train_run, lambda: (read_only(train_run),
                                trainer.train_and_evaluate(train_cfg(), str(train_run)))),
        "distill into a training run": (
            train_run, lambda: runner.run(distill_cfg(), str(train_run), progress=False)),
        "distill into its teacher's directory": (
            teacher, lambda: runner.run(distill_cfg(), teacher, progress=False)),
        "train into a distillation": (
            distill_run, lambda: trainer.train_and_evaluate(train_cfg(), str(distill_run))),
        "export_hf over a run": (
            train_run, lambda: hf.export_run(str(distill_run), str(train_run), overwrite=True)),
    }
    for name, (directory, attempt) in cases.items():
        before = tree_digest(directory)
        COUNTS["refusals"] += 1
        with pytest.raises((ConfigError, CheckpointError, ValueError)) as e:
            attempt()
        monkeypatch.undo()
        one_line_error(e)
        unchanged = tree_digest(directory) == before
        COUNTS["refusals_unchanged"] += unchanged
        assert unchanged, name
    assert json.loads((train_run / "config.json").read_text())["model"]["n_layer"] == 1
