"""Training library: step/loss strategies, the sharded train step, evaluation and the loop.

    train_and_evaluate(config, workdir)     what `python -m cleangpt_jax.train` runs

Pieces other tools reuse (distillation registers its own strategy and calls the same step):

    register_strategy("name")     factory(model, config) -> loss_terms
    create_train_state            params + optimizer state + step, laid out on a mesh
    make_train_step               the jit-compiled, sharded update with donated state
    make_eval_step, evaluate      token-weighted validation loss
    Trainer + hooks.Hook          the loop and its openings (train start/end, step end, eval end)

The loss contract. A strategy's loss_terms(params, batch, *, rng, step, train) returns float32
scalars (loss_sum, count, extra_sums): the sum of per-token losses, the number of scored tokens
and a dict of other per-token sums worth reporting. The step divides exactly once:

    loss = sum_micro loss_sum / sum_micro count,    grads = d(sum_micro loss_sum) / sum count

over every micro-batch (gradient accumulation) and every device (the batch is sharded on the
mesh, XLA inserts the all-reduce), so both equal the token-weighted mean over the global batch.

Randomness: parameters come from fold_in(key(seed), 0); the dropout key of step s is
fold_in(fold_in(key(seed), 1), s) (and fold_in(., i) for micro-batch i), and batches are a pure
function of (seed, s): a resumed run repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cleangpt_jax import hooks as hooks_lib
from cleangpt_jax import sharding
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.checkpoint import Checkpointer
from cleangpt_jax.config import ConfigError, model_config
from cleangpt_jax.loading import check_vocab
from cleangpt_jax.losses import causal_lm_loss_terms
from cleangpt_jax.optim import make_optimizer

PARAMS_SEED_SALT, DROPOUT_SEED_SALT = 0, 1


class TrainingError(ValueError):
    """Training cannot go on (e.g. the loss became NaN); the message says what was kept."""


# ------------------------------------------------------------------------------ strategies
LossTerms = Callable[..., tuple]
_STRATEGIES: dict[str, Callable[[Any, Any], LossTerms]] = {}


def register_strategy(name: str, factory: Callable | None = None):
    """Register factory(model, config) -> loss_terms under `name`; usable as a decorator."""

    def add(f):
        _STRATEGIES[name.lower()] = f
        return f

    return add(factory) if factory is not None else add


def registered_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str, model, config) -> LossTerms:
    key = str(name).lower()
    if key not in _STRATEGIES:
        raise ConfigError(f"unknown train.strategy {name!r}: registered strategies are "
                          f"{registered_strategies()}")
    return _STRATEGIES[key](model, config)


@register_strategy("lm")
def lm_strategy(model, config=None) -> LossTerms:
    """Next-token cross-entropy on batch['input_ids'] (padding masked by 'attention_mask')."""

    def loss_terms(params, batch, *, rng, step, train):
        del step
        out = model.apply({"params": params}, batch["input_ids"], deterministic=not train,
                          rngs={"dropout": rng} if train else None)
        total, count = causal_lm_loss_terms(out.logits, batch["input_ids"],
                                            batch.get("attention_mask"))
        return total, count, {}

    return loss_terms


# ----------------------------------------------------------------------------- train state
@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any


def _initial_state(init_params: Callable[[], Any], optimizer) -> TrainState:
    params = init_params()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def abstract_train_state(init_params: Callable[[], Any], optimizer, mesh):
    """(TrainState of ShapeDtypeStructs with target shardings, the shardings tree)."""
    shapes = jax.eval_shape(lambda: _initial_state(init_params, optimizer))
    return sharding.abstract_state(shapes, mesh), sharding.state_shardings(shapes, mesh)


def create_train_state(init_params: Callable[[], Any], optimizer, mesh):
    """Fresh TrainState built directly in its sharded layout; returns (state, shardings).

    `init_params` is a closure returning the parameter tree (traced under jit, so nothing is
    materialised on one device first).
    """
    _, shardings = abstract_train_state(init_params, optimizer, mesh)
    state = jax.jit(lambda: _initial_state(init_params, optimizer), out_shardings=shardings)()
    return state, shardings


def model_init_fn(model, seed: int) -> Callable[[], Any]:
    key = jax.random.fold_in(jax.random.key(seed), PARAMS_SEED_SALT)
    ids = jnp.zeros((1, model.config.block_size), jnp.int32)
    return lambda: model.init(key, ids)["params"]


# ------------------------------------------------------------------------------ the step
def loss_and_grads(loss_terms: LossTerms, params, batch, *, rng, step, grad_accum_steps=1,
                   mesh=None):
    """(mean loss, {name: mean extra}, grads of the mean) over the whole batch.

    With grad_accum_steps = A the batch (B, ...) is cut into A micro-batches of B / A rows
    (rows i, i + A, i + 2A, ... form micro-batch i, which keeps each device's rows local) and
    a lax.scan sums loss_sum, count and the gradient of loss_sum over them.
    """

    def terms(p, mb, r):
        total, count, extra = loss_terms(p, mb, rng=r, step=step, train=True)
        return total, (count, extra)

    grad_fn = jax.value_and_grad(terms, has_aux=True)
    if grad_accum_steps == 1:
        (total, (count, extra)), grads = grad_fn(params, batch, rng)
    else:
        a = grad_accum_steps
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 0, 1), batch)
        if mesh is not None:
            micro = jax.lax.with_sharding_constraint(
                micro, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, first, rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(carry, xs):
            i, mb = xs
            out = grad_fn(params, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, out), None

        ((total, (count, extra)), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(a), micro))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    return total / denom, {k: v / denom for k, v in extra.items()}, grads


def make_train_step(loss_terms: LossTerms, optimizer, *, mesh, state_shardings,
                    grad_accum_steps: int = 1, seed: int = 0):
    """jit-compiled (state, batch) -> (state, metrics); the input state is donated.

    metrics (replicated float32 scalars): loss, grad_norm (before clipping), tokens (scored),
    and the strategy's extras.
    """
    dropout_key = jax.random.fold_in(jax.random.key(seed), DROPOUT_SEED_SALT)

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(dropout_key, state.step)
        loss, extra, grads = loss_and_grads(loss_terms, state.params, batch, rng=rng,
                                            step=state.step, grad_accum_steps=grad_accum_steps,
                                            mesh=mesh)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **extra}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_eval_step(loss_terms: LossTerms, *, mesh, params_shardings):
    """jit-compiled (params, batch) -> (loss_sum, count), dropout off."""

    def eval_fn(params, batch):
        total, count, _ = loss_terms(params, batch, rng=jax.random.key(0), step=0, train=False)
        return total, count

    return jax.jit(eval_fn, in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def evaluate(eval_step, params, batches: Iterable[dict], mesh) -> dict:
    """Token-weighted mean loss over `batches` (this process's rows of each global batch):
    {'val_loss', 'val_ppl', 'val_tokens'}."""
    total, count = jnp.zeros(()), jnp.zeros(())
    for batch in batches:
        t, c = eval_step(params, sharding.global_batch(batch, mesh))
        total, count = total + t, count + c
    total, count = float(total), float(count)
    if count == 0:
        raise TrainingError("the validation set yielded no tokens to score: lower "
                            "train.eval_steps' batch or check data.val_fraction")
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 80.0)), "val_tokens": int(count)}


# ------------------------------------------------------------------------------- the loop
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


class Trainer:
    """The training loop. Hooks read its attributes:

    config, workdir, model, tokenizer, mesh, state, num_steps, step, schedule, writer,
    checkpointer, best_val_loss, last_eval, samples, interrupted, tokens_per_step.

    `batch_for_step(step)` returns this process's rows of the global batch of `step` (numpy);
    `eval_batches()` yields this process's rows of each validation batch.
    """

    def __init__(self, *, config, workdir: str, model, tokenizer, mesh, state, state_shardings,
                 train_step, eval_step, schedule, batch_for_step: Callable[[int], dict],
                 eval_batches: Callable[[], Iterable[dict]] | None, num_steps: int,
                 checkpointer: Checkpointer, writer: workdir_lib.MetricWriter,
                 hooks: list | None = None, best_val_loss: float | None = None):
        self.config, self.workdir, self.model, self.tokenizer = config, workdir, model, tokenizer
        self.mesh, self.state, self.state_shardings = mesh, state, state_shardings
        self.train_step, self.eval_step, self.schedule = train_step, eval_step, schedule
        self.batch_for_step, self.eval_batches = batch_for_step, eval_batches
        self.num_steps, self.checkpointer, self.writer = num_steps, checkpointer, writer
        self.hooks = list(hooks or [])
        self.step = int(jax.device_get(state.step))
        self.start_step = self.step
        self.best_val_loss = best_val_loss
        self.last_eval: dict | None = None
        self.samples: list[str] = []
        self.interrupted = False
        self.stop_requested = threading.Event()
        self.tokens_per_step = config.train.batch_size * config.model.block_size
        self.compile_seconds: float | None = None
        self._unchecked: list[tuple] = []  # (step, loss, grad_norm) still on device
        self._host_losses: list[tuple[int, float]] = []  # resolved since the last pop
        self.last_train_loss: float | None = None
        self.last_metrics: dict | None = None
        self._last_saved_step: int | None = None

    # ---- services for hooks
    def dispatch(self, event: str, *args) -> None:
        for h in self.hooks:
            getattr(h, event)(self, *args)

    def learning_rate(self, step: int) -> float:
        """The rate used by the update that produced `step` (i.e. schedule(step - 1))."""
        return float(self.schedule(max(step - 1, 0)))

    def check_finite(self, keep_last: int = 0) -> None:
        """Fetch pending losses (all but the newest `keep_last`); stop on a NaN/inf loss or
        gradient norm (an infinite gradient leaves finite-loss but poisoned parameters)."""
        while len(self._unchecked) > keep_last:
            step, loss, grad_norm = self._unchecked.pop(0)
            value, grad_norm = (float(x) for x in jax.device_get((loss, grad_norm)))
            if not (math.isfinite(value) and math.isfinite(grad_norm)):
                what = (f"training loss is {value}" if not math.isfinite(value)
                        else f"gradient norm is {grad_norm}")
                last = self.checkpointer.latest_step()
                kept = (f"the last good checkpoint (step {last}) is kept in "
                        f"{self.checkpointer.directory}" if last is not None
                        else "no checkpoint had been written yet")
                raise TrainingError(
                    f"{what} at step {step}: stopped; {kept}. Lower train.learning_rate, "
                    f"raise train.warmup_steps or set train.grad_clip")
            self._host_losses.append((step, value))
            self.last_train_loss = value

    def pop_losses(self) -> list[tuple[int, float]]:
        self.check_finite()
        out, self._host_losses = self._host_losses, []
        return out

    def evaluate(self) -> dict:
        metrics = evaluate(self.eval_step, self.state.params, self.eval_batches(), self.mesh)
        if self.best_val_loss is None or metrics["val_loss"] < self.best_val_loss:
            self.best_val_loss = metrics["val_loss"]
        metrics["best_val_loss"] = self.best_val_loss
        self.last_eval = metrics
        return metrics

    def meta(self) -> dict:
        return {"step": self.step, "data_seed": int(self.config.train.seed),
                "tokens_seen": self.step * self.tokens_per_step, "num_steps": self.num_steps,
                "best_val_loss": self.best_val_loss}

    def save_checkpoint(self) -> bool:
        """Checkpoint the current state (once per step); losses are checked first so a
        non-finite state is never saved."""
        self.check_finite()
        if self._last_saved_step == self.step:
            return False
        saved = self.checkpointer.save(self.step, params=self.state.params,
                                       opt_state=self.state.opt_state, meta=self.meta())
        self._last_saved_step = self.step
        return saved

    def _agree_to_stop(self) -> bool:
        """All processes stop at the same step: single-process checks every step, multi-process
        agrees every log_every steps."""
        if jax.process_count() == 1:
            return self.stop_requested.is_set()
        if self.step % max(int(self.config.train.log_every), 1):
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.stop_requested.is_set()))
        return bool(np.max(flags))

    # ---- the loop
    def run(self) -> Summary:
        self.dispatch("on_train_start")
        while self.step < self.num_steps:
            batch = sharding.global_batch(self.batch_for_step(self.step), self.mesh)
            first = self.compile_seconds is None
            t0 = time.perf_counter()
            self.state, metrics = self.train_step(self.state, batch)
            if first:
                jax.block_until_ready(metrics)
                self.compile_seconds = time.perf_counter() - t0
            self.step += 1
            self.last_metrics = metrics
            self._unchecked.append((self.step, metrics["loss"], metrics["grad_norm"]))
            self.check_finite(keep_last=1)  # lag one step: the device keeps working
            self.dispatch("on_step_end", self.step)
            if self._agree_to_stop():
                self.interrupted = True
                break
        self.check_finite()
        self.dispatch("on_train_end")
        return Summary(step=self.step, num_steps=self.num_steps,
                       train_loss=self.last_train_loss,
                       val_loss=self.last_eval["val_loss"] if self.last_eval else None,
                       best_val_loss=self.best_val_loss, interrupted=self.interrupted,
                       samples=list(self.samples), workdir=self.workdir)


@contextlib.contextmanager
def stop_on_signals(event: threading.Event):
    """SIGTERM / SIGINT set `event` (the loop then saves and returns) instead of killing the
    process; a second Ctrl-C raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        event.set()
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint and stopping "
              f"(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- entry point
def resolve_num_steps(train_cfg, steps_per_epoch: Callable[[], int]) -> int:
    """train.num_epochs (when set) wins over train.num_steps; one epoch = one pass over the
    packed training tokens."""
    if train_cfg.get("num_epochs") is not None:
        epochs = float(train_cfg.num_epochs)
        if epochs <= 0:
            raise ConfigError(f"train.num_epochs must be positive, got {epochs}")
        return max(1, math.ceil(epochs * steps_per_epoch()))
    n = train_cfg.num_steps
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"train.num_steps must be a positive integer, got {n!r}")
    return n


def check_train_config(config) -> None:
    t = config.train
    for key in ("batch_size", "grad_accum_steps", "log_every"):
        v = t[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"train.{key} must be a positive integer, got {v!r}")
    for key in ("eval_every", "eval_steps", "checkpoint_every", "sample_every"):
        v = t.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"train.{key} must be an integer >= 0 (0 = off), got {v!r}")
    if config.model.param_dtype != "float32":
        raise ConfigError(f"model.param_dtype={config.model.param_dtype!r}: training keeps "
                          f"float32 master weights and optimizer state; set model.dtype="
                          f"'bfloat16' for bf16 compute and leave param_dtype='float32'")


def prepare_tokenizer(config, workdir: str):
    """The run's tokenizer: the one saved in the workdir when resuming, else built from the
    config and saved there."""
    from cleangpt_jax.tokenizers import build_tokenizer, load_tokenizer

    saved = os.path.join(workdir, workdir_lib.TOKENIZER_DIR)
    if os.path.isdir(saved):
        return load_tokenizer(saved)
    return build_tokenizer(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       extra_hooks: list | None = None) -> Summary:
    """Train `config` in `workdir`, resuming from its latest checkpoint when there is one."""
    from cleangpt_jax import data as data_lib
    from cleangpt_jax.models import get_model

    sharding.initialize_distributed(config.train)
    config = ml_collections.ConfigDict(config.to_dict())  # private, resolved copy
    check_train_config(config)
    workdir = os.path.abspath(workdir)
    t = config.train
    mesh = sharding.create_mesh(int(t.get("fsdp", 1)))
    sharding.check_batch_size(t.batch_size, mesh, t.grad_accum_steps)
    micro_batch = t.batch_size // t.grad_accum_steps

    tokenizer = prepare_tokenizer(config, workdir)
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    check_vocab(tokenizer.vocab_size, config.model.vocab_size, where="model.vocab_size",
                fix="leave model.vocab_size None (the tokenizer's size)")
    mcfg = model_config(config.model)
    previous = None
    if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
        previous = workdir_lib.load_config(workdir)
        diff = workdir_lib.config_differences(previous, config)
        if diff:
            raise ConfigError(
                f"{workdir} holds a run with a different model/tokenizer ({'; '.join(diff[:4])})"
                f": pass a new --workdir, or the original settings to resume it")

    data = data_lib.load_dataset(config, tokenizer)
    block, batch_size = mcfg.block_size, t.batch_size
    num_steps = resolve_num_steps(
        t, lambda: data_lib.steps_per_epoch(data.train, batch_size, block))

    model = get_model(config=mcfg)
    optimizer, schedule = make_optimizer(t, num_steps)
    loss_terms = get_strategy(t.get("strategy", "lm"), model, config)
    init_fn = model_init_fn(model, t.seed)
    abstract, shardings = abstract_train_state(init_fn, optimizer, mesh)

    checkpointer = workdir_lib.open_checkpointer(
        workdir, max_to_keep=t.get("max_checkpoints_to_keep", 3))
    restored = checkpointer.restore_latest(params=abstract.params,
                                           opt_state=abstract.opt_state)
    if restored is None:
        state, _ = create_train_state(init_fn, optimizer, mesh)
        best = None
    else:
        step = jax.device_put(jnp.asarray(restored.step, jnp.int32), shardings.step)
        state = TrainState(step=step, params=restored.params, opt_state=restored.opt_state)
        best = restored.meta.get("best_val_loss")
        if workdir_lib.is_writer():
            print(f"Resuming from step {restored.step} ({checkpointer.directory})", flush=True)

    workdir_lib.save_config(workdir, config)
    if workdir_lib.is_writer() and not os.path.isdir(
            os.path.join(workdir, workdir_lib.TOKENIZER_DIR)):
        tokenizer.save_pretrained(os.path.join(workdir, workdir_lib.TOKENIZER_DIR))

    pi, pc = jax.process_index(), jax.process_count()

    def batch_for_step(step):
        return data_lib.batch_for_step(data.train, seed=t.seed, step=step,
                                       global_batch_size=batch_size, block_size=block,
                                       process_index=pi, process_count=pc)

    def eval_batches():
        return data_lib.eval_batches(data.val, global_batch_size=micro_batch,
                                     block_size=block, num_batches=t.eval_steps,
                                     process_index=pi, process_count=pc)

    train_step = make_train_step(loss_terms, optimizer, mesh=mesh, state_shardings=shardings,
                                 grad_accum_steps=t.grad_accum_steps, seed=t.seed)
    eval_step = make_eval_step(loss_terms, mesh=mesh, params_shardings=shardings.params)
    writer = workdir_lib.MetricWriter(
        workdir, resume_step=None if restored is None else restored.step)
    trainer = Trainer(config=config, workdir=workdir, model=model, tokenizer=tokenizer,
                      mesh=mesh, state=state, state_shardings=shardings, train_step=train_step,
                      eval_step=eval_step, schedule=schedule, batch_for_step=batch_for_step,
                      eval_batches=(eval_batches if t.eval_every and t.eval_steps
                                    and data.val is not None else None),
                      num_steps=num_steps, checkpointer=checkpointer, writer=writer,
                      hooks=hooks_lib.default_hooks(config) + list(extra_hooks or []),
                      best_val_loss=best)
    if trainer.step >= num_steps:
        if workdir_lib.is_writer():
            print(f"{workdir} is already trained to step {trainer.step} (num_steps="
                  f"{num_steps}): nothing to do; raise train.num_steps to train further",
                  flush=True)
        checkpointer.close()
        writer.close()
        return Summary(step=trainer.step, num_steps=num_steps, train_loss=None, val_loss=None,
                       best_val_loss=best, interrupted=False, samples=[], workdir=workdir)
    try:
        with stop_on_signals(trainer.stop_requested):
            return trainer.run()
    finally:
        checkpointer.close()
        writer.close()
        for h in trainer.hooks:
            if hasattr(h, "close"):
                h.close()
        logging.info("training finished at step %d", trainer.step)
