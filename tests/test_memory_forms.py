"""The memory-saving forms compute what the plain forms compute: per-block remat (train.remat)
and the vocabulary-chunked LM and distillation logit losses (train.loss_chunk_tokens), values
and gradients within float32 rounding, for all three architectures; remat leaves the
parameter tree unchanged; a chunked loss never makes a (B, T, V) array. The blocks as one
lax.scan (model.scan_layers) compute what the unrolled blocks compute, on the same tree."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cleangpt_jax import losses
from cleangpt_jax import train_step
from cleangpt_jax.config import ConfigError, ModelConfig, get_config
from cleangpt_jax.distill import losses as distill_losses
from cleangpt_jax.distill import plan, stage_step
from cleangpt_jax.distill.config import get_config as distill_config
from cleangpt_jax.distill.stitching import init_stitching
from cleangpt_jax.models import get_model
from cleangpt_jax.models.base import head_fn, head_params
from helpers import one_line_error

pytestmark = pytest.mark.usefixtures("fast_compile")

B, T, V = 3, 7, 97  # B * T = 21 tokens; chunks of 5 tokens -> 1 position, 8 -> 2 (pads T to 8)
ARCHS = {
    "vanilla": dict(model_type="vanilla", bias=True),
    "sasp": dict(model_type="sasp", tie_embeddings=False),
    "factored": dict(model_type="factored", position_encoding="alibi", use_v=True),
}


def _model(arch, **changes):
    cfg = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=V, **ARCHS[arch])
    cfg.update(changes)
    return get_model(config=ModelConfig(**cfg))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[0, 5:] = 0  # right padding in row 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))


def _assert_trees_close(a, b, atol=2e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert _max_diff(a, b) <= atol, _max_diff(a, b)


def _train_config(**train):
    cfg = get_config()
    cfg.train.update(train)
    return cfg


@pytest.mark.parametrize("arch", ["vanilla", "sasp"])
def test_remat_keeps_the_parameters_and_the_gradients(arch):
    """train.remat 'block' and 'matmuls' init the same parameter tree (same paths, the same
    values up to float32 rounding)
    and give the 'lm' strategy's loss and gradients of remat 'none', dropout included.
    (Factored's remat is checked through the scanned blocks below.)"""
    model = _model(arch, dropout=0.1)
    batch = _batch()
    params = model.init(jax.random.key(0), batch["input_ids"])["params"]
    paths = set(traverse_util.flatten_dict(params))

    # Every architecture's blocks go through the one nn.remat wrapper; each policy is checked
    # on Vanilla, the whole-block policy on all three (what differs between them is the block).
    policies = ("block", "matmuls") if arch == "vanilla" else ("block",)

    @jax.jit
    def loss_and_grads(params):
        out = {}
        for remat in ("none", *policies):
            terms = train_step.lm_strategy(model, _train_config(remat=remat,
                                                                 loss_chunk_tokens=0))
            out[remat] = jax.value_and_grad(lambda p: terms(
                p, batch, rng=jax.random.key(1), step=0, train=True)[0])(params)
        return out

    out = loss_and_grads(params)
    for remat in policies:
        rematted = model.clone(remat=remat).init(jax.random.key(0), batch["input_ids"])
        assert set(traverse_util.flatten_dict(rematted["params"])) == paths
        # (init under nn.remat runs as one traced computation: the same draws, rounded once
        # differently at most)
        _assert_trees_close(rematted["params"], params, atol=1e-7)
        np.testing.assert_allclose(out[remat][0], out["none"][0], rtol=1e-6)
        _assert_trees_close(out[remat][1], out["none"][1])


@pytest.mark.parametrize("arch", ["vanilla", "factored"])
def test_scanned_blocks_equal_unrolled_blocks(arch):
    """model.scan_layers: the same parameter tree (init runs the blocks unrolled); the same
    logits, hidden states and 'lm' gradients as the unrolled blocks without remat, within
    float32 rounding, scanned with and without remat;
    with dropout on, the scanned blocks do drop (training differs from deterministic). The
    scan calls any block class the same way; Factored's carry is a pair (xt, xe)."""
    unrolled = _model(arch, n_layer=3, dropout=0.1)
    scanned = _model(arch, n_layer=3, dropout=0.1, scan_layers=True)
    batch = _batch()
    params = unrolled.init(jax.random.key(0), batch["input_ids"])["params"]
    _assert_trees_close(scanned.init(jax.random.key(0), batch["input_ids"])["params"], params,
                        atol=0)
    remats = ("none", "block") if arch == "vanilla" else ("block",)

    @jax.jit
    def forward_and_grads(params):
        out = {}
        for name, model in (("unrolled", unrolled), ("scanned", scanned)):
            o = model.apply({"params": params}, batch["input_ids"], output_hidden_states=True)
            out[name] = {"logits": o.logits, "hidden": o.hidden_states}
            for remat in remats if name == "scanned" else ("none",):
                terms = train_step.lm_strategy(model, _train_config(remat=remat))
                out[name][remat] = jax.value_and_grad(lambda p: terms(
                    p, batch, rng=jax.random.key(1), step=0, train=False)[0])(params)
        train_terms = train_step.lm_strategy(scanned, _train_config())
        out["dropped"] = train_terms(params, batch, rng=jax.random.key(1), step=0, train=True)[0]
        return out

    out = forward_and_grads(params)
    assert len(out["scanned"]["hidden"]) == 4
    _assert_trees_close(out["scanned"]["logits"], out["unrolled"]["logits"])
    _assert_trees_close(out["scanned"]["hidden"], out["unrolled"]["hidden"])
    for remat in remats:
        np.testing.assert_allclose(out["scanned"][remat][0], out["unrolled"]["none"][0],
                                   rtol=1e-6)
        _assert_trees_close(out["scanned"][remat][1], out["unrolled"]["none"][1])
    assert abs(float(out["dropped"]) - float(out["scanned"][remats[0]][0])) > 1e-4


def test_bad_memory_settings_are_one_line_config_errors():
    with pytest.raises(ConfigError) as e:
        train_step.lm_strategy(_model("vanilla"), _train_config(remat="full"))
    assert "'none', 'block', 'matmuls'" in one_line_error(e)
    with pytest.raises(ConfigError) as e:
        train_step.lm_strategy(_model("vanilla"), _train_config(loss_chunk_tokens=-1))
    assert "train.loss_chunk_tokens" in one_line_error(e)
    with pytest.raises(ConfigError) as e:
        _model("vanilla", scan_layers="yes")
    assert "model.scan_layers must be True or False" in one_line_error(e)


def test_chunking_rule():
    """Chunks only when the batch has more tokens than one chunk; positions = N // B (>= 1)."""
    assert losses.chunk_positions((B, T), 0) is None
    assert losses.chunk_positions((B, T), B * T) is None
    assert losses.chunk_positions((B, T), 8) == 2
    assert losses.chunk_positions((B, T), 2) == 1
    assert losses.chunk_positions((32, 1024), get_config().train.loss_chunk_tokens) == 256


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_chunked_lm_loss_equals_the_plain_loss(arch):
    """lm_loss_terms from the final hidden states with chunks of 1 and 2 positions (T = 7
    padded to 8) equals the plain form and causal_lm_loss_terms over the model's logits:
    values, counts and gradients through the whole model, with padding and an ignored
    label."""
    model = _model(arch)
    batch = _batch(1)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.at[1, 3].set(losses.IGNORE_INDEX)
    params = model.init(jax.random.key(0), ids)["params"]

    def terms(params, chunk):
        hidden = model.apply({"params": params}, ids, head=False).last_hidden_state
        return losses.lm_loss_terms(head_fn(model), head_params(params), hidden, labels, mask,
                                    chunk_tokens=chunk)

    @jax.jit
    def all_forms(params):
        logits = model.apply({"params": params}, ids).logits
        return ({chunk: jax.value_and_grad(lambda p: terms(p, chunk)[0])(params)
                 for chunk in (0, 5, 8)},
                {chunk: terms(params, chunk)[1] for chunk in (0, 8)},
                losses.causal_lm_loss_terms(logits, labels, mask))

    forms, counts, reference = all_forms(params)
    plain_total, plain_grads = forms[0]
    np.testing.assert_allclose(plain_total, reference[0], rtol=1e-6)
    assert float(counts[0]) == float(counts[8]) == float(reference[1]) == 4 + 6 + 6 - 1
    for chunk in (5, 8):
        total, grads = forms[chunk]
        np.testing.assert_allclose(total, plain_total, rtol=1e-6)
        _assert_trees_close(grads, plain_grads)


def test_chunked_logit_losses_equal_the_plain_losses():
    """distill.losses.logit_stage_loss over a teacher and an untied student head, for kl_div,
    ce and mse (and kl_div plus the LM term): chunks of 1 and 2 positions equal the plain form
    and `distillation_loss` (+ `causal_lm_loss`) of the full logits, values and gradients
    (student head parameters and hidden states), with padding."""
    teacher, student = _model("vanilla", n_embd=24), _model("sasp")
    batch = _batch(2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    t_params = teacher.init(jax.random.key(0), ids)["params"]
    s_params = student.init(jax.random.key(1), ids)["params"]
    t_hidden = teacher.apply({"params": t_params}, ids, head=False).last_hidden_state
    s_hidden = student.apply({"params": s_params}, ids, head=False).last_hidden_state
    forms = (("kl_div", 0.0), ("ce", 0.0), ("mse", 0.0), ("kl_div", 0.5))
    chunks = {form: (5, 8) if form[1] else (8,) for form in forms}  # 1 and 2 positions

    @jax.jit
    def all_forms(s_head, s_hidden):
        def stage_loss(form, chunk, s_head, s_hidden):
            return distill_losses.logit_stage_loss(
                form[0], head_fn(student), s_head, s_hidden, head_fn(teacher),
                head_params(t_params), t_hidden, ids, mask, 2.0, logit_weight=0.7,
                lm_weight=form[1], chunk_tokens=chunk)

        s_logits, t_logits = head_fn(student)(s_head, s_hidden), head_fn(teacher)(t_params,
                                                                                 t_hidden)
        reference = {form: 0.7 * distill_losses.distillation_loss(form[0], s_logits, t_logits,
                                                                  mask, 2.0)
                     + form[1] * losses.causal_lm_loss(s_logits, ids, mask) for form in forms}
        return {(form, chunk): jax.value_and_grad(stage_loss, argnums=(2, 3))(
            form, chunk, s_head, s_hidden) for form in forms for chunk in (0, *chunks[form])}, \
            reference

    out, reference = all_forms(head_params(s_params), s_hidden)
    for form in forms:
        np.testing.assert_allclose(out[form, 0][0], reference[form], rtol=1e-6, atol=2e-7)
        assert float(jnp.abs(out[form, 0][1][1]).max()) > 0
        for chunk in chunks[form]:
            np.testing.assert_allclose(out[form, chunk][0], out[form, 0][0], rtol=1e-6,
                                       atol=2e-7)
            _assert_trees_close(out[form, chunk][1], out[form, 0][1])


def test_chunked_lm_loss_never_makes_whole_logits():
    """The jaxpr of the 'lm' strategy's chunked loss and its gradient has no array of B * T * V
    or more elements (the plain one does)."""
    model = _model("vanilla")
    batch = _batch()
    params = model.init(jax.random.key(0), batch["input_ids"])["params"]

    def largest(chunk):
        terms = train_step.lm_strategy(model, _train_config(loss_chunk_tokens=chunk))
        fn = jax.value_and_grad(lambda p: terms(p, batch, rng=None, step=0, train=False)[0])
        return max(np.prod(v.aval.shape, dtype=int) for v in _all_vars(jax.make_jaxpr(fn)(
            params).jaxpr))

    assert largest(8) < B * T * V <= largest(0)


def _all_vars(jaxpr):
    """Every variable a jaxpr and its nested jaxprs (scan bodies, custom VJPs) define."""
    for eqn in jaxpr.eqns:
        yield from eqn.outvars
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _all_vars(sub)


TEACHER = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=V, bias=True)
STUDENT = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=V,
                      tie_embeddings=False, dropout=0.1)


@pytest.mark.parametrize("kind", ["block", "final"])
def test_a_distillation_stage_with_remat_and_chunks_equals_the_plain_stage(kind):
    """One stage's loss and gradients (a block stage; the final stage with KL and the LM term)
    with train.remat='block' and chunked logit losses equal those of the plain stage."""
    t = get_config().train
    stage = (plan.Stage("block_1", "block", 3, 1e-3, 0.0, 1.0, block=1, teacher_layer=1)
             if kind == "block" else plan.Stage("final", "final", 3, 1e-3, 0.0, 1.0))
    batch = _batch(3)
    ids = batch["input_ids"]
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    t_params = get_model(config=TEACHER).init(k0, ids)["params"]
    tree = {"student": get_model(config=STUDENT).init(k1, ids)["params"],
            "stitch": init_stitching(k2, 1, 8, 16, True)}
    paths = stage_step.trainable_paths(tree, stage, distill_config(), tie_embeddings=False)
    trainable, frozen = stage_step.split(tree, paths)

    def spec(**changes):
        return stage_step.StepSpec(
            teacher=TEACHER, student=STUDENT, stage=stage, trainable=paths,
            loss=distill_losses.get_loss("mse" if kind == "block" else "kl_div"),
            temperature=2.0, adam=(t.adam_b1, t.adam_b2, t.adam_eps), lm_weight=1.0,
            **changes)

    @jax.jit
    def both(trainable):
        return [jax.value_and_grad(stage_step.stage_loss_fn(s), has_aux=True)(
            trainable, frozen, t_params, batch, jax.random.key(4))
            for s in (spec(), spec(remat="block", loss_chunk_tokens=8))]

    ((plain, _), plain_grads), ((rematted, _), grads) = both(trainable)
    np.testing.assert_allclose(rematted, plain, rtol=1e-6)
    assert _max_diff(plain_grads, jax.tree.map(jnp.zeros_like, plain_grads)) > 0
    _assert_trees_close(grads, plain_grads)
