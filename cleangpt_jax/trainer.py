"""Training: the loop, written out.

    summary = train_and_evaluate(config, workdir)      what `python -m cleangpt_jax.train` runs
    train_and_evaluate(config, workdir, callbacks=[fn])   fn(event, run) at each event below

`cleangpt_jax.train_setup.prepare_run` builds what the loop needs (tokenizer, data, model, the
compiled steps of `cleangpt_jax.train_step`, the restored or fresh state) as a `TrainRun`;
`train_and_evaluate` is the loop.
`cleangpt_jax.loop` holds what the loop shares with distillation (lagged metric fetch, the
non-finite stop, stop agreement, signals, progress bar, metric writer). Batches are a pure
function of (train.seed, step) (built data.prefetch steps ahead in a background thread:
`data.Prefetcher`) and the dropout key of a step is fixed by it
(`train_step.make_train_step`): a resumed run repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from typing import Callable, Iterable

import jax
import ml_collections

from cleangpt_jax import loop, plot, sharding, storage
from cleangpt_jax import metrics as metrics_lib
from cleangpt_jax import train_step as step_lib
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ConfigError
from cleangpt_jax.data.prefetch import Prefetcher
from cleangpt_jax.profiling import StepProfiler
from cleangpt_jax.train_setup import TrainRun, prepare_run


# -------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Summary:
    """What a finished (or interrupted) run returns."""

    step: int
    num_steps: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    interrupted: bool
    samples: list[str]
    workdir: str
    stop_signal: int | None = None  # the signal that interrupted the run (None: none received)
    best_step: int | None = None  # the step of best_val_loss
    early_stopped: bool = False  # train.early_stopping_patience ended the run


# The events a callback receives, as fn(event, run), in loop order. epoch_* fire every
# run.steps_per_epoch steps (one pass over the training windows) and at the last step.
EVENTS = ("train_begin", "epoch_begin", "step_begin", "eval_begin", "eval_end", "step_end",
          "epoch_end", "train_end")
Callback = Callable[[str, "TrainRun"], None]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       callbacks: Iterable[Callback] = ()) -> Summary:
    """Train `config` in `workdir`, resuming from its latest checkpoint when there is one.

    Each step, in this order: the update; the previous step's metrics fetched and checked (a
    NaN or infinite loss, gradient norm or updated-parameter norm stops the run, and every
    pending step is checked before a save); the log record; evaluation; samples; the checkpoint
    (so its meta holds the evaluation of its step; with train.early_stopping_patience, also at
    every new best, and the run ends after `patience` evaluations without one); the stop check
    (SIGTERM, Ctrl-C). After the last step: the final evaluation, the checkpoint, then the
    samples (a failing sample loses nothing); after an interrupt, the checkpoint only (`interrupted` and `stop_signal` say so).
    `callbacks` are called as fn(event, run) (see EVENTS).
    """
    run = prepare_run(config, workdir)
    t = run.config.train
    callbacks = list(callbacks)

    def notify(event: str) -> None:
        for callback in callbacks:
            callback(event, run)

    if run.step >= run.num_steps or run.early_stopped:
        if workdir_lib.is_writer():
            print(f"{run.workdir} is already trained to step {run.step} (num_steps="
                  f"{run.num_steps}{', stopped early' if run.early_stopped else ''}): nothing "
                  f"to do; raise train.num_steps to train further", flush=True)
        run.checkpointer.close()
        return _summary(run)
    if t.early_stopping_patience and run.eval_batches is None:
        run.checkpointer.close()
        raise ConfigError("train.early_stopping_patience needs validation data: set "
                          "data.val_fraction > 0 (or give a validation split)")

    writer = loop.MetricWriter(run.workdir, resume_step=run.resumed_from or 0,
                               loggers=t.loggers, config=run.config,
                               wandb_project=t.wandb_project)
    bar = loop.progress_bar(run.num_steps, run.step)
    speed = metrics_lib.Throughput(
        metrics_lib.train_flops_per_token(metrics_lib.lm_param_count(run.state.params),
                                          run.model.config),
        peak_flops_per_device=t.peak_flops)
    compile_s = None  # the first step's seconds (compiling), logged once with the next record
    profiler = StepProfiler(t.profile_steps, run.workdir)
    stop = threading.Event()
    lag = loop.LaggedMetrics()
    newest: dict = {}  # the host metrics of the newest step fetched
    evaluated_at = saved_at = clock = None
    steps_timed = 0  # steps since `clock` (the first step, which compiles, is not timed)

    def fetch(new: list[tuple[int, dict]]) -> None:
        for _, metrics in new:
            total, count = run.loss_window
            run.loss_window = (total + metrics["loss"], count + 1)
            newest.update(metrics)
            run.train_loss = metrics["loss"]

    def evaluate_now() -> None:
        nonlocal evaluated_at
        notify("eval_begin")
        metrics = step_lib.evaluate(run.eval_step, run.state.params, run.eval_batches(), run.mesh)
        loss, best = metrics["val_loss"], run.best_val_loss
        # Patience restarts on an improvement by more than min_delta; the best is the minimum.
        improved = best is None or loss < best - float(t.early_stopping_min_delta)
        run.evals_since_best = 0 if improved else run.evals_since_best + 1
        if best is None or loss < best:
            run.best_val_loss, run.best_step = loss, run.step
        run.last_eval = dict(metrics, best_val_loss=run.best_val_loss)
        evaluated_at = run.step
        writer.write(run.step, {k: run.last_eval[k]
                                for k in ("val_loss", "val_ppl", "best_val_loss")})
        loop.report(bar, f"step {run.step}: val_loss {metrics['val_loss']:.4f} (ppl "
                         f"{metrics['val_ppl']:.2f} over {metrics['val_tokens']} tokens of the "
                         f"validation split, best {run.best_val_loss:.4f})")
        notify("eval_end")

    def save_now() -> None:
        nonlocal saved_at
        fetch(lag.flush())  # every pending step checked first: never save a non-finite state
        writer.flush()  # the records this checkpoint keeps on a resume are in the workdir
        if saved_at != run.step:
            run.checkpointer.save(run.step, params=run.state.params,
                                  opt_state=run.state.opt_state, meta=run.meta())
            saved_at = run.step

    batches = None
    try:
        with loop.stop_on_signals(stop):
            notify("train_begin")
            start = run.step
            # Batches (on the devices) built data.prefetch steps ahead in a background thread.
            batches = Prefetcher(lambda s: sharding.global_batch(run.batch_for_step(s), run.mesh),
                                 start=start, stop=run.num_steps, depth=run.config.data.prefetch)
            for step in range(start, run.num_steps):
                if step == start or step % run.steps_per_epoch == 0:
                    notify("epoch_begin")
                notify("step_begin")
                batch = batches.get(step)
                t0 = time.perf_counter()
                with profiler.annotate(step + 1):
                    run.state, metrics = run.train_step(run.state, batch)
                run.step = step + 1
                profiler.stop_after(run.step, metrics)
                if clock is None:  # this process's first step compiled the programs
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - t0
                    loop.report(bar, f"compiled and ran the first step in {compile_s:.1f}s")
                    clock = time.perf_counter()
                else:
                    steps_timed += 1
                fetch(lag.push(run.step, metrics))  # step - 1's numbers: the device keeps going
                elapsed = time.perf_counter() - clock
                tokens_per_sec = steps_timed * run.tokens_per_step / elapsed if elapsed else 0.0
                bar.update(1)
                if run.train_loss is not None:
                    bar.set_postfix(loss=f"{run.train_loss:.4f}",
                                    lr=f"{run.learning_rate(run.step):.2e}",
                                    tok_s=f"{tokens_per_sec:.0f}", refresh=False)

                if run.step % t.log_every == 0 or run.step == run.num_steps:
                    fetch(lag.flush())  # (waits for the device: the window's time is all run)
                    record = _train_record(run, newest, speed.record(
                        steps=steps_timed, seconds=time.perf_counter() - clock,
                        tokens_per_step=run.tokens_per_step))
                    if compile_s is not None:
                        record["compile_s"], compile_s = compile_s, None
                    writer.write(run.step, record)
                    loop.log_progress(bar, run.step, run.num_steps, record)
                    run.loss_window = (0.0, 0)
                    clock, steps_timed = time.perf_counter(), 0
                if t.eval_every and run.step % t.eval_every == 0 and run.eval_batches:
                    evaluate_now()
                    if t.early_stopping_patience:
                        run.early_stopped = run.evals_since_best >= t.early_stopping_patience
                        if run.best_step == run.step:
                            save_now()  # every new best is on disk: export_hf --step=best_step
                    if run.early_stopped:
                        loop.report(bar, f"step {run.step}: no val_loss improvement in "
                                         f"{run.evals_since_best} evaluations; stopping early "
                                         f"(best {run.best_val_loss:.4f} at step "
                                         f"{run.best_step})")
                if (t.sample_every and run.step % t.sample_every == 0
                        and run.step < run.num_steps):
                    write_samples(run)
                if t.checkpoint_every and run.step % t.checkpoint_every == 0:
                    save_now()
                notify("step_end")
                if run.step % run.steps_per_epoch == 0 or run.step == run.num_steps:
                    notify("epoch_end")
                if run.early_stopped:  # (every process evaluated the same global batches)
                    break
                # Several processes all-gather their flags at log steps only.
                if loop.agree_to_stop(stop, sync=run.step % t.log_every == 0):
                    run.interrupted = True
                    run.stop_signal = loop.received_signal(stop)
                    break

            fetch(lag.flush())
            if not run.interrupted and run.eval_batches and evaluated_at != run.step:
                evaluate_now()
            save_now()
            if not run.interrupted and t.sample_max_new_tokens > 0 and t.sample_prompts:
                run.samples = write_samples(run)
            if run.interrupted and workdir_lib.is_writer():
                print(f"stopped at step {run.step}: checkpoint saved in "
                      f"{run.checkpointer.directory}; rerun the same command to resume",
                      file=sys.stderr, flush=True)
            notify("train_end")
    except loop.NonFiniteError as e:
        last = run.checkpointer.latest_step()
        kept = (f"the last good checkpoint (step {last}) is kept in "
                f"{run.checkpointer.directory}" if last is not None
                else "no checkpoint had been written yet")
        raise e.stopped("training", kept, "Lower train.learning_rate, raise train.warmup_steps "
                                          "or set train.grad_clip") from None
    finally:
        profiler.close()
        if batches is not None:
            batches.close()
        bar.close()
        writer.close()
        run.checkpointer.close()
        logging.info("training finished at step %d", run.step)
    if config.train.curves:
        plot.write_curves(run.workdir)  # WORKDIR/curves.png (process 0)
    return _summary(run)


def _train_record(run: TrainRun, newest: dict, speed: dict):
    """The log record of run.step: the mean loss of the steps since the last record (those
    before a resume included), the newest step's learning rate and grad norm (and the
    strategy's extras), throughput, MFU and memory (`metrics.Throughput.record`)."""
    total, count = run.loss_window
    record = {"train_loss": total / count,
              "lr": run.learning_rate(run.step), "grad_norm": newest["grad_norm"], **speed}
    record.update({k: v for k, v in newest.items() if k not in ("loss", "grad_norm")})
    return record


def _summary(run: TrainRun) -> Summary:
    return Summary(step=run.step, num_steps=run.num_steps, train_loss=run.train_loss,
                   val_loss=run.last_eval["val_loss"] if run.last_eval else None,
                   best_val_loss=run.best_val_loss, best_step=run.best_step,
                   early_stopped=run.early_stopped, interrupted=run.interrupted,
                   samples=list(run.samples), workdir=run.workdir, stop_signal=run.stop_signal)


def write_samples(run: TrainRun) -> list[str]:
    """Generate from every train.sample_prompts with the current parameters into
    WORKDIR/samples/step_<N>.txt (process 0); returns the texts (empty on other processes)."""
    from cleangpt_jax.generation import run_generation

    t = run.config.train
    params = run.state.params
    if jax.process_count() > 1:  # every process joins the gather; process 0 samples
        params = sharding.to_host(params)
        if not workdir_lib.is_writer():
            return []
    texts = []
    for i, prompt in enumerate(t.sample_prompts):
        _, text = run_generation(run.model, params, run.tokenizer, prompt,
                                 max_new_tokens=int(t.sample_max_new_tokens),
                                 temperature=float(t.sample_temperature),
                                 top_k=int(t.sample_top_k) or None, top_p=None,
                                 seed=int(t.seed) + i)
        texts.append(text)
    out_dir = storage.join(run.workdir, workdir_lib.SAMPLES_DIR)
    storage.makedirs(out_dir)
    storage.write_text(storage.join(out_dir, f"step_{run.step}.txt"), "".join(
        f"=== step {run.step} | prompt {prompt!r} ===\n{text}\n\n"
        for prompt, text in zip(t.sample_prompts, texts)))
    return texts
