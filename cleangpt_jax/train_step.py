"""The training step: loss strategies, the train state, the sharded train and eval steps.

    loss_terms = get_strategy(config.train.strategy, model, config)    # `STRATEGIES` by name
    state, shardings = create_train_state(model_init_fn(model), optimizer, mesh, seed=seed)
    train_step = make_train_step(loss_terms, optimizer, mesh=mesh, state_shardings=shardings)
    state, metrics = train_step(state, batch)      # jit-compiled, sharded, state donated

`cleangpt_jax.trainer` builds these from a config and runs the loop; distillation builds its
own per-stage step (distill/stage_step.py) from the same model_init_fn, dropout-key rule and
eval step.

The loss contract. A strategy's loss_terms(params, batch, *, rng, step, train) returns float32
scalars (loss_sum, count, extra_sums): the sum of per-token losses, the number of scored tokens
and a dict of other per-token sums worth reporting. The step divides exactly once:

    loss = sum_micro loss_sum / sum_micro count,    grads = d(sum_micro loss_sum) / sum count

over every micro-batch (gradient accumulation) and every device (the batch is sharded on the
mesh, XLA inserts the all-reduce), so both equal the token-weighted mean over the global batch.

Randomness: parameters come from fold_in(key(seed), 0); the dropout key of step s is
fold_in(fold_in(key(seed), 1), s) (and fold_in(., i) for micro-batch i). The seed's keys enter
the compiled programs as arguments (the init's key; TrainState.dropout_key), never as
constants, so every seed runs the same programs and a seed sweep compiles them once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cleangpt_jax import sharding
from cleangpt_jax.config import ConfigError, get_config, loss_chunk_setting, remat_setting
from cleangpt_jax.losses import lm_loss_terms
from cleangpt_jax.models.base import head_fn, head_params
from cleangpt_jax.registry import Registry

PARAMS_SEED_SALT, DROPOUT_SEED_SALT = 0, 1


# ------------------------------------------------------------------------------ strategies
LossTerms = Callable[..., tuple]
# name -> factory(model, config) -> loss_terms; `train.strategy` picks one.
STRATEGIES = Registry("train.strategy", "strategies")
register_strategy = STRATEGIES.register


def get_strategy(name: str, model, config) -> LossTerms:
    """The loss_terms of the strategy registered as `name`, built for `model` and `config`."""
    return STRATEGIES[name](model, config)


@register_strategy("lm")
def lm_strategy(model, config=None) -> LossTerms:
    """Next-token cross-entropy on batch['input_ids'] (padding masked by 'attention_mask';
    attention kept within documents by 'segment_ids' when the batch has them), with
    config.train's remat and loss_chunk_tokens (the defaults when config is None)."""
    train_cfg = (config if config is not None else get_config()).train
    model = model.clone(remat=remat_setting(train_cfg.remat))
    chunk_tokens = loss_chunk_setting(train_cfg.loss_chunk_tokens)
    head = head_fn(model)

    def loss_terms(params, batch, *, rng, step, train):
        del step
        out = model.apply({"params": params}, batch["input_ids"], deterministic=not train,
                          rngs={"dropout": rng} if train else None, head=False,
                          segment_ids=batch.get("segment_ids"))
        total, count = lm_loss_terms(head, head_params(params), out.last_hidden_state,
                                     batch["input_ids"], batch.get("attention_mask"),
                                     chunk_tokens=chunk_tokens)
        return total, count, {}

    return loss_terms


# ----------------------------------------------------------------------------- train state
@flax.struct.dataclass
class TrainState:
    """What a step reads and returns. A checkpoint keeps params and opt_state (and the step in
    its meta); dropout_key is rebuilt from train.seed on restore (`dropout_key`)."""
    step: jax.Array         # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    dropout_key: jax.Array  # typed key: dropout_key(key(seed))


def params_key(seed_key: jax.Array) -> jax.Array:
    """The key a run's parameters are initialised from: fold_in(key(seed), 0)."""
    return jax.random.fold_in(seed_key, PARAMS_SEED_SALT)


def dropout_key(seed_key: jax.Array) -> jax.Array:
    """The key whose fold_in(., step) is step's dropout key: fold_in(key(seed), 1)."""
    return jax.random.fold_in(seed_key, DROPOUT_SEED_SALT)


def model_init_fn(model) -> Callable[[jax.Array], Any]:
    """key -> `model`'s parameter tree (trace it under jit: nothing is built on one device)."""
    ids = jnp.zeros((1, model.config.block_size), jnp.int32)
    return lambda key: model.init(key, ids)["params"]


def _initial_state(init_params: Callable[[jax.Array], Any], optimizer, seed_key) -> TrainState:
    params = init_params(params_key(seed_key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), dropout_key=dropout_key(seed_key))


def abstract_train_state(init_params: Callable[[jax.Array], Any], optimizer, mesh):
    """(TrainState of ShapeDtypeStructs with target shardings, the shardings tree)."""
    shapes = jax.eval_shape(functools.partial(_initial_state, init_params, optimizer),
                            jax.random.key(0))
    return sharding.abstract_state(shapes, mesh), sharding.state_shardings(shapes, mesh)


def create_train_state(init_params: Callable[[jax.Array], Any], optimizer, mesh, *, seed: int):
    """Fresh TrainState for `seed`, built directly in its sharded layout; returns (state,
    shardings). `init_params` (`model_init_fn`) is traced under jit with key(seed) as an
    argument, so nothing is materialised on one device first and every seed shares the program.
    """
    _, shardings = abstract_train_state(init_params, optimizer, mesh)
    state = jax.jit(functools.partial(_initial_state, init_params, optimizer),
                    out_shardings=shardings)(jax.random.key(seed))
    return state, shardings


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
                    grad_accum_steps: int = 1):
    """jit-compiled (state, batch) -> (state, metrics); the input state is donated.

    metrics (replicated float32 scalars): loss (of the parameters before the update), grad_norm
    (before clipping), param_norm (the global norm of the updated parameters: what
    `loop.fetch_finite` checks before the state is saved) and the strategy's extras.
    """
    @sharding.traced_under(mesh)
    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(state.dropout_key, state.step)
        loss, extra, grads = loss_and_grads(loss_terms, state.params, batch, rng=rng,
                                            step=state.step, grad_accum_steps=grad_accum_steps,
                                            mesh=mesh)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params), **extra}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_eval_step(loss_terms: LossTerms, *, mesh, params_shardings):
    """jit-compiled (params, batch) -> (loss_sum, count), dropout off."""

    @sharding.traced_under(mesh)
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
        raise ConfigError("the validation set yielded no tokens to score: lower "
                          "train.eval_steps' batch or check data.val_fraction")
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 80.0)), "val_tokens": int(count)}
