"""Block-by-block distillation: setup, the stage loop, checkpoints and resume, the student.

    summary = run(config, workdir)        # what `python -m cleangpt_jax.distill` runs

Each stage's compiled update (what it trains, its loss, its optimizer) is
`distill.stage_step`; this module runs the stages and keeps what they leave on disk.

Layout of a distillation workdir:

    WORKDIR/config.json, tokenizer/, checkpoints/   the final student, a normal model workdir
                                                     (generate / evaluate --workdir take it)
    WORKDIR/hf/                                      Vanilla students in Hugging Face format
    WORKDIR/stitching/                               the trained stitching layers (Orbax)
    WORKDIR/stages/plan.json                         the run's settings, checked on resume
    WORKDIR/stages/<stage>/                          Orbax steps of one stage: params =
                                                     {'student', 'stitch'}, opt_state, meta
    WORKDIR/stages/manifest.json                     the stages completed so far
    WORKDIR/metrics.jsonl, events.out.*              one record per log event, with `stage`

Resume: batches are a pure function of (train.seed, global step), the dropout key is
fold_in(fold_in(key(seed), 1), global step), and a stage checkpoint holds the whole
{'student', 'stitch'} tree with the optimizer state. A run killed at any point and rerun
therefore computes what the uninterrupted run computes, bit for bit on CPU, and skips the
stages the manifest lists. Compiled steps are cached per (models, stage, loss, optimizer), so
a second run in one process (a resumed run, a study sweeping variants) compiles nothing again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cleangpt_jax import checkpoint as ckpt_lib
from cleangpt_jax import data as data_lib
from cleangpt_jax import hf, loop, sharding, train_step
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ConfigError, ModelConfig, model_config
from cleangpt_jax.distill import plan as plan_lib
from cleangpt_jax.distill import stage_step
from cleangpt_jax.distill.losses import get_loss
from cleangpt_jax.distill.stitching import init_stitching, stitch_name
from cleangpt_jax.loading import load_lm
from cleangpt_jax.models import get_model

MANIFEST = "manifest.json"
PLAN_FILE = "plan.json"
STITCHING_DIR = "stitching"
HF_DIR = "hf"
STITCH_SEED_SALT = 2
# Settings that may change between a run and its resumption without changing any result.
_RESUMABLE_KEYS = {"distill": ("log_every", "checkpoint_every", "eval_steps"),
                   "data": ("cache_dir", "num_proc")}
# Settings of single stages (recorded per stage in the plan instead).
_STAGE_KEYS = ("steps_per_block", "epochs_per_block", "learning_rate", "weight_decay",
               "grad_clip", "head", "final")



# ------------------------------------------------------------------------------------ setup

@dataclasses.dataclass
class Setup:
    config: ml_collections.ConfigDict
    teacher: Any                # Vanilla module (GPT-2)
    teacher_params: Any
    student: Any                # any registered architecture
    tokenizer: Any              # the teacher's
    data: Any                   # data_lib.TokenData
    mesh: Any
    stages: list
    layer_map: list[int] | None  # None without block stages


def check_config(cfg) -> None:
    d = cfg.distill
    if cfg.model.param_dtype != "float32":
        raise ConfigError(f"model.param_dtype={cfg.model.param_dtype!r}: distillation keeps "
                          f"float32 master weights; set model.dtype='bfloat16' for bf16 compute")
    for key in ("checkpoint_every", "eval_steps", "warmup_steps"):
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"distill.{key} must be an integer >= 0, got {v!r}")
    if not isinstance(d.log_every, int) or d.log_every <= 0:
        raise ConfigError(f"distill.log_every must be a positive integer, got {d.log_every!r}")
    if d.block_stages:
        get_loss(d.hidden_loss)
    for name in ("head", "final"):
        if d[name].enabled:
            get_loss(d[name].logit_loss)


def student_config(cfg, teacher_cfg: ModelConfig) -> ModelConfig:
    """The student's ModelConfig: vocabulary from the teacher, an untied head when the head
    stage must train the head without moving the (frozen) embeddings."""
    m = cfg.model
    if m.vocab_size is not None and m.vocab_size != teacher_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} differs from the teacher's "
                          f"vocabulary ({teacher_cfg.vocab_size}): the student's vocabulary "
                          f"comes from the teacher; drop model.vocab_size")
    if m.block_size > teacher_cfg.max_position_embeddings:
        raise ConfigError(f"model.block_size={m.block_size} exceeds the teacher's "
                          f"{teacher_cfg.max_position_embeddings} positions: lower it")
    head = cfg.distill.head
    if head.enabled and not head.untie and head.init_from_teacher:
        raise ConfigError("distill.head.untie=False with init_from_teacher=True would overwrite "
                          "the distilled (tied) embeddings with the teacher's head: set "
                          "distill.head.init_from_teacher=False or untie the head")
    untie = head.enabled and head.untie
    return model_config(cfg.model, vocab_size=teacher_cfg.vocab_size,
                        tie_embeddings=m.tie_embeddings and not untie)


def setup(cfg: ml_collections.ConfigDict) -> Setup:
    """Load the teacher, its tokenizer and the data, and check the plan; writes nothing."""
    check_config(cfg)
    d = cfg.distill
    mesh = sharding.create_mesh(int(cfg.train.fsdp))
    sharding.check_batch_size(cfg.train.batch_size, mesh)
    teacher = load_lm(d.teacher, dtype=d.teacher_dtype or cfg.model.dtype, mesh=mesh)
    t_cfg, t_params, tokenizer = teacher.config, teacher.params, teacher.tokenizer
    s_cfg = student_config(cfg, t_cfg)
    if d.block_stages and not d.stitching and s_cfg.n_embd != t_cfg.n_embd:
        raise ConfigError(f"distill.stitching=False needs equal widths, but the student has "
                          f"n_embd={s_cfg.n_embd} and the teacher {t_cfg.n_embd}: turn "
                          f"stitching on or match the widths")
    if (d.head.enabled and d.head.init_from_teacher and not d.block_stages
            and s_cfg.n_embd != t_cfg.n_embd):
        raise ConfigError("distill.head.init_from_teacher at different widths maps the "
                          "teacher's head through the last trained stitching layer, which "
                          "distill.block_stages=False never trains: set init_from_teacher=False")
    data = data_lib.load_dataset(cfg, tokenizer)
    steps_per_epoch = data_lib.steps_per_epoch(data.train, cfg.train.batch_size,
                                               s_cfg.block_size)
    stages = plan_lib.build_stages(d, s_cfg.n_layer, t_cfg.n_layer, steps_per_epoch)
    mapping = ([st.teacher_layer for st in stages if st.kind == "block"]
               if d.block_stages else None)
    return Setup(cfg, get_model(config=t_cfg), t_params, get_model(config=s_cfg), tokenizer,
                 data, mesh, stages, mapping)


# ------------------------------------------------------------------------ checkpoints

def stages_dir(workdir: str) -> str:
    return os.path.join(workdir, workdir_lib.DISTILL_STAGES_DIR)


def read_manifest(workdir: str) -> list[dict]:
    """The completed stages, in order: [{'name', 'steps', 'first_loss', 'final_loss'}]."""
    path = os.path.join(stages_dir(workdir), MANIFEST)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["completed"]


def _write_json(path: str, obj) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    workdir_lib.write_json(path, obj)


def write_manifest(workdir: str, completed: list[dict]) -> None:
    _write_json(os.path.join(stages_dir(workdir), MANIFEST), {"completed": completed})


def stage_checkpointer(workdir, stage_name, *, read_only: bool = False) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(os.path.join(stages_dir(workdir), stage_name), max_to_keep=2,
                                 async_save=False, read_only=read_only)


def _plan_record(s: Setup) -> dict:
    """What the completed stages' results depend on: the resolved models, the data, the seed
    and batch, the global distill settings, and every stage's own settings."""
    cfg = s.config.to_dict()
    drop = {"data": _RESUMABLE_KEYS["data"], "distill": _RESUMABLE_KEYS["distill"] + _STAGE_KEYS}
    record = {"student": s.student.config.to_dict(), "teacher": s.teacher.config.to_dict(),
              "train": {k: cfg["train"][k] for k in ("seed", "batch_size", "adam_b1",
                                                     "adam_b2", "adam_eps")},
              "stages": [dataclasses.asdict(st) for st in s.stages]}
    for sec in ("data", "distill"):
        record[sec] = {k: v for k, v in dict(cfg[sec]).items() if k not in drop[sec]}
    return json.loads(json.dumps(record, default=workdir_lib.json_default))


def check_plan(s: Setup, workdir: str, done: list[dict]) -> None:
    """Record the run's settings; on a rerun refuse settings that would change what the
    completed stages computed. Stages not completed yet may change (e.g. a lower learning
    rate after a NaN stop)."""
    path = os.path.join(stages_dir(workdir), PLAN_FILE)
    now = _plan_record(s)
    n = len(done)
    names = [st["name"] for st in now["stages"]]
    if names[:n] != [m["name"] for m in done]:
        raise ConfigError(f"{workdir} lists completed stages {[m['name'] for m in done]} that "
                          f"are not this plan's {names}: use a new --workdir")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        diff = workdir_lib.config_differences(
            before, now, sections=("student", "teacher", "train", "data", "distill"))
        for a, b in zip(before["stages"][:n], now["stages"][:n]):
            if a != b:
                diff.append(f"completed stage {a['name']}: {a} -> {b}")
        if diff:
            raise ConfigError(f"{workdir} holds a distillation with other settings "
                              f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}): "
                              f"rerun with the original config to resume, or use a new "
                              f"--workdir")
        if before["stages"] != now["stages"] and jax.process_index() == 0:
            print("note: settings of stages not completed yet changed; they apply from the "
                  "stage's last checkpoint on", flush=True)
    _write_json(path, now)


def load_stitching(workdir: str) -> dict | None:
    """The trained stitching layers of a distillation run ({'stitch_<k>': Dense params}), or
    None when the run has none (a training run, or stitching off)."""
    directory = os.path.join(workdir, STITCHING_DIR)
    if not os.path.isdir(directory):
        return None
    c = ckpt_lib.Checkpointer(directory, read_only=True)
    try:
        if c.latest_step() is None:
            return None
        meta = c.read_meta()
        abstract = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(tuple(shape), jnp.float32),
                                meta["shapes"], is_leaf=lambda x: isinstance(x, list))
        return c.restore(params=abstract).params
    finally:
        c.close()


def layer_map_from_config(config) -> list[int]:
    """The run's layer map (teacher block for student blocks 1..L_s), as its final config
    records it (`write_student` stores the resolved list and the teacher's depth)."""
    d = config.distill
    return plan_lib.layer_map(list(d.layer_map), config.model.n_layer, d.teacher_n_layer)


# ------------------------------------------------------------------------------ the loop

def init_tree(s: Setup, seed: int):
    """{'student': params, 'stitch': {'stitch_k': ...}} at initialisation, one compiled call.
    The student gets the parameters `python -m cleangpt_jax.train` gives it with this seed."""
    c = s.student.config
    init_student = train_step.model_init_fn(s.student, seed)

    def init():
        tree = {"student": init_student()}
        if s.config.distill.stitching and s.config.distill.block_stages:
            key = jax.random.fold_in(jax.random.key(seed), STITCH_SEED_SALT)
            tree["stitch"] = init_stitching(key, c.n_layer, c.n_embd, s.teacher.config.n_embd,
                                            s.config.distill.stitching_bias)
        return tree

    shapes = jax.eval_shape(init)
    return jax.jit(init, out_shardings=sharding.state_shardings(shapes, s.mesh))()


def init_head_from_teacher(s: Setup, tree):
    """lm_head (and ln_f at equal width) from the teacher: copies at equal widths, otherwise
    W_s = W_t K^T with K (d_s, d_t) the last stitching layer's kernel (h_t ~ h_s K), which
    maps the student's final hidden state into the space the teacher's head reads."""
    student = dict(tree["student"])
    if "lm_head" not in student:
        return tree
    w_t = s.teacher_params["wte"]["embedding"]
    dtype = student["lm_head"].dtype
    if s.student.config.n_embd == s.teacher.config.n_embd:
        # Fresh buffers: these leaves are donated by the head step, the teacher's are not.
        student["lm_head"] = jnp.array(w_t, dtype, copy=True)
        if "ln_f" in student:
            student["ln_f"] = {k: jnp.array(s.teacher_params["ln_f"][k], v.dtype, copy=True)
                               for k, v in student["ln_f"].items()}
    else:
        kernel = tree["stitch"][stitch_name(s.student.config.n_layer)]["kernel"]
        student["lm_head"] = (w_t.astype(jnp.float32) @ kernel.T).astype(dtype)
    return dict(tree, student=student)


def _stage_info(stage, first_loss, final_loss) -> dict:
    return {"name": stage.name, "steps": stage.steps, "first_loss": first_loss,
            "final_loss": final_loss}


def run_stage(s: Setup, stage, tree, *, workdir, step_offset, writer, stop: threading.Event,
              progress: bool = True):
    """Train one stage from `tree` (or from the stage's newest checkpoint); returns
    (tree, info). Saves every distill.checkpoint_every steps, at the end, and on `stop`."""
    cfg = s.config
    d = cfg.distill
    paths = stage_step.trainable_paths(tree, stage, cfg, s.student.config.tie_embeddings)
    if not paths:
        raise ConfigError(f"stage {stage.name} has no trainable parameters")
    compiled = stage_step.compiled_step(stage_step.step_spec(s, stage, paths), s.mesh)
    trainable, frozen = stage_step.split(stage_step.place(tree, s.mesh), paths)
    trainable = stage_step.place(trainable, s.mesh, copy=True)
    opt_state = stage_step.place(compiled.init(trainable), s.mesh)  # the layout the step returns
    seed = int(cfg.train.seed)
    ckpt = stage_checkpointer(workdir, stage.name)
    try:
        start, first_loss, last_loss = 0, None, None
        restored = ckpt.restore_latest(
            params=sharding.abstract_state(stage_step.join(trainable, frozen), s.mesh),
            opt_state=sharding.abstract_state(opt_state, s.mesh))
        if restored is not None:
            start = restored.step
            first_loss, last_loss = restored.meta.get("first_loss"), restored.meta.get("loss")
            trainable, frozen = stage_step.split(restored.params, paths)
            # Donated below: fresh buffers, never ones that may alias host memory Orbax read.
            trainable = stage_step.place(trainable, s.mesh, copy=True)
            opt_state = stage_step.place(restored.opt_state, s.mesh, copy=True)
            if start < stage.steps and jax.process_index() == 0:
                print(f"Resuming stage {stage.name} from step {start}", flush=True)

        def save(step):
            ckpt.save(step, params=stage_step.join(trainable, frozen), opt_state=opt_state,
                      meta={"stage": stage.name, "global_step": step_offset + step,
                            "data_seed": seed, "first_loss": first_loss, "loss": last_loss})

        dropout_key = jax.random.fold_in(jax.random.key(seed), train_step.DROPOUT_SEED_SALT)
        bar = loop.progress_bar(stage.steps, start, desc=stage.name, enabled=progress,
                                leave=False)
        lag = loop.LaggedMetrics()

        def log(fetched):
            nonlocal first_loss, last_loss
            for step, m in fetched:
                first_loss = m["loss"] if first_loss is None else first_loss
                last_loss = m["loss"]
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if step % d.log_every == 0 or step == stage.steps:
                    writer.write(step_offset + step, {
                        "stage": stage.name, "stage_step": step, "distill_loss": m["loss"],
                        "grad_norm": m["grad_norm"], "lr": float(compiled.schedule(step - 1))})

        for step in range(start, stage.steps):
            g = step_offset + step
            batch = data_lib.batch_for_step(
                s.data.train, seed=seed, step=g, global_batch_size=cfg.train.batch_size,
                block_size=s.student.config.block_size, process_index=jax.process_index(),
                process_count=jax.process_count())
            trainable, opt_state, metrics = compiled.step(
                trainable, opt_state, frozen, s.teacher_params,
                sharding.global_batch(batch, s.mesh), jax.random.fold_in(dropout_key, g))
            done = step + 1
            log(lag.push(done, metrics))  # the previous step's: the device keeps working
            stopping = loop.agree_to_stop(stop) and done < stage.steps
            if stopping or (d.checkpoint_every and done % d.checkpoint_every == 0
                            and done < stage.steps):
                log(lag.flush())  # never save a non-finite state
                save(done)
            if stopping:
                bar.close()
                raise loop.interrupted(stop, f"stopped in stage {stage.name} at step {done} "
                                             f"(saved); rerun the same command to resume")
        log(lag.flush())
        bar.close()
        save(stage.steps)
    except loop.NonFiniteError as e:
        last = ckpt.latest_step()
        kept = ("the completed stages are kept" if last is None else
                f"the stage's checkpoint at step {last} and the completed stages are kept")
        raise e.stopped(f"stage {stage.name}", kept, "Lower distill.learning_rate or set "
                                                     "distill.grad_clip, then rerun") from None
    finally:
        ckpt.close()
    return stage_step.join(trainable, frozen), _stage_info(stage, first_loss, last_loss)


def completed_tree(s: Setup, workdir, name):
    """The {'student', 'stitch'} tree a completed stage ended with."""
    template = jax.eval_shape(lambda: init_tree(s, 0))  # traces only
    c = stage_checkpointer(workdir, name, read_only=True)
    try:
        return c.restore(params=sharding.abstract_state(template, s.mesh)).params
    finally:
        c.close()


def val_loss(model, params, tokens, cfg, mesh) -> dict | None:
    """Token-weighted LM validation loss of `model` on the first distill.eval_steps batches
    of `tokens` ({'val_loss', 'val_ppl', 'val_tokens'}); None without data or eval_steps."""
    n = cfg.distill.eval_steps
    if tokens is None or not n:
        return None
    step = train_step.make_eval_step(train_step.lm_strategy(model), mesh=mesh,
                                  params_shardings=sharding.state_shardings(params, mesh))
    batches = data_lib.eval_batches(
        tokens, global_batch_size=cfg.train.batch_size, block_size=model.config.block_size,
        num_batches=n, process_index=jax.process_index(), process_count=jax.process_count())
    return train_step.evaluate(step, stage_step.place(params, mesh), batches, mesh)


def run(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Run (or resume) every stage, then write the final student. Returns a summary:
    {'stages': [{'name', 'steps', 'first_loss', 'final_loss'}], 'layer_map',
     'teacher_val', 'student_val', 'workdir'}."""
    workdir_lib.check_kind(workdir, "distill", source=cfg.distill.teacher)
    sharding.initialize_distributed(cfg.train)
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # a private, resolved copy
    s = setup(cfg)
    workdir = os.path.abspath(workdir)
    done = read_manifest(workdir)
    check_plan(s, workdir, done)
    names = [st.name for st in s.stages]
    tree = (completed_tree(s, workdir, done[-1]["name"]) if done
            else init_tree(s, int(cfg.train.seed)))
    offset = sum(st.steps for st in s.stages[:len(done)])
    remaining = s.stages[len(done):]
    mid = 0
    if remaining:
        c = stage_checkpointer(workdir, remaining[0].name)
        mid = c.latest_step() or 0
        c.close()
    if done and jax.process_index() == 0:
        print(f"Completed stages {[m['name'] for m in done]}; continuing with "
              f"{remaining[0].name if remaining else 'the final student'}", flush=True)
    writer = loop.MetricWriter(workdir, resume_step=offset + mid)
    stop = threading.Event()
    try:
        with loop.stop_on_signals(stop):
            for stage in remaining:
                if loop.agree_to_stop(stop):
                    raise loop.interrupted(stop, f"stopped before stage {stage.name}; rerun "
                                                 f"the same command to resume")
                if jax.process_index() == 0:
                    target = (f"student block {stage.block} -> teacher block "
                              f"{stage.teacher_layer}" if stage.kind == "block" else "logits")
                    print(f"Stage {stage.name} ({names.index(stage.name) + 1}/{len(names)}): "
                          f"{target}, {stage.steps} steps", flush=True)
                if stage.kind == "head" and cfg.distill.head.init_from_teacher:
                    c = stage_checkpointer(workdir, stage.name)
                    fresh = c.latest_step() is None
                    c.close()
                    if fresh:
                        tree = init_head_from_teacher(s, tree)
                tree, info = run_stage(s, stage, tree, workdir=workdir, step_offset=offset,
                                       writer=writer, stop=stop, progress=progress)
                offset += stage.steps
                done.append(info)
                write_manifest(workdir, done)
                logging.info("stage %s done: %s", stage.name, info)
        write_student(s, tree, workdir, step=offset)
        student = sharding.to_host(tree["student"])
        summary = {"stages": done, "layer_map": s.layer_map, "workdir": workdir,
                   "teacher_val": val_loss(s.teacher, s.teacher_params, s.data.val, cfg,
                                           s.mesh),
                   "student_val": val_loss(s.student, student, s.data.val, cfg, s.mesh)}
        if summary["student_val"] is not None and not student_logged(workdir):
            writer.write(offset, {"stage": "student", **summary["student_val"],
                                  "teacher_val_ppl": summary["teacher_val"]["val_ppl"]})
    finally:
        writer.close()
    return summary


# ------------------------------------------------------------------------------ outputs

def student_logged(workdir: str) -> bool:
    """Whether metrics.jsonl already holds the final student's record (a rerun of a finished
    run, which must not append it twice)."""
    return (os.path.exists(os.path.join(workdir, workdir_lib.METRICS_FILE))
            and any(r.get("stage") == "student" for r in workdir_lib.read_metrics(workdir)))


def student_run_config(s: Setup, workdir: str) -> ml_collections.ConfigDict:
    """The final student's config.json: the run's config with the resolved student model,
    the layer map as a list, the teacher's depth and the saved tokenizer."""
    cfg = ml_collections.ConfigDict(s.config.to_dict(), type_safe=False)
    cfg.model = ml_collections.ConfigDict(s.student.config.to_dict())
    teacher = cfg.distill.teacher
    cfg.distill.teacher = os.path.abspath(teacher) if os.path.isdir(teacher) else teacher
    cfg.distill.layer_map = None if s.layer_map is None else list(s.layer_map)
    cfg.distill.teacher_n_layer = s.teacher.config.n_layer
    cfg.tokenizer.type = s.tokenizer.tokenizer_type
    cfg.tokenizer.name_or_path = os.path.join(workdir, workdir_lib.TOKENIZER_DIR)
    return cfg


def write_student(s: Setup, tree, workdir: str, step: int) -> None:
    """The final student as a model workdir (+ stitching layers, + HF export for Vanilla).
    Each piece is written once; a rerun after a kill writes only the missing ones."""
    written = workdir_lib.open_checkpointer(workdir, async_save=False)
    have = step in written.all_steps()
    written.close()
    params = sharding.to_host(tree["student"])
    if not have:
        workdir_lib.write_model_workdir(workdir, student_run_config(s, workdir), s.tokenizer,
                                        params, step=step, meta={"distilled": True})
    if "stitch" in tree:
        c = ckpt_lib.Checkpointer(os.path.join(workdir, STITCHING_DIR), async_save=False)
        shapes = jax.tree.map(lambda x: list(np.shape(x)), tree["stitch"])
        c.save(0, params=tree["stitch"], meta={"shapes": shapes})  # no-op when present
        c.close()
    c = s.student.config
    out = os.path.join(workdir, HF_DIR)
    complete = all(os.path.isfile(os.path.join(out, f))
                   for f in (hf.CONFIG_FILE, hf.SAFETENSORS_FILE))
    if c.model_type == "vanilla" and c.position_encoding == "learned" and not complete:
        hf.export_gpt2(c, params, out, tokenizer=s.tokenizer, overwrite=True)
