"""What the in-loop throughput / MFU / memory metrics cost: the same training run, in one
process, with them on and off, alternated.

    JAX_PLATFORMS=cpu python scripts/bench_observe.py --steps=200 --log_every=10 --repeats=2

'off' replaces `metrics.Throughput.record` (tokens/s, step time, MFU, memory counters) with an
empty record; everything else (the lagged fetch, the log records, the progress line) runs as in
'on'. Each run trains from scratch in a fresh workdir; the compiled programs come from the
persistent compilation cache after the first run, and the first (compiling) step is not timed.
Reported per mode: the median and mean wall time between consecutive step_end events, and the
mean time of the log steps alone (where the metrics are computed), in milliseconds; and the
cost of one `Throughput.record` call by itself (what a log step adds), in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from cleangpt_jax import config as config_lib
from cleangpt_jax import metrics
from cleangpt_jax.trainer import train_and_evaluate


def timed_run(cfg, workdir: str) -> tuple[list[float], list[float]]:
    """(every step's wall seconds after the first, the log steps' seconds)."""
    stamps: list[tuple[int, float]] = []

    def callback(event, run):
        if event == "step_end":
            stamps.append((run.step, time.perf_counter()))

    train_and_evaluate(cfg, workdir, callbacks=[callback])
    deltas = [(s, b - a) for (_, a), (s, b) in zip(stamps, stamps[1:])]
    every = cfg.train.log_every
    return [d for _, d in deltas], [d for s, d in deltas if s % every == 0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    cfg = config_lib.get_config()
    cfg.train.num_steps = args.steps
    cfg.train.log_every = args.log_every
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 0
    cfg.train.sample_max_new_tokens = 0
    real_record = metrics.Throughput.record
    results = {"on": ([], []), "off": ([], [])}
    with tempfile.TemporaryDirectory() as root:
        train_and_evaluate(cfg, f"{root}/warmup")  # compiles, measures the CPU peak
        for r in range(args.repeats):
            for mode in ("off", "on"):
                metrics.Throughput.record = (real_record if mode == "on"
                                             else lambda self, **_: {})
                steps, logs = timed_run(cfg, f"{root}/{mode}{r}")
                results[mode][0].extend(steps)
                results[mode][1].extend(logs)
    metrics.Throughput.record = real_record
    speed = metrics.Throughput(1e6)
    speed.record(steps=1, seconds=1.0, tokens_per_step=1)  # the CPU peak, measured once
    t0, calls = time.perf_counter(), 10_000
    for _ in range(calls):
        speed.record(steps=10, seconds=1.0, tokens_per_step=1024)
    record_us = 1e6 * (time.perf_counter() - t0) / calls
    print(f"{args.steps} steps x {args.repeats} runs per mode, log_every={args.log_every}, "
          f"default config (4 x 128 char model, batch 16 x 64)")
    for mode, (steps, logs) in results.items():
        print(f"metrics {mode:3}: step median {1e3 * statistics.median(steps):.2f} ms, mean "
              f"{1e3 * statistics.mean(steps):.2f} ms; log steps mean "
              f"{1e3 * statistics.mean(logs):.2f} ms ({len(steps)} steps timed)")
    print(f"one Throughput.record call: {record_us:.1f} us (once per log step)")


if __name__ == "__main__":
    main()
