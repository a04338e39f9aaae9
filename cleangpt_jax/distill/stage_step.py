"""One distillation stage's compiled update: which leaves it trains, its loss, its optimizer.

The {'student', 'stitch'} tree is split into the leaves a stage trains (`trainable_paths`, from
`plan.is_trainable`) and the frozen rest; inside the loss the frozen leaves enter through
stop_gradient (`merge`), so the frozen prefix costs its forward pass and no backward work.
For block stage k, with theta_k the trainable leaves:

    target = teacher(ids, num_blocks=map(k)).hidden_states[map(k)]      (no gradient)
    hidden = student(ids, num_blocks=k).hidden_states[k]                (B, T, d_s)
    loss   = sum_bt mask * hidden_loss(stitch_k(hidden), target) / sum_bt mask

The head and final stages compare logits: logit_weight * logit_loss(T) + lm_weight * LM loss,
both computed from the two models' final hidden states and heads, chunk by chunk
(train.loss_chunk_tokens). The student's blocks are rematerialised under train.remat.
`compiled_step(step_spec(...), mesh)` is the jitted update; equal specs share one executable.
`distill.runner.run_stage` is the loop that calls it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from cleangpt_jax import sharding
from cleangpt_jax.config import ModelConfig, loss_chunk_setting, remat_setting
from cleangpt_jax.distill import plan as plan_lib
from cleangpt_jax.distill.losses import distillation_loss, get_loss, logit_stage_loss
from cleangpt_jax.distill.stitching import apply_stitch
from cleangpt_jax.models import get_model
from cleangpt_jax.models.base import head_fn, head_params
from cleangpt_jax.optim import make_optimizer


# ------------------------------------------------------------------------ trainable split

def trainable_paths(tree, stage, cfg, tie_embeddings: bool) -> frozenset:
    """Paths ('student'|'stitch', ...) of the leaves `stage` trains."""
    return frozenset(
        p for p in traverse_util.flatten_dict(tree)
        if plan_lib.is_trainable(stage, p, tie_embeddings=tie_embeddings,
                                 freeze_previous_blocks=cfg.distill.freeze_previous_blocks))


def split(tree, paths: frozenset):
    """(trainable, frozen) flat dicts {path: leaf} of the {'student', 'stitch'} tree."""
    flat = traverse_util.flatten_dict(tree)
    return ({p: v for p, v in flat.items() if p in paths},
            {p: v for p, v in flat.items() if p not in paths})


def join(trainable, frozen):
    """The nested tree again (outside jit)."""
    return traverse_util.unflatten_dict({**frozen, **trainable})


def merge(trainable, frozen):
    """The nested tree inside the loss: frozen leaves under stop_gradient."""
    return join(trainable, jax.lax.stop_gradient(frozen))


def place(tree, mesh, *, copy: bool = False):
    """Lay a tree out as training does (replicated, or fsdp-sharded); `copy` guarantees fresh
    buffers, so a donated leaf never aliases a frozen or teacher array."""
    return jax.device_put(tree, sharding.state_shardings(tree, mesh),
                          may_alias=False if copy else None)


# ------------------------------------------------------------------------------ the steps

@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything one stage's compiled step depends on (hashable: the cache key)."""

    teacher: ModelConfig
    student: ModelConfig
    stage: plan_lib.Stage
    trainable: frozenset
    loss: Callable              # per-token loss from the registry
    temperature: float
    adam: tuple[float, float, float]  # AdamW (b1, b2, eps): train.adam_b1/adam_b2/adam_eps
    logit_weight: float = 1.0
    lm_weight: float = 0.0
    stitching: bool = True
    stitching_bias: bool = True
    warmup_steps: int = 0
    truncate: bool = True       # False: both models run every block and their heads (the
    #                             full-forward baseline scripts/distill_study.py times)
    remat: str = "none"         # the student's blocks: train.remat ('none': no remat)
    loss_chunk_tokens: int = 0  # the logit losses: train.loss_chunk_tokens (0: plain)


def step_spec(s, stage, paths: frozenset, *, truncate: bool = True) -> StepSpec:
    """The spec of `stage`'s step in the run `s` (a `runner.Setup`: its config and the two
    models' configs)."""
    d, t = s.config.distill, s.config.train
    common = dict(teacher=s.teacher.config, student=s.student.config, stage=stage,
                  trainable=paths,
                  adam=(float(t.adam_b1), float(t.adam_b2), float(t.adam_eps)),
                  stitching=bool(d.stitching),
                  stitching_bias=bool(d.stitching_bias), warmup_steps=int(d.warmup_steps),
                  truncate=truncate, remat=remat_setting(t.remat),
                  loss_chunk_tokens=loss_chunk_setting(t.loss_chunk_tokens))
    if stage.kind == "block":
        return StepSpec(loss=get_loss(d.hidden_loss), temperature=float(d.hidden_temperature),
                        **common)
    c = d[stage.kind]
    return StepSpec(loss=get_loss(c.logit_loss), temperature=float(c.temperature),
                    logit_weight=float(c.logit_weight), lm_weight=float(c.lm_weight), **common)


def stage_optimizer(stage, warmup_steps: int, adam: tuple[float, float, float]):
    """The training optimizer (AdamW with the run's (b1, b2, eps), decay on >= 2-D weights
    only, global-norm clipping) for one stage: the stage's learning rate, weight decay and
    clipping, linear warmup, then cosine decay to 10% of the stage's learning rate."""
    b1, b2, eps = adam
    return make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=stage.learning_rate, min_lr=0.1 * stage.learning_rate,
        warmup_steps=min(warmup_steps, stage.steps // 10), lr_schedule="cosine",
        grad_clip=stage.grad_clip or 0.0, weight_decay=stage.weight_decay,
        adam_b1=b1, adam_b2=b2, adam_eps=eps)), stage.steps)


def stage_loss_fn(spec: StepSpec):
    """loss(trainable, frozen, teacher_params, batch, rng) -> (loss, aux) for one stage."""
    teacher, stage = get_model(config=spec.teacher), spec.stage
    student = get_model(config=spec.student).clone(remat=spec.remat)

    def forward(trainable, frozen, teacher_params, batch, rng, *, hidden: bool):
        tree = merge(trainable, frozen)
        ids = batch["input_ids"]
        t_blocks = stage.teacher_layer if (hidden and spec.truncate) else None
        s_blocks = stage.block if (hidden and spec.truncate) else None
        segments = batch.get("segment_ids")  # data.document_mask: both attend per document
        t_out = teacher.apply({"params": teacher_params}, ids, num_blocks=t_blocks,
                              output_hidden_states=hidden, head=hidden, segment_ids=segments)
        s_out = student.apply({"params": tree["student"]}, ids, num_blocks=s_blocks,
                              output_hidden_states=hidden, deterministic=False,
                              rngs={"dropout": rng}, head=hidden, segment_ids=segments)
        aux = {}
        if hidden and not spec.truncate:  # keep the heads alive: XLA would prune them
            aux = {"teacher_logits_mean": jnp.mean(jax.lax.stop_gradient(t_out.logits)),
                   "student_logits_mean": jnp.mean(jax.lax.stop_gradient(s_out.logits))}
        return tree, t_out, s_out, aux

    def block_loss(trainable, frozen, teacher_params, batch, rng):
        tree, t_out, s_out, aux = forward(trainable, frozen, teacher_params, batch, rng,
                                          hidden=True)
        target = jax.lax.stop_gradient(t_out.hidden_states[stage.teacher_layer])
        pred = apply_stitch(tree.get("stitch") if spec.stitching else None, stage.block,
                            s_out.hidden_states[stage.block], spec.teacher.n_embd,
                            spec.stitching_bias)
        loss = distillation_loss(spec.loss, pred, target, batch["attention_mask"],
                                 spec.temperature)
        return loss, aux

    def logit_loss(trainable, frozen, teacher_params, batch, rng):
        tree, t_out, s_out, aux = forward(trainable, frozen, teacher_params, batch, rng,
                                          hidden=False)
        loss = logit_stage_loss(
            spec.loss, head_fn(student), head_params(tree["student"]), s_out.last_hidden_state,
            head_fn(teacher), head_params(teacher_params), t_out.last_hidden_state,
            batch["input_ids"], batch["attention_mask"], spec.temperature,
            logit_weight=spec.logit_weight, lm_weight=spec.lm_weight,
            chunk_tokens=spec.loss_chunk_tokens)
        return loss, aux

    return block_loss if stage.kind == "block" else logit_loss


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    step: Callable      # (trainable, opt_state, frozen, teacher_params, batch, rng)
    #                     -> (trainable, opt_state, metrics); trainable and opt_state donated
    init: Callable      # trainable -> opt_state
    schedule: Callable  # stage step -> learning rate


@functools.lru_cache(maxsize=64)
def compiled_step(spec: StepSpec, mesh: jax.sharding.Mesh) -> CompiledStep:
    """The jit-compiled update of one stage for arrays laid out over `mesh` (cached: equal
    specs share the executable). The step is traced under the mesh, so that kernels' 'auto'
    sees the platform the program is for."""
    loss_fn = stage_loss_fn(spec)
    tx, schedule = stage_optimizer(spec.stage, spec.warmup_steps, spec.adam)

    @sharding.traced_under(mesh)
    def step(trainable, opt_state, frozen, teacher_params, batch, rng):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, teacher_params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(trainable), **aux}  # checked before a save
        return trainable, opt_state, metrics

    return CompiledStep(jax.jit(step, donate_argnums=(0, 1)), jax.jit(tx.init),
                        jax.jit(schedule))
