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
directory and renames it when complete, so an interrupted save never shows up as a step.

Checksums: once a step's files are complete (in Orbax's finalisation, before the rename that
makes the step visible), `checksums.json` in the step directory records the size and SHA-256
of every file of its items. A restore verifies the files of the items it reads first, so
flipped, truncated or deleted bytes are caught before Orbax parses them. A step that fails
its checksums or cannot be read (files lost or damaged) is reported by `restore_latest`, moved
aside to `<directory>_unreadable/<step>` (nothing is deleted) and the previous step used. A
step without `checksums.json` (written before it existed) is restored unverified.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging as py_logging
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cleangpt_jax import storage

ITEMS = ("params", "opt_state", "meta")
CHECKSUMS_FILE = "checksums.json"
HASH_CHUNK_BYTES = 8 << 20


class _DropReadOnlyNotice(py_logging.Filter):
    """Orbax warns 'Given directory is read only' whenever a manager is opened read-only, which
    is how every reader here opens a run: not news to the user."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


py_logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


def _is_abandoned_read(exc_type, exc, tb, obj=None) -> bool:
    """An error of a read that a failed restore left behind: an Orbax coroutine finalised with
    its array's read error, or TensorStore calling back into the closed event loop."""
    code = getattr(obj, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return True
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and "asyncio" in tb.tb_frame.f_code.co_filename
    return False


def _silence_abandoned_reads() -> None:
    """When a restore fails, the reads it started still land, each printing a traceback
    (hundreds for a large tree) around the one-line message that matters: drop those, and only
    those, from sys.unraisablehook and sys.excepthook. Installed once, by the first restore."""
    if getattr(sys.unraisablehook, "_cleangpt_filter", False):
        return
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def unraisable_filter(u):
        if not _is_abandoned_read(u.exc_type, u.exc_value, u.exc_traceback, u.object):
            unraisable(u)

    def excepthook_filter(exc_type, exc, tb):
        if not _is_abandoned_read(exc_type, exc, tb):
            excepthook(exc_type, exc, tb)

    unraisable_filter._cleangpt_filter = True
    sys.unraisablehook, sys.excepthook = unraisable_filter, excepthook_filter


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
        self.directory = storage.absolute(directory)  # (a URL: Orbax writes it natively)
        self.read_only = read_only
        self._max_to_keep = max_to_keep
        self._async = async_save
        self._saving_step: int | None = None  # the step whose save is in flight
        self._manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        async_options = (ocp.AsyncOptions(post_finalization_callback=self._write_checksums)
                         if self._async and not self.read_only else None)
        options = ocp.CheckpointManagerOptions(  # (read-only: what Orbax would force anyway)
            max_to_keep=None if self.read_only else self._max_to_keep,
            save_interval_steps=0 if self.read_only else 1, create=not self.read_only,
            read_only=self.read_only, enable_async_checkpointing=self._async,
            async_options=async_options)
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
        self._manager.wait_until_finished()  # (Orbax would wait too: one save in flight)
        self._saving_step = int(step)
        saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        if saved and not self._async:  # (async: Orbax's finalisation calls _write_checksums)
            self._write_checksums()
        return saved

    def _write_checksums(self) -> None:
        """Record the checksums of the step just written (process 0; its files are complete).
        Async saves run this inside Orbax's finalisation, before the step becomes visible."""
        step, self._saving_step = self._saving_step, None
        if step is None or jax.process_index() != 0:
            return
        temporary = f"{step}{ocp.path.step.TMP_DIR_SUFFIX}"  # (Orbax's name before the rename)
        pending = sorted(n for n in storage.listdir(self.directory) if n.startswith(temporary))
        write_checksums(storage.join(self.directory, pending[-1] if pending else str(step)))

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
        wanted = {"params": params} if opt_state is None else {"params": params,
                                                                 "opt_state": opt_state}
        self._verify(step, (*wanted, "meta"), where)
        try:
            stored = self._manager.item_metadata(int(step))
        except Exception as e:
            raise CheckpointError(f"{where} is unreadable ({_first_line(e)})"
                                  f"{self._other_steps_hint(step)}") from e
        for name, target in wanted.items():
            if stored.get(name) is None:
                what = ("has no optimizer state (a params-only checkpoint)"
                        if name == "opt_state" and stored.get("params") is not None
                        else f"is incomplete (no '{name}' item)")
                raise CheckpointError(f"{where} {what}")
            _check_fits(getattr(stored[name], "tree", stored[name]), target, name, where)

        _silence_abandoned_reads()  # (a failing read's siblings report before it returns)
        items = {"params": ocp.args.StandardRestore(params), "meta": ocp.args.JsonRestore()}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_state)
        try:
            out = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
            raise CheckpointError(f"{where} is unreadable ({_first_line(e)})"
                                  f"{self._other_steps_hint(step)}") from e
        return Restored(step=int(step), params=out["params"],
                        opt_state=out["opt_state"] if opt_state is not None else None,
                        meta=dict(out["meta"] or {}))

    def _verify(self, step: int, items, where: str) -> None:
        """Compare the files of `items` with the step's checksums (process 0 reads them; every
        process gets the verdict); a CheckpointError naming the first bad file."""
        problem = ""
        if jax.process_index() == 0:
            problem = checksum_problem(storage.join(self.directory, str(step)), items)
        if jax.process_count() > 1:
            bad = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
            problem = problem or ("fails its checksums (see process 0)" if bad else "")
        if problem:
            raise CheckpointError(f"{where} {problem}{self._other_steps_hint(step)}")

    def _other_steps_hint(self, step: int) -> str:
        """For a reader (which never moves a bad step aside): the steps it could use instead."""
        others = [s for s in self.all_steps() if s != step]
        return (f"; other steps {others} can be chosen with --step" if self.read_only and others
                else "")

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
                        f"{storage.join(self.directory, str(step))} away to start afresh") from e
                if jax.process_index() == 0:
                    print(f"warning: {e}; moved to {self._quarantine_dir(step)}, using step "
                          f"{earlier[-1]} instead", file=sys.stderr, flush=True)
                self._quarantine(step)

    def _quarantine_dir(self, step: int) -> str:
        return storage.join(self.directory + "_unreadable", str(step))

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            dest = self._quarantine_dir(step)
            if storage.exists(dest):
                dest = f"{dest}.{len(storage.listdir(storage.parent(dest)))}"
            storage.makedirs(storage.parent(dest))
            storage.move(storage.join(self.directory, str(step)), dest)
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


def _file_digest(path: str) -> dict:
    """{size, sha256} of a file, read in chunks of HASH_CHUNK_BYTES (never whole in memory)."""
    sha, size = hashlib.sha256(), 0
    with storage.open_file(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def _files_under(root: str, relative: str) -> list[str]:
    """The files below root / relative, as paths relative to root ('/'-separated)."""
    path = _under(root, relative)
    if not storage.isdir(path):
        return [relative]
    return [f"{relative}/{name}" for name in storage.walk_files(path)]


def _under(root: str, relative: str) -> str:
    """The path of `relative` ('/'-separated) below `root`."""
    return storage.join(root, *relative.split("/"))


def _digests(step_dir: str, names: list[str]) -> dict[str, dict]:
    """{relative path: {size, sha256}} of `names` under step_dir, hashed on a few threads
    (hashlib releases the GIL, so files hash in parallel)."""
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: _file_digest(_under(step_dir, n)), names)))


def write_checksums(step_dir) -> None:
    """Write `checksums.json` into a complete step directory: the size and SHA-256 of every file
    of its items (the files Orbax writes around them, like _CHECKPOINT_METADATA, are left
    out: Orbax may still update them)."""
    step_dir = os.fspath(step_dir)
    names = sorted(name for item in ITEMS if storage.exists(_under(step_dir, item))
                   for name in _files_under(step_dir, item))
    record = {"algorithm": "sha256", "files": _digests(step_dir, names)}
    # (in one step: a local rename, or one upload to an object store, which has no rename)
    storage.write_text(_under(step_dir, CHECKSUMS_FILE),
                       json.dumps(record, indent=1, sort_keys=True))


def checksum_problem(step_dir, items) -> str:
    """'' when the files of `items` match the step's checksums.json (or there is none: a step
    written before checksums existed); else what is wrong with the first bad file."""
    step_dir = os.fspath(step_dir)
    record_file = _under(step_dir, CHECKSUMS_FILE)
    if not storage.exists(record_file):
        return ""
    try:
        expected = json.loads(storage.read_text(record_file))["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"has an unreadable {CHECKSUMS_FILE} ({type(e).__name__})"
    # (an item missing as a whole is left to `restore`, which names what the step lacks)
    names = sorted(n for n in expected if n.split("/")[0] in items
                   and storage.exists(_under(step_dir, n.split("/")[0])))
    missing = [n for n in names if not storage.exists(_under(step_dir, n))]
    if missing:
        return f"fails its checksums: {missing[0]} is missing"
    actual = _digests(step_dir, names)
    for name in names:
        if actual[name] != expected[name]:
            what = ("size" if actual[name]["size"] != expected[name]["size"] else "content")
            return f"fails its checksums: {name} has changed ({what})"
    return ""


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
