"""Distillation pieces without a run: losses, layer maps, stages, what each stage trains,
stitching init, the stage step and its optimizer."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cleangpt_jax import optim, sharding
from cleangpt_jax.config import ConfigError, ModelConfig
from cleangpt_jax.distill import losses as L
from cleangpt_jax.distill import plan, stage_step
from cleangpt_jax.distill.config import get_config
from cleangpt_jax.distill.stitching import Stitch, init_stitching
from cleangpt_jax.models import get_model

# Tests of what programs compute: XLA optimisations off, one compile cache (conftest).
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("name", ["mse", "cosine", "kl_div", "ce"])
def test_padding_changes_no_loss(name):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 2, 6, 9)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    ref = float(L.distillation_loss(name, s, t, mask, 2.0))
    s2, t2 = s.copy(), t.copy()
    s2[0, 4:], t2[0, 4:] = 50.0, -50.0  # garbage in the padded positions
    assert float(L.distillation_loss(name, s2, t2, mask, 2.0)) == pytest.approx(ref, rel=1e-6)
    # Token-weighted mean over the 10 real tokens.
    per_token = np.asarray(L.get_loss(name)(jnp.asarray(s), jnp.asarray(t), 2.0))
    np.testing.assert_allclose(ref, per_token[mask == 1].mean(), rtol=1e-5)


def test_kl_is_a_per_token_mean_not_a_sum_over_the_sequence():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 1, 4, 7)).astype(np.float32)
    short = float(L.distillation_loss("kl_div", s, t, None, 1.0))
    long = float(L.distillation_loss("kl_div", np.tile(s, (1, 5, 1)), np.tile(t, (1, 5, 1)),
                                     None, 1.0))
    assert long == pytest.approx(short, rel=1e-5)
    # Value: T^2 * KL(p_t || p_s) with p = softmax(x / T), averaged over tokens.
    temp = 2.0
    pt = jax.nn.softmax(t / temp, -1)
    ps = jax.nn.softmax(s / temp, -1)
    ref = temp ** 2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    np.testing.assert_allclose(float(L.distillation_loss("kl_div", s, t, None, temp)), ref,
                               rtol=1e-5)


def test_cosine_and_ce_values():
    s = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)
    t = np.array([[[2.0, 0.0], [1.0, 0.0]]], np.float32)
    np.testing.assert_allclose(float(L.distillation_loss("cosine", s, t)), 0.5)  # (0 + 1) / 2
    logp = jax.nn.log_softmax(s, -1)
    np.testing.assert_allclose(float(L.distillation_loss("ce", s, t)),
                               -(logp[0, 0, 0] + logp[0, 1, 0]) / 2, rtol=1e-6)


def test_registered_custom_loss_is_usable_by_name():
    @L.register_loss("mse_cosine")
    def mse_cosine(student, teacher, temperature):
        return L.mse(student, teacher, temperature) + L.cosine(student, teacher, temperature)

    s, t = np.ones((1, 2, 3), np.float32), np.zeros((1, 2, 3), np.float32) + 0.5
    assert float(L.distillation_loss("MSE_Cosine", s, t)) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ConfigError, match="registered losses"):
        L.get_loss("huber")


def test_layer_maps():
    assert plan.layer_map("uniform", 6, 12) == [2, 4, 6, 8, 10, 12]
    assert plan.layer_map("uniform", 2, 4) == [2, 4]
    assert plan.layer_map("uniform", 3, 3) == [1, 2, 3]
    assert plan.layer_map([1, 4], 2, 4) == [1, 4]
    with pytest.raises(ConfigError, match="out of range"):
        plan.layer_map([1, 5], 2, 4)
    with pytest.raises(ConfigError, match="strictly increasing"):
        plan.layer_map([3, 2], 2, 4)
    with pytest.raises(ConfigError, match="entries"):
        plan.layer_map([1, 2, 3], 2, 4)
    with pytest.raises(ConfigError, match="teacher only"):
        plan.layer_map("uniform", 5, 4)


def test_stages_and_per_block_values():
    d = get_config().distill
    d.steps_per_block = [3, 4]
    d.learning_rate = [1e-3, 5e-4]
    d.final.enabled = True
    stages = plan.build_stages(d, 2, 4)
    assert [s.name for s in stages] == ["block_1", "block_2", "head", "final"]
    assert [s.steps for s in stages[:2]] == [3, 4]
    assert [s.learning_rate for s in stages[:2]] == [1e-3, 5e-4]
    assert [s.teacher_layer for s in stages[:2]] == [2, 4]
    d.epochs_per_block = 0.5
    assert [s.steps for s in plan.build_stages(d, 2, 4, steps_per_epoch=10)[:2]] == [5, 5]
    d.weight_decay = [0.1]
    with pytest.raises(ConfigError, match="weight_decay"):
        plan.build_stages(d, 2, 4, steps_per_epoch=10)


def _trainable(stage, paths, freeze=True, tie=False):
    return {p for p in paths
            if plan.is_trainable(stage, p, freeze_previous_blocks=freeze, tie_embeddings=tie)}


def test_what_each_stage_trains():
    paths = [("student", "wte"), ("student", "wpe"), ("student", "h_0"), ("student", "h_1"),
             ("student", "h_2"), ("student", "ln_f"), ("student", "lm_head"),
             ("stitch", "stitch_1"), ("stitch", "stitch_2"), ("stitch", "stitch_3")]
    block = lambda k: plan.Stage(f"block_{k}", "block", 1, 1e-3, 0.0, None, block=k)  # noqa
    assert _trainable(block(1), paths) == {("student", "wte"), ("student", "wpe"),
                                           ("student", "h_0"), ("stitch", "stitch_1")}
    assert _trainable(block(2), paths) == {("student", "h_1"), ("stitch", "stitch_2")}
    assert _trainable(block(3), paths, freeze=False) == {
        ("student", "wte"), ("student", "wpe"), ("student", "h_0"), ("student", "h_1"),
        ("student", "h_2"), ("stitch", "stitch_3")}
    head = plan.Stage("head", "head", 1, 1e-3, 0.0, None)
    assert _trainable(head, paths) == {("student", "ln_f"), ("student", "lm_head")}
    assert _trainable(head, paths, tie=True) == {("student", "ln_f"), ("student", "wte")}
    final = plan.Stage("final", "final", 1, 1e-3, 0.0, None)
    assert _trainable(final, paths) == {p for p in paths if p[0] == "student"}


def test_stitching_starts_as_identity_at_equal_width_and_xavier_otherwise():
    h = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    same = Stitch(8)
    p = jax.jit(same.init)(jax.random.key(1), h)["params"]
    np.testing.assert_array_equal(jax.jit(same.apply)({"params": p}, h), h)
    wide = Stitch(16)
    p = jax.jit(wide.init)(jax.random.key(1), h)["params"]
    assert p["kernel"].shape == (8, 16) and np.all(p["bias"] == 0)
    limit = np.sqrt(6 / (8 + 16))
    assert np.abs(p["kernel"]).max() <= limit and np.std(p["kernel"]) > limit / 4


def test_epochs_logit_only_plans_and_bad_plans():
    d = get_config().distill
    d.epochs_per_block = [1.0, 0.5]
    d.head.epochs = 2.0
    stages = plan.build_stages(d, 2, 4, steps_per_epoch=10)
    assert [(s.name, s.steps) for s in stages] == [("block_1", 10), ("block_2", 5),
                                                   ("head", 20)]
    d.block_stages, d.final.enabled = False, True  # logit-only distillation
    assert [s.name for s in plan.build_stages(d, 2, 4, steps_per_epoch=10)] == ["head", "final"]
    d.head.enabled = d.final.enabled = False
    with pytest.raises(ConfigError, match="no stage to run"):
        plan.build_stages(d, 2, 4)
    d = get_config().distill
    d.learning_rate = 0.0
    with pytest.raises(ConfigError, match="learning rate 0.0"):
        plan.build_stages(d, 2, 4)


TEACHER = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, bias=True,
                      activation="gelu_tanh")
STUDENT = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11,
                      tie_embeddings=False)
BLOCK_1 = plan.Stage("block_1", "block", 3, 1e-3, 0.0, 1.0, block=1, teacher_layer=1)
TRAINABLE = frozenset({("student", "h_0"), ("stitch", "stitch_1")})


def _tiny_spec(**changes):
    t = get_config().train
    spec = dict(teacher=TEACHER, student=STUDENT, stage=BLOCK_1, trainable=TRAINABLE,
                loss=L.get_loss("mse"), temperature=1.0,
                adam=(t.adam_b1, t.adam_b2, t.adam_eps))
    spec.update(changes)
    return stage_step.StepSpec(**spec)


def _tiny_models(key, ids):
    """(teacher params, {'student', 'stitch'} tree) of the tiny spec's models."""
    k0, k1, k2 = jax.random.split(key, 3)
    t_params = get_model(config=TEACHER).init(k0, ids)["params"]
    tree = {"student": get_model(config=STUDENT).init(k1, ids)["params"],
            "stitch": init_stitching(k2, 2, 8, 16, True)}
    return t_params, tree


def test_truncated_forward_gives_the_full_forward_loss():
    """Stage k's loss from the teacher run to map(k) and the student to k equals the loss of a
    full forward of both (whose logits the baseline keeps as aux)."""
    spec = _tiny_spec()
    ids = np.random.default_rng(0).integers(0, 11, size=(2, 8)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    truncated = stage_step.stage_loss_fn(spec)
    full = stage_step.stage_loss_fn(_tiny_spec(truncate=False))

    @jax.jit
    def both(key):
        t_params, tree = _tiny_models(key, ids)
        k3 = jax.random.fold_in(key, 3)
        trainable, frozen = stage_step.split(tree, spec.trainable)
        return (truncated(trainable, frozen, t_params, batch, k3),
                full(trainable, frozen, t_params, batch, k3))

    (loss, aux), (full_loss, full_aux) = both(jax.random.key(0))
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    assert aux == {} and set(full_aux) == {"teacher_logits_mean", "student_logits_mean"}


def test_a_stage_step_uses_the_configs_adam_settings():
    """Two updates of a block stage, built from the config as a run builds them: they follow
    train.adam_b1 / adam_b2 / adam_eps (the original silently used b2 = 0.95), and equal optax's
    AdamW with those values and the stage's rate, weight decay, clipping and cosine schedule."""
    stage = plan.Stage("block_1", "block", 10, 1e-2, 0.1, 1.0, block=1, teacher_layer=1)
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 11, size=(2, 8)).astype(np.int32),
                "attention_mask": np.ones((2, 8), np.int32)} for _ in range(2)]
    t_params, tree = jax.jit(_tiny_models)(jax.random.key(0), batches[0]["input_ids"])

    def two_updates(**train):
        cfg = get_config()
        cfg.train.update(train)
        cfg.distill.warmup_steps = 0
        setup = types.SimpleNamespace(config=cfg, teacher=types.SimpleNamespace(config=TEACHER),
                                      student=types.SimpleNamespace(config=STUDENT))
        paths = stage_step.trainable_paths(tree, stage, cfg, tie_embeddings=False)
        spec = stage_step.step_spec(setup, stage, paths)
        compiled = stage_step.compiled_step(spec, sharding.create_mesh())
        trainable, frozen = stage_step.split(tree, paths)
        trainable = jax.tree.map(jnp.copy, trainable)  # donated by the step
        opt_state = compiled.init(trainable)
        for i, batch in enumerate(batches):
            trainable, opt_state, _ = compiled.step(trainable, opt_state, frozen, t_params,
                                                    batch, jax.random.key(i))

        # The reference: optax from the raw numbers, gradients of the same stage loss.
        t = cfg.train
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
            optax.cosine_decay_schedule(1e-2, 10, alpha=0.1), b1=t.adam_b1, b2=t.adam_b2,
            eps=t.adam_eps, weight_decay=0.1, mask=optim.weight_decay_mask))
        grad = jax.jit(jax.grad(lambda p, b, r: stage_step.stage_loss_fn(spec)(
            p, frozen, t_params, b, r)[0]))
        ref, _ = stage_step.split(tree, paths)
        ref_state = jax.jit(tx.init)(ref)

        @jax.jit  # one program, not one per eager optax op
        def ref_update(ref, ref_state, g):
            updates, ref_state = tx.update(g, ref_state, ref)
            return optax.apply_updates(ref, updates), ref_state

        for i, batch in enumerate(batches):
            ref, ref_state = ref_update(ref, ref_state, grad(ref, batch, jax.random.key(i)))
        for k in ref:
            np.testing.assert_allclose(trainable[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
        return trainable

    default = two_updates()
    assert get_config().train.adam_b2 == 0.99
    changed = two_updates(adam_b2=0.5)
    assert {k[:2] for k in default} == {("student", "wte"), ("student", "wpe"),
                                        ("student", "h_0"), ("stitch", "stitch_1")}
    assert any(not np.allclose(default[k], changed[k], rtol=0, atol=1e-6) for k in default)
    two_updates(adam_b1=0.5, adam_eps=1e-3)


def test_linear_cka_is_one_for_rotated_scaled_copies_and_low_for_unrelated_states():
    """CKA(X, c X Q) = 1 for an orthogonal Q (any width: Q may embed d_x into d_y > d_x) and a
    scalar c; unrelated Gaussian states give a small value; it is symmetric."""
    from cleangpt_jax.distill.analysis import linear_cka

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16))
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    y = 3.0 * x @ q[:16] + 5.0  # (a constant shift: CKA centres the tokens)
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-12)
    unrelated = rng.normal(size=(512, 32))
    assert linear_cka(x, unrelated) < 0.1
    assert linear_cka(x, unrelated) == pytest.approx(linear_cka(unrelated, x), abs=1e-12)
    half = np.concatenate([x[:, :8], rng.normal(size=(512, 8))], axis=1)
    assert 0.3 < linear_cka(x, half) < 0.8


def test_paired_difference_is_the_student_t_interval_of_the_per_seed_differences():
    """n = 3 seeds: the interval is mean +- 4.303 sd / sqrt(3) (t_{0.975, 2} = 4.3027)."""
    from cleangpt_jax.distill.analysis import paired_difference

    a, b = [2.0, 2.2, 2.1], [1.5, 1.9, 1.5]
    d = paired_difference(a, b)
    diffs = np.subtract(a, b)
    half = 4.302653 * diffs.std(ddof=1) / np.sqrt(3)
    assert d["mean"] == pytest.approx(diffs.mean()) and d["n"] == 3
    assert (d["low"], d["high"]) == (pytest.approx(diffs.mean() - half, abs=1e-5),
                                     pytest.approx(diffs.mean() + half, abs=1e-5))
    assert d["spread"] == pytest.approx(np.std(b, ddof=1))  # the larger seed sd of the two
    assert d["significant"] and d["exceeds_spread"]
    flat = paired_difference([2.0, 2.1, 2.0], [2.01, 2.0, 2.05])
    assert not flat["significant"] and not flat["exceeds_spread"]
    with pytest.raises(ValueError, match="two equal-length lists of >= 2 values"):
        paired_difference([1.0], [2.0])
