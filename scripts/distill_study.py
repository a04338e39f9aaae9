"""The distillation study: does the original cleanGPT's method beat its alternatives?

    python scripts/distill_study.py                    # the full study -> docs/distillation_study.md
    python scripts/distill_study.py --preset=quick     # minutes: every code path, tiny shapes
    python scripts/distill_study.py --only=char        # one setting (the report covers what ran)

The original made three claims: block-by-block transfer beats distilling the logits alone,
stitching layers help, and the head stage matters. This script tests them, and writes the
whole report (tables, plots, answers, the machine, the code version and the wall time).

Settings: character-level Shakespeare, and Shakespeare under GPT-2's real byte-level BPE
(tests/data/gpt2_tokenizer, 50,257 tokens). In each, a Vanilla teacher with GPT-2's block is
trained until its validation loss stops improving (train.early_stopping_patience), exported
with export_hf at its best step and loaded as a GPT-2 directory.

Students, at the teacher's depth and half its width for every architecture (vanilla, sasp,
factored), plus a shallower Vanilla student at the teacher's width (L/2 blocks, layer map
2, 4, ..., L), trained by each method for the same N optimizer steps on the same batches in the
same order (a pure function of the seed and the global step), from the same initialisation,
with the same AdamW, weight decay, clipping and untied head:

    scratch       the LM loss (python -m cleangpt_jax.train)
    kd            logit-only KD: KL(teacher || student) at T = 2 plus the LM loss (DistilGPT2)
    distilgpt2    student block k <- teacher block map(k), embeddings and head copied, then kd
                  (the shallow student only: the widths must match)
    bbb           block stages (hidden MSE through stitching layers), the head stage (KL,
                  head initialised from the teacher's), then the end-to-end kd stage
    bbb_nostitch  bbb without stitching layers (equal widths: the shallow student only)
    bbb_nohead    bbb without the head stage (its steps go to the end-to-end stage)
    bbb_nofinal   bbb without the end-to-end stage (its steps go to the head stage)
    bbb_nofold    bbb with the head initialised as W_t S, not W_t diag(g_t) S (half width)

Every cell runs for --seeds seeds; a seed fixes the student's initialisation and the batch
order, so methods are compared seed by seed (paired differences, Student-t intervals).

Caching and resuming: every run lives in WORKDIR/runs/... and resumes from its checkpoints;
every finished run's numbers are kept in WORKDIR/results.json under a key made of its
settings, the code version (a hash of the package's code and of this script's
MEASUREMENT_VERSION) and a fingerprint of the teacher's parameters. Rerunning the command after an interruption, or on
another day, computes only what is missing; a code change reruns everything it touches.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cleangpt_jax import data as data_lib  # noqa: E402
from cleangpt_jax import hf, sharding, trainer  # noqa: E402
from cleangpt_jax import workdir as workdir_lib  # noqa: E402
from cleangpt_jax.config import get_config, load_config_file  # noqa: E402
from cleangpt_jax.distill import analysis  # noqa: E402
from cleangpt_jax.distill import config as distill_config  # noqa: E402
from cleangpt_jax.distill import plan as plan_lib  # noqa: E402
from cleangpt_jax.distill import runner, stage_step, student_init  # noqa: E402
from cleangpt_jax.loading import load_lm  # noqa: E402
from cleangpt_jax.models import get_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_TOKENIZER = os.path.join(REPO, "tests", "data", "gpt2_tokenizer")
METHODS = ("scratch", "kd", "distilgpt2", "bbb", "bbb_nostitch", "bbb_nohead", "bbb_nofinal",
           "bbb_nofold")
METHOD_LABELS = {
    "scratch": "from scratch", "kd": "logit-only KD", "distilgpt2": "DistilGPT2 init + KD",
    "bbb": "block-by-block", "bbb_nostitch": "block-by-block, no stitching",
    "bbb_nohead": "block-by-block, no head stage", "bbb_nofinal": "block-by-block, no final stage",
    "bbb_nofold": "block-by-block, head W_t S"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One regime of the study: data, teacher, budget. Every field is part of the cache key."""
    name: str
    tokenizer: str              # 'character' | 'gpt2' (GPT-2's real BPE, tests/data)
    teacher_layers: int
    teacher_width: int
    heads: int
    block_size: int
    batch_size: int
    teacher_lr: float
    teacher_max_steps: int      # the cosine schedule's length; early stopping ends sooner
    teacher_eval_every: int
    teacher_patience: int       # evaluations without a better val_loss (by min_delta)
    teacher_min_delta: float
    teacher_dropout: float
    steps: int                  # N: every student's optimizer steps
    block_steps: int            # per block stage
    head_steps: int
    lr: float                   # peak lr: scratch, kd, the head and end-to-end stages
    block_lr: float
    warmup: int
    weight_decay: float
    eval_every: int             # the validation curves
    eval_steps: int             # validation batches of every reported number
    cka_batches: int
    archs: tuple                # the half-width students
    ablation_archs: tuple       # half-width students that also get bbb_nohead / bbb_nofinal
    max_samples: int | None = None  # plays (None: all)


FULL = (
    Setting("char", "character", teacher_layers=4, teacher_width=128, heads=4, block_size=64,
            batch_size=16, teacher_lr=2e-3, teacher_max_steps=4000, teacher_eval_every=200,
            teacher_patience=3, teacher_min_delta=0.005, teacher_dropout=0.1, steps=600,
            block_steps=40, head_steps=60, lr=2e-3, block_lr=2e-3, warmup=30,
            weight_decay=0.1, eval_every=50, eval_steps=16, cka_batches=4,
            archs=("vanilla", "sasp", "factored"), ablation_archs=("vanilla",)),
    Setting("gpt2", "gpt2", teacher_layers=4, teacher_width=128, heads=4, block_size=64,
            batch_size=8, teacher_lr=2e-3, teacher_max_steps=2000, teacher_eval_every=100,
            teacher_patience=3, teacher_min_delta=0.005, teacher_dropout=0.1, steps=300,
            block_steps=20, head_steps=40, lr=2e-3, block_lr=2e-3, warmup=20,
            weight_decay=0.1, eval_every=25, eval_steps=16, cka_batches=4,
            archs=("vanilla",), ablation_archs=(), max_samples=8),
)
QUICK = (
    Setting("tiny", "character", teacher_layers=2, teacher_width=32, heads=2, block_size=32,
            batch_size=8, teacher_lr=3e-3, teacher_max_steps=40, teacher_eval_every=20,
            teacher_patience=2, teacher_min_delta=0.0, teacher_dropout=0.0, steps=24,
            block_steps=3, head_steps=3, lr=3e-3, block_lr=3e-3, warmup=2, weight_decay=0.1,
            eval_every=8, eval_steps=2, cka_batches=2, archs=("vanilla",), ablation_archs=(),
            max_samples=3),
)
# Methods a setting leaves out (besides those that do not apply): the GPT-2 setting's steps cost
# ~10x the character setting's, so it runs claims 1 and 3 (and the baselines) and leaves
# stitching, DistilGPT2's initialisation and the other ablations to the character setting.
# (Not a Setting field, so that the cached runs' keys stay as they are.)
SKIPPED_METHODS = {"gpt2": {"half": ("bbb_nofold",),
                            "shallow": ("bbb_nofinal", "distilgpt2", "bbb_nostitch")},
                   # --preset=quick: each code path once (the shallow student runs kd; the
                   # head-only and no-fold plans are config flags tests/test_distill.py runs)
                   "tiny": {"half": ("kd", "bbb_nofold"), "shallow": ("bbb_nofinal",)}}
PRESETS = {"full": {"settings": FULL, "seeds": 3, "timing": True},
           "quick": {"settings": QUICK, "seeds": 2, "timing": False}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--workdir", default=None, help="default: runs/distill_study_<preset>")
    p.add_argument("--out", default=None, help="the report (default: docs/distillation_study.md "
                   "for the full preset, WORKDIR/distillation_study.md otherwise)")
    p.add_argument("--images", default=None, help="where the plots go (default: docs/images "
                   "for the full preset, WORKDIR otherwise)")
    p.add_argument("--only", default=None, help="comma-separated setting names to run")
    p.add_argument("--seeds", type=int, default=None, help="override the preset's seed count")
    p.add_argument("--methods", default=None, help="comma-separated methods to run (default: "
                   "every method that applies; the report covers what ran)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- bookkeeping
# Bump when run_cell, head_init_losses or the configs below measure differently (the report
# and the plots are not part of it: they are redrawn from the cached numbers).
MEASUREMENT_VERSION = 1


def code_version() -> str:
    """sha256 of the package's code (each module's syntax tree without docstrings, so that
    comments and docs leave the cache alone), the teacher config and MEASUREMENT_VERSION."""
    import ast

    files = sorted(glob.glob(os.path.join(REPO, "cleangpt_jax", "**", "*.py"), recursive=True))
    files.append(os.path.join(REPO, "configs", "gpt2_teacher_shakespeare.py"))
    h = hashlib.sha256(str(MEASUREMENT_VERSION).encode())
    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(os.path.relpath(path, REPO).encode())
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--",
                                "cleangpt_jax", "scripts"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return out + ("+local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


class Results:
    """WORKDIR/results.json: {key: result}, rewritten atomically after every finished run."""

    def __init__(self, path):
        self.path = path
        self.data = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def get(self, key, label, fn):
        if key not in self.data:
            t0 = time.time()
            result = fn()
            result["seconds"] = time.time() - t0
            result["label"] = label
            self.data[key] = result
            print(f"[{label}] " + (f"val_loss {result['val_loss']:.4f} " if "val_loss" in result
                                   else "") + f"({result['seconds']:.0f}s)", flush=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(self.path + ".tmp", self.path)
        return self.data[key]


@contextlib.contextmanager
def quiet():
    """The runs' own progress lines go to WORKDIR/study.log's caller, not the terminal."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield


# ------------------------------------------------------------------------------ teacher
def teacher_config(st: Setting, data_dir: str):
    cfg = load_config_file(os.path.join(REPO, "configs", "gpt2_teacher_shakespeare.py"))
    cfg.model.update(n_layer=st.teacher_layers, n_embd=st.teacher_width, n_head=st.heads,
                     block_size=st.block_size, dropout=st.teacher_dropout)
    if st.tokenizer == "gpt2":
        cfg.tokenizer.update(type="gpt2", name_or_path=GPT2_TOKENIZER)
    cfg.data.update(source="shakespeare", val_fraction=0.1, cache_dir=data_dir,
                    max_samples=st.max_samples)
    cfg.train.update(batch_size=st.batch_size, num_steps=st.teacher_max_steps,
                     learning_rate=st.teacher_lr, min_lr=st.teacher_lr / 10,
                     warmup_steps=min(100, st.teacher_max_steps // 10),
                     weight_decay=st.weight_decay, eval_every=st.teacher_eval_every,
                     eval_steps=st.eval_steps, early_stopping_patience=st.teacher_patience,
                     early_stopping_min_delta=st.teacher_min_delta, checkpoint_every=0,
                     max_checkpoints_to_keep=3, sample_max_new_tokens=0, log_every=50,
                     loggers="jsonl", curves=False, peak_flops=1e12)
    return cfg


def train_teacher(st: Setting, workdir: str, data_dir: str) -> dict:
    """Train until early stopping; export the best step as a GPT-2 directory."""
    cfg = teacher_config(st, data_dir)
    run_dir = os.path.join(workdir, "train")
    with quiet():
        summary = trainer.train_and_evaluate(cfg, run_dir)
    stopped(summary)
    out = os.path.join(workdir, "hf")
    hf.export_run(run_dir, out, step=summary.best_step, overwrite=True)
    curve = [[m["step"], m["val_loss"]] for m in workdir_lib.read_metrics(run_dir)
             if "val_loss" in m]
    return {"hf_dir": out, "steps_run": summary.step, "best_step": summary.best_step,
            "early_stopped": summary.early_stopped, "curve": curve,
            "fingerprint": params_fingerprint(out)}


def stopped(summary) -> None:
    """An interrupted run (SIGTERM, Ctrl-C) saved its state: leave, record nothing."""
    if summary.interrupted:
        sys.exit(f"stopped at step {summary.step} of {summary.workdir} (saved): rerun the same "
                 f"command to continue the study")


def params_fingerprint(hf_dir: str) -> str:
    with open(os.path.join(hf_dir, hf.SAFETENSORS_FILE), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


# ----------------------------------------------------------------------------- students
@dataclasses.dataclass(frozen=True)
class Student:
    arch: str
    n_layer: int
    width: int
    heads: int

    @property
    def name(self) -> str:
        return f"{self.arch} {self.n_layer}x{self.width}"


def students_of(st: Setting) -> list[tuple[Student, tuple]]:
    """(student, methods) of a setting: half width at the teacher's depth for each arch, and
    the shallow Vanilla student at the teacher's width with every method."""
    half = st.teacher_width // 2
    out = []
    for arch in st.archs:
        methods = ("scratch", "kd", "bbb", "bbb_nofold")
        if arch in st.ablation_archs:
            methods += ("bbb_nohead", "bbb_nofinal")
        out.append((Student(arch, st.teacher_layers, half, st.heads), methods))
    out.append((Student("vanilla", st.teacher_layers // 2, st.teacher_width, st.heads),
                tuple(m for m in METHODS if m != "bbb_nofold")))
    skipped = SKIPPED_METHODS.get(st.name, {})
    return [(student, tuple(m for m in methods if m not in skipped.get(
        "half" if student.width < st.teacher_width else "shallow", ())))
        for student, methods in out]


def model_overrides(student: Student, st: Setting) -> dict:
    """The student's model section, the same for every method: GPT-2's block (bias, tanh
    GELU), an untied head (the head stage trains one), no dropout."""
    return dict(model_type=student.arch, n_layer=student.n_layer, n_head=student.heads,
                n_embd=student.width, block_size=st.block_size, dropout=0.0, bias=True,
                activation="gelu_tanh", tie_embeddings=False)


def distill_cfg(st: Setting, student: Student, method: str, teacher: str, seed: int,
                data_dir: str):
    cfg = distill_config.get_config()
    cfg.model.update(model_overrides(student, st))
    cfg.data.update(source="shakespeare", val_fraction=0.1, cache_dir=data_dir,
                    max_samples=st.max_samples)
    cfg.train.update(batch_size=st.batch_size, seed=seed, loggers="jsonl", curves=False,
                     peak_flops=1e12)
    d = cfg.distill
    d.update(teacher=teacher, steps_per_block=st.block_steps, learning_rate=st.block_lr,
             weight_decay=st.weight_decay, warmup_steps=st.warmup, checkpoint_every=200,
             log_every=50, eval_steps=st.eval_steps, eval_every=st.eval_every)
    d.head.update(steps=st.head_steps, learning_rate=st.lr, weight_decay=st.weight_decay,
                  logit_loss="kl_div", temperature=2.0, lm_weight=0.0)
    blocks = student.n_layer * st.block_steps
    d.final.update(enabled=True, steps=st.steps - blocks - st.head_steps, learning_rate=st.lr,
                   weight_decay=st.weight_decay, logit_loss="kl_div", temperature=2.0,
                   logit_weight=1.0, lm_weight=1.0)
    if method in ("kd", "distilgpt2"):
        d.block_stages = False
        d.head.enabled = False
        d.final.steps = st.steps
        d.init_from_teacher = method == "distilgpt2"
    elif method == "bbb_nostitch":
        d.stitching = False
    elif method == "bbb_nohead":
        d.head.enabled = False
        d.final.steps = st.steps - blocks
    elif method == "bbb_nofold":
        d.head.fold_ln_scale = False
    elif method == "bbb_nofinal":
        d.final.enabled = False
        d.head.steps = st.steps - blocks
    return cfg


def scratch_cfg(st: Setting, student: Student, teacher: str, seed: int, data_dir: str):
    """python -m cleangpt_jax.train with the stage optimizer's schedule: warmup
    min(warmup, N // 10), cosine to lr / 10 over N steps."""
    cfg = get_config()
    cfg.model.update(model_overrides(student, st))
    cfg.tokenizer.update(type=st.tokenizer, name_or_path=teacher)
    cfg.data.update(source="shakespeare", val_fraction=0.1, cache_dir=data_dir,
                    max_samples=st.max_samples)
    cfg.train.update(batch_size=st.batch_size, num_steps=st.steps, seed=seed,
                     learning_rate=st.lr, min_lr=st.lr / 10,
                     warmup_steps=min(st.warmup, st.steps // 10),
                     weight_decay=st.weight_decay, eval_every=st.eval_every,
                     eval_steps=st.eval_steps, checkpoint_every=200, log_every=50,
                     sample_max_new_tokens=0, loggers="jsonl", curves=False, peak_flops=1e12)
    return cfg


def total_steps(cfg) -> int:
    stages = plan_lib.build_stages(cfg.distill, cfg.model.n_layer, 10 ** 6, steps_per_epoch=1)
    return sum(s.steps for s in stages)


class Teacher:
    """The exported teacher, its data and the validation batches every number is taken on."""

    def __init__(self, st: Setting, hf_dir: str, data_dir: str):
        self.hf_dir = hf_dir
        self.lm = load_lm(hf_dir)
        self.model = get_model(config=self.lm.config)
        cfg = teacher_config(st, data_dir)
        cfg.tokenizer.update(type=st.tokenizer, name_or_path=hf_dir)
        self.data = data_lib.load_dataset(cfg, self.lm.tokenizer)
        self.mesh = sharding.create_mesh()
        self.eval_cfg = ml_collections.ConfigDict({"distill": {"eval_steps": st.eval_steps},
                                                   "train": {"batch_size": st.batch_size}})
        self.cka_batches = data_lib.eval_batches(
            self.data.val, global_batch_size=st.batch_size, block_size=st.block_size,
            num_batches=st.cka_batches)

    def val(self, model, params) -> dict:
        """runner.val_loss (its compiled step is shared by every run of the process)."""
        return runner.val_loss(model, params, self.data.val, self.eval_cfg, self.mesh)


def layer_map_of(student: Student, st: Setting) -> list[int]:
    return plan_lib.layer_map("uniform", student.n_layer, st.teacher_layers)


def val_curve(workdir: str) -> list[list]:
    """[(global step, val_loss)] of a run's metrics.jsonl (the last record of a step wins)."""
    points = {}
    for m in workdir_lib.read_metrics(workdir):
        if "val_loss" in m:
            points[m["step"]] = m["val_loss"]
    return [[s, points[s]] for s in sorted(points)]


def head_init_losses(cfg, workdir: str, n_layer: int) -> dict:
    """The head stage's loss at initialisation (before any head step) on the validation
    batches, with the teacher's ln_f scale folded into W_t S and without: issue 17 item 7."""
    s = runner.setup(ml_collections.ConfigDict(cfg.to_dict()))
    tree = runner.completed_tree(s, workdir, f"block_{n_layer}")
    stage = next(x for x in s.stages if x.kind == "head")
    batches = data_lib.eval_batches(s.data.val, global_batch_size=cfg.train.batch_size,
                                    block_size=cfg.model.block_size,
                                    num_batches=cfg.distill.eval_steps)
    out = {}
    for fold in (True, False):
        s.config.distill.head.fold_ln_scale = fold
        t = student_init.init_head_from_teacher(s, tree)
        paths = stage_step.trainable_paths(t, stage, s.config, s.student.config.tie_embeddings)
        loss_fn = jax.jit(stage_step.stage_loss_fn(stage_step.step_spec(s, stage, paths)))
        trainable, frozen = stage_step.split(t, paths)
        losses = [float(loss_fn(trainable, frozen, s.teacher_params,
                                {k: jnp.asarray(v) for k, v in b.items()},
                                jax.random.key(0))[0]) for b in batches]
        out["fold" if fold else "plain"] = float(np.mean(losses))
    return out


def run_cell(st: Setting, student: Student, method: str, seed: int, teacher: Teacher,
             run_dir: str, data_dir: str) -> dict:
    """One student, one method, one seed: train (resuming), then the numbers."""
    if method == "scratch":
        cfg = scratch_cfg(st, student, teacher.hf_dir, seed, data_dir)
        with quiet():
            stopped(trainer.train_and_evaluate(cfg, run_dir))
        steps = cfg.train.num_steps
    else:
        cfg = distill_cfg(st, student, method, teacher.hf_dir, seed, data_dir)
        with quiet():
            runner.run(cfg, run_dir, progress=False)
        steps = total_steps(cfg)
    assert steps == st.steps, (method, steps)
    run = workdir_lib.load_run(run_dir)
    val = teacher.val(run.model, run.params)
    result = {"val_loss": val["val_loss"], "val_ppl": val["val_ppl"], "steps": steps,
              "curve": val_curve(run_dir),
              "cka": analysis.hidden_state_agreement(
                  run.model, run.params, teacher.model, teacher.lm.params, teacher.cka_batches,
                  layer_map_of(student, st))}
    if method == "bbb" and student.width != st.teacher_width:
        result["head_init"] = head_init_losses(cfg, run_dir, student.n_layer)
    return result


# ------------------------------------------------------------------------------- timing
def time_stages(cfg, *, repeats: int = 5, steps: int = 6) -> dict:
    """ms per block-stage step, truncated vs full forward, alternating repeats (medians)."""
    s = runner.setup(ml_collections.ConfigDict(cfg.to_dict()))
    tree = student_init.init_tree(s, 0)
    batch = sharding.global_batch(data_lib.batch_for_step(
        s.data.train, seed=0, step=0, global_batch_size=cfg.train.batch_size,
        block_size=s.student.config.block_size), s.mesh)
    key = jax.random.key(0)
    rows = []
    for stage in [st for st in s.stages if st.kind == "block"]:
        paths = stage_step.trainable_paths(tree, stage, s.config, s.student.config.tie_embeddings)
        states = {}
        for truncate in (True, False):
            c = stage_step.compiled_step(stage_step.step_spec(s, stage, paths, truncate=truncate),
                                         s.mesh)
            tr, fr = stage_step.split(stage_step.place(tree, s.mesh), paths)
            tr = stage_step.place(tr, s.mesh, copy=True)
            opt = stage_step.place(c.init(tr), s.mesh)
            tr, opt, m = c.step(tr, opt, fr, s.teacher_params, batch, key)  # compile
            jax.block_until_ready(m)
            states[truncate] = [c, tr, opt, fr]
        times = {True: [], False: []}
        for _ in range(repeats):
            for truncate in (True, False):
                c, tr, opt, fr = states[truncate]
                t0 = time.perf_counter()
                for _ in range(steps):
                    tr, opt, m = c.step(tr, opt, fr, s.teacher_params, batch, key)
                jax.block_until_ready((tr, m))
                times[truncate].append((time.perf_counter() - t0) / steps)
                states[truncate][1:3] = [tr, opt]
        trunc, full = (1000 * statistics.median(times[t]) for t in (True, False))
        rows.append({"stage": stage.name, "teacher_blocks": stage.teacher_layer,
                     "truncated_ms": trunc, "full_ms": full})
    return {"rows": rows, "vocab_size": s.teacher.config.vocab_size,
            "total_ratio": sum(r["truncated_ms"] for r in rows) / sum(r["full_ms"]
                                                                      for r in rows)}


# ------------------------------------------------------------------------------- report
HYPOTHESES = (
    # (claim number or None, label, better method, other method)
    (1, "block-by-block beats logit-only KD", "bbb", "kd"),
    (2, "stitching layers help", "bbb", "bbb_nostitch"),
    (3, "the head stage matters", "bbb", "bbb_nohead"),
    (None, "the end-to-end stage matters", "bbb", "bbb_nofinal"),
    (None, "block-by-block beats training from scratch", "bbb", "scratch"),
    (None, "logit-only KD beats training from scratch", "kd", "scratch"),
    (None, "block-by-block beats DistilGPT2's initialisation + KD", "bbb", "distilgpt2"),
    (None, "folding g_t into the head's initialisation helps", "bbb", "bbb_nofold"),
)
CLAIMS = {1: "Block-by-block transfer beats distilling the logits alone",
          2: "Stitching layers help", 3: "The head stage matters"}


def fmt_ms(values) -> str:
    mean, sd = analysis.mean_sd(values)
    return f"{mean:.4f} ± {sd:.4f}"


VERDICTS = {"yes": "yes", "opposite": "no: the opposite", "unresolved": "not resolved"}


def verdict(d: dict) -> str:
    """'yes' (the first method better, resolved), 'opposite' (worse, resolved) or
    'unresolved' (the interval holds 0, or |mean| is within the seed spread)."""
    if d["significant"] and d["exceeds_spread"]:
        return "yes" if d["mean"] > 0 else "opposite"
    return "unresolved"


def plot_setting(st: Setting, cells: dict, teacher_val: float, images: str) -> list[str]:
    """Two PNGs: validation curves per method (mean over seeds, min-max band) and the
    per-block linear CKA with the teacher, one panel per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleangpt_jax import plot as plot_lib

    students = list(cells)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    paths = []
    for kind in ("curves", "cka"):
        fig, axes = plt.subplots(1, len(students), figsize=(4.2 * len(students), 3.6),
                                 squeeze=False)
        for ax, name in zip(axes[0], students):
            finals = []
            for method, runs in cells[name].items():
                if kind == "curves":
                    steps = sorted(set.intersection(*[{p[0] for p in r["curve"]} for r in runs]))
                    ys = np.array([[dict(map(tuple, r["curve"]))[s] for s in steps]
                                   for r in runs])
                    finals.append(ys[:, -1].mean())
                    x = np.array(steps)
                else:
                    ys = np.array([r["cka"] for r in runs])
                    x = np.arange(1, ys.shape[1] + 1)
                ax.plot(x, ys.mean(0), label=METHOD_LABELS[method], color=colors[method],
                        marker="o" if kind == "cka" else None, markersize=3)
                ax.fill_between(x, ys.min(0), ys.max(0), color=colors[method], alpha=0.2)
            ax.set_title(name, fontsize=10)
            if kind == "curves":
                ax.axhline(teacher_val, color="black", linestyle="--", linewidth=1,
                           label="teacher")
                ax.set_ylim(teacher_val - 0.1, max(finals) + 0.8)
                ax.set_xlabel("optimizer step")
                ax.set_ylabel("validation loss (nats/token)")
            else:
                ax.set_xticks(x)
                ax.set_ylim(0, 1.02)
                ax.set_xlabel("student block k (vs teacher block map(k))")
                ax.set_ylabel("linear CKA")
            ax.grid(alpha=0.3)
        handles, labels = [], []
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = os.path.join(images, f"distillation_study_{st.name}_{kind}.png")
        plot_lib.save_png(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def report(args, preset, r: dict, out_path: str) -> str:
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out_path)))
    seeds = r["seeds"]
    lines = ["# Distillation study: does block-by-block distillation earn its keep?", "",
             "Produced in full by `scripts/distill_study.py` (tables, plots, answers); "
             "reproduce with:", "", f"    {r['command']}", "",
             f"- Code version {r['code_version']} (a hash of the package's code and the "
             f"script's measurement version; git {r['git']}); the results are cached under it "
             f"in the study's workdir, keyed also on each setting and the teacher's "
             f"parameters.",
             f"- Machine: {r['machine']}.",
             f"- Wall time: {r['compute_hours']:.2f} h of runs in all (the sum of every "
             f"cached run's seconds, teachers included); this invocation took "
             f"{r['invocation_minutes']:.1f} min.",
             f"- {seeds} seeds per cell; a seed fixes the student's initialisation and the "
             f"batch order, so every comparison pairs the methods seed by seed.", ""]
    lines += ["## The three claims, answered", ""]
    for n, claim in CLAIMS.items():
        rows = [h for h in r["hypotheses"] if h["claim"] == n]
        if not rows:
            lines.append(f"{n}. **{claim}**: not measured in this run.")
            continue
        yes = [h for h in rows if verdict(h["d"]) == "yes"]
        opposite = [h for h in rows if verdict(h["d"]) == "opposite"]
        detail = "; ".join(f"{h['setting']} {h['student']}: Δ = {h['d']['mean']:+.4f} "
                           f"[{h['d']['low']:+.4f}, {h['d']['high']:+.4f}]" for h in rows)
        if yes and not opposite and len(yes) == len(rows):
            answer = "yes"
        elif opposite and not yes and len(opposite) == len(rows):
            answer = "no, the opposite holds"
        elif not yes and not opposite:
            answer = "not shown: every difference is within the seed noise"
        else:
            answer = "only in some cases"
        lines.append(f"{n}. **{claim}?** {answer.capitalize()} ({len(yes)} of {len(rows)} "
                     f"student/setting pairs better by more than the seed spread with a 95% "
                     f"interval excluding 0, {len(opposite)} worse); Δ = validation loss of "
                     f"the alternative minus block-by-block's, nats/token: {detail}.")
    lines.append("")
    lines += ["## Setup", "",
              "| setting | tokenizer | teacher | students | N steps | batch x context | "
              "blocks / head / final steps | lr (blocks) | eval batches |",
              "|---|---|---|---|---:|---|---|---|---:|"]
    for st in r["settings"]:
        t = r["teachers"][st.name]
        studs = ", ".join(s.name for s, _ in students_of(st))
        lines.append(f"| {st.name} | {st.tokenizer} ({t['vocab_size']} tokens) | vanilla "
                     f"{st.teacher_layers}x{st.teacher_width} | {studs} | {st.steps} | "
                     f"{st.batch_size} x {st.block_size} | {st.block_steps} per block / "
                     f"{st.head_steps} / the rest | {st.lr} ({st.block_lr}) | "
                     f"{st.eval_steps} |")
    lines += ["",
              "- Every student: GPT-2's block (bias, tanh GELU), an untied head, no dropout; "
              "AdamW (b1 0.9, b2 0.99), weight decay as in the table, clipping at 1.0, linear "
              "warmup then cosine to a tenth of the peak, per stage; the same batches in the "
              "same order (a function of the seed and the global step).",
              "- KD and the end-to-end stage: KL(teacher || student) at T = 2 plus the LM "
              "loss (DistilGPT2's recipe). Block stages: MSE of the stitched hidden state "
              "against teacher block map(k) (map: 1..L at equal depth; 2, 4, ..., L for the "
              "shallow student). Head stage: KL at T = 2, the head initialised from the "
              "teacher's (W_t diag(g_t) S at half width, a copy at equal width).",
              "- Validation loss: the token-weighted mean cross-entropy over the same first "
              "validation batches (the last 10% of the plays) for every model, teacher "
              "included; perplexity = exp(loss).", ""]
    lines += ["## Teachers", "",
              "| setting | steps run (early stop) | best step | val loss | val ppl | best "
              "half-width scratch student | margin | seed spread | beats every scratch "
              "student by more than the spread |", "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for st in r["settings"]:
        t = r["teachers"][st.name]
        scratch = {name: analysis.mean_sd([x["val_loss"] for x in m["scratch"]])
                   for name, m in r["cells"][st.name].items()
                   if name.split()[1].endswith(f"x{st.teacher_width // 2}") and "scratch" in m}
        if not scratch:  # (--methods without scratch)
            continue
        best = min(scratch, key=lambda k: scratch[k][0])
        margin = scratch[best][0] - t["val_loss"]
        spread = max(sd for _, sd in scratch.values())
        ok = margin > spread
        lines.append(f"| {st.name} | {t['steps_run']} ({'yes' if t['early_stopped'] else 'no'}"
                     f") | {t['best_step']} | {t['val_loss']:.4f} | {math.exp(t['val_loss']):.3f}"
                     f" | {best}: {scratch[best][0]:.4f} | {margin:.4f} | {spread:.4f} | "
                     f"**{'yes' if ok else 'no'}** |")
    lines += ["", f"Early stopping: an evaluation every `teacher_eval_every` steps on "
              f"the validation batches; training stops after `teacher_patience` evaluations "
              f"without an improvement larger than `teacher_min_delta`, and the best step is "
              f"exported. " + "; ".join(
                  f"{st.name}: every {st.teacher_eval_every} steps, patience "
                  f"{st.teacher_patience}, min delta {st.teacher_min_delta}, cosine schedule "
                  f"over {st.teacher_max_steps} steps, dropout {st.teacher_dropout}"
                  for st in r["settings"]) + ".", ""]
    for st in r["settings"]:
        cells = r["cells"][st.name]
        t_loss = r["teachers"][st.name]["val_loss"]
        lines += [f"## Results: {st.name}", "",
                  f"Validation loss, mean ± standard deviation over {seeds} seeds (teacher "
                  f"{t_loss:.4f}); — where a method does not apply.", "",
                  "| student | " + " | ".join(METHOD_LABELS[m] for m in METHODS) + " |",
                  "|---|" + "---:|" * len(METHODS)]
        for name, methods in cells.items():
            lines.append(f"| {name} | " + " | ".join(
                fmt_ms([x["val_loss"] for x in methods[m]]) if m in methods else "—"
                for m in METHODS) + " |")
        lines += ["", f"![validation curves]({rel(r['images'][st.name][0])})", "",
                  "Validation loss against optimizer steps (mean over seeds, band: min to "
                  "max). Block-by-block runs start high: until the head stage, the student's "
                  "head is untrained.", "",
                  f"![per-block agreement]({rel(r['images'][st.name][1])})", "",
                  "Linear CKA between the student's hidden state after block k and the "
                  "teacher's after block map(k), on the validation tokens (the raw states: "
                  "CKA compares different widths without the stitching layers, so every "
                  "method is measured the same way).", ""]
    lines += ["## Paired differences", "",
              "Δ = validation loss of the second method minus the first's, per seed, then "
              "the mean, its 95% Student-t interval and the seed spread (the larger of the two "
              "cells' standard deviations). Positive: the first method is better. 'Resolved' "
              "needs the interval to exclude 0 and |Δ| to exceed the spread.", "",
              "| setting | student | hypothesis | Δ mean | 95% interval | spread | "
              "answer |", "|---|---|---|---:|---|---:|---|"]
    for h in r["hypotheses"]:
        d = h["d"]
        lines.append(f"| {h['setting']} | {h['student']} | {h['label']} | {d['mean']:+.4f} | "
                     f"[{d['low']:+.4f}, {d['high']:+.4f}] | {d['spread']:.4f} | "
                     f"{VERDICTS[verdict(d)]} |")
    lines.append("")
    if r["head_init"]:
        lines += ["## The head's initialisation at half width", "",
                  "The head stage's loss (KL at T = 2) at its first step, on the validation "
                  "batches, from the same block stages, with the head initialised as "
                  "W_t diag(g_t) S (the teacher's final LayerNorm scale folded in, "
                  "`distill.head.fold_ln_scale`, the default) and as W_t S.", "",
                  "| setting | student | W_t diag(g_t) S | W_t S | paired Δ (95% interval) |",
                  "|---|---|---:|---:|---|"]
        for row in r["head_init"]:
            d = row["d"]
            lines.append(f"| {row['setting']} | {row['student']} | {fmt_ms(row['fold'])} | "
                         f"{fmt_ms(row['plain'])} | {d['mean']:+.4f} [{d['low']:+.4f}, "
                         f"{d['high']:+.4f}] |")
        lines.append("")
    if r.get("timing"):
        t = r["timing"]
        lines += ["## Step time: truncated forward vs full forward", "",
                  f"A block stage k runs the teacher up to block map(k) and the student up to "
                  f"block k; the full-forward step runs both models through every block and "
                  f"their heads (what the original computed each step). The {t['label']}; "
                  f"compiled steps, the two alternating on one batch; medians in ms.", "",
                  "| stage | teacher blocks run | truncated ms | full ms | ratio |",
                  "|---|---:|---:|---:|---:|"]
        for row in t["rows"]:
            lines.append(f"| {row['stage']} | {row['teacher_blocks']} | "
                         f"{row['truncated_ms']:.1f} | {row['full_ms']:.1f} | "
                         f"{row['truncated_ms'] / row['full_ms']:.3f} |")
        lines += [f"| all block stages (sum) | | | | **{t['total_ratio']:.3f}** |", ""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    preset = PRESETS[args.preset]
    seeds = args.seeds or preset["seeds"]
    settings = [st for st in preset["settings"]
                if not args.only or st.name in args.only.split(",")]
    workdir = os.path.abspath(args.workdir or os.path.join("runs",
                                                           f"distill_study_{args.preset}"))
    if workdir_lib.run_kind(workdir) is not None:
        sys.exit(f"error: --workdir {workdir} holds a {workdir_lib.run_kind(workdir)} run: "
                 f"give the study a directory of its own")
    full = args.preset == "full"
    out_path = os.path.abspath(args.out or (os.path.join(REPO, "docs", "distillation_study.md")
                                            if full else os.path.join(workdir,
                                                                      "distillation_study.md")))
    images = os.path.abspath(args.images or (os.path.join(REPO, "docs", "images") if full
                                             else workdir))
    os.makedirs(workdir, exist_ok=True)
    data_dir = os.path.join(workdir, "tokens")
    results = Results(os.path.join(workdir, "results.json"))
    code = code_version()
    r = {"seeds": seeds, "settings": settings, "teachers": {}, "cells": {}, "hypotheses": [],
         "head_init": [], "images": {}, "code_version": code, "git": git_commit()}
    for st in settings:
        setting = dataclasses.asdict(st)
        tkey = key_of("teacher", setting, code)
        t = results.get(tkey, f"{st.name} teacher", lambda: train_teacher(
            st, os.path.join(workdir, "teachers", f"{st.name}-{tkey}"), data_dir))
        teacher = Teacher(st, t["hf_dir"], data_dir)
        tval = teacher.val(teacher.model, teacher.lm.params)
        r["teachers"][st.name] = dict(t, val_loss=tval["val_loss"],
                                      vocab_size=teacher.lm.config.vocab_size)
        cells = r["cells"][st.name] = {}
        for seed in range(seeds):  # every cell's seed 0 first: partial runs are balanced
            for student, methods in students_of(st):
                for method in methods:
                    if args.methods and method not in args.methods.split(","):
                        continue
                    key = key_of(setting, dataclasses.asdict(student), method, seed, code,
                                 t["fingerprint"])
                    run_dir = os.path.join(workdir, "runs", st.name,
                                           student.name.replace(" ", "_"), method,
                                           f"seed{seed}-{key}")
                    res = results.get(key, f"{st.name} {student.name} {method} seed {seed}",
                                      lambda: run_cell(st, student, method, seed, teacher,
                                                       run_dir, data_dir))
                    cells.setdefault(student.name, {}).setdefault(method, []).append(res)
        for name, methods in cells.items():
            for claim, label, a, b in HYPOTHESES:
                if a in methods and b in methods and seeds >= 2:  # (paired: >= 2 seeds)
                    r["hypotheses"].append({
                        "claim": claim, "label": label, "setting": st.name, "student": name,
                        "d": analysis.paired_difference([x["val_loss"] for x in methods[b]],
                                                        [x["val_loss"] for x in methods[a]])})
            runs = methods.get("bbb", [])
            if runs and "head_init" in runs[0] and seeds >= 2:
                fold = [x["head_init"]["fold"] for x in runs]
                plain = [x["head_init"]["plain"] for x in runs]
                r["head_init"].append({"setting": st.name, "student": name, "fold": fold,
                                       "plain": plain,
                                       "d": analysis.paired_difference(plain, fold)})
        r["images"][st.name] = plot_setting(st, cells, tval["val_loss"], images)
    if preset["timing"] and any(st.tokenizer == "gpt2" for st in settings):
        st = next(s for s in settings if s.tokenizer == "gpt2")
        student = students_of(st)[0][0]
        t = r["teachers"][st.name]
        cfg = distill_cfg(st, student, "bbb", t["hf_dir"], 0, data_dir)
        timing = results.get(key_of("timing", dataclasses.asdict(st), code, t["fingerprint"],
                                    platform.node()), "timing", lambda: time_stages(cfg))
        r["timing"] = dict(timing, label=f"{st.name} setting's {student.name} student and "
                                         f"{st.teacher_layers}x{st.teacher_width} teacher, "
                                         f"vocabulary {timing['vocab_size']}")
    r["compute_hours"] = sum(v.get("seconds", 0.0) for v in results.data.values()) / 3600
    r["invocation_minutes"] = (time.time() - t_start) / 60
    r["machine"] = (f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
                    f"backend {jax.default_backend()}")
    r["command"] = ("python scripts/distill_study.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
        if not a.startswith(("--out", "--images", "--workdir")))).strip()
    text = report(args, preset, r, out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(text)
    print(f"wrote {out_path}", flush=True)
    return r


if __name__ == "__main__":
    main()
