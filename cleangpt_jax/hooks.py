"""Openings in the training loop, and the built-in hooks that use them.

    class MyHook(Hook):
        def on_eval_end(self, trainer, step, metrics):
            ...  # trainer.state.params, trainer.config, trainer.writer, ...

    train_and_evaluate(config, workdir, extra_hooks=[MyHook()])

Events, in loop order: on_train_start(trainer); per step on_step_end(trainer, step) (step = the
number of updates applied so far); on_eval_end(trainer, step, metrics) after each evaluation;
on_train_end(trainer) after the last step or an interrupt (trainer.interrupted). Built-ins run
first, in this order: evaluation, logging (progress bar, metrics.jsonl, TensorBoard), samples,
checkpointing, so a checkpoint's meta already holds the evaluation of its step.
"""

from __future__ import annotations

import os
import sys
import time

import jax
from tqdm.auto import tqdm

from cleangpt_jax import sharding
from cleangpt_jax import workdir as workdir_lib


class Hook:
    """Base class: override the events you need (all are no-ops here)."""

    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, step: int) -> None:
        pass

    def on_eval_end(self, trainer, step: int, metrics: dict) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class EvalHook(Hook):
    """Validation loss every `every` steps and after the last step (not after an interrupt)."""

    def __init__(self, every: int):
        self.every = every
        self._done_at = None

    def _run(self, trainer, step):
        if trainer.eval_batches is None or self._done_at == step:
            return
        self._done_at = step
        trainer.dispatch("on_eval_end", step, trainer.evaluate())

    def on_step_end(self, trainer, step):
        if _due(step, self.every):
            self._run(trainer, step)

    def on_train_end(self, trainer):
        if not trainer.interrupted and trainer.step == trainer.num_steps:
            self._run(trainer, trainer.step)


class LoggingHook(Hook):
    """Progress bar (step, loss, lr, tokens/s, ETA) on process 0, and one metrics.jsonl /
    TensorBoard record per `every` steps: train_loss (mean over the window), lr, grad_norm,
    tokens_per_sec (compile time excluded); eval records carry val_loss, val_ppl,
    best_val_loss."""

    def __init__(self, every: int):
        self.every = every
        self.bar = None

    def on_train_start(self, trainer):
        self._t0, self._steps = None, 0
        if workdir_lib.is_writer():
            self.bar = tqdm(total=trainer.num_steps, initial=trainer.step, unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def on_step_end(self, trainer, step):
        if self._t0 is None:  # the first step of this process includes compilation
            self._t0 = time.perf_counter()
            if workdir_lib.is_writer() and trainer.compile_seconds is not None:
                self._write(trainer, f"compiled and ran the first step in "
                                     f"{trainer.compile_seconds:.1f}s")
        else:
            self._steps += 1
        if self.bar is not None:
            self.bar.update(1)
            if trainer.last_train_loss is not None:
                self.bar.set_postfix(loss=f"{trainer.last_train_loss:.4f}",
                                     lr=f"{trainer.learning_rate(step):.2e}",
                                     tok_s=f"{self._rate(trainer):.0f}", refresh=False)
        if _due(step, self.every) or step == trainer.num_steps:
            self._log(trainer, step)

    def _rate(self, trainer) -> float:
        dt = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return self._steps * trainer.tokens_per_step / dt if dt > 0 else 0.0

    def _log(self, trainer, step):
        losses = trainer.pop_losses()
        if not losses:
            return
        record = {"train_loss": sum(v for _, v in losses) / len(losses),
                  "lr": trainer.learning_rate(step),
                  "grad_norm": float(trainer.last_metrics["grad_norm"]),
                  "tokens_per_sec": self._rate(trainer)}
        for k, v in trainer.last_metrics.items():
            if k not in ("loss", "grad_norm"):
                record[k] = float(v)
        trainer.writer.write(step, record)
        self._t0, self._steps = time.perf_counter(), 0

    def on_eval_end(self, trainer, step, metrics):
        trainer.writer.write(step, {k: metrics[k] for k in
                                    ("val_loss", "val_ppl", "best_val_loss")})
        self._write(trainer, f"step {step}: val_loss {metrics['val_loss']:.4f} "
                             f"(ppl {metrics['val_ppl']:.2f}, best {metrics['best_val_loss']:.4f})")

    def _write(self, trainer, text):
        if not workdir_lib.is_writer():
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def on_train_end(self, trainer):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SampleHook(Hook):
    """Sample generations every `every` steps (0 = only at the end) into
    WORKDIR/samples/step_<N>.txt; the final ones are kept in trainer.samples."""

    def __init__(self, *, every: int, prompts, max_new_tokens: int, temperature: float,
                 top_k: int | None, seed: int):
        self.every, self.prompts = every, [p for p in prompts]
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.top_k, self.seed = top_k, seed

    def generate(self, trainer, step) -> list[str]:
        from cleangpt_jax.generation import run_generation

        params = trainer.state.params
        if jax.process_count() > 1:  # every process joins the gather; process 0 samples
            params = sharding.to_host(params)
            if not workdir_lib.is_writer():
                return []
        texts = []
        for i, prompt in enumerate(self.prompts):
            _, text = run_generation(trainer.model, params, trainer.tokenizer, prompt,
                                     max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature, top_k=self.top_k,
                                     top_p=None, seed=self.seed + i)
            texts.append(text)
        if workdir_lib.is_writer():
            out_dir = os.path.join(trainer.workdir, workdir_lib.SAMPLES_DIR)
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"step_{step}.txt"), "w", encoding="utf-8") as f:
                for prompt, text in zip(self.prompts, texts):
                    f.write(f"=== step {step} | prompt {prompt!r} ===\n{text}\n\n")
        return texts

    def on_step_end(self, trainer, step):
        if _due(step, self.every) and step != trainer.num_steps:
            self.generate(trainer, step)

    def on_train_end(self, trainer):
        if not trainer.interrupted and self.max_new_tokens > 0 and self.prompts:
            trainer.samples = self.generate(trainer, trainer.step)


class CheckpointHook(Hook):
    """Checkpoint every `every` steps and at the end (also after an interrupt)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer, step):
        if _due(step, self.every):
            trainer.save_checkpoint()

    def on_train_end(self, trainer):
        trainer.save_checkpoint()
        if trainer.interrupted and workdir_lib.is_writer():
            print(f"stopped at step {trainer.step}: checkpoint saved in "
                  f"{trainer.checkpointer.directory}; rerun the same command to resume",
                  file=sys.stderr, flush=True)


def default_hooks(config) -> list[Hook]:
    t = config.train
    top_k = t.get("sample_top_k", 0)
    return [
        EvalHook(int(t.eval_every)),
        LoggingHook(int(t.log_every)),
        SampleHook(every=int(t.get("sample_every", 0)), prompts=tuple(t.get("sample_prompts", ())),
                   max_new_tokens=int(t.get("sample_max_new_tokens", 0)),
                   temperature=float(t.get("sample_temperature", 1.0)),
                   top_k=int(top_k) if top_k else None, seed=int(t.seed)),
        CheckpointHook(int(t.checkpoint_every)),
    ]


__all__ = ["CheckpointHook", "EvalHook", "Hook", "LoggingHook", "SampleHook", "default_hooks"]
