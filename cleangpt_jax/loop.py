"""What every training loop here shares: training (`trainer.train_and_evaluate`) and each
distillation stage (`distill.runner.run_stage`).

    stop = threading.Event()
    with stop_on_signals(stop):                    # SIGTERM / Ctrl-C set `stop`
        lag = LaggedMetrics()
        for step in range(start, num_steps):
            state, metrics = train_step(state, batch)           # metrics stay on the device
            for done, host in lag.push(step + 1, metrics):      # the previous step's numbers
                writer.write(done, host)                        # raise NonFiniteError on NaN
            if agree_to_stop(stop):                             # every process answers alike
                break

Lagged fetch: reading step s's loss waits for step s to finish, so the loop fetches step s - 1's
metrics after dispatching step s and the device never idles. `flush()` fetches the rest (before
every save, so a non-finite state is never written). Each step's metrics carry `param_norm`, the
global norm of the parameters the step produced: a diverged update shows there one step before
the loss sees it, and the state it produced is never saved.

Exit status: a tool whose run a signal stopped (after saving) exits 128 + the signal's number,
as a shell reports a process the signal killed: 143 for SIGTERM, 130 for Ctrl-C (`exit_status`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time

import jax
import numpy as np

from cleangpt_jax import storage
from cleangpt_jax.workdir import METRICS_FILE, is_writer, write_atomically

TENSORBOARD_PREFIX = "events.out.tfevents"  # the events files tensorboardX writes
# Logged once per process (metrics.jsonl and the log line), not a curve: kept out of TensorBoard.
ONCE_KEYS = ("compile_s",)


# ---------------------------------------------------------------------------- metrics
class NonFiniteError(ValueError):
    """A step's loss or gradient norm is NaN or infinite (`step`, and `what`: 'loss is nan').

    The loop raises it with a bare message; training and distillation re-raise it through
    `stopped`, whose message says where it happened, what was kept and what to change."""

    def __init__(self, step: int, what: str, message: str | None = None):
        super().__init__(message or f"step {step}: {what}")
        self.step, self.what = step, what

    def stopped(self, where: str, kept: str, fix: str) -> "NonFiniteError":
        """The same stop, as one line: '<where>: <what> at step <step>; stopped, <kept>. <fix>'."""
        return NonFiniteError(self.step, self.what, f"{where}: {self.what} at step {self.step}; "
                                                    f"stopped, {kept}. {fix}")


def fetch_finite(step: int, metrics: dict) -> dict[str, float]:
    """The step's metrics as Python floats; NonFiniteError when `loss`, `grad_norm` or
    `param_norm` is not finite. The loss belongs to the parameters before the update, so an
    infinite gradient or a diverged update leaves it finite; `param_norm` (the norm of the
    parameters the step produced) catches both before they are saved or called good."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for key, name in (("loss", "loss"), ("grad_norm", "gradient norm"),
                      ("param_norm", "parameter norm")):
        if not math.isfinite(host[key]):
            raise NonFiniteError(step, f"{name} is {host[key]}")
    return host


class LaggedMetrics:
    """On-device metrics of the newest steps, fetched (and checked) one step late."""

    def __init__(self):
        self._pending: list[tuple[int, dict]] = []

    def push(self, step: int, metrics: dict) -> list[tuple[int, dict[str, float]]]:
        """Hold `step`'s metrics; return [(step, host metrics)] of the older ones."""
        self._pending.append((step, metrics))
        return self._fetch(keep=1)

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """Fetch everything held, newest step included."""
        return self._fetch(keep=0)

    def _fetch(self, keep: int):
        out = []
        while len(self._pending) > keep:
            step, metrics = self._pending.pop(0)
            out.append((step, fetch_finite(step, metrics)))
        return out


# ------------------------------------------------------------------------ stopping
@contextlib.contextmanager
def stop_on_signals(event: threading.Event):
    """SIGTERM / SIGINT set `event` (the loop then saves and returns) instead of killing the
    process, and record the signal's number (`received_signal`); a second Ctrl-C raises
    KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        event.signum = signum
        event.set()
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint and stopping "
              f"(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def received_signal(event: threading.Event) -> int | None:
    """The number of the signal that set `event` under `stop_on_signals`; None when none did
    (another process's signal stopped this one, or no signal at all)."""
    return getattr(event, "signum", None)


def interrupted(event: threading.Event, message: str) -> KeyboardInterrupt:
    """KeyboardInterrupt(message) whose `signum` is `received_signal(event)`: how distillation
    stops after saving, for its CLI to exit with `exit_status(signum)`."""
    error = KeyboardInterrupt(message)
    error.signum = received_signal(event)
    return error


def exit_status(signum: int | None) -> int:
    """The exit status of a run that `signum` stopped: 128 + its number (143 for SIGTERM); 130
    (SIGINT's) when the signal is unknown (a second Ctrl-C, another process's signal)."""
    return 128 + int(signal.SIGINT if signum is None else signum)


def agree_to_stop(event: threading.Event, *, sync: bool = True) -> bool:
    """Whether to stop now, the same answer on every process. With several processes the
    flags are all-gathered (a collective: every process must call it at the same step), and
    only when `sync`; a single process just reads `event`."""
    if jax.process_count() == 1:
        return event.is_set()
    if not sync:
        return False
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(event.is_set()))))


# ------------------------------------------------------------------------ reporting
def on_terminal() -> bool:
    """Whether stderr is a terminal (not a file, a pipe, a notebook cell or a batch log)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(total: int, initial: int, *, desc: str | None = None, enabled: bool = True,
                 leave: bool = True):
    """A tqdm bar on process 0 when stderr is a terminal; otherwise a disabled one, and the
    loop prints a plain line per log interval instead (`log_progress`)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=leave,
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                disable=not (enabled and is_writer() and on_terminal()))


def log_progress(bar, step: int, total: int, record: dict, *, desc: str | None = None) -> None:
    """Without a terminal (the bar disabled), one line for a log record:
    '[desc ]step 50/2000: train_loss 2.3456, lr 1.00e-03, 5678 tok/s, 12.3 ms/step, MFU 1.23%'.
    On a terminal the bar shows the progress and this prints nothing."""
    from cleangpt_jax.metrics import format_speed

    if not bar.disable or not is_writer():
        return
    shown = [f"{k} {record[k]:.4f}" for k in ("train_loss", "distill_loss") if k in record]
    if "lr" in record:
        shown.append(f"lr {record['lr']:.2e}")
    speed = format_speed(record)
    text = f"step {step}/{total}: {', '.join(shown + ([speed] if speed else []))}"
    print(f"{desc} {text}" if desc else text, file=sys.stderr, flush=True)


def report(bar, text: str) -> None:
    """One line on stderr (process 0), printed above the progress bar."""
    if is_writer():
        bar.write(text, file=sys.stderr)


# Each upload rewrites a whole file: one per record would upload bytes quadratic in records.
REMOTE_UPLOAD_SECONDS = 60.0


class MetricWriter:
    """metrics.jsonl + TensorBoard scalars; a no-op on every process but 0.

    `resume_step` is the step the run restarts from (its restored checkpoint's; 0 for a run
    that restored nothing). Records past it, left by a run that died after its last checkpoint
    (or before its first), are dropped from metrics.jsonl and from the older TensorBoard events
    files (each rewritten atomically; a file left with no scalars is deleted), and the new
    events file asks TensorBoard to purge them too. A killed and rerun run's records thus equal
    an uninterrupted run's, record for record, in the files and in TensorBoard.

    A URL workdir (gs://...) has no appendable files: metrics.jsonl is kept in memory and
    TensorBoard writes into a local scratch directory, and each is uploaded whole (replacing
    the object in one step) by `flush`: at a record once REMOTE_UPLOAD_SECONDS have passed
    since the last upload (the first record at once), and by `close`. The training loops call
    `flush` as each checkpoint save begins, so the records a resume keeps (those up to its
    checkpoint) are in the workdir before that checkpoint can count; a kill loses only records
    a resume drops anyway.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True,
                 loggers=None, config=None, wandb_project: str | None = None,
                 clock=time.monotonic):
        """`loggers`: train.loggers ('jsonl,tensorboard,wandb', `trackers`); None: jsonl, and
        TensorBoard when `tensorboard`. `config` and `wandb_project` are W&B's. `clock`:
        seconds (monotonic), the time between a URL workdir's uploads."""
        from cleangpt_jax import trackers

        names = (trackers.parse_loggers(loggers) if loggers is not None
                 else ("jsonl",) + (("tensorboard",) if tensorboard else ()))
        self.active = is_writer()
        self.workdir = workdir
        self.path = storage.join(workdir, METRICS_FILE)
        self._tb = self._file = self._wandb = None
        self._jsonl = "jsonl" in names
        self._remote = storage.is_url(workdir)
        self._clock = clock
        self._uploaded_at = None  # the clock at the last upload; None: none yet
        self._pending = False  # records written since the last upload (URL workdir)
        if not self.active:
            return
        storage.makedirs(workdir)
        keep = []
        if self._jsonl and storage.exists(self.path):
            keep = [ln for ln in storage.read_text(self.path).splitlines(keepends=True)
                    if ln.strip() and json.loads(ln)["step"] <= resume_step]
            write_atomically(self.path, "".join(keep))
        if self._jsonl and self._remote:
            self._lines = keep  # (joined at each upload: a record costs an append)
        elif self._jsonl:
            self._file = open(self.path, "a", encoding="utf-8")
        if "wandb" in names:
            self._wandb = trackers.WandbLogger(workdir, config=config, project=wandb_project)
        if "tensorboard" in names:
            for name in storage.listdir(workdir):
                if name.startswith(TENSORBOARD_PREFIX):
                    _drop_events_after(storage.join(workdir, name), resume_step)
            self._tb_dir = storage.scratch_dir("tensorboard-") if self._remote else workdir
            self._tb = ScalarEventsFile(self._tb_dir,
                                        purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        record = {"step": int(step)}
        for k, v in metrics.items():
            v = v.item() if hasattr(v, "item") else v
            record[k] = v
        if self._jsonl and self._remote:
            self._lines.append(json.dumps(record) + "\n")
        elif self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._wandb is not None:
            self._wandb.write(step, {k: v for k, v in record.items() if k not in ONCE_KEYS})
        if self._tb is not None:
            self._tb.write(int(step), {k: v for k, v in record.items()
                                       if k != "step" and k not in ONCE_KEYS
                                       and isinstance(v, (int, float)) and math.isfinite(v)})
        if self._remote:
            self._pending = True
            if (self._uploaded_at is None
                    or self._clock() - self._uploaded_at >= REMOTE_UPLOAD_SECONDS):
                self.flush()

    def flush(self) -> None:
        """URL workdir: upload metrics.jsonl and the local events file(s) into the workdir,
        each whole in one upload, when a record is pending (a local workdir's files are
        flushed at each record already)."""
        if not (self.active and self._remote and self._pending):
            return
        if self._jsonl:
            storage.write_text(self.path, "".join(self._lines))
        if self._tb is not None:
            for name in os.listdir(self._tb_dir):
                with open(os.path.join(self._tb_dir, name), "rb") as f:
                    storage.write_bytes(storage.join(self.workdir, name), f.read())
        self._pending, self._uploaded_at = False, self._clock()

    def close(self) -> None:
        if self.active:
            for sink in (self._file, self._tb, self._wandb):
                if sink is not None:
                    sink.close()
            self.flush()


def _drop_events_after(path: str, step: int) -> None:
    """Rewrite the TensorBoard events file `path` without its scalar events past `step`
    (deleted when no scalar is left). A file is TFRecords: an 8-byte little-endian length, a
    4-byte CRC of it, the Event proto, a 4-byte CRC of that; kept records are copied as they
    are, so their CRCs stay valid. A record cut short by a kill ends the file."""
    with _torch_hidden():
        from tensorboardX.proto import event_pb2

    data, pos, kept, scalars = storage.read_bytes(path), 0, [], 0
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        end = pos + 12 + length + 4
        if end > len(data):
            break
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        has_scalars = bool(event.summary.value)
        if not has_scalars or event.step <= step:
            kept.append(data[pos:end])
            scalars += has_scalars
        pos = end
    if not scalars:
        storage.remove(path)
    elif sum(map(len, kept)) != len(data):
        storage.write_bytes(path, b"".join(kept))


@contextlib.contextmanager
def _torch_hidden():
    """Import tensorboardX without torch: it imports torch whenever it is installed (for
    torch.Tensor inputs, which scalars never are), a few seconds per run. Torch is hidden
    meanwhile unless something already loaded it."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        yield
    finally:
        if hide:
            del sys.modules["torch"]


class ScalarEventsFile:
    """A TensorBoard events file of scalars, written synchronously: when `write` returns, its
    events are in the file (tensorboardX's SummaryWriter queues them for a writer thread that
    its flush does not wait for, so a checkpoint could count before its step's scalars did).

    The file is `logdir/events.out.tfevents.<second>.<host>.<ns>` (tensorboardX's record
    writer; the nanosecond suffix keeps a run and its quick rerun, started in the same second,
    in two files, in their order). `purge_step`: a resumed run's first step; the file opens
    with a session start at it, which makes TensorBoard drop the older files' events from that
    step on."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        with _torch_hidden():
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2
            from tensorboardX.summary import scalar
        self._event, self._scalar = event_pb2.Event, scalar
        self._file = EventsWriter(os.path.join(logdir, "events"), f".{time.time_ns()}")
        if purge_step is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._file.write_event(self._event(step=purge_step, wall_time=time.time(),
                                               session_log=start))
        self._file.flush()

    def write(self, step: int, scalars: dict) -> None:
        """One event per scalar {tag: value} at `step`, then flush the file."""
        now = time.time()
        for tag, value in scalars.items():
            self._file.write_event(self._event(step=step, wall_time=now,
                                               summary=self._scalar(tag, value)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
