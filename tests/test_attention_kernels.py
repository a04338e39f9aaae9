"""The accelerator attention kernels (cleangpt_jax/kernels/tpu.py, gpu.py) and their choice.

- Which implementation model.attention picks per backend and call (plain CPU, no libtpu).
- Splash run by the Pallas interpreter ('splash_interpret') gives the reference attention's
  loss and gradients for Vanilla, SASP and Factored; ALiBi takes the generic path.
- With libtpu installed: 'auto' puts the Splash kernels into a tiny model's training program
  compiled for a TPU topology, and leaves them out of an ALiBi model's.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleangpt_jax import kernels
from cleangpt_jax.config import ModelConfig
from cleangpt_jax.losses import causal_lm_loss
from cleangpt_jax.models import get_model

pytestmark = pytest.mark.usefixtures("fast_compile")

PLAIN = dict(square=True, mask=False, bias=False, dropout=False, same_head_dim=True,
             length=1024, head_dim=64, dtype="bfloat16")


@pytest.mark.parametrize("setting, backend, needs, chosen", [
    ("auto", "tpu", {}, "splash"),
    ("auto", "tpu", dict(dtype="float32"), "splash"),
    ("auto", "tpu", dict(bias=True), "xla"),                  # ALiBi
    ("auto", "tpu", dict(mask=True), "xla"),
    ("auto", "tpu", dict(dropout=True), "xla_softmax"),
    ("auto", "tpu", dict(square=False, mask=True), "xla"),    # a decode step over a cache
    ("auto", "tpu", dict(length=100), "xla"),                 # T not a multiple of 128
    ("auto", "tpu", dict(head_dim=12), "xla"),
    ("auto", "tpu", dict(shardable=False), "xla"),            # several devices, no mesh set
    ("auto", "gpu", {}, "cudnn"),
    ("auto", "gpu", dict(dtype="float16"), "cudnn"),
    ("auto", "gpu", dict(dtype="float32"), "xla"),
    ("auto", "gpu", dict(bias=True), "xla"),
    ("auto", "gpu", dict(dropout=True), "xla_softmax"),
    ("auto", "cpu", {}, "cpu_blockwise"),
    ("splash", "cpu", {}, "splash"),
    ("splash_interpret", "cpu", dict(bias=True), "xla"),
    ("cudnn", "tpu", dict(dtype="float32"), "xla"),
])
def test_choose_attention_picks_the_backend_kernel_or_falls_back(setting, backend, needs,
                                                                 chosen):
    call = kernels.AttentionCall(**{**PLAIN, **needs})
    assert kernels.choose_attention(setting, backend, call) == chosen


def test_attention_path_reads_the_model_config():
    base = ModelConfig(model_type="vanilla", n_head=12, n_embd=768, block_size=1024,
                       dtype="bfloat16")
    assert kernels.attention_path(base, backend="tpu") == "splash"
    assert kernels.attention_path(base, backend="gpu") == "cudnn"
    assert kernels.attention_path(base, backend="cpu") == "cpu_blockwise"
    assert kernels.attention_path(base.replace(dtype="float32"), backend="gpu") == "xla"
    assert kernels.attention_path(base, length=1000, backend="tpu") == "xla"
    alibi = base.replace(model_type="factored", position_encoding="alibi",
                         max_position_embeddings=4096)
    assert kernels.attention_path(alibi, backend="tpu") == "xla"
    assert kernels.attention_path(base.replace(dropout=0.1), backend="tpu") == "xla_softmax"


TINY = dict(n_layer=1, n_head=2, n_embd=64, block_size=128, vocab_size=64)


def _loss_and_grads(config: ModelConfig, params, ids):
    model = get_model(config=config)
    loss = lambda p: causal_lm_loss(model.apply(p, ids).logits, ids)  # noqa: E731
    traced = jax.jit(jax.value_and_grad(loss)).trace(params)
    loss_value, grads = traced.lower().compile()(params)
    return loss_value, grads, str(traced.jaxpr).count("pallas_call")


@pytest.mark.parametrize("model_type", ["vanilla", "sasp", "factored"])
def test_interpreted_splash_equals_the_reference_attention(model_type):
    """Loss and every parameter gradient of a model attending through Splash (run by the
    Pallas interpreter) equal those through the materialised softmax."""
    config = ModelConfig(model_type=model_type, **TINY)
    model = get_model(config=config)
    ids = jax.random.randint(jax.random.key(1), (1, TINY["block_size"]), 0, TINY["vocab_size"])
    params = model.init(jax.random.key(0), ids)
    leaves, tree = jax.tree.flatten(params)   # away from SASP's zero-key init: real scores
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = tree.unflatten([p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
                             for p, k in zip(leaves, keys)])

    ref_loss, ref_grads, ref_calls = _loss_and_grads(config.replace(attention="xla_softmax"),
                                                     params, ids)
    kernel_config = config.replace(attention="splash_interpret")
    loss, grads, calls = _loss_and_grads(kernel_config, params, ids)

    assert kernels.attention_path(kernel_config) == "splash_interpret"
    assert ref_calls == 0 and calls == 3   # the kernel's forward, dq and dk/dv
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_an_alibi_model_never_reaches_the_kernel():
    """ALiBi's bias is beyond Splash: the model's training program has no Pallas call."""
    config = ModelConfig(model_type="factored", position_encoding="alibi",
                         attention="splash_interpret", **TINY)
    model = get_model(config=config)
    ids = jnp.zeros((2, TINY["block_size"]), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    loss = lambda p: causal_lm_loss(model.apply(p, ids).logits, ids)  # noqa: E731
    assert kernels.attention_path(config) == "xla"
    assert "pallas_call" not in str(jax.make_jaxpr(jax.value_and_grad(loss))(params))


SPLASH_KERNELS = ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_auto_compiles_splash_into_a_tpu_training_program():
    """On a v5e:2x2 mesh (compiled ahead of time, no TPU needed) 'auto' attention in the
    project's train step is Splash, shard_mapped over the batch, in the forward and backward;
    ALiBi takes the generic path."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes load it
    from jax.experimental import topologies

    from cleangpt_jax import sharding

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = sharding.create_mesh(devices=devices)

    def compiled_text(config):
        """The project's own train step (train_step.make_train_step) for this mesh, compiled."""
        import optax

        from cleangpt_jax import train_step

        model = get_model(config=config)
        optimizer = optax.adamw(1e-3)
        state, shardings = train_step.abstract_train_state(
            train_step.model_init_fn(model), optimizer, mesh)
        step = train_step.make_train_step(train_step.lm_strategy(model), optimizer, mesh=mesh,
                                          state_shardings=shardings)
        batch = {k: jax.ShapeDtypeStruct((8, config.block_size), jnp.int32,
                                         sharding=sharding.batch_sharding(mesh))
                 for k in ("input_ids", "attention_mask")}
        with jax.set_mesh(mesh):
            assert kernels.target_backend() == "tpu"
            path = kernels.attention_path(config)
        return path, step.trace(state, batch).lower().compile().as_text()

    config = ModelConfig(model_type="vanilla", **TINY, dtype="bfloat16")
    path, text = compiled_text(config)
    assert path == "splash"
    assert 'custom_call_target="tpu_custom_call"' in text
    assert all(name in text for name in SPLASH_KERNELS)

    alibi = config.replace(model_type="factored", position_encoding="alibi",
                           max_position_embeddings=4 * config.block_size)
    path, text = compiled_text(alibi)
    assert path == "xla"
    assert 'custom_call_target="tpu_custom_call"' not in text
    assert not any(name in text for name in SPLASH_KERNELS)
