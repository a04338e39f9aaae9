"""The hand-written training fast paths equal the plain formulations they replace: blockwise
causal attention (the CPU path) vs jax.nn.dot_product_attention, the LayerNorm backward vs
autodiff, the 2-D Dense product, and the cross-entropy backward vs autodiff (values and
gradients, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cleangpt_jax.config import model_config
from cleangpt_jax.losses import IGNORE_INDEX, causal_lm_loss_terms, cross_entropy
from cleangpt_jax.models import get_model, layers

TOL = dict(rtol=1e-5, atol=1e-5)


def normal(i, shape):
    return jax.random.normal(jax.random.key(i), shape, jnp.float32)


@pytest.mark.parametrize("alibi", [False, True])
def test_blockwise_attention_equals_dot_product_attention(alibi):
    b, t, h, d = 2, 20, 3, 8
    q, k, v, w = (normal(i, (b, t, h, d)) for i in range(4))
    bias = layers.alibi_bias(h, jnp.arange(t), jnp.arange(t)) if alibi else None

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    # Blocks of 8 queries: 8, 8 and a ragged 4, so both the skipped key ranges and the
    # ragged last block are exercised.
    ours = lambda q, k, v: layers.blockwise_causal_attention(q, k, v, bias=bias,  # noqa: E731
                                                            block_size=8)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias,  # noqa: E731
                                                       is_causal=True)
    both = jax.jit(lambda q, k, v: [(f(q, k, v), jax.grad(lambda *a: loss(f, *a),
                                                          argnums=(0, 1, 2))(q, k, v))
                                    for f in (ours, ref)])
    (y, g), (y_ref, g_ref) = both(q, k, v)
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, **TOL)


def test_blockwise_attention_dropout_equals_the_materialised_path(monkeypatch):
    """Same key, same dropped entries: the CPU path (two query blocks at T = 72) and the
    generic one agree."""
    q, k, v = (normal(i, (1, 72, 2, 4)) for i in range(3))
    run = lambda rng: layers.causal_attention(  # noqa: E731
        q, k, v, dropout_rate=0.5, deterministic=False, dropout_rng=jax.random.key(rng))
    cpu = jax.jit(run)(0)
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    np.testing.assert_allclose(cpu, jax.jit(run)(0), **TOL)
    assert not np.allclose(cpu, jax.jit(run)(1))


def test_model_on_the_cpu_path_matches_the_generic_path(monkeypatch):
    """A whole model (T = 80: query blocks of 64 and 16) gives the same loss and gradients
    through blockwise attention as through jax.nn.dot_product_attention."""
    cfg = model_config(dict(model_type="vanilla", n_layer=1, n_head=2, n_embd=16,
                            block_size=80, vocab_size=37, dropout=0.0, bias=True))
    model = get_model(config=cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 37, (2, 80)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]

    def loss(p):
        total, count = causal_lm_loss_terms(model.apply({"params": p}, ids).logits, ids)
        return total / count

    cpu = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    generic = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(cpu[0], generic[0], **TOL)
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, **TOL), cpu[1], generic[1])


def test_layer_norm_backward_equals_autodiff():
    x = 3.0 * normal(0, (2, 5, 16)) + 1.0
    w = normal(1, (2, 5, 16))

    def plain(x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-5)

    ours = lambda x: layers.standardize(x, 1e-5)  # noqa: E731
    (y, g), (y_ref, g_ref) = jax.jit(lambda x: [jax.value_and_grad(lambda x: jnp.sum(f(x) * w))(x)
                                                for f in (ours, plain)])(x)
    np.testing.assert_allclose(ours(x), plain(x), **TOL)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(g, g_ref, **TOL)


def test_dense_is_the_plain_product():
    cfg = model_config(dict(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=5,
                            bias=True))
    dense = layers.dense(cfg, 6, "d")
    x = normal(0, (2, 3, 8))
    p = {"kernel": normal(1, (8, 6)), "bias": normal(2, (6,))}
    np.testing.assert_allclose(dense.apply({"params": p}, x),
                               jnp.einsum("btd,df->btf", x, p["kernel"]) + p["bias"], **TOL)


def test_cross_entropy_and_its_gradient_equal_optax():
    logits = 4.0 * normal(0, (3, 7, 11))
    targets = jax.random.randint(jax.random.key(1), (3, 7), 0, 11)
    g = normal(2, (3, 7))
    ref = optax.softmax_cross_entropy_with_integer_labels
    (y, dz), (y_ref, dz_ref) = jax.jit(lambda z: [
        (f(z, targets), jax.grad(lambda z: jnp.sum(f(z, targets) * g))(z))
        for f in (cross_entropy, ref)])(logits)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(dz, dz_ref, **TOL)


def test_loss_terms_equal_the_sliced_formulation():
    """Scoring every position with weight 0 on the last one = slicing the logits."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 9)), jnp.float32)
    labels = rng.integers(0, 9, (2, 6))
    labels[0, 3] = IGNORE_INDEX
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])

    def sliced(z):
        tgt = jnp.asarray(labels[:, 1:])
        w = (tgt != IGNORE_INDEX) & (mask[:, 1:] > 0)
        nll = optax.softmax_cross_entropy_with_integer_labels(z[:, :-1], jnp.where(w, tgt, 0))
        return jnp.sum(nll * w), jnp.sum(w)

    ours = lambda z: causal_lm_loss_terms(z, labels, mask)  # noqa: E731
    (a, da), (r, dr) = jax.jit(lambda z: [(f(z), jax.grad(lambda z: f(z)[0])(z))
                                          for f in (ours, sliced)])(logits)
    np.testing.assert_allclose(a[0], r[0], **TOL)
    assert float(a[1]) == float(r[1]) == 7
    np.testing.assert_allclose(da, dr, **TOL)
