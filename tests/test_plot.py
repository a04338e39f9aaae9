"""Loss-curve pictures (cleangpt_jax.plot): the PNG `train` and `distill` leave in their
workdirs, and `python -m cleangpt_jax.plot` drawing several runs on the same axes."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from cleangpt_jax import config as config_lib
from cleangpt_jax import hf, plot, trainer
from cleangpt_jax.distill import config as distill_config
from cleangpt_jax.distill import runner
from helpers import run_tool

pytestmark = pytest.mark.usefixtures("fast_compile")

TRAIN = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16,
         "train.batch_size": 4, "train.num_steps": 4, "train.warmup_steps": 2,
         "train.eval_every": 2, "train.eval_steps": 1, "train.log_every": 1,
         "train.checkpoint_every": 0, "train.sample_max_new_tokens": 0, "data.max_samples": 3}
DISTILL = {"model.model_type": "vanilla", "model.n_layer": 1, "model.n_head": 2,
           "model.n_embd": 16, "model.block_size": 16, "model.dropout": 0.0,
           "train.batch_size": 4, "data.max_samples": 3, "distill.steps_per_block": 3,
           "distill.head.steps": 2, "distill.checkpoint_every": 0, "distill.warmup_steps": 0,
           "distill.log_every": 1, "distill.eval_steps": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step training run, exported to HF, and a distillation of it into a narrower
    student (block_1 and head stages): what `train` and `distill` run."""
    root = tmp_path_factory.mktemp("plot")
    tokens = str(root / "tokens")
    trained = str(root / "trained")
    cfg = config_lib.get_config()
    cfg.update_from_flattened_dict({**TRAIN, "data.cache_dir": tokens})
    trainer.train_and_evaluate(cfg, trained)
    teacher = hf.export_run(trained, str(root / "teacher_hf"))
    cfg = distill_config.get_config()
    cfg.update_from_flattened_dict({**DISTILL, "distill.teacher": teacher,
                                    "data.cache_dir": tokens})
    distilled = str(root / "distilled")
    runner.run(cfg, distilled, progress=False)
    return types.SimpleNamespace(root=root, trained=trained, distilled=distilled)


def png_pixels(path: str) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def test_train_and_distill_leave_their_curves(runs):
    for workdir in (runs.trained, runs.distilled):
        path = os.path.join(workdir, plot.CURVES_FILE)
        pixels = png_pixels(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600
        assert pixels[..., :3].std() > 0.05  # drawn on, not a blank canvas
    fig = plot.draw([plot.load(runs.trained)])
    loss, lr = fig.axes[:2]
    assert len(fig.axes) == 2  # no stages: the loss and learning-rate panels only
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("step", "loss (nats/token)")
    assert (lr.get_xlabel(), lr.get_ylabel()) == ("step", "learning rate")
    train_line, val_line = loss.get_lines()
    assert list(train_line.get_xdata()) == [1, 2, 3, 4]
    assert list(val_line.get_xdata()) == [2, 4]
    records = [json.loads(ln) for ln in open(os.path.join(runs.trained, "metrics.jsonl"))]
    assert list(val_line.get_ydata()) == [r["val_loss"] for r in records if "val_loss" in r]
    assert len(lr.get_lines()[0].get_xdata()) == 4

    fig = plot.draw([plot.load(runs.distilled)])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[2:] == ["block_1: hidden state vs teacher block 1", "head: logits, T=2"]
    block, head = fig.axes[2:]
    assert block.get_ylabel() == "hidden mse loss" and block.get_xlabel() == "stage step"
    assert head.get_ylabel() == "kl_div (nats/token)"
    assert list(block.get_lines()[0].get_xdata()) == [1, 2, 3]
    assert list(head.get_lines()[0].get_xdata()) == [1, 2]
    student = fig.axes[0].get_lines()[0]  # the final student's star at the last global step
    assert list(student.get_xdata()) == [5]


def test_cli_draws_several_runs_on_the_same_axes(runs, capsys, monkeypatch):
    out = str(runs.root / "compare.png")
    code, stdout, err = run_tool(plot.run, ["plot", f"--workdir={runs.trained}",
                                            f"--workdir={runs.distilled}", f"--out={out}"],
                                 capsys, monkeypatch)
    assert (code, stdout.strip()) == (0, out), err
    assert png_pixels(out)[..., :3].std() > 0.05
    fig = plot.draw([plot.load(runs.trained), plot.load(runs.distilled)])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["trained: vanilla 1x32, trained",
                      "distilled: vanilla 1x16, distilled from teacher_hf"]
    colours = {line.get_color() for ax in fig.axes[:2] for line in ax.get_lines()}
    assert colours == {"C0", "C1"}  # one colour per run, on the shared panels
    assert len(fig.axes) == 4  # the shared panels, then block_1 and head
    assert len(plot.draw([plot.load(runs.distilled)], stages=False).axes) == 2  # --nostages


@pytest.mark.parametrize("argv, code, message", [
    ([], 2, "--workdir is required"),
    (["--workdir={root}/nowhere"], 1, "is not a directory"),
    (["--workdir={root}"], 1, "has no metrics.jsonl"),
    (["--workdir={trained}", "--out={root}/x.pdf"], 2, "must name a .png file"),
    (["--workdir={root}/bad"], 1, "line 2 is not JSON"),
])
def test_cli_refuses_bad_input_in_one_line(runs, capsys, monkeypatch, argv, code, message):
    bad = runs.root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2,\n')
    argv = [a.format(root=runs.root, trained=runs.trained) for a in argv]
    got, _, err = run_tool(plot.run, ["plot", *argv], capsys, monkeypatch)
    assert got == code and message in err and err.count("\n") == 1, err
