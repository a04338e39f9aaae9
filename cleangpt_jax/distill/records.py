"""What a distillation run leaves on disk and reads back when it resumes.

    WORKDIR/config.json, tokenizer/, checkpoints/   the final student, a normal model workdir
                                                     (generate / evaluate --workdir take it)
    WORKDIR/hf/                                      Vanilla students in Hugging Face format
    WORKDIR/stitching/                               the trained stitching layers (Orbax)
    WORKDIR/stages/plan.json                         the run's settings, checked on resume
    WORKDIR/stages/<stage>/                          Orbax steps of one stage: params =
                                                     {'student', 'stitch'}, opt_state, meta
    WORKDIR/stages/manifest.json                     the stages completed so far
    WORKDIR/metrics.jsonl, events.out.*              one record per log event, with `stage`

WORKDIR may be a URL (gs://...): every path here goes through cleangpt_jax.storage.

`distill.runner` runs the stages; the functions here take its `Setup` (`s`) where they need
the run's models, config and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cleangpt_jax import checkpoint as ckpt_lib
from cleangpt_jax import hf, sharding, storage
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ConfigError
from cleangpt_jax.distill import plan as plan_lib

MANIFEST = "manifest.json"
PLAN_FILE = "plan.json"
STITCHING_DIR = "stitching"
HF_DIR = "hf"
# Settings that may change between a run and its resumption without changing any result.
_RESUMABLE_KEYS = {"distill": ("log_every", "checkpoint_every", "eval_steps"),
                   "data": ("cache_dir", "num_proc", "cache_wait_seconds", "prefetch")}
# Settings of single stages (recorded per stage in the plan instead).
_STAGE_KEYS = ("steps_per_block", "epochs_per_block", "learning_rate", "weight_decay",
               "grad_clip", "head", "final")


def stages_dir(workdir: str) -> str:
    return storage.join(workdir, workdir_lib.DISTILL_STAGES_DIR)


def read_manifest(workdir: str) -> list[dict]:
    """The completed stages, in order: [{'name', 'steps', 'first_loss', 'final_loss'}]."""
    path = storage.join(stages_dir(workdir), MANIFEST)
    if not storage.exists(path):
        return []
    return json.loads(storage.read_text(path))["completed"]


def _write_json(path: str, obj) -> None:
    if jax.process_index() != 0:
        return
    storage.makedirs(storage.parent(path))
    workdir_lib.write_json(path, obj)


def write_manifest(workdir: str, completed: list[dict]) -> None:
    _write_json(storage.join(stages_dir(workdir), MANIFEST), {"completed": completed})


def stage_checkpointer(workdir, stage_name, *, read_only: bool = False) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(storage.join(stages_dir(workdir), stage_name), max_to_keep=2,
                                 async_save=False, read_only=read_only)


def _plan_record(s) -> dict:
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


def check_plan(s, workdir: str, done: list[dict]) -> None:
    """Record the run's settings; on a rerun refuse settings that would change what the
    completed stages computed. Stages not completed yet may change (e.g. a lower learning
    rate after a NaN stop)."""
    path = storage.join(stages_dir(workdir), PLAN_FILE)
    now = _plan_record(s)
    n = len(done)
    names = [st["name"] for st in now["stages"]]
    if names[:n] != [m["name"] for m in done]:
        raise ConfigError(f"{workdir} lists completed stages {[m['name'] for m in done]} that "
                          f"are not this plan's {names}: use a new --workdir")
    if storage.exists(path):
        before = json.loads(storage.read_text(path))
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
    directory = storage.join(workdir, STITCHING_DIR)
    if not storage.isdir(directory):
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


def student_logged(workdir: str) -> bool:
    """Whether metrics.jsonl already holds the final student's record (a rerun of a finished
    run, which must not append it twice)."""
    return (storage.exists(storage.join(workdir, workdir_lib.METRICS_FILE))
            and any(r.get("stage") == "student" for r in workdir_lib.read_metrics(workdir)))


def student_run_config(s, workdir: str) -> ml_collections.ConfigDict:
    """The final student's config.json: the run's config with the resolved student model,
    the layer map as a list, the teacher's depth and the saved tokenizer."""
    cfg = ml_collections.ConfigDict(s.config.to_dict(), type_safe=False)
    cfg.model = ml_collections.ConfigDict(s.student.config.to_dict())
    teacher = cfg.distill.teacher
    cfg.distill.teacher = storage.absolute(teacher) if storage.isdir(teacher) else teacher
    cfg.distill.layer_map = None if s.layer_map is None else list(s.layer_map)
    cfg.distill.teacher_n_layer = s.teacher.config.n_layer
    cfg.tokenizer.type = s.tokenizer.tokenizer_type
    cfg.tokenizer.name_or_path = storage.join(workdir, workdir_lib.TOKENIZER_DIR)
    return cfg


def write_student(s, tree, workdir: str, step: int) -> None:
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
        c = ckpt_lib.Checkpointer(storage.join(workdir, STITCHING_DIR), async_save=False)
        shapes = jax.tree.map(lambda x: list(np.shape(x)), tree["stitch"])
        c.save(0, params=tree["stitch"], meta={"shapes": shapes})  # no-op when present
        c.close()
    c = s.student.config
    out = storage.join(workdir, HF_DIR)
    complete = all(storage.isfile(storage.join(out, f))
                   for f in (hf.CONFIG_FILE, hf.SAFETENSORS_FILE))
    if c.model_type == "vanilla" and c.position_encoding == "learned" and not complete:
        hf.export_gpt2(c, params, out, tokenizer=s.tokenizer, overwrite=True)
