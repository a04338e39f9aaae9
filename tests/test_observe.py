"""What a run shows while it runs (issue 16): throughput, MFU, memory and the compile time in
the log records, a profile on request, a plain progress line per log interval without a
terminal, the persistent compilation cache, --print_config and --help.

One tiny training run (in-process, its output redirected to a buffer: no terminal) and its
resume, then one tiny distillation from it, serve most tests.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import math
import os
import re
import sys
import types

import jax
import pytest
from absl import app, flags

from cleangpt_jax import cli, compile_cache, config_help
from cleangpt_jax import config as config_lib
from cleangpt_jax import metrics, train
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.distill import __main__ as distill_main
from cleangpt_jax.distill import config as distill_config
from helpers import run_tool

pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
        "train.batch_size": 4, "train.num_steps": 6, "train.log_every": 2,
        "train.eval_every": 6, "train.eval_steps": 1, "train.checkpoint_every": 0,
        "train.sample_max_new_tokens": 0, "train.profile_steps": "3,4", "data.max_samples": 3,
        "train.loggers": "jsonl,tensorboard,wandb"}
TINY_DISTILL = {"model.model_type": "vanilla", "model.n_layer": 1, "model.n_head": 2,
                "model.n_embd": 16, "model.block_size": 16, "train.batch_size": 4,
                "data.max_samples": 3, "distill.steps_per_block": 2, "distill.head.enabled": False,
                "distill.final.enabled": False, "distill.warmup_steps": 0,
                "distill.log_every": 2, "distill.checkpoint_every": 0, "distill.eval_steps": 0}


def flag_list(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def run_quietly(tool_run, argv: list[str]) -> types.SimpleNamespace:
    """A tool in-process with stdout and stderr redirected to buffers (not terminals)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", argv)
        mp.setenv("WANDB_MODE", "offline")  # W&B writes its run directory only
        mp.setenv("WANDB_SILENT", "true")
        try:
            tool_run(flag_values=flags.FlagValues())
        except SystemExit as e:
            code = e.code or 0
    return types.SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny training run (6 steps, logged every 2, steps 3-4 profiled), its resume to 8
    steps, and a distillation (one block stage, step 2 profiled) of its model."""
    root = tmp_path_factory.mktemp("observe")
    tokens = {"data.cache_dir": str(root / "tokens")}
    workdir = str(root / "train")
    first = run_quietly(train.run, ["train", f"--workdir={workdir}",
                                    *flag_list({**TINY, **tokens})])
    assert first.code == 0, first.err[-2000:]
    first_records = workdir_lib.read_metrics(workdir)
    resumed = run_quietly(train.run, ["train", f"--workdir={workdir}", *flag_list(
        {**TINY, **tokens, "train.num_steps": 8, "train.profile_steps": ""})])
    assert resumed.code == 0, resumed.err[-2000:]
    student = str(root / "distill")
    distill = run_quietly(distill_main.run, [
        "distill", f"--workdir={student}", f"--config.distill.teacher={workdir}",
        *flag_list({**TINY_DISTILL, **tokens, "distill.profile_steps": "2,2"})])
    assert distill.code == 0, distill.err[-2000:]
    return types.SimpleNamespace(
        workdir=workdir, student=student, first=first, first_records=first_records, resumed=resumed,
        records=workdir_lib.read_metrics(workdir), distill=distill,
        distill_records=workdir_lib.read_metrics(student))


def wandb_history(run_dir: str) -> tuple[str, list[dict]]:
    """(run id, [history rows]) of an offline W&B run directory's run-<id>.wandb: a LevelDB-style
    log (a 7-byte file header, 32 KiB blocks of records with a 7-byte header: CRC, length,
    type 1 full / 2 first / 3 middle / 4 last) of wandb_internal_pb2.Record protos."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data, pos, part, rows, run_id = open(path, "rb").read(), 7, b"", [], None
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero padding
            pos += room
            continue
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(part)
            part = b""
            if record.HasField("run"):
                run_id = record.run.run_id
            if record.HasField("history"):
                rows.append({i.key or ".".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return run_id, rows


def check_speed(record: dict, timed: bool) -> None:
    for key in metrics.SPEED_KEYS:
        assert math.isfinite(record[key]) and record[key] >= 0, (key, record)
    if timed:
        assert record["tokens_per_sec"] > 0 and 0 < record["mfu"] < 1, record
        assert record["tokens_per_sec_device"] == pytest.approx(
            record["tokens_per_sec"] / jax.device_count())
        assert record["step_time_s"] > 0


def test_training_records_throughput_mfu_and_the_compile_time_once(runs):
    records = [r for r in runs.first_records if "train_loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        check_speed(r, timed=True)
    # The compile time: once per process, with the first record after the first step.
    assert [("compile_s" in r) for r in records] == [True, False, False]
    resumed = [r for r in runs.records if r["step"] > 6 and "train_loss" in r]
    assert [r["step"] for r in resumed] == [8] and "compile_s" in resumed[0]
    # The resume's first step loads its programs from the persistent cache the first run
    # filled: the second start compiles less.
    assert resumed[0]["compile_s"] < records[0]["compile_s"]
    assert "compiled and ran the first step in" in runs.resumed.err


def test_distillation_records_throughput_mfu_per_stage(runs):
    stages = [r for r in runs.distill_records if r.get("stage") == "block_1"]
    assert [r["stage_step"] for r in stages] == [2]
    check_speed(stages[0], timed=True)
    assert stages[0]["compile_s"] > 0  # (each stage compiles its own program)


def test_redirected_output_has_one_progress_line_per_log_interval(runs):
    lines = [ln for ln in runs.first.err.splitlines() if re.match(r"step \d+/", ln)]
    assert [ln.split(":")[0] for ln in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all("train_loss" in ln and "tok/s" in ln and "MFU" in ln for ln in lines)
    after_setup = runs.first.err.split("compiled and ran the first step")[1]
    assert "\r" not in after_setup  # no bar
    stage_lines = [ln for ln in runs.distill.err.splitlines() if " step " in ln]
    assert [ln.split(":")[0] for ln in stage_lines] == ["block_1 step 2/2"]
    # The warmup (100 steps by default) outlasts the 6-step run: a warning says so.
    assert "warning: train.warmup_steps=100 >= the run's 6 steps" in runs.first.err


def test_the_validation_report_says_what_it_scored(runs):
    """Item 9: training's perplexity names its token count and split (distillation's and
    evaluate's lines do the same), so numbers from different tools are not taken for one."""
    (line,) = [ln for ln in runs.first.err.splitlines() if "val_loss" in ln]
    assert line.startswith("step 6: val_loss ")
    assert " over 60 tokens of the validation split" in line  # 4 rows x 15 next tokens


def test_the_sample_prompt_is_the_start_of_a_validation_document(runs):
    from cleangpt_jax import data as data_lib
    from cleangpt_jax.tokenizers import load_tokenizer

    saved = workdir_lib.load_config(runs.workdir)
    (prompt,) = saved.train.sample_prompts  # resolved from None and saved with the run
    tokenizer = load_tokenizer(os.path.join(runs.workdir, "tokenizer"))
    val = data_lib.load_dataset(saved, tokenizer).val
    assert prompt and prompt != "ROMEO:"
    assert tokenizer.decode([int(i) for i in val[:64]]).lstrip().startswith(prompt)


def profiled_steps(workdir: str, name: str) -> tuple[list[int], list[dict]]:
    """(the step numbers annotated `name`, every event) of a run's one profile."""
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*",
                                    "*.trace.json.gz"))
    assert len(traces) == 1 and glob.glob(os.path.join(os.path.dirname(traces[0]),
                                                       "*.xplane.pb"))
    with gzip.open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == name), events


def test_profile_holds_the_annotated_train_and_distillation_steps(runs):
    steps, events = profiled_steps(runs.workdir, "train")
    assert steps == [3, 4]
    assert any("step_fn" in str(e.get("name")) for e in events)  # the compiled train step
    steps, events = profiled_steps(runs.student, "distill")
    assert steps == [2]
    assert any(e.get("name") == "PjitFunction(step)" for e in events)  # the stage's step


def test_wandb_offline_run_holds_the_scalars_and_the_resume_continues_it(runs):
    run_id = open(os.path.join(runs.workdir, "wandb_run_id.txt")).read().strip()
    dirs = sorted(glob.glob(os.path.join(runs.workdir, "wandb", "offline-run-*")))
    assert len(dirs) == 2 and all(d.endswith(f"-{run_id}") for d in dirs)  # run, then resume
    first_id, rows = wandb_history(dirs[0])
    assert first_id == run_id
    records = {r["step"]: r for r in runs.first_records if "train_loss" in r}
    assert [row["_step"] for row in rows] == list(records)
    for row in rows:
        assert row["train_loss"] == pytest.approx(records[row["_step"]]["train_loss"])
        assert row["mfu"] == pytest.approx(records[row["_step"]]["mfu"])
    resumed_id, resumed_rows = wandb_history(dirs[1])
    assert resumed_id == run_id and [row["_step"] for row in resumed_rows] == [8]


def test_print_config_lists_every_key_with_its_meaning(capsys, monkeypatch):
    code, out, _ = run_tool(distill_main.run, ["distill", "--print_config",
                                               "--config.distill.log_every=7"],
                            capsys, monkeypatch)
    assert code == 0
    lines = dict(ln.split(" = ", 1) for ln in out.splitlines())
    keys = [k for k, _ in config_help.flat_items(distill_config.get_config())]
    assert sorted(lines) == sorted(keys)
    assert all("  # " in v for v in lines.values())  # every default key has its meaning
    assert lines["distill.log_every"].startswith("7 ")
    assert lines["train.learning_rate"].split("# ")[1] == config_help.meanings()[
        "train.learning_rate"] and "learning rate" in lines["train.learning_rate"]


def test_help_exits_zero_and_names_print_config(capsys):
    values = flags.FlagValues()
    flags.DEFINE_flag(app.HelpFlag(), flag_values=values)
    with pytest.raises(SystemExit) as exit_info:
        cli.flags_parser(flag_values=values, help_hint=True)(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--print_config lists every key" in capsys.readouterr().out


def test_compile_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEANGPT_JAX_CACHE", str(tmp_path))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.cache_dir() == str(tmp_path / "jax_cache")
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_dir() == str(tmp_path / "mine")
    # A directory already configured (here the fast_compile fixture's) is kept.
    before = jax.config.jax_compilation_cache_dir
    with compile_cache.persistent_cache() as used:
        assert used == before and jax.config.jax_compilation_cache_dir == before
    # Otherwise the tool's own is set for the block, and the caller's setting restored.
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        with compile_cache.persistent_cache() as used:
            assert used == jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_peak_flops_table_and_override():
    chip = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
    assert metrics.peak_flops_per_device(device=chip) == (197e12, "table")
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert metrics.peak_flops_per_device(device=gpu) == (989e12, "table")
    assert metrics.peak_flops_per_device(123.0, device=chip) == (123.0, "config")
    cfg = config_lib.get_config()
    assert cfg.train.peak_flops is None and cfg.train.profile_steps is None
