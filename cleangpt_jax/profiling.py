"""Profiles on request: a `jax.profiler` trace of a window of steps, for TensorBoard.

    profiler = StepProfiler(config.train.profile_steps, workdir)   # 'START,END' or None
    for step in ...:
        with profiler.annotate(step + 1):          # the update that produces step + 1
            state, metrics = train_step(state, batch)
        profiler.stop_after(step + 1, metrics)     # waits for the last step, ends the trace
    profiler.close()                               # an interrupted window ends here

The trace covers the updates numbered START..END (1-based, both included); each carries a
`jax.profiler.StepTraceAnnotation(name, step_num=n)`, so the trace viewer and TensorBoard's
profile plugin show the steps by number. Files land in WORKDIR/profile/plugins/profile/<run>/
(`<host>.xplane.pb`), the layout `tensorboard --logdir WORKDIR/profile` reads with the plugin
installed (the `tensorboard` extra). Outside the window nothing is annotated or traced.
"""

from __future__ import annotations

import contextlib
import os
import sys

import jax

from cleangpt_jax.config import ConfigError

PROFILE_DIR = "profile"


def parse_window(setting, key: str = "train.profile_steps") -> tuple[int, int] | None:
    """(START, END) of 'START,END' (or a pair); None for None / '' (no profile)."""
    if setting is None or (isinstance(setting, str) and not setting.strip()):
        return None
    parts = setting.split(",") if isinstance(setting, str) else list(setting)
    try:
        start, end = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={setting!r}: give two step numbers 'START,END' "
                          f"(e.g. --config.{key}=10,20)") from None
    if not 1 <= start <= end:
        raise ConfigError(f"{key}={setting!r}: need 1 <= START <= END (steps are numbered from "
                          f"1)")
    return start, end


class StepProfiler:
    """A trace of the steps START..END of a run into WORKDIR/profile (see the module doc)."""

    def __init__(self, setting, workdir: str, *, name: str = "train",
                 key: str = "train.profile_steps"):
        self.window = parse_window(setting, key)
        self.directory = os.path.join(workdir, PROFILE_DIR)
        self.name = name
        self.active = False

    def _inside(self, step: int) -> bool:
        return self.window is not None and self.window[0] <= step <= self.window[1]

    @contextlib.contextmanager
    def annotate(self, step: int):
        """Around the dispatch of update `step`: starts the trace at the window's first step
        this run reaches, and names the step in it."""
        if not self._inside(step):
            yield
            return
        if not self.active:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.active = True
        with jax.profiler.StepTraceAnnotation(self.name, step_num=step):
            yield

    def stop_after(self, step: int, outputs) -> None:
        """After update `step` was dispatched: at the window's end, wait for `outputs` (the
        step's device work) and write the trace."""
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Write the trace if one is still open (a run stopped inside the window)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            if jax.process_index() == 0:
                print(f"profile of steps {self.window[0]}-{self.window[1]} written to "
                      f"{self.directory} (tensorboard --logdir {self.directory})",
                      file=sys.stderr, flush=True)
