"""The one checkpoint module: an Orbax CheckpointManager with items `params`, `opt_state`, `meta`.

    ckpt = Checkpointer(workdir + "/checkpoints")
    ckpt.save(step, params=params, opt_state=opt_state, meta={"step": step, ...})
    restored = ckpt.restore(params=abstract_params, opt_state=abstract_opt_state)  # latest
    restored.params, restored.opt_state, restored.meta, restored.step

Each step directory is an Orbax Composite: `params` and `opt_state` are PyTrees written with
StandardSave, `meta` is JSON (step, data position, best validation loss, ...). A params-only
checkpoint (`opt_state=None`, what `write_model_workdir` and distillation's final student write)
simply lacks the `opt_state` item.

Restores go into an *abstract* target: ShapeDtypeStructs carrying the shardings wanted now
(`cleangpt_jax.sharding.abstract_state`), so a checkpoint written on 1 device restores onto 8
(or onto a different fsdp layout) and vice versa. Orbax writes each step into a temporary
directory and renames it when complete, so an interrupted save never shows up as a step; a
step that is present but unreadable (files lost or damaged) is reported by `restore_latest`,
moved aside to `<directory>_unreadable/<step>` (nothing is deleted) and the previous step used.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

ITEMS = ("params", "opt_state", "meta")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any  # None for a params-only restore
    meta: dict


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].split(" See full TensorStore details")[0] if text else ""
    return f"{type(e).__name__}: {first}"[:300]


class Checkpointer:
    """Save and restore train state in `directory` (created on first save). `max_to_keep`:
    the newest steps kept (None: all; training passes train.max_checkpoints_to_keep)."""

    def __init__(self, directory: str, *, max_to_keep: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only = read_only
        self._max_to_keep = max_to_keep
        self._async = async_save
        self._manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(  # (read-only: what Orbax would force anyway)
            max_to_keep=None if self.read_only else self._max_to_keep,
            save_interval_steps=0 if self.read_only else 1, create=not self.read_only,
            read_only=self.read_only, enable_async_checkpointing=self._async)
        handlers = {"params": ocp.StandardCheckpointHandler(),
                    "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ----------------------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------------------- save
    def save(self, step: int, *, params, opt_state=None, meta: dict | None = None,
             force: bool = True) -> bool:
        """Write step `step` (asynchronously; `wait()` or `close()` to block). Every process
        must call this. Returns False when the step already exists."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        if step in self._manager.all_steps():
            return False
        items = {"params": ocp.args.StandardSave(params),
                 "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ---------------------------------------------------------------------------- restore
    def restore(self, step: int | None = None, *, params, opt_state=None) -> Restored:
        """Restore `step` (default: latest) into the abstract targets.

        `params` / `opt_state` are trees of jax.ShapeDtypeStruct with shardings; pass
        opt_state=None to restore parameters only (works on params-only checkpoints too).
        """
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}: train first, or "
                                      f"point --workdir at a run that has saved one")
        elif step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}: "
                                  f"available steps are {self.all_steps()}")
        where = f"checkpoint step {step} in {self.directory}"
        try:
            stored = self._manager.item_metadata(int(step))
        except Exception as e:
            raise CheckpointError(f"{where} is unreadable ({_first_line(e)})") from e
        wanted = {"params": params} if opt_state is None else {"params": params,
                                                                 "opt_state": opt_state}
        for name, target in wanted.items():
            if stored.get(name) is None:
                what = ("has no optimizer state (a params-only checkpoint)"
                        if name == "opt_state" and stored.get("params") is not None
                        else f"is incomplete (no '{name}' item)")
                raise CheckpointError(f"{where} {what}")
            _check_fits(getattr(stored[name], "tree", stored[name]), target, name, where)

        items = {"params": ocp.args.StandardRestore(params), "meta": ocp.args.JsonRestore()}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_state)
        try:
            out = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
            raise CheckpointError(f"{where} is unreadable ({_first_line(e)})") from e
        return Restored(step=int(step), params=out["params"],
                        opt_state=out["opt_state"] if opt_state is not None else None,
                        meta=dict(out["meta"] or {}))

    def restore_latest(self, *, params, opt_state=None) -> Restored | None:
        """The newest readable step, or None when there is no checkpoint at all.

        An unreadable newest step is reported, moved to `<directory>_unreadable/<step>` (so a
        resumed run can write that step again) and the previous step is tried.
        """
        while True:
            step = self.latest_step()
            if step is None:
                return None
            try:
                return self.restore(step, params=params, opt_state=opt_state)
            except ModelMismatchError:
                raise
            except CheckpointError as e:
                if self.read_only:
                    raise
                earlier = [s for s in self.all_steps() if s < step]
                if not earlier:
                    raise CheckpointError(
                        f"{e}; there is no earlier checkpoint to fall back to: move "
                        f"{os.path.join(self.directory, str(step))} away to start afresh") from e
                if jax.process_index() == 0:
                    print(f"warning: {e}; moved to {self._quarantine_dir(step)}, using step "
                          f"{earlier[-1]} instead", file=sys.stderr, flush=True)
                self._quarantine(step)

    def _quarantine_dir(self, step: int) -> str:
        return os.path.join(self.directory + "_unreadable", str(step))

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            dest = self._quarantine_dir(step)
            if os.path.exists(dest):
                dest = f"{dest}.{len(os.listdir(os.path.dirname(dest)))}"
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        self._manager.reload()  # forget the moved step (no close: reads may still be landing)

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON meta of a step (latest by default) without touching the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        out = self._manager.restore(int(step), args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})


def path_str(path) -> str:
    """'h_0/attn/c_attn/kernel' for a jax key path (dict keys, attributes and indices alike, so
    a namedtuple field and the dict Orbax stores it as compare equal)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


class ModelMismatchError(CheckpointError):
    """The checkpoint holds a different architecture than the one asked for."""


def _check_fits(stored, target, name: str, where: str) -> None:
    """Same tree paths and shapes, or a ModelMismatchError naming the first differences."""
    flat = lambda tree: {path_str(p): tuple(getattr(x, "shape", ()))  # noqa: E731
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, want = flat(stored), flat(target)
    problems = [f"{k} missing" for k in want if k not in have]
    problems += [f"{k} unexpected" for k in have if k not in want]
    problems += [f"{k} {have[k]} vs {want[k]}" for k in want
                 if k in have and have[k] != want[k]]
    if problems:
        raise ModelMismatchError(
            f"{where} does not fit this model's {name} (checkpoint vs model: "
            f"{'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}): "
            f"use the config the run was trained with")
