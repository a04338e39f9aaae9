"""Block-by-block distillation: setup, the stage loop, checkpoints and resume, the student.

    summary = run(config, workdir)        # what `python -m cleangpt_jax.distill` runs

Each stage's compiled update (what it trains, its loss, its optimizer) is
`distill.stage_step`; this module sets the run up and runs the stages.

What the run leaves on disk (the layout, the manifest, the plan, the student) is
`distill.records`.

Resume: batches are a pure function of (train.seed, global step), the dropout key is
fold_in(fold_in(key(seed), 1), global step), and a stage checkpoint holds the whole
{'student', 'stitch'} tree with the optimizer state. A run killed at any point and rerun
therefore computes what the uninterrupted run computes, bit for bit on CPU, and skips the
stages the manifest lists. Compiled steps are cached per (models, stage, loss, optimizer), and
evaluation steps per (model, mesh, parameter layout), so a second run in one process (a resumed
run, a study sweeping variants) compiles nothing again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from typing import Any

import jax
import ml_collections

from cleangpt_jax import data as data_lib
from cleangpt_jax import loop, plot, sharding, storage, trackers, train_step
from cleangpt_jax import metrics as metrics_lib
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ConfigError, ModelConfig, model_config
from cleangpt_jax.distill import plan as plan_lib
from cleangpt_jax.distill import records
from cleangpt_jax.distill import stage_step
from cleangpt_jax.distill.losses import get_loss
from cleangpt_jax.distill.student_init import (check_copyable, init_head_from_teacher,
                                               init_tree)
from cleangpt_jax.loading import load_lm
from cleangpt_jax.models import get_model
from cleangpt_jax.profiling import StepProfiler, parse_window


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
    for key in ("checkpoint_every", "eval_steps", "eval_every", "warmup_steps"):
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"distill.{key} must be an integer >= 0, got {v!r}")
    if not isinstance(d.log_every, int) or d.log_every <= 0:
        raise ConfigError(f"distill.log_every must be a positive integer, got {d.log_every!r}")
    data_lib.prefetch_depth(cfg.data.prefetch)
    trackers.parse_loggers(cfg.train.loggers)  # (before the run writes anything)
    parse_window(d.profile_steps, "distill.profile_steps")
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
    if d.init_from_teacher:
        check_copyable(get_model(config=s_cfg), get_model(config=t_cfg))
    data = data_lib.load_dataset(cfg, tokenizer)
    steps_per_epoch = data_lib.steps_per_epoch(data.train, cfg.train.batch_size,
                                               s_cfg.block_size)
    stages = plan_lib.build_stages(d, s_cfg.n_layer, t_cfg.n_layer, steps_per_epoch)
    mapping = ([st.teacher_layer for st in stages if st.kind == "block"]
               if d.block_stages else None)
    return Setup(cfg, get_model(config=t_cfg), t_params, get_model(config=s_cfg), tokenizer,
                 data, mesh, stages, mapping)


# ------------------------------------------------------------------------------ the loop

def _stage_info(stage, first_loss, final_loss) -> dict:
    return {"name": stage.name, "steps": stage.steps, "first_loss": first_loss,
            "final_loss": final_loss}


def run_stage(s: Setup, stage, tree, *, workdir, step_offset, writer, stop: threading.Event,
              progress: bool = True, profiler: StepProfiler | None = None,
              evaluate_student=None):
    """Train one stage from `tree` (or from the stage's newest checkpoint); returns
    (tree, info). Saves every distill.checkpoint_every steps, at the end, and on `stop`;
    writes evaluate_student(student params) every distill.eval_every global steps."""
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
    separator = data_lib.document_separator_id(cfg.data, s.tokenizer)
    ckpt = records.stage_checkpointer(workdir, stage.name)
    batches = None
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
            writer.flush()  # the records this checkpoint keeps on a resume are in the workdir
            ckpt.save(step, params=stage_step.join(trainable, frozen), opt_state=opt_state,
                      meta={"stage": stage.name, "global_step": step_offset + step,
                            "data_seed": seed, "first_loss": first_loss, "loss": last_loss})

        dropout_key = train_step.dropout_key(jax.random.key(seed))
        bar = loop.progress_bar(stage.steps, start, desc=stage.name, enabled=progress,
                                leave=False)
        lag = loop.LaggedMetrics()
        speed = metrics_lib.Throughput(_stage_flops_per_token(s, stage, trainable),
                                       peak_flops_per_device=cfg.train.peak_flops)
        tokens_per_step = cfg.train.batch_size * s.student.config.block_size
        timer = {}  # 'compile_s' (the first step), 'clock' and 'step' of the timed window

        def log(fetched):
            nonlocal first_loss, last_loss
            for step, m in fetched:
                first_loss = m["loss"] if first_loss is None else first_loss
                last_loss = m["loss"]
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if step % d.log_every == 0 or step == stage.steps:
                    now = time.perf_counter()
                    record = {"stage": stage.name, "stage_step": step, "distill_loss": m["loss"],
                              "grad_norm": m["grad_norm"],
                              "lr": float(compiled.schedule(step - 1)),
                              **speed.record(steps=step - timer["step"],
                                             seconds=now - timer["clock"],
                                             tokens_per_step=tokens_per_step)}
                    if "compile_s" in timer:
                        record["compile_s"] = timer.pop("compile_s")
                    writer.write(step_offset + step, record)
                    loop.log_progress(bar, step, stage.steps, record, desc=stage.name)
                    timer.update(clock=time.perf_counter(), step=step)

        def make_batch(step):  # (on the devices, data.prefetch steps ahead)
            return sharding.global_batch(data_lib.with_segment_ids(data_lib.batch_for_step(
                s.data.train, seed=seed, step=step_offset + step,
                global_batch_size=cfg.train.batch_size, block_size=s.student.config.block_size,
                process_index=jax.process_index(), process_count=jax.process_count()),
                separator), s.mesh)

        batches = data_lib.Prefetcher(make_batch, start=start, stop=stage.steps,
                                      depth=cfg.data.prefetch)
        for step in range(start, stage.steps):
            g = step_offset + step
            t0 = time.perf_counter()
            with profiler.annotate(g + 1) if profiler else contextlib.nullcontext():
                trainable, opt_state, metrics = compiled.step(
                    trainable, opt_state, frozen, s.teacher_params, batches.get(step),
                    jax.random.fold_in(dropout_key, g))
            done = step + 1
            if profiler:
                profiler.stop_after(g + 1, metrics)
            if not timer:  # the first step compiles (or loads) the stage's program: not timed
                jax.block_until_ready(metrics)
                timer.update(compile_s=time.perf_counter() - t0, clock=time.perf_counter(),
                             step=done)
            log(lag.push(done, metrics))  # the previous step's: the device keeps working
            if evaluate_student and d.eval_every and (g + 1) % d.eval_every == 0:
                log(lag.flush())
                val = evaluate_student(stage_step.join(trainable, frozen)["student"])
                writer.write(g + 1, {"stage": stage.name, "val_loss": val["val_loss"],
                                     "val_ppl": val["val_ppl"]})
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
        if batches is not None:
            batches.close()
        ckpt.close()
    return stage_step.join(trainable, frozen), _stage_info(stage, first_loss, last_loss)


def _stage_flops_per_token(s: Setup, stage, trainable) -> float:
    """`metrics.distill_flops_per_token` of a stage: forward and backward of its trainable
    leaves (and of the student blocks among them), plus the teacher's forward (up to the
    stage's teacher layer for a block stage, the whole model for the logit stages)."""
    layers = {p[1] for p in trainable if p[0] == "student" and str(p[1]).startswith("h_")}
    t_layers = s.teacher.config.n_layer
    if stage.kind == "block":
        t_layers = stage.teacher_layer
        t_params = sum(metrics_lib.param_count(s.teacher_params[f"h_{i}"])
                       for i in range(t_layers) if f"h_{i}" in s.teacher_params)
    else:
        t_params = metrics_lib.lm_param_count(s.teacher_params)
    return metrics_lib.distill_flops_per_token(
        metrics_lib.param_count(trainable), len(layers), s.student.config, t_params, t_layers,
        s.teacher.config)


def completed_tree(s: Setup, workdir, name):
    """The {'student', 'stitch'} tree a completed stage ended with."""
    template = jax.eval_shape(lambda: init_tree(s, 0))  # traces only
    c = records.stage_checkpointer(workdir, name, read_only=True)
    try:
        return c.restore(params=sharding.abstract_state(template, s.mesh)).params
    finally:
        c.close()


def val_evaluator(model, params_like, tokens, cfg, mesh, separator=None):
    """params -> {'val_loss', 'val_ppl', 'val_tokens'}: the token-weighted LM validation loss
    of `model` on the first distill.eval_steps batches of `tokens`, compiled once per process
    for `model` with params laid out like `params_like`; None without data or eval_steps.
    separator: the document separator when data.document_mask is on (segment ids)."""
    n = cfg.distill.eval_steps
    if tokens is None or not n:
        return None
    shardings = sharding.state_shardings(params_like, mesh)
    step = _eval_step(model, mesh, jax.tree.structure(shardings),
                      tuple(jax.tree.leaves(shardings)))
    batches = data_lib.eval_batches(
        tokens, global_batch_size=cfg.train.batch_size, block_size=model.config.block_size,
        num_batches=n, process_index=jax.process_index(), process_count=jax.process_count())
    batches = [data_lib.with_segment_ids(b, separator) for b in batches]
    return lambda params: train_step.evaluate(step, stage_step.place(params, mesh), batches,
                                              mesh)


@functools.lru_cache(maxsize=16)
def _eval_step(model, mesh, shardings_treedef, shardings_leaves):
    """The jitted LM evaluation step of `model` (modules and meshes hash by value): one per
    model and layout, whichever run asks (its teacher, its student, every stage's eval_every)."""
    shardings = jax.tree.unflatten(shardings_treedef, shardings_leaves)
    return train_step.make_eval_step(train_step.lm_strategy(model), mesh=mesh,
                                     params_shardings=shardings)


def val_loss(model, params, tokens, cfg, mesh, separator=None) -> dict | None:
    """`val_evaluator` of `model` applied once to `params`."""
    evaluate = val_evaluator(model, params, tokens, cfg, mesh, separator)
    return None if evaluate is None else evaluate(params)


def run(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Run (or resume) every stage, then write the final student. Returns a summary:
    {'stages': [{'name', 'steps', 'first_loss', 'final_loss'}], 'layer_map',
     'teacher_val', 'student_val', 'workdir'}."""
    workdir_lib.check_kind(workdir, "distill", source=cfg.distill.teacher)
    sharding.initialize_distributed(cfg.train)
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # a private, resolved copy
    s = setup(cfg)
    workdir = storage.absolute(workdir)
    done = records.read_manifest(workdir)
    records.check_plan(s, workdir, done)
    names = [st.name for st in s.stages]
    tree = (completed_tree(s, workdir, done[-1]["name"]) if done
            else init_tree(s, int(cfg.train.seed)))
    offset = sum(st.steps for st in s.stages[:len(done)])
    remaining = s.stages[len(done):]
    mid = 0
    if remaining:
        c = records.stage_checkpointer(workdir, remaining[0].name)
        mid = c.latest_step() or 0
        c.close()
    if done and jax.process_index() == 0:
        print(f"Completed stages {[m['name'] for m in done]}; continuing with "
              f"{remaining[0].name if remaining else 'the final student'}", flush=True)
    writer = loop.MetricWriter(workdir, resume_step=offset + mid, loggers=cfg.train.loggers,
                               config=cfg, wandb_project=cfg.train.wandb_project)
    stop = threading.Event()
    profiler = StepProfiler(cfg.distill.profile_steps, workdir, name="distill",
                            key="distill.profile_steps")
    separator = data_lib.document_separator_id(cfg.data, s.tokenizer)
    evaluate_student = (val_evaluator(s.student, tree["student"], s.data.val, cfg, s.mesh,
                                      separator) if cfg.distill.eval_every else None)
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
                    c = records.stage_checkpointer(workdir, stage.name)
                    fresh = c.latest_step() is None
                    c.close()
                    if fresh:
                        tree = init_head_from_teacher(s, tree)
                tree, info = run_stage(s, stage, tree, workdir=workdir, step_offset=offset,
                                       writer=writer, stop=stop, progress=progress,
                                       profiler=profiler, evaluate_student=evaluate_student)
                offset += stage.steps
                done.append(info)
                records.write_manifest(workdir, done)
                logging.info("stage %s done: %s", stage.name, info)
        writer.flush()  # as before every checkpoint save (this one the final student)
        records.write_student(s, tree, workdir, step=offset)
        student = sharding.to_host(tree["student"])
        summary = {"stages": done, "layer_map": s.layer_map, "workdir": workdir,
                   "teacher_val": val_loss(s.teacher, s.teacher_params, s.data.val, cfg,
                                           s.mesh, separator),
                   "student_val": val_loss(s.student, student, s.data.val, cfg, s.mesh,
                                           separator)}
        if summary["student_val"] is not None and not records.student_logged(workdir):
            writer.write(offset, {"stage": "student", **summary["student_val"],
                                  "teacher_val_ppl": summary["teacher_val"]["val_ppl"]})
    finally:
        profiler.close()
        writer.close()
    if cfg.train.curves:
        plot.write_curves(workdir)  # WORKDIR/curves.png (process 0)
    return summary



