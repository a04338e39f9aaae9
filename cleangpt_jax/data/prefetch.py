"""Batches built ahead of the step that needs them, in a background thread.

    with Prefetcher(make_batch, start=s0, stop=n, depth=2) as batches:
        for step in range(s0, n):
            batch = batches.get(step)          # == make_batch(step)

`make_batch(step)` runs for step = start, start + 1, ... in one daemon thread, which keeps at most
`depth` finished batches in a bounded queue (so at most depth + 1 exist at a time besides the
one in use). The batches and their order are exactly those of calling make_batch in the loop:
with batches a pure function of (seed, step), a resumed run starting at any step sees the
batches an uninterrupted run saw. An exception in make_batch is raised by the `get` of its step,
in the calling thread. `close()` (also on leaving the `with`) stops the thread and waits for it:
a loop that breaks early leaves nothing running. depth = 0 builds each batch in `get` itself.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from cleangpt_jax.config import ConfigError


def prefetch_depth(value) -> int:
    """data.prefetch, validated: an integer >= 0 (0 = no background thread)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"data.prefetch must be an integer >= 0 (batches built ahead; 0 = "
                          f"off), got {value!r}")
    return value


class Prefetcher:
    """make_batch(step) for steps [start, stop), built up to `depth` steps ahead (see module)."""

    def __init__(self, make_batch: Callable[[int], Any], *, start: int, stop: int,
                 depth: int = 2):
        self._make_batch, self._next, self._stop = make_batch, int(start), int(stop)
        self._depth = prefetch_depth(depth)
        self._closing = threading.Event()
        self._thread = None
        if self._depth and start < stop:
            self._queue: queue.Queue = queue.Queue(maxsize=self._depth)
            self._thread = threading.Thread(target=self._produce, args=(int(start),),
                                            name="batch-prefetch", daemon=True)
            self._thread.start()

    def _produce(self, step: int) -> None:
        while step < self._stop and not self._closing.is_set():
            try:
                item = (step, self._make_batch(step), None)
            except BaseException as e:  # handed to the consumer, raised by its get()
                item = (step, None, e)
            while not self._closing.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int):
        """The batch of `step`, which must be the next step in order."""
        if step != self._next or step >= self._stop:
            raise ValueError(f"batch of step {step} asked for; the next one is {self._next} "
                             f"(steps run in order up to {self._stop})")
        self._next += 1
        if self._thread is None:
            return self._make_batch(step)
        while True:
            try:
                made_step, batch, error = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the batch prefetch thread stopped without a "
                                       "batch") from None
        assert made_step == step, (made_step, step)
        if error is not None:
            raise error
        return batch

    def close(self) -> None:
        """Stop the thread (a batch it is building is finished and dropped) and wait for it."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
