"""Training: the real CLI, exact resume (also through SIGTERM), determinism, 8 host devices, two
processes, the optimizer and its schedule, gradient accumulation, epochs, mixtures,
callbacks, strategies, and bad input that leaves the disk as it was.

Cost control (compiling is what tiny runs spend their time on): one tiny model (2 layers x 32,
block 16) on 4 of the embedded Shakespeare plays; a persistent compilation cache shared by this
process and its subprocesses, so a program compiles once however many runs use it; XLA's
optimisation passes off; module-scoped runs that several tests read; and the 8-device and
2-process subprocesses started in the background as soon as their inputs exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import datasets
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cleangpt_jax import loop, optim, train_setup, trainer
from cleangpt_jax import train_step
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.checkpoint import CheckpointError, path_str
from cleangpt_jax.config import ConfigError, get_config, model_config
from cleangpt_jax.distill import config as distill_config
from cleangpt_jax.models import get_model
from cleangpt_jax.tokenizers import create_tokenizer
from helpers import (QUIET_RUN, one_line_error, persistent_compile_cache, run_tool,
                     xla_flags)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, HALF = 12, 6  # steps of the short runs; the interrupted run stops at HALF

# The tiny run every test starts from, as flat 'section.key' overrides of the default config
# (the same dict becomes --config.section.key=value flags for the CLI).
TINY = {
    "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16,
    "model.dropout": 0.1,
    "train.batch_size": 8, "train.num_steps": N, "train.learning_rate": 1e-2,
    "train.min_lr": 1e-3, "train.warmup_steps": 2, "train.eval_every": 4, "train.eval_steps": 2,
    "train.log_every": 1, "train.checkpoint_every": 4, "train.max_checkpoints_to_keep": 5,
    "train.sample_max_new_tokens": 0, "train.sample_prompts": ("ROMEO:",), **QUIET_RUN,
    "data.max_samples": 4,  # the first 4 plays: 3 to train on, 1 for validation
}
SAMPLES = {"train.sample_every": 4, "train.sample_max_new_tokens": 8}


def overrides(env, **changes) -> dict:
    return {**TINY, "data.cache_dir": str(env.tokens), **changes}


def make_config(env, **changes) -> ml_collections.ConfigDict:
    cfg = get_config()
    for key, value in overrides(env, **changes).items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def cli_flags(env, **changes) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides(env, **changes).items()]


def run(cfg, workdir, callbacks=()) -> trainer.Summary:
    return trainer.train_and_evaluate(cfg, str(workdir), callbacks=list(callbacks))


def params_of(workdir, step=None) -> dict[str, np.ndarray]:
    """{path: array} of a run's checkpoint (latest by default), restored onto one device."""
    params = workdir_lib.load_run(str(workdir), step).params
    return {path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_params_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_params_close(a: dict, b: dict):
    """Equal up to float32 reduction order, as amplified by 12 Adam steps: Adam moves every
    weight by about lr = 1e-2 per step whatever its gradient, so a weight whose gradient is
    nearly zero may land 1e-4 away. Bound the worst weight by a tenth of one step, and all of
    them together by 1e-4 of their norm."""
    assert a.keys() == b.keys()
    diff = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a))
    norm = np.sqrt(sum(np.sum(b[k] ** 2) for k in b))
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-3 and diff / norm < 1e-4, (worst, diff / norm)


def losses(workdir) -> list[tuple]:
    """(step, train_loss) and (step, val_loss) records of metrics.jsonl, timings dropped."""
    keep = ("train_loss", "val_loss", "lr", "best_val_loss")
    return [tuple([r["step"]] + [(k, r[k]) for k in keep if k in r])
            for r in workdir_lib.read_metrics(str(workdir))]


def tree_digest(root) -> dict[str, str]:
    """sha256 of every file under `root`: proof that nothing on disk changed."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def tensorboard_scalars(workdir) -> dict[str, list[int]]:
    """{tag: [steps]} read back from the TensorBoard event files (TFRecords of Event protos; a
    resumed run adds a file)."""
    from tensorboardX.proto import event_pb2  # tensorboardX is loaded already (no torch)

    out = {}
    for name in sorted(f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")):
        data, pos = open(os.path.join(workdir, name), "rb").read(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(event.step)
    return out


def checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit())


class Recorder:
    """A callback that records (event, run.step) and what the event is about."""

    def __init__(self):
        self.events = []
        self.steps_per_epoch = None

    def __call__(self, event, run):
        if event == "train_begin":
            self.steps_per_epoch = run.steps_per_epoch
        extra = {"eval_end": lambda: (run.last_eval["val_loss"],),
                 "train_end": lambda: (run.interrupted,)}.get(event, tuple)()
        self.events.append((event, run.step, *extra))


def sigterm_at(step):
    """A callback that sends this process SIGTERM at the end of `step` (what a preempted TPU
    VM receives)."""

    def callback(event, run):
        if event == "step_end" and run.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return callback


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Token cache and compilation settings for this module and its subprocesses.

    Compiling, not running, is what these tiny runs cost: a persistent compilation cache shares
    each program between runs and processes, and XLA's optimisation passes are off
    (jax_disable_most_optimizations: ~3x cheaper compiles, slower but still millisecond steps).
    Every number compared bitwise comes from programs compiled the same way."""
    root = tmp_path_factory.mktemp("train")
    with persistent_compile_cache(str(root / "jit_cache"), fast_compile=True) as sub_env:
        yield types.SimpleNamespace(root=root, tokens=root / "tokens", sub_env=sub_env)


@pytest.fixture(scope="module")
def straight(env):
    """N steps in one go (with a recording callback and periodic samples)."""
    rec = Recorder()
    workdir = env.root / "straight"
    summary = run(make_config(env, **SAMPLES), workdir, [rec])
    return types.SimpleNamespace(workdir=workdir, summary=summary, events=rec.events,
                                 steps_per_epoch=rec.steps_per_epoch,
                                 params=params_of(workdir), losses=losses(workdir))


@pytest.fixture(scope="module")
def resumed(env, straight):
    """The same run stopped by SIGTERM at HALF (a snapshot of that workdir is kept), then the
    same call again, which resumes and finishes."""
    workdir = env.root / "resumed"
    cfg = make_config(env, **SAMPLES)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        first = run(cfg, workdir, [sigterm_at(HALF)])
    snapshot = env.root / "half_snapshot"
    shutil.copytree(workdir, snapshot)
    with contextlib.redirect_stdout(out):
        second = run(cfg, workdir)
    return types.SimpleNamespace(workdir=workdir, snapshot=snapshot, first=first, second=second,
                                 stdout=out.getvalue(), params=params_of(workdir),
                                 losses=losses(workdir))


# --------------------------------------------------------------------- resume, determinism
@pytest.mark.usefixtures("background")  # start the 8-device and 2-process runs now
def test_exact_resume_after_sigterm(straight, resumed):
    first, second = resumed.first, resumed.second
    assert first.interrupted and first.step == HALF and not first.samples
    assert first.stop_signal == signal.SIGTERM and second.stop_signal is None
    assert checkpoint_steps(resumed.snapshot) == [4, HALF]  # every 4 steps + on SIGTERM
    assert f"Resuming from step {HALF}" in resumed.stdout
    assert not second.interrupted and second.step == N
    # Bitwise: parameters, the final train/val loss and every logged number of the run.
    assert_params_equal(resumed.params, straight.params)
    assert second.train_loss == straight.summary.train_loss
    assert second.val_loss == straight.summary.val_loss
    assert second.best_val_loss == straight.summary.best_val_loss
    assert resumed.losses == straight.losses
    assert second.samples == straight.summary.samples


def test_early_stopping_ends_the_run_and_keeps_the_best(env, straight, tmp_path, capsys):
    """train.early_stopping_patience: with a min_delta no evaluation can beat, the evaluation
    at step 4 sets the best and the one at step 8 (patience 1) ends the run there; every new
    best is checkpointed (even one below the delta), the losses up to step 8 are the straight
    run's, and a rerun has nothing to do."""
    workdir = tmp_path / "early"
    cfg = make_config(env, **SAMPLES, **{"train.early_stopping_patience": 1,
                                         "train.early_stopping_min_delta": 100.0,
                                         "train.checkpoint_every": 0})
    summary = run(cfg, workdir)
    assert summary.early_stopped and summary.step == 8 and not summary.interrupted
    vals = [dict(x[1:])["val_loss"] for x in straight.losses
            if x[0] <= 8 and "val_loss" in dict(x[1:])]
    assert summary.best_val_loss == min(vals)
    assert summary.best_step == 4 * (1 + vals.index(min(vals)))
    assert checkpoint_steps(workdir) == sorted({4, summary.best_step, 8})
    assert [x for x in losses(workdir) if x[0] <= 8] == [x for x in straight.losses
                                                        if x[0] <= 8]
    capsys.readouterr()
    again = run(cfg, workdir)
    assert again.step == 8 and again.early_stopped
    assert "stopped early" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="early_stopping_patience=1 needs evaluations"):
        run(make_config(env, **{"train.early_stopping_patience": 1, "train.eval_every": 0}),
            tmp_path / "no_eval")


def test_a_finished_run_rerun_writes_nothing(env, straight, tmp_path, capsys):
    """Issue 13 item 13: rerunning a run already at num_steps has nothing to do and leaves its
    workdir byte for byte as it was (config.json is not rewritten)."""
    workdir = tmp_path / "finished"
    shutil.copytree(straight.workdir, workdir)
    config_json = workdir / workdir_lib.CONFIG_FILE
    before = tree_digest(workdir), config_json.stat().st_mtime_ns, config_json.stat().st_ino
    assert run(make_config(env, **SAMPLES), workdir).step == N
    assert "nothing to do" in capsys.readouterr().out
    assert (tree_digest(workdir), config_json.stat().st_mtime_ns,
            config_json.stat().st_ino) == before  # the same bytes, not rewritten


def test_another_seed_gives_other_losses_and_weights(env, straight, tmp_path):
    """(The same seed giving the same run, bit for bit, is what every resume test checks, and
    tests/test_fault_injection.py across processes.)"""
    other = run(make_config(env, **{"train.seed": 1}), tmp_path / "seed1")
    other_losses = [r for r in losses(tmp_path / "seed1") if r[1][0] == "train_loss"]
    mine = [r for r in straight.losses if r[1][0] == "train_loss"]
    assert len(other_losses) == len(mine) == N
    assert all(a[1] != b[1] for a, b in zip(other_losses, mine))
    assert other.train_loss != straight.summary.train_loss
    p1 = params_of(tmp_path / "seed1")
    assert not np.array_equal(p1["wte/embedding"], straight.params["wte/embedding"])


# ------------------------------------------------------------------------------- the CLI
def test_cli_writes_the_run_resumes_after_sigterm_and_the_loss_falls(env, straight, tmp_path):
    """Real CLI on a config file: SIGTERM mid-run saves and exits 143 (128 + SIGTERM, as
    distill does; 0 means finished); the same command resumes,
    finishes, prints a sample and leaves metrics, TensorBoard events, checkpoints, config and
    tokenizer; the parameters are bitwise those of the uninterrupted in-process run."""
    # Evaluating 100 batches after every step makes the 12 steps last long enough to be
    # interrupted; evaluation does not change training, and every program is already compiled.
    changes = {**SAMPLES, "train.eval_every": 1, "train.eval_steps": 100}
    workdir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "cleangpt_jax.train", "--config=configs/shakespeare_char.py",
           f"--workdir={workdir}", *cli_flags(env, **changes)]
    metrics = workdir / "metrics.jsonl"
    with open(tmp_path / "out1", "w") as out, open(tmp_path / "err1", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env.sub_env, stdout=out, stderr=err)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            if metrics.exists() and '"step": 2, "train_loss"' in metrics.read_text():
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.005)
        proc.wait(timeout=240)
    err1 = (tmp_path / "err1").read_text()
    assert proc.returncode == 128 + signal.SIGTERM == 143, err1[-3000:]
    stopped = checkpoint_steps(workdir)[-1]
    assert 2 <= stopped < N, err1[-2000:]
    assert "SIGTERM received" in err1 and f"stopped at step {stopped}" in err1

    # The rerun evaluates 20 batches a step: evaluation settings may change across a resume
    # (only the model and tokenizer may not), and 100 x 10 batches would dominate the test.
    second = subprocess.run([*cmd, "--config.train.eval_steps=20"], cwd=REPO, env=env.sub_env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from step {stopped}" in second.stdout
    assert f"----- sample (prompt 'ROMEO:', step {N}) -----\n" in second.stdout
    assert f"workdir: {workdir}" in second.stdout

    files = os.listdir(workdir)
    assert {"config.json", "tokenizer", "checkpoints", "metrics.jsonl", "samples"} <= set(files)
    scalars = tensorboard_scalars(workdir)  # the same numbers as metrics.jsonl
    assert scalars["train_loss"] == scalars["lr"] == scalars["val_loss"] == list(range(1, N + 1))
    assert checkpoint_steps(workdir)[-1] == N
    assert sorted(os.listdir(workdir / "samples")) == ["step_12.txt", "step_4.txt", "step_8.txt"]
    assert (workdir / "samples" / "step_12.txt").read_text() == \
        (straight.workdir / "samples" / "step_12.txt").read_text()
    saved = workdir_lib.load_config(str(workdir))
    assert saved.model.vocab_size == create_tokenizer(
        "character", name_or_path=str(workdir / "tokenizer")).vocab_size
    assert (saved.train.num_steps, saved.model.n_embd, saved.train.eval_steps) == (N, 32, 20)
    records = workdir_lib.read_metrics(str(workdir))
    train_records = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, N + 1))
    assert {"step", "train_loss", "lr", "tokens_per_sec", "grad_norm"} <= set(train_records[0])
    assert [r["step"] for r in records if "val_loss" in r] == list(range(1, N + 1))
    assert_params_equal(params_of(workdir), straight.params)
    assert [r for r in losses(workdir) if r[1][0] == "train_loss"] == \
        [r for r in straight.losses if r[1][0] == "train_loss"]
    # The loss falls on Shakespeare: from ln(vocab) at the start to well below it in 12 steps.
    first_loss = train_records[0]["train_loss"]
    last_val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert abs(first_loss - math.log(saved.model.vocab_size)) < 0.2
    assert last_val < first_loss - 0.8, (first_loss, last_val)


def cli_error(*args, capsys, monkeypatch) -> tuple[int, str]:
    """The train command line in-process (`run_tool`), from the repository root."""
    from cleangpt_jax import train

    monkeypatch.chdir(REPO)
    code, out, err = run_tool(train.run, ["train", *args], capsys, monkeypatch)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not out
    return code, err.strip()


def test_cli_unknown_config_file_and_key(tmp_path, capsys, monkeypatch):
    rc, msg = cli_error("--config=configs/no_such_config.py", f"--workdir={tmp_path}/a",
                        capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 2 and "configs/no_such_config.py" in msg
    rc, msg = cli_error("--config=configs/shakespeare_char.py", "--config.train.nmu_steps=3",
                        f"--workdir={tmp_path}/b", capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 2 and "unknown config key '--config.train.nmu_steps'" in msg
    assert 'Did you mean "num_steps"' in msg  # ml_collections' suggestion is kept
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------- callbacks, samples, epochs
def test_callbacks_receive_events_in_loop_order_and_samples_are_written(straight):
    events, workdir, per_epoch = straight.events, straight.workdir, straight.steps_per_epoch
    val = {r[0]: r[1][1] for r in straight.losses if r[1][0] == "val_loss"}
    expected = [("train_begin", 0)]
    for s in range(N):  # s updates done; the step makes it s + 1
        if s % per_epoch == 0:
            expected.append(("epoch_begin", s))
        expected.append(("step_begin", s))
        if (s + 1) % 4 == 0:  # evaluation inside the step, before step_end
            expected += [("eval_begin", s + 1), ("eval_end", s + 1, val[s + 1])]
        expected.append(("step_end", s + 1))
        if (s + 1) % per_epoch == 0 or s + 1 == N:
            expected.append(("epoch_end", s + 1))
    expected.append(("train_end", N, False))
    assert events == expected
    assert sorted(os.listdir(workdir / "samples")) == ["step_12.txt", "step_4.txt", "step_8.txt"]
    final = (workdir / "samples" / "step_12.txt").read_text()
    assert final == f"=== step 12 | prompt 'ROMEO:' ===\n{straight.summary.samples[0]}\n\n"
    assert straight.summary.samples[0].startswith("ROMEO:")


def test_logged_learning_rate_follows_the_schedule(straight):
    lrs = {r[0]: dict(r[1:])["lr"] for r in straight.losses if r[1][0] == "train_loss"}
    # warmup 2: the update that produced step s used lr(s - 1) = 1e-2 * s / 2 for s <= 2 ...
    assert lrs[1] == pytest.approx(5e-3) and lrs[2] == pytest.approx(1e-2)
    # ... then cosine from 1e-2 to min_lr 1e-3 over the remaining 10 updates.
    for s in range(3, N + 1):
        p = (s - 1 - 2) / (N - 2)
        assert lrs[s] == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-5)


def write_text(path, text) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_num_epochs_and_a_mixture_from_the_train_config(env, straight, tmp_path):
    """train.num_epochs sets the step count from the packed tokens, and the epoch callbacks
    fire at its boundaries; data.mixture mixes two sources row by row (here 'ab...' text and
    'xyz...' text, told apart by their letters). Sized to N steps with the straight run's
    vocab_size, so its compiled step is reused."""
    a = write_text(tmp_path / "a" / "a.txt", "ab" * 200)  # 400 tokens: 25 windows of 16
    b = write_text(tmp_path / "b" / "b.txt", "xyz" * 123)  # 369 tokens: 23 windows
    vocab = workdir_lib.load_config(str(straight.workdir)).model.vocab_size
    cfg = make_config(env, **{"train.num_epochs": 2.0, "train.eval_every": 0,
                              "train.checkpoint_every": 0, "data.val_fraction": 0.0,
                              "model.vocab_size": vocab})
    cfg.data.mixture = {"sources": [{"source": "text", "files": a},
                                    {"source": "text", "files": b}],
                        "schedule": {"type": "constant", "weights": [1.0, 1.0]}}
    first, epochs = {}, []

    def first_batch_and_epochs(event, run):
        if event == "train_begin":
            first["rows"] = [run.tokenizer.decode(r) for r in run.batch_for_step(0)["input_ids"]]
        if event.startswith("epoch_"):
            epochs.append((event, run.step))

    summary = run(cfg, tmp_path / "run", [first_batch_and_epochs])
    per_epoch = math.ceil((25 + 23) / 8)
    assert summary.num_steps == summary.step == 2 * per_epoch == N
    assert epochs == [("epoch_begin", 0), ("epoch_end", per_epoch),
                      ("epoch_begin", per_epoch), ("epoch_end", N)]
    kinds = [set(r) for r in first["rows"]]
    assert all(k <= {"a", "b"} or k <= {"x", "y", "z"} for k in kinds), first["rows"]
    assert any(k <= {"a", "b"} for k in kinds) and any(k <= {"x", "y", "z"} for k in kinds)
    assert train_setup.resolve_num_steps(ml_collections.ConfigDict(
        {"num_epochs": 2.5, "num_steps": 7}), 10) == 25
    with pytest.raises(ConfigError, match="train.num_epochs must be positive"):
        train_setup.resolve_num_steps(ml_collections.ConfigDict({"num_epochs": 0.0}), 10)


# ------------------------------------------------------------------ strategies and NaN
STRATEGY_CALLS = []


@train_step.register_strategy("Test_Plain_LM")
def plain_lm_strategy(model, config):
    """A user strategy (here the LM loss again, so the run must equal the straight one)."""
    STRATEGY_CALLS.append((model.config.n_embd, config.train.strategy))
    return train_step.lm_strategy(model, config)


def test_a_registered_strategy_is_picked_by_train_strategy(env, straight, tmp_path):
    assert {"lm", "test_plain_lm"} <= set(train_step.STRATEGIES.names())
    summary = run(make_config(env, **{"train.strategy": "test_plain_lm"}), tmp_path / "run")
    assert STRATEGY_CALLS == [(32, "test_plain_lm")]
    assert summary.train_loss == straight.summary.train_loss
    with pytest.raises(ConfigError, match=r"unknown train.strategy 'nope': registered .*'lm'"):
        train_step.get_strategy("nope", None, None)


def poison_at(step):
    """A callback that turns the parameters into NaN after `step` (a diverged update)."""

    def callback(event, run):
        if event == "step_end" and run.step == step:
            run.state = run.state.replace(
                params=jax.tree.map(lambda x: x * jnp.nan, run.state.params))

    return callback


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(env, tmp_path):
    cfg = make_config(env, **{"train.checkpoint_every": 2})
    workdir = tmp_path / "nan"
    with pytest.raises(loop.NonFiniteError) as e:
        run(cfg, workdir, [poison_at(5)])
    msg = one_line_error(e)
    assert "training: loss is nan at step 6; stopped" in msg
    assert "checkpoint (step 4) is kept" in msg
    assert checkpoint_steps(workdir) == [2, 4]
    params = params_of(workdir)
    assert all(np.isfinite(v).all() for v in params.values())
    assert [r["step"] for r in workdir_lib.read_metrics(str(workdir))][-1] == 5


def test_a_diverged_update_is_never_saved_or_called_good(env, tmp_path, monkeypatch):
    """The last update turns every weight into NaN (a NaN learning rate at the last optimizer
    step): its loss, computed before the update, is finite, but the norm of the updated
    parameters is not. With a checkpoint every step, the run stops there and the newest
    checkpoint holds the finite weights of the step before."""
    real = optim.lr_schedule
    monkeypatch.setattr(optim, "lr_schedule", lambda t, n: (
        lambda s: jnp.where(s == n - 1, jnp.nan, real(t, n)(s))))
    workdir = tmp_path / "diverged"
    with pytest.raises(loop.NonFiniteError) as e:
        run(make_config(env, **{"train.checkpoint_every": 1, "train.eval_every": 0}), workdir)
    assert one_line_error(e) == (
        f"training: parameter norm is nan at step {N}; stopped, the last good checkpoint (step "
        f"{N - 1}) is kept in {workdir / 'checkpoints'}. Lower train.learning_rate, raise "
        f"train.warmup_steps or set train.grad_clip")
    assert checkpoint_steps(workdir) == list(range(N - 5, N))  # max_checkpoints_to_keep=5
    assert all(np.isfinite(v).all() for v in params_of(workdir).values())
    assert [r["step"] for r in workdir_lib.read_metrics(str(workdir))][-1] == N - 1


def test_the_final_checkpoint_is_saved_before_the_final_sample(env, straight, tmp_path,
                                                               monkeypatch):
    """checkpoint_every > num_steps: a final sample that fails still leaves the trained run."""
    def fail(run):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(trainer, "write_samples", fail)
    workdir = tmp_path / "sample_fails"
    with pytest.raises(RuntimeError, match="sampling failed"):
        run(make_config(env, **{"train.checkpoint_every": N + 1, "train.eval_every": 0,
                                "train.sample_max_new_tokens": 8}), workdir)
    assert checkpoint_steps(workdir) == [N]
    assert_params_equal(params_of(workdir), straight.params)


@pytest.mark.parametrize("changes, message", [
    ({"train.learning_rate": float("nan")}, "train.learning_rate and train.min_lr must be "
     "finite numbers, got learning_rate=nan, min_lr=0.001: set them to numbers like 1e-3 and "
     "1e-4"),
    ({"train.learning_rate": float("inf")}, "train.learning_rate and train.min_lr must be "
     "finite numbers, got learning_rate=inf, min_lr=0.001: set them to numbers like 1e-3 and "
     "1e-4"),
    ({"model.position_encoding": "alibi", "train.sample_max_new_tokens": 59},
     "train.sample_prompts need up to 6 tokens plus train.sample_max_new_tokens=59: 65 "
     "positions, more than model.max_position_embeddings=64; lower "
     "train.sample_max_new_tokens or shorten the prompts"),
    ({"train.loggers": "jsonl,foo"}, "unknown train.loggers ['foo']: choose any of ('jsonl', "
     "'tensorboard', 'wandb'), comma-separated (e.g. --config.train.loggers=jsonl,tensorboard)"),
    ({"train.profile_steps": "9,3"}, "train.profile_steps='9,3': need 1 <= START <= END (steps "
     "are numbered from 1)"),
], ids=["nan_lr", "inf_lr", "sample_too_long", "logger", "profile_window"])
def test_settings_that_fail_later_are_refused_up_front_and_write_nothing(changes, message, env,
                                                                        tmp_path):
    """A non-finite learning rate (caught at step 2 before), samples the model cannot serve
    (caught at the end-of-run sample before), an unknown logger and a bad profile window
    (caught when the loop opened them): one line before anything is written."""
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run(make_config(env, **changes), workdir)
    assert one_line_error(e) == message
    assert not workdir.exists()


# ------------------------------------------------------------------------------ bad input
# When one array of a step fails to read, Orbax's restore returns while TensorStore reads of the
# others are still landing on its (by then closed) event loop: harmless "Exception ignored".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_latest_checkpoint_is_reported_and_the_previous_one_used(
        env, straight, tmp_path, capsys):
    workdir = tmp_path / "damaged"
    shutil.copytree(straight.workdir, workdir)
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "checkpoints" / str(N)
                                                            / "params") for f in fs
                  if os.path.basename(d) == "d"]
    assert data_files
    for f in data_files:  # the parameter data of the newest step is lost
        os.remove(f)
    summary = run(make_config(env), workdir)
    out, err = capsys.readouterr()
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and f"checkpoint step {N} in {workdir}" in warning[0]
    assert "fails its checksums: params/" in warning[0] and "is missing" in warning[0]
    assert "using step 8 instead" in warning[0]
    assert "Resuming from step 8" in out
    assert os.path.isdir(workdir / "checkpoints_unreadable" / str(N))  # moved aside, not deleted
    assert summary.step == N
    assert_params_equal(params_of(workdir), straight.params)

    # Only one checkpoint, and it is partial (its optimizer state is gone): refuse, touch nothing.
    lone = tmp_path / "lone"
    shutil.copytree(straight.workdir, lone)
    for s in (4, 8):
        shutil.rmtree(lone / "checkpoints" / str(s))
    shutil.rmtree(lone / "checkpoints" / str(N) / "opt_state")
    before = tree_digest(lone)
    with pytest.raises(CheckpointError) as e:
        run(make_config(env), lone)
    msg = one_line_error(e)
    assert f"checkpoint step {N}" in msg and "has no optimizer state" in msg
    assert "no earlier checkpoint to fall back to" in msg
    assert tree_digest(lone) == before


def saved_dataset(path, **columns) -> str:
    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("case", ["text_column", "empty", "short", "accum", "strategy",
                                  "other_model", "num_steps", "lr_schedule", "param_dtype"])
def test_bad_input_gives_one_line_error_and_leaves_the_workdir_alone(case, env, straight,
                                                                      tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight.workdir, workdir)
    before = tree_digest(workdir)
    hf = {"data.source": "hf"}
    text = {"data.source": "text"}
    cases = {
        "text_column": ({**hf, "data.text_column": "story", "data.name": saved_dataset(
            tmp_path / "ds", body=["To be, or not to be"] * 3)},
            r"data.text_column='story' is not a column of the dataset \(columns: \['body'\]\)"),
        "empty": ({**text, "data.files": write_text(tmp_path / "e.txt", " \n\n ")},
                  "the dataset is empty"),
        "short": ({**text, "data.files": write_text(tmp_path / "s.txt", "To be, or not")},
                  r"shorter than one block \(block_size=16\)"),
        "accum": ({"train.grad_accum_steps": 3},
                  r"train.batch_size=8 is not divisible by device count 1 x "
                  r"train.grad_accum_steps=3"),
        "strategy": ({"train.strategy": "nope"}, "unknown train.strategy 'nope'"),
        "other_model": ({"model.n_embd": 64}, r"different model/tokenizer \(model.n_embd: 32 -> "
                                              r"64\).*pass a new --workdir"),
        "num_steps": ({"train.num_steps": 0}, "train.num_steps must be a positive integer"),
        "lr_schedule": ({"train.lr_schedule": "step"}, "unknown train.lr_schedule 'step'"),
        "param_dtype": ({"model.param_dtype": "bfloat16"},
                        "training keeps float32 master weights and optimizer state"),
    }
    changes, pattern = cases[case]
    with pytest.raises(ValueError) as e:
        run(make_config(env, **changes), workdir)
    assert e.match(pattern)
    one_line_error(e)
    assert tree_digest(workdir) == before


# ------------------------------------------------------------- optimizer and schedules
def schedule(kind, warmup=10, num_steps=110):
    t = ml_collections.ConfigDict({"learning_rate": 1.0, "min_lr": 0.1, "warmup_steps": warmup,
                                   "lr_schedule": kind})
    return lambda s: float(optim.lr_schedule(t, num_steps)(s))


def test_lr_schedule_values_at_chosen_steps():
    cos, lin, const = schedule("cosine"), schedule("linear"), schedule("constant")
    for f in (cos, lin, const):  # linear warmup: lr * (s + 1) / W, peak at step W - 1
        assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [cos(10), cos(35), cos(60), cos(110), cos(500)] == pytest.approx(
        [1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1, 0.1])
    assert [lin(10), lin(35), lin(60), lin(110), lin(500)] == pytest.approx(
        [1.0, 0.775, 0.55, 0.1, 0.1])
    assert [const(10), const(60), const(500)] == pytest.approx([1.0, 1.0, 1.0])
    assert schedule("cosine", warmup=0)(0) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="need 0 <= train.min_lr <= train.learning_rate"):
        optim.lr_schedule(ml_collections.ConfigDict(
            {"learning_rate": 1e-3, "min_lr": 1e-2, "warmup_steps": 0, "lr_schedule": "cosine"}),
            10)


def test_weight_decay_only_on_matrices():
    cfg = model_config(get_config().model, model_type="sasp", n_layer=1, n_head=2, n_embd=16,
                       block_size=8, vocab_size=20, use_proj=True, use_v=True, bias=True,
                       llama_mlp=True)
    shapes = workdir_lib.param_shapes(get_model(config=cfg))
    mask = {path_str(p): bool(m) for p, m in
            jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(shapes))[0]}
    decayed = {k for k, m in mask.items() if m}
    assert decayed == {k for k, x in zip(mask, jax.tree.leaves(shapes)) if x.ndim >= 2}
    assert "wte/embedding" in decayed and "wpe/embedding" in decayed
    assert any(k.endswith("c_attn/kernel") for k in decayed)
    never = [k for k in mask if k.split("/")[-1] in ("bias", "scale", "alpha", "beta", "gamma",
                                                      "beta_sa", "beta_ff")]
    assert len(never) >= 8 and not any(mask[k] for k in never), never
    # Factored + ALiBi with head mixing: the n_head x n_head matrices are weights, decayed.
    fcfg = cfg.replace(model_type="factored", position_encoding="alibi", llama_mlp=False,
                       bias=False, max_position_embeddings=None)
    fmask = jax.tree_util.tree_flatten_with_path(
        optim.weight_decay_mask(workdir_lib.param_shapes(get_model(config=fcfg))))[0]
    assert {path_str(p) for p, m in fmask if m} == {
        "wte/embedding", "h_0/attn/c_attn/kernel", "h_0/attn/v_mix", "h_0/attn/proj_mix",
        "h_0/mlp/c_fc/kernel", "h_0/mlp/c_proj/kernel"}

    # Numerically: with zero gradients AdamW's step is -lr * wd * w on matrices, 0 elsewhere.
    t = get_config().train
    t.update(learning_rate=0.1, min_lr=0.1, warmup_steps=0, lr_schedule="constant",
             weight_decay=0.5, grad_clip=0.0)
    opt, _ = optim.make_optimizer(t, 10)
    params = {"w": jnp.full((2, 3), 2.0), "b": jnp.full((3,), 2.0), "alpha": jnp.array(2.0)}
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    np.testing.assert_allclose(updates["w"], np.full((2, 3), -0.1))
    np.testing.assert_array_equal(updates["b"], np.zeros(3))
    assert float(updates["alpha"]) == 0.0


def test_optimizer_state_structure_does_not_depend_on_grad_clip():
    """Issue 13 item 17: grad_clip 0 and 1 give optimizer states of one tree structure (a run
    resumes after the switch), and grad_clip=0 updates equal plain AdamW's exactly."""
    t = get_config().train
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: 0.3 * p - 1.0, params)
    states = {}
    for clip in (0.0, 1.0):
        t.grad_clip = clip
        opt, schedule = optim.make_optimizer(t, 10)
        states[clip] = opt.init(params)
    assert jax.tree.structure(states[0.0]) == jax.tree.structure(states[1.0])
    t.grad_clip = 0.0
    opt, schedule = optim.make_optimizer(t, 10)
    plain = optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                        weight_decay=t.weight_decay, mask=optim.weight_decay_mask)
    got, _ = opt.update(grads, opt.init(params), params)
    want, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_equals_the_large_batch(env):
    cfg = make_config(env, **{"model.dropout": 0.0, "model.vocab_size": 50, "model.n_layer": 1})
    model = get_model(config=model_config(cfg.model))
    params = jax.jit(train_step.model_init_fn(model))(train_step.params_key(jax.random.key(0)))
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 50, (8, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[[1, 2, 6], 10:] = 0  # ragged rows: micro-batches score different token counts
    batch = {"input_ids": ids, "attention_mask": mask}
    loss_terms = train_step.get_strategy("lm", model, cfg)

    @jax.jit
    def both(p, b):  # one program: one compilation
        return [train_step.loss_and_grads(loss_terms, p, b, rng=jax.random.key(0), step=0,
                                       grad_accum_steps=a) for a in (1, 4)]

    (l1, _, g1), (l4, _, g4) = both(params, batch)
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_weights_and_optimizer_state(env, tmp_path):
    cfg = make_config(env, **{"model.dtype": "bfloat16", "model.n_layer": 1,
                              "train.num_steps": 2, "train.eval_every": 0})
    seen = {}

    def dtypes(event, run):
        if event == "train_end":
            seen["state"] = {str(x.dtype) for x in jax.tree.leaves(
                (run.state.params, run.state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)}

    summary = run(cfg, tmp_path / "bf16", [dtypes])
    assert summary.step == 2 and math.isfinite(summary.train_loss)
    assert seen["state"] == {"float32"}
    assert {str(v.dtype) for v in params_of(tmp_path / "bf16").values()} == {"float32"}


# ---------------------------------------------------------------- 8 devices, 2 processes
# Both run in subprocesses that spend most of their time compiling. The `background` fixture
# starts them as soon as their inputs exist, so they use the second core while the in-process
# tests run; their tests below collect the results.

SHARDING_SCRIPT = r"""
import json, os, shutil, sys
import jax, jax.numpy as jnp, ml_collections, numpy as np
from cleangpt_jax import data as data_lib, sharding, train_step, trainer, workdir as wdl
from cleangpt_jax.checkpoint import Checkpointer, path_str
from cleangpt_jax.config import model_config
from cleangpt_jax.models import get_model
from cleangpt_jax.tokenizers import load_tokenizer

args = json.loads(sys.argv[1])
cfg = ml_collections.ConfigDict(args["config"])
res = {"devices": jax.device_count()}
tok = load_tokenizer(os.path.join(args["snapshot"], "tokenizer"))
cfg.model.vocab_size = tok.vocab_size
model = get_model(config=model_config(cfg.model))
flat = lambda t: {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}

# 1. Loss and gradients for the same global batch on 1 device and on 8 (dropout off here; the
#    resumed run below has it on and must still land on the 1-device result).
nodrop = model_config(cfg.model, dropout=0.0)
plain = get_model(config=nodrop)
data = data_lib.load_dataset(cfg, tok)
batch = data_lib.batch_for_step(data.train, seed=0, step=3, global_batch_size=8,
                                block_size=16)
params = jax.device_get(jax.jit(train_step.model_init_fn(plain))(
    train_step.params_key(jax.random.key(0))))
loss_terms = train_step.get_strategy("lm", plain, cfg)
results = {}
meshes = {"1": sharding.create_mesh(1, jax.devices()[:1]), "8": sharding.create_mesh(1)}
for name, mesh in meshes.items():
    shard = sharding.state_shardings(params, mesh)
    f = jax.jit(lambda p, b: train_step.loss_and_grads(loss_terms, p, b, rng=jax.random.key(3),
                                                    step=3, mesh=mesh),
                in_shardings=(shard, sharding.batch_sharding(mesh)))
    loss, _, grads = f(jax.device_put(params, shard), sharding.global_batch(batch, mesh))
    results[name] = (float(loss), flat(grads))
(ref_loss, ref_grads), (loss8, grads8) = results["1"], results["8"]
res["loss_diff_8"] = abs(loss8 - ref_loss)
res["grad_diff_8"] = max(float(np.abs(grads8[k] - ref_grads[k]).max()) for k in ref_grads)
res["grad_scale"] = max(float(np.abs(g).max()) for g in ref_grads.values())

# 2. The checkpoint written on 1 device restores onto 8 (fsdp 1 and 2), values unchanged.
ckpt = Checkpointer(os.path.join(args["snapshot"], "checkpoints"), read_only=True)
shapes = wdl.param_shapes(model)
one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
ref = flat(ckpt.restore(params=jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes)).params)
for fsdp in (1, 2):
    mesh = sharding.create_mesh(fsdp)
    restored = ckpt.restore(params=sharding.abstract_state(shapes, mesh)).params
    leaf = restored["h_0"]["mlp"]["c_fc"]["kernel"]
    res[f"restore_{fsdp}_devices"] = len(leaf.sharding.device_set)
    res[f"restore_{fsdp}_shard"] = list(leaf.addressable_shards[0].data.shape)
    res[f"restore_{fsdp}_equal"] = all(np.array_equal(v, ref[k]) for k, v in flat(restored).items())
ckpt.close()

# 3. Resume that 1-device run on 8 devices with fsdp=2 and finish it.
shutil.copytree(args["snapshot"], args["resume_dir"])
cfg8 = ml_collections.ConfigDict(args["config"])
cfg8.train.fsdp = 2


def layout(event, run):
    if event == "train_begin":
        big = [x for x in jax.tree.leaves((run.state.params, run.state.opt_state)) if x.ndim >= 2]
        res["resumed_specs"] = sorted({str(x.sharding.spec) for x in big})
        res["resumed_start"] = run.step


summary = trainer.train_and_evaluate(cfg8, args["resume_dir"], callbacks=[layout])
res["resumed_step"] = summary.step
res["resumed_train_loss"] = summary.train_loss

# 4. A batch that does not split over 8 devices: a clear error before anything is written.
bad = ml_collections.ConfigDict(args["config"])
bad.train.batch_size = 4
try:
    trainer.train_and_evaluate(bad, args["bad_dir"])
except ValueError as e:
    res["bad_batch_error"] = str(e)
res["bad_dir_exists"] = os.path.exists(args["bad_dir"])
print("RESULT " + json.dumps(res))
"""


WORKER_SCRIPT = r"""
import json, os, signal, sys
import ml_collections
from cleangpt_jax import trainer
cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
preempt_at = int(sys.argv[3])

def preempt(event, run):  # both hosts get SIGTERM at the end of step preempt_at
    if event == "step_end" and run.step == preempt_at:
        os.kill(os.getpid(), signal.SIGTERM)

first = trainer.train_and_evaluate(cfg, sys.argv[2], callbacks=[preempt])
s = trainer.train_and_evaluate(cfg, sys.argv[2])  # the restart: both hosts restore and go on

# Then the run distilled into a 1 x 16 student, both hosts preempted in the head stage.
from cleangpt_jax import data as data_lib
from cleangpt_jax.distill import runner
distill_cfg = ml_collections.ConfigDict(json.loads(sys.argv[4]))
build_batch = data_lib.batch_for_step

def preempted_batch(tokens, *, step, **kw):  # global step 2: the head stage's first batch
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return build_batch(tokens, step=step, **kw)

data_lib.batch_for_step = preempted_batch
try:
    runner.run(distill_cfg, sys.argv[5], progress=False)
    stopped = "not stopped"
except KeyboardInterrupt as e:
    stopped = str(e)
data_lib.batch_for_step = build_batch
d = runner.run(distill_cfg, sys.argv[5], progress=False)  # the restart
import jax
print("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                              "devices": jax.device_count(), "step": s.step,
                              "first_step": first.step, "first_interrupted": first.interrupted,
                              "train_loss": s.train_loss, "val_loss": s.val_loss,
                              "samples": s.samples, "distill_stopped": stopped,
                              "distill_stages": [m["name"] for m in d["stages"]],
                              "student_val": d["student_val"]["val_loss"]}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """Subprocesses started now, waited for by `result()` (one parsed RESULT line each)."""

    def __init__(self, root, commands, env):
        self.logs, self.procs = [], []
        for i, cmd in enumerate(commands):
            out, err = open(root / f"out{i}", "w+"), open(root / f"err{i}", "w+")
            self.logs.append((out, err))
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err))

    def result(self, timeout=300) -> list[dict]:
        results = []
        for p, (out, err) in zip(self.procs, self.logs):
            p.wait(timeout=timeout)
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
            assert p.returncode == 0, stderr[-4000:]
            results.append(json.loads(stdout.split("RESULT ", 1)[1]))
        return results

    def kill(self):
        for p, (out, err) in zip(self.procs, self.logs):
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close(), err.close()


@pytest.fixture(scope="module")
def background(env, resumed, tmp_path_factory):
    root = tmp_path_factory.mktemp("background")
    cfg = make_config(env)  # (no samples: they would compile a generation loop each)
    args = {"config": cfg.to_dict(), "snapshot": str(resumed.snapshot),
            "resume_dir": str(root / "resume8"), "bad_dir": str(root / "bad")}
    (root / "eight").mkdir()
    eight = Job(root / "eight", [[sys.executable, "-c", SHARDING_SCRIPT, json.dumps(args)]],
                dict(env.sub_env, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8")))
    port, two_dir = free_port(), root / "two"
    (root / "workers").mkdir()
    commands = []
    for pid in range(2):
        worker = make_config(env, **{"train.coordinator_address": f"127.0.0.1:{port}",
                                     "train.num_processes": 2, "train.process_id": pid})
        student = distill_config.get_config()
        student.update_from_flattened_dict({
            "distill.teacher": str(two_dir), "model.model_type": "vanilla", "model.n_layer": 1,
            "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
            "train.batch_size": 8, "train.curves": False, "train.peak_flops": 1e12,
            "data.max_samples": 4, "data.cache_dir": str(env.tokens), "data.prefetch": 0,
            "distill.steps_per_block": 2, "distill.head.steps": 2, "distill.final.enabled": True,
            "distill.final.steps": 2,
            "distill.warmup_steps": 0, "distill.log_every": 1, "distill.checkpoint_every": 1,
            "distill.eval_steps": 1, "train.coordinator_address": f"127.0.0.1:{port}",
            "train.num_processes": 2, "train.process_id": pid})
        commands.append([sys.executable, "-c", WORKER_SCRIPT, json.dumps(worker.to_dict()),
                         str(two_dir), str(HALF), json.dumps(student.to_dict()),
                         str(root / "distilled")])
    two = Job(root / "workers", commands, env.sub_env)
    yield types.SimpleNamespace(eight=eight, two=two, resume8=root / "resume8", two_dir=two_dir,
                                distilled=root / "distilled", student_config=student.to_dict())
    eight.kill()
    two.kill()


def test_eight_devices_match_one_and_restore_a_one_device_checkpoint(straight, background):
    (res,) = background.eight.result()
    assert res["devices"] == 8
    # Loss and gradients of the same global batch agree to 1e-5 (float32 reduction order).
    assert res["loss_diff_8"] < 1e-5 and res["grad_diff_8"] < 1e-5, res
    assert res["grad_scale"] > 1e-3  # the comparison is not between zeros
    # 1-device checkpoint onto 8 devices: replicated (fsdp 1) or split in two (fsdp 2).
    assert res["restore_1_devices"] == res["restore_2_devices"] == 8
    assert res["restore_1_equal"] and res["restore_2_equal"]
    assert res["restore_1_shard"] == [32, 128] and sorted(res["restore_2_shard"]) == [32, 64]
    # ... and the run resumes there (fsdp=2: parameters and Adam moments split over 2 of the
    # 8 devices, dropout on) to the uninterrupted 1-device run's result.
    assert res["resumed_start"] == HALF and res["resumed_step"] == N
    # every matrix of the state (parameters and both Adam moments) split on the fsdp axis
    assert all("fsdp" in spec for spec in res["resumed_specs"]), res["resumed_specs"]
    assert res["resumed_train_loss"] == pytest.approx(straight.summary.train_loss, abs=1e-4)
    assert_params_close(params_of(background.resume8), straight.params)
    assert ("train.batch_size=4 is not divisible by device count 8" in res["bad_batch_error"]
            and "\n" not in res["bad_batch_error"])
    assert not res["bad_dir_exists"]


def test_two_processes_agree_with_one(straight, background):
    """Two CPU processes (jax.distributed on localhost; JAX 0.10 uses gloo for CPU collectives
    by default) each feed half of every batch and together train the single-process run,
    preempted (SIGTERM on both) at HALF and restarted: the multi-host save and restore."""
    outs = background.two.result()
    assert [o["process"] for o in outs] == [0, 1]
    assert all(o["count"] == 2 and o["devices"] == 2 and o["step"] == N for o in outs)
    assert all(o["first_step"] == HALF and o["first_interrupted"] for o in outs)
    assert outs[0]["train_loss"] == outs[1]["train_loss"]
    assert outs[0]["train_loss"] == pytest.approx(straight.summary.train_loss, abs=1e-4)
    assert outs[0]["val_loss"] == pytest.approx(straight.summary.val_loss, abs=1e-4)
    assert_params_close(params_of(background.two_dir), straight.params)
    mine = losses(background.two_dir)
    assert [r[0] for r in mine] == [r[0] for r in straight.losses]  # one writer, no duplicates
    assert np.allclose([r[1][1] for r in mine], [r[1][1] for r in straight.losses], atol=1e-4)


def test_two_processes_distil_and_resume_like_one(background, tmp_path):
    """The two processes then distil their run into a 1 x 16 student, preempted in the head
    stage and restarted (the manifest, stage checkpoints and the student written by process 0,
    read by both): the same stages and student as one process distilling the same teacher."""
    from cleangpt_jax.distill import runner

    outs = background.two.result()
    assert all(o["distill_stopped"].startswith("stopped in stage head at step 1") for o in outs), \
        [o["distill_stopped"] for o in outs]
    assert all(o["distill_stages"] == ["block_1", "head", "final"] for o in outs)
    assert outs[0]["student_val"] == outs[1]["student_val"]
    one = ml_collections.ConfigDict(background.student_config)
    one.train.update(coordinator_address=None, num_processes=None, process_id=None)
    summary = runner.run(one, str(tmp_path / "one"), progress=False)
    assert outs[0]["student_val"] == pytest.approx(summary["student_val"]["val_loss"], abs=1e-4)
    assert_params_close(params_of(background.distilled), params_of(tmp_path / "one"))
