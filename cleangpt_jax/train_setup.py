"""A training run's setup: everything `trainer.train_and_evaluate` needs before its first step.

    run = prepare_run(config, workdir)     # a TrainRun: tokenizer, data, model, compiled steps,
                                           # the restored or fresh state

The checks of the train section (`check_train_config`, `check_sample_settings`,
`resolve_num_steps`, `warn_about_warmup`) run here, before anything is written to the workdir;
the sample prompt train.sample_prompts=None stands for comes from the data (`data_prompt`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections

from cleangpt_jax import profiling, sharding, storage, trackers
from cleangpt_jax import train_step as step_lib
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.checkpoint import Checkpointer
from cleangpt_jax.config import ConfigError, model_config
from cleangpt_jax.data.prefetch import prefetch_depth
from cleangpt_jax.optim import make_optimizer
from cleangpt_jax.tokenizers import check_vocab


@dataclasses.dataclass
class TrainRun:
    """Everything the loop works on; callbacks read it (and may replace `state`)."""

    config: ml_collections.ConfigDict  # resolved: model.vocab_size is filled in
    workdir: str
    model: Any
    tokenizer: Any
    mesh: Any
    state: step_lib.TrainState
    num_steps: int
    steps_per_epoch: int
    schedule: Callable                  # optimizer step s -> learning rate
    train_step: Callable                # (state, global batch) -> (state, device metrics)
    eval_step: Callable                 # (params, global batch) -> (loss_sum, count)
    batch_for_step: Callable[[int], dict]   # this process's rows of step s's batch (numpy)
    eval_batches: Callable[[], Iterable[dict]] | None  # None: evaluation is off
    checkpointer: Checkpointer
    resumed_from: int | None            # the restored checkpoint's step; None: a fresh run
    step: int = 0                       # updates applied so far
    best_val_loss: float | None = None
    best_step: int | None = None        # the step of best_val_loss
    evals_since_best: int = 0           # evaluations in a row without a new best
    early_stopped: bool = False         # train.early_stopping_patience ended the run
    last_eval: dict | None = None       # {'val_loss', 'val_ppl', 'val_tokens', 'best_val_loss'}
    train_loss: float | None = None     # the newest loss fetched from the device
    loss_window: tuple[float, int] = (0.0, 0)  # (sum, count) of the losses since the last log
    samples: list[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False
    stop_signal: int | None = None      # the signal's number when one interrupted the run

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.batch_size * self.config.model.block_size

    def learning_rate(self, step: int) -> float:
        """The rate used by the update that produced `step` (i.e. schedule(step - 1))."""
        return float(self.schedule(max(step - 1, 0)))

    def meta(self) -> dict:
        """What a checkpoint records next to the state; `loss_window` lets a resumed run's next
        log record average the same steps as an uninterrupted run's."""
        return {"step": self.step, "data_seed": int(self.config.train.seed),
                "tokens_seen": self.step * self.tokens_per_step, "num_steps": self.num_steps,
                "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                "evals_since_best": self.evals_since_best, "early_stopped": self.early_stopped,
                "loss_window": list(self.loss_window)}


def resolve_num_steps(train_cfg, steps_per_epoch: int) -> int:
    """train.num_epochs (when set) wins over train.num_steps; one epoch = one pass over the
    packed training tokens."""
    if train_cfg.num_epochs is not None:
        epochs = float(train_cfg.num_epochs)
        if epochs <= 0:
            raise ConfigError(f"train.num_epochs must be positive, got {epochs}")
        return max(1, math.ceil(epochs * steps_per_epoch))
    n = train_cfg.num_steps
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"train.num_steps must be a positive integer, got {n!r}")
    return n


def warn_about_warmup(train_cfg, num_steps: int) -> None:
    """A warning on stderr (process 0) when the warmup does not end before the run does: the
    learning rate then never reaches train.learning_rate."""
    if train_cfg.warmup_steps >= num_steps and workdir_lib.is_writer():
        print(f"warning: train.warmup_steps={train_cfg.warmup_steps} >= the run's {num_steps} "
              f"steps: the learning rate never reaches train.learning_rate="
              f"{train_cfg.learning_rate}; lower train.warmup_steps", file=sys.stderr,
              flush=True)


def check_train_config(config) -> None:
    t = config.train
    for key in ("batch_size", "grad_accum_steps", "log_every"):
        v = t[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"train.{key} must be a positive integer, got {v!r}")
    for key in ("eval_every", "eval_steps", "checkpoint_every", "sample_every",
                "sample_max_new_tokens", "max_checkpoints_to_keep", "early_stopping_patience"):
        v = t[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            zero = "all" if key == "max_checkpoints_to_keep" else "off"
            raise ConfigError(f"train.{key} must be an integer >= 0 (0 = {zero}), got {v!r}")
    if t.early_stopping_patience and not (t.eval_every and t.eval_steps):
        raise ConfigError(f"train.early_stopping_patience={t.early_stopping_patience} needs "
                          f"evaluations: set train.eval_every and train.eval_steps > 0")
    if not float(t.early_stopping_min_delta) >= 0:
        raise ConfigError(f"train.early_stopping_min_delta must be >= 0, got "
                          f"{t.early_stopping_min_delta!r}")
    prefetch_depth(config.data.prefetch)
    trackers.parse_loggers(t.loggers)  # (before the run writes anything, not at the writer)
    profiling.parse_window(t.profile_steps)
    if config.model.param_dtype != "float32":
        raise ConfigError(f"model.param_dtype={config.model.param_dtype!r}: training keeps "
                          f"float32 master weights and optimizer state; set model.dtype="
                          f"'bfloat16' for bf16 compute and leave param_dtype='float32'")


def check_sample_settings(train_cfg, model_cfg, tokenizer) -> None:
    """Refuse, before training, samples the model cannot serve: a prompt with characters
    outside the tokenizer's vocabulary (`generation.check_prompt`), and, with positions bounded
    by model.max_position_embeddings (alibi), tokenized train.sample_prompts plus
    train.sample_max_new_tokens that do not fit them. Learned positions slide a block_size
    window, so any length samples."""
    from cleangpt_jax.generation import check_prompt

    n = train_cfg.sample_max_new_tokens
    if not n or not train_cfg.sample_prompts:
        return
    for prompt in train_cfg.sample_prompts:
        check_prompt(tokenizer, prompt, what="train.sample_prompts entry",
                     fix="change train.sample_prompts or set train.sample_max_new_tokens=0")
    if model_cfg.position_encoding == "learned":
        return
    longest = max(max(len(tokenizer.encode(p)), 1) for p in train_cfg.sample_prompts)
    if longest + n > model_cfg.max_position_embeddings:
        raise ConfigError(
            f"train.sample_prompts need up to {longest} tokens plus train.sample_max_new_tokens"
            f"={n}: {longest + n} positions, more than model.max_position_embeddings="
            f"{model_cfg.max_position_embeddings}; lower train.sample_max_new_tokens or "
            f"shorten the prompts")


def data_prompt(tokens, tokenizer, max_tokens: int = 16) -> str:
    """The sample prompt train.sample_prompts=None stands for: the start of the token stream
    `tokens` (the validation split begins with a document), at most `max_tokens` tokens and
    its first line, as text; a document separator before it is skipped."""
    stream = getattr(tokens, "streams", (tokens,))[0]  # a Mixture's first source
    ids = [int(i) for i in stream[:max_tokens + 8]]
    sep = tokenizer.document_separator()
    while sep and ids[:len(sep)] == sep:
        ids = ids[len(sep):]
    text = tokenizer.decode(ids[:max_tokens])
    return text.strip().split("\n")[0].strip() or text


def prepare_tokenizer(config, workdir: str):
    """The run's tokenizer: the one saved in the workdir when resuming, else built from the
    config and saved there."""
    from cleangpt_jax.tokenizers import build_tokenizer, load_tokenizer

    saved = storage.join(workdir, workdir_lib.TOKENIZER_DIR)
    if storage.isdir(saved):
        return load_tokenizer(saved)
    return build_tokenizer(config)


def prepare_run(config: ml_collections.ConfigDict, workdir: str) -> TrainRun:
    """Everything the loop needs: the tokenizer, data, model, compiled steps and the state,
    restored from the workdir's latest checkpoint or freshly initialised. Checks the config
    and the workdir (writable, of this kind) before it writes anything (config.json,
    tokenizer/), and writes nothing when the run already reached its num_steps."""
    from cleangpt_jax import data as data_lib
    from cleangpt_jax.models import get_model

    workdir_lib.check_kind(workdir, "train")
    sharding.initialize_distributed(config.train)
    config = ml_collections.ConfigDict(config.to_dict())  # private, resolved copy
    check_train_config(config)
    workdir = storage.absolute(workdir)
    t = config.train
    mesh = sharding.create_mesh(int(t.fsdp))
    sharding.check_batch_size(t.batch_size, mesh, t.grad_accum_steps)
    micro_batch = t.batch_size // t.grad_accum_steps

    tokenizer = prepare_tokenizer(config, workdir)
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    check_vocab(tokenizer.vocab_size, config.model.vocab_size, where="model.vocab_size",
                fix="leave model.vocab_size None (the tokenizer's size)")
    model = get_model(config=model_config(config.model))
    if storage.exists(storage.join(workdir, workdir_lib.CONFIG_FILE)):
        diff = workdir_lib.config_differences(workdir_lib.load_config(workdir), config)
        if diff:
            raise ConfigError(
                f"{workdir} holds a run with a different model/tokenizer ({'; '.join(diff[:4])})"
                f": pass a new --workdir, or the original settings to resume it")
    check_sample_settings(t, model.config, tokenizer)  # after the run's own config is checked

    data = data_lib.load_dataset(config, tokenizer)
    if t.sample_prompts is None:  # the start of a validation document (saved in config.json)
        t.sample_prompts = (data_prompt(data.val if data.val is not None else data.train,
                                        tokenizer),)
        check_sample_settings(t, model.config, tokenizer)
    block, batch_size = model.config.block_size, t.batch_size
    steps_per_epoch = data_lib.steps_per_epoch(data.train, batch_size, block)
    num_steps = resolve_num_steps(t, steps_per_epoch)
    warn_about_warmup(t, num_steps)
    optimizer, schedule = make_optimizer(t, num_steps)
    loss_terms = step_lib.get_strategy(t.strategy, model, config)
    init_fn = step_lib.model_init_fn(model)
    abstract, shardings = step_lib.abstract_train_state(init_fn, optimizer, mesh)

    checkpointer = workdir_lib.open_checkpointer(
        workdir, max_to_keep=t.max_checkpoints_to_keep or None)  # (Orbax's 0 would keep none)
    restored = checkpointer.restore_latest(params=abstract.params,
                                           opt_state=abstract.opt_state)
    if restored is None:
        state, _ = step_lib.create_train_state(init_fn, optimizer, mesh, seed=t.seed)
    else:
        step = jax.device_put(jnp.asarray(restored.step, jnp.int32), shardings.step)
        state = step_lib.TrainState(
            step=step, params=restored.params, opt_state=restored.opt_state,
            # (built by a program: device_put cannot place a key on other hosts' devices)
            dropout_key=jax.jit(step_lib.dropout_key, out_shardings=shardings.dropout_key)(
                jax.random.key(int(t.seed))))
        if workdir_lib.is_writer():
            print(f"Resuming from step {restored.step} ({checkpointer.directory})", flush=True)

    if restored is None or restored.step < num_steps:  # a finished run is left as it was
        workdir_lib.save_config(workdir, config)
        if workdir_lib.is_writer() and not storage.isdir(
                storage.join(workdir, workdir_lib.TOKENIZER_DIR)):
            workdir_lib.save_tokenizer(tokenizer, workdir)

    pi, pc = jax.process_index(), jax.process_count()
    separator = data_lib.document_separator_id(config.data, tokenizer)

    def batch_for_step(step):
        return data_lib.with_segment_ids(data_lib.batch_for_step(
            data.train, seed=t.seed, step=step, global_batch_size=batch_size, block_size=block,
            process_index=pi, process_count=pc), separator)

    def eval_batches():
        return [data_lib.with_segment_ids(b, separator) for b in data_lib.eval_batches(
            data.val, global_batch_size=micro_batch, block_size=block,
            num_batches=t.eval_steps, process_index=pi, process_count=pc)]

    return TrainRun(
        config=config, workdir=workdir, model=model, tokenizer=tokenizer, mesh=mesh,
        state=state, num_steps=num_steps, steps_per_epoch=steps_per_epoch, schedule=schedule,
        train_step=step_lib.make_train_step(loss_terms, optimizer, mesh=mesh,
                                            state_shardings=shardings,
                                            grad_accum_steps=t.grad_accum_steps),
        eval_step=step_lib.make_eval_step(loss_terms, mesh=mesh,
                                          params_shardings=shardings.params),
        batch_for_step=batch_for_step,
        eval_batches=(eval_batches if t.eval_every and t.eval_steps and data.val is not None
                      else None),
        checkpointer=checkpointer,
        resumed_from=None if restored is None else restored.step,
        step=0 if restored is None else restored.step,
        best_val_loss=None if restored is None else restored.meta.get("best_val_loss"),
        best_step=None if restored is None else restored.meta.get("best_step"),
        evals_since_best=0 if restored is None else restored.meta.get("evals_since_best", 0),
        early_stopped=False if restored is None else restored.meta.get("early_stopped", False),
        loss_window=(0.0, 0) if restored is None else tuple(restored.meta.get("loss_window",
                                                                              (0.0, 0))))
