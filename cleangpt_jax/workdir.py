"""Run directories: what a training run leaves on disk and how other tools load it.

    WORKDIR/config.json      the resolved ConfigDict (model.vocab_size filled in)
    WORKDIR/kind.txt         the kind of run: train, distill or import (`run_kind`)
    WORKDIR/tokenizer/       tokenizer.save_pretrained
    WORKDIR/checkpoints/     Orbax steps with items params / opt_state / meta (checkpoint.py)
    WORKDIR/metrics.jsonl    one JSON object per log or eval event (loop.MetricWriter)
    WORKDIR/events.out.*     TensorBoard scalars (same numbers as metrics.jsonl)
    WORKDIR/samples/         step_<N>.txt sample generations

    run = load_run(workdir)            # config, model_config, model, tokenizer, params, step
    write_model_workdir(workdir, config, tokenizer, params)   # export a trained model
    check_kind(workdir, "train")       # refuse a file or another kind of run before writing

WORKDIR may be a URL (gs://bucket/run, any fsspec filesystem): every file here goes through
cleangpt_jax.storage, Orbax writes the checkpoints there itself.

Only process 0 writes files; every process takes part in checkpoint saves and restores.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cleangpt_jax import sharding, storage
from cleangpt_jax.checkpoint import Checkpointer
from cleangpt_jax.config import ConfigError, ModelConfig, model_config

CONFIG_FILE = "config.json"
KIND_FILE = "kind.txt"
DISTILL_STAGES_DIR = "stages"  # a distillation's stage checkpoints (distill.records.stages_dir)
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


def is_writer() -> bool:
    return jax.process_index() == 0


# ------------------------------------------------------------------------------- config.json
def save_config(workdir: str, config: ml_collections.ConfigDict, kind: str = "train") -> str:
    """Write config.json atomically (process 0 only); returns its path. A workdir that records
    no kind yet is marked as `kind` (see `run_kind`); one that does keeps its own."""
    path = storage.join(workdir, CONFIG_FILE)
    if is_writer():
        storage.makedirs(workdir)
        if not storage.isfile(storage.join(workdir, KIND_FILE)):
            write_atomically(storage.join(workdir, KIND_FILE), f"{kind}\n")
        write_json(path, config.to_dict())
    return path


def write_atomically(path: str, text: str) -> None:
    """Replace `path` with `text` in one step (a reader sees the old file or the new one):
    `storage.write_text`."""
    storage.write_text(path, text)


def write_json(path: str, obj) -> None:
    """`obj` as indented, key-sorted JSON at `path`, atomically (`write_atomically`)."""
    write_atomically(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return str(x)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config.json; a missing, unreadable or wrongly shaped one (not an object whose
    model, tokenizer, data and train are objects) raises a ConfigError naming the file."""
    storage.check_reachable(workdir, "workdir")
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.isfile(path):
        if storage.exists(workdir) and not storage.isdir(workdir):
            raise ConfigError(f"workdir {workdir!r} is a file, not a directory: pass the "
                              "--workdir of a training run")
        if not storage.isdir(workdir):
            raise ConfigError(f"workdir {workdir!r} does not exist: pass the --workdir of a "
                              "training run")
        raise ConfigError(f"{workdir!r} has no {CONFIG_FILE}: it is not a training run's workdir "
                          "(train into it first)")
    try:
        config = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from e
    bad = [k for k in ("model", "tokenizer", "data", "train")
           if isinstance(config, dict) and not isinstance(config.get(k, {}), dict)]
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or bad:
        raise ConfigError(f"{path} is not a run's config (a JSON object whose model, tokenizer, "
                          f"data and train are objects): restore it or train into a new workdir")
    return ml_collections.ConfigDict(config)


def run_kind(workdir: str) -> str | None:
    """The kind of run `workdir` holds: 'train', 'distill' or 'import' as its kind.txt records
    it; for a run written before kind.txt existed, 'distill' when it has distillation stages,
    else 'train' when it has checkpoints/ or a run's config.json; None for anything else (a
    new or empty directory, an HF export)."""
    try:
        return storage.read_text(storage.join(workdir, KIND_FILE)).strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        pass
    if storage.isdir(storage.join(workdir, DISTILL_STAGES_DIR)):
        return "distill"
    if storage.isdir(storage.join(workdir, CHECKPOINT_DIR)):
        return "train"
    try:
        config = json.loads(storage.read_text(storage.join(workdir, CONFIG_FILE)))
    except (OSError, ValueError):
        return None
    return "train" if isinstance(config, dict) and "train" in config else None


def check_output_dir(path: str, what: str) -> None:
    """Refuse (ConfigError naming `what`, e.g. '--output_dir') a `path` that is a file or lies
    under one, or whose nearest existing directory (itself, or the parent it would be created
    in) is not writable, so that a tool fails before its work rather than when it writes.
    A URL: its filesystem must answer and its bucket exist (`storage.check_reachable`), and it
    must not be a file."""
    if storage.is_url(path):
        storage.check_reachable(path, what)
        if storage.isfile(path):
            raise ConfigError(f"{what} cannot be created: {path!r} is a file, not a directory: "
                              f"pass a directory")
        return
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{what} cannot be created: {path!r} is a file, not a directory: "
                          f"pass a directory")
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{what} cannot be written: the directory {path!r} is not writable: "
                          f"pass a writable directory or fix its permissions")


def check_kind(workdir: str, kind: str, *, source: str | None = None) -> None:
    """Refuse, before anything is written, a `workdir` a `kind` run ('train', 'distill') may not
    write into: a file, a workdir holding another kind of run (`run_kind`), or `source` itself
    (the run's input, e.g. a distillation's teacher)."""
    check_output_dir(workdir, "--workdir")
    if source is not None and _same_place(source, workdir):
        raise ConfigError(f"--workdir {workdir!r} is the {kind} run's own input {source!r}: "
                          f"writing there would replace it; pass a new --workdir")
    found = run_kind(workdir)
    if found not in (None, kind):
        raise ConfigError(f"{workdir!r} holds a {found} run, not a {kind} run: pass a new "
                          f"--workdir (a {kind} run never writes into another kind's)")


def _same_place(a: str, b: str) -> bool:
    if storage.is_url(a) or storage.is_url(b):
        return storage.absolute(a) == storage.absolute(b)
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


# Keys that choose how, not what, a model computes (every attention implementation, remat
# policy and loss chunking gives the same numbers): a run may change them between a save and
# its resumption.
HOW_NOT_WHAT_KEYS = ("attention", "remat", "loss_chunk_tokens")


def config_differences(old: Any, new: Any, sections=("model", "tokenizer")) -> list[str]:
    """'section.key: old -> new' for every differing key of the given sections (keys in
    `HOW_NOT_WHAT_KEYS` aside)."""
    old = old.to_dict() if hasattr(old, "to_dict") else dict(old)
    new = new.to_dict() if hasattr(new, "to_dict") else dict(new)
    out = []
    for sec in sections:
        a, b = dict(old.get(sec) or {}), dict(new.get(sec) or {})
        for k in sorted((set(a) | set(b)) - set(HOW_NOT_WHAT_KEYS)):
            va, vb = a.get(k), b.get(k)
            if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
                va, vb = list(va), list(vb)
            if va != vb:
                out.append(f"{sec}.{k}: {va!r} -> {vb!r}")
    return out


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_dir(workdir: str) -> str:
    return storage.join(storage.absolute(workdir), CHECKPOINT_DIR)


def open_checkpointer(workdir: str, **kwargs) -> Checkpointer:
    return Checkpointer(checkpoint_dir(workdir), **kwargs)


def param_shapes(model) -> Any:
    """The model's parameter tree as ShapeDtypeStructs (nothing is allocated)."""
    c = model.config
    ids = jnp.zeros((1, c.block_size), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    model_config: ModelConfig
    model: Any
    tokenizer: Any
    params: Any
    step: int


def load_run(workdir: str, step: int | None = None, *, mesh=None) -> Run:
    """Load a run's config, tokenizer and parameters (latest checkpoint unless `step`).

    Parameters land on the first local device, or laid out for `mesh`
    (`cleangpt_jax.sharding.create_mesh`) when given.
    """
    from cleangpt_jax.models import get_model
    from cleangpt_jax.tokenizers import load_tokenizer

    config = load_config(workdir)
    tok_dir = storage.join(workdir, TOKENIZER_DIR)
    if not storage.isdir(tok_dir):
        raise ConfigError(f"{workdir!r} has no {TOKENIZER_DIR}/ directory: the run did not finish "
                          "setting up; rerun training into it")
    ckdir = checkpoint_dir(workdir)
    if not storage.isdir(ckdir):
        raise ConfigError(f"{workdir!r} has no checkpoint yet: train until a checkpoint is written "
                          "(train.checkpoint_every), or pick another workdir")
    tokenizer = load_tokenizer(tok_dir)
    mcfg = model_config(config.model)
    model = get_model(config=mcfg)
    shapes = param_shapes(model)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                              shapes)
    else:
        target = sharding.abstract_state(shapes, mesh)
    ckpt = Checkpointer(ckdir, read_only=True)
    try:
        restored = ckpt.restore(step, params=target)
    finally:
        ckpt.close()
    return Run(config=config, model_config=mcfg, model=model, tokenizer=tokenizer,
               params=restored.params, step=restored.step)


def write_model_workdir(workdir: str, config, tokenizer, params, step: int = 0,
                        meta: dict | None = None, kind: str = "distill") -> str:
    """Write config.json, tokenizer/ and a params-only checkpoint at `step` into `workdir`,
    recorded as a `kind` run unless it records one already (a distillation's final student is
    a 'distill' run, `loading.import_to_workdir` writes 'import' ones).

    The result loads with `load_run` (generate, evaluate, distillation's teacher). Refuses to
    overwrite an existing checkpoint of the same step.
    """
    config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict")
                                       else dict(config))
    with config.unlocked():
        config.model.vocab_size = int(config.model.vocab_size or tokenizer.vocab_size)
    model_config(config.model)  # validate before writing anything
    save_config(workdir, config, kind)
    if is_writer():
        save_tokenizer(tokenizer, workdir)
    ckpt = open_checkpointer(workdir, async_save=False)
    try:
        if step in ckpt.all_steps():
            raise ConfigError(f"{checkpoint_dir(workdir)} already has step {step}: write into a "
                              "new workdir")
        ckpt.save(step, params=params, meta=dict(meta or {}, step=int(step)))
    finally:
        ckpt.close()
    return workdir


def save_tokenizer(tokenizer, workdir: str) -> str:
    """tokenizer.save_pretrained into WORKDIR/tokenizer/ (on a URL: saved locally, then each
    file uploaded); returns that directory."""
    directory = storage.join(workdir, TOKENIZER_DIR)
    if not storage.is_url(directory):
        tokenizer.save_pretrained(directory)
        return directory
    local = storage.scratch_dir("tokenizer-")
    tokenizer.save_pretrained(local)
    storage.upload_dir(local, directory)
    return directory


# --------------------------------------------------------------------------------- metrics
def read_metrics(workdir: str) -> list[dict]:
    text = storage.read_text(storage.join(workdir, METRICS_FILE))
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
