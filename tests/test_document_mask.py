"""data.document_mask: packed documents attend only within themselves (segment ids).

- The batch's segment ids: a separator begins the document that follows it.
- Every attention path (CPU blockwise, XLA, the materialised softmax, Splash run by the Pallas
  interpreter) with segment ids equals the dense block-diagonal causal reference, values and
  gradients; cuDNN cannot take them and 'auto' says so.
- The per-token losses of a packed batch equal those of its documents run one at a time, for
  Vanilla, SASP and Token-Factored (learned and ALiBi positions).
- With libtpu: a tiny train step with segment ids compiled for v5e:2x2 still runs Splash.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cleangpt_jax import data as data_lib, kernels
from cleangpt_jax.config import ConfigError, ModelConfig, get_config
from cleangpt_jax.models import get_model
from cleangpt_jax.train_step import lm_strategy

pytestmark = pytest.mark.usefixtures("fast_compile")

SEPARATOR = 0


def test_segment_ids_start_a_document_at_each_separator():
    ids = np.array([[5, 0, 3, 3, 0, 0, 7],
                    [0, 1, 2, 0, 4, 4, 4]])
    np.testing.assert_array_equal(data_lib.segment_ids(ids, SEPARATOR),
                                  [[0, 1, 1, 1, 2, 3, 3],
                                   [0, 0, 0, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    assert data_lib.with_segment_ids(batch, None) is batch
    assert data_lib.with_segment_ids(batch, SEPARATOR)["segment_ids"].dtype == np.int32


class _Tokenizer:
    def __init__(self, separator):
        self.separator = separator

    def document_separator(self):
        return self.separator


def test_document_separator_id_is_off_by_default_and_needs_one_token():
    data = get_config().data
    assert data.document_mask is False
    assert data_lib.document_separator_id(data, _Tokenizer([7])) is None
    data = ml_collections.ConfigDict({**data.to_dict(), "document_mask": True})
    assert data_lib.document_separator_id(data, _Tokenizer([7])) == 7
    with pytest.raises(ConfigError, match="one-token document separator"):
        data_lib.document_separator_id(data, _Tokenizer([7, 8]))


@pytest.mark.parametrize("backend, dtype, chosen", [
    ("cpu", "float32", "cpu_blockwise"), ("tpu", "bfloat16", "splash"),
    ("gpu", "bfloat16", "xla"),   # cuDNN through jax.nn takes no segment ids: generic path
])
def test_segments_choose_every_kernel_but_cudnn(backend, dtype, chosen):
    config = ModelConfig(model_type="vanilla", n_head=12, n_embd=768, block_size=1024,
                         dtype=dtype)
    assert kernels.attention_path(config, backend=backend, segments=True) == chosen


# ------------------------------------------------------------------------------ kernels
B, T, H, D = 2, 128, 2, 8   # T: one Splash tile; cpu_blockwise: two blocks of 64


def _packed_ids(batch_size, length, vocab_size, separators, seed=0):
    """Random non-separator tokens with SEPARATOR at the given positions of each row."""
    ids = np.random.RandomState(seed).randint(1, vocab_size, (batch_size, length))
    for row, positions in enumerate(separators):
        ids[row, positions] = SEPARATOR
    return ids.astype(np.int32)


def _reference(q, k, v, segment_ids):
    """Dense softmax(q k^T / sqrt(D)) v with the block-diagonal causal mask spelled out."""
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    t = jnp.arange(q.shape[1])
    allowed = (t[None, :] <= t[:, None]) & (segment_ids[:, None, :, None]
                                           == segment_ids[:, None, None, :])
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("implementation", ["cpu_blockwise", "xla", "xla_softmax",
                                            "splash_interpret"])
def test_every_attention_path_masks_documents(implementation):
    """Values and q, k, v gradients of each path with segment ids equal the dense reference;
    the rows hold several documents (some across the edge of two query blocks), one row
    begins with a separator."""
    ids = _packed_ids(B, T, 50, [[30, 31, 90], [0, 64, 100]])
    segment_ids = jnp.asarray(data_lib.segment_ids(ids, SEPARATOR))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, (B, T, H, D)) for key in keys)

    def value_and_grads(attend):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent)  # noqa: E731
        return attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    @jax.jit
    def compare():
        ours = value_and_grads(lambda q, k, v: kernels.causal_attention(
            q, k, v, implementation=implementation, segment_ids=segment_ids))
        ref = value_and_grads(lambda q, k, v: _reference(q, k, v, segment_ids))
        return ours, ref, kernels.causal_attention(q, k, v, implementation=implementation)

    (y, grads), (y_ref, grads_ref), unmasked = compare()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(unmasked, y_ref, atol=1e-3)  # the mask matters


# ------------------------------------------------------------------------------ models
MODELS = {
    "vanilla": dict(model_type="vanilla"),
    "sasp": dict(model_type="sasp"),
    "factored": dict(model_type="factored"),
    "factored_alibi": dict(model_type="factored", position_encoding="alibi"),
}
TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=13)
# Row 0 begins inside a document; row 1 with a separator.
SEPARATORS = [[6, 15, 24], [0, 9, 18, 26]]


def _per_token_losses(model, params, ids, segment_ids=None):
    """(B, T - 1): -log p(ids[:, t + 1] | ids[:, :t + 1]) in float32."""
    logits = model.apply({"params": params}, ids, segment_ids=segment_ids).logits
    return kernels.cross_entropy(logits[:, :-1], ids[:, 1:])


def _documents(ids):
    """Each document of the packed rows with the token after it (its last target), one per
    row, right-padded with separators (causal attention: padding after a token never changes
    its output), and where each one's targets lie in the packed rows."""
    t = ids.shape[1]
    pieces, places = [], []
    for row, separators in enumerate(SEPARATORS):
        bounds = [0, *[s for s in separators if s > 0], t]
        for start, end in zip(bounds[:-1], bounds[1:]):
            pieces.append(ids[row, start:min(end + 1, t)])
            places.append((row, start, len(pieces[-1]) - 1))
    width = max(len(p) for p in pieces)
    rows = np.full((len(pieces), width), SEPARATOR, np.int32)
    for i, piece in enumerate(pieces):
        rows[i, :len(piece)] = piece
    return jnp.asarray(rows), places


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_losses_equal_each_document_alone(name):
    """Per-token losses of packed rows with segment ids equal those of each document run as
    its own sequence (positions from 0); so does the strategy's loss that the train and eval
    steps take. Without segment ids they differ."""
    config = ModelConfig(**MODELS[name], **TINY)
    model = get_model(config=config)
    ids = jnp.asarray(_packed_ids(2, TINY["block_size"], TINY["vocab_size"], SEPARATORS))
    segment_ids = jnp.asarray(data_lib.segment_ids(ids, SEPARATOR))
    documents, places = _documents(np.asarray(ids))

    # Random parameters of the model's shapes (no init program to compile; real attention
    # scores, unlike SASP's zero-key init).
    shapes, tree = jax.tree.flatten(jax.eval_shape(model.init, jax.random.key(0), ids))
    rng = np.random.RandomState(2)
    params = tree.unflatten([0.4 * rng.standard_normal(s.shape).astype(np.float32)
                             for s in shapes])["params"]

    @jax.jit
    def losses(params):
        batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
                 "segment_ids": segment_ids}
        total, count, _ = lm_strategy(model)(params, batch, rng=None, step=0, train=False)
        return (_per_token_losses(model, params, ids, segment_ids), total / count,
                _per_token_losses(model, params, documents), _per_token_losses(model, params, ids))

    packed, strategy_loss, per_document, unmasked = losses(params)
    alone = np.zeros(packed.shape, np.float32)
    for i, (row, start, n) in enumerate(places):
        alone[row, start:start + n] = per_document[i, :n]
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(strategy_loss, alone.mean(), rtol=1e-5)
    assert not np.allclose(unmasked, alone, atol=1e-3)


# ------------------------------------------------------------------------------ TPU program
SPLASH_KERNELS = ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_a_document_masked_train_step_still_compiles_splash_for_tpu():
    """The project's train step with segment ids in the batch, compiled ahead of time for
    v5e:2x2 (no TPU needed): attention is Splash, forward and backward."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes load it
    import optax

    from cleangpt_jax import compile as compile_lib, sharding, train_step

    mesh = sharding.create_mesh(devices=compile_lib.topology_devices("v5e:2x2"))
    config = ModelConfig(model_type="vanilla", n_layer=1, n_head=2, n_embd=64, block_size=128,
                         vocab_size=64, dtype="bfloat16")
    model = get_model(config=config)
    optimizer = optax.adamw(1e-3)
    state, shardings = train_step.abstract_train_state(train_step.model_init_fn(model),
                                                       optimizer, mesh)
    step = train_step.make_train_step(train_step.lm_strategy(model), optimizer, mesh=mesh,
                                      state_shardings=shardings)
    batch = compile_lib.abstract_batch(8, config.block_size, sharding.batch_sharding(mesh),
                                       segments=True)
    assert "segment_ids" in batch
    assert compile_lib.attention_under(mesh, config, segments=True) == "splash"
    text = step.trace(state, batch).lower().compile().as_text()
    assert all(name in text for name in SPLASH_KERNELS)
