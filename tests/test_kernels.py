"""cleangpt_jax.kernels: every backend-specific form equals the plain formulation it replaces
(blockwise causal attention vs jax.nn.dot_product_attention, the LayerNorm backward vs
autodiff, the 2-D Dense product and its decode layout, the cross-entropy backward vs autodiff;
values and gradients, float32), and model.attention chooses the implementation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cleangpt_jax import kernels
from cleangpt_jax.config import ConfigError, model_config
from cleangpt_jax.kernels import cpu
from cleangpt_jax.losses import IGNORE_INDEX, causal_lm_loss_terms
from cleangpt_jax.models import get_model, layers

# Tests of what programs compute: XLA optimisations off, one compile cache (conftest).
pytestmark = pytest.mark.usefixtures("fast_compile")

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
    ours = lambda q, k, v: cpu.blockwise_causal_attention(q, k, v, bias=bias,  # noqa: E731
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


def test_blockwise_attention_dropout_equals_the_materialised_path():
    """Same key, same dropped entries: the CPU path (two query blocks at T = 72) and the
    generic one agree."""
    q, k, v = (normal(i, (1, 72, 2, 4)) for i in range(3))

    @jax.jit
    def run(rng):
        key = jax.random.key(rng)
        return [kernels.causal_attention(q, k, v, implementation=name, dropout_rate=0.5,
                                         dropout_rng=key) for name in ("cpu_blockwise", "xla")]

    blockwise, generic = run(0)
    np.testing.assert_allclose(blockwise, generic, **TOL)
    assert not np.allclose(blockwise, run(1)[0])


def loss_and_grads(attention, dropout=0.0):
    """A whole ALiBi model (T = 80: query blocks of 64 and 16) with model.attention =
    `attention`: its loss and gradients."""
    cfg = model_config(dict(model_type="vanilla", n_layer=1, n_head=2, n_embd=16,
                            block_size=80, vocab_size=37, dropout=dropout, bias=True,
                            attention=attention, position_encoding="alibi"))
    model = get_model(config=cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 37, (2, 80)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]

    def loss(p):
        out = model.apply({"params": p}, ids, deterministic=dropout == 0,
                          rngs={"dropout": jax.random.key(5)})
        total, count = causal_lm_loss_terms(out.logits, ids)
        return total / count

    return jax.jit(jax.value_and_grad(loss))(params)


def test_the_model_trains_the_same_under_auto_and_xla_attention():
    """'auto' (blockwise on CPU) and 'xla' (jax.nn.dot_product_attention; with dropout the
    materialised softmax, which drops the same entries) give the same loss and gradients."""
    losses = []
    for dropout in (0.0, 0.3):
        auto, generic = loss_and_grads("auto", dropout), loss_and_grads("xla", dropout)
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, **TOL), auto, generic)
        losses.append(auto[0])
    assert not np.allclose(*losses)  # the dropout was applied


def test_xla_setting_is_jax_dot_product_attention_and_equals_the_reference():
    q, k, v = (normal(i, (2, 12, 3, 8)) for i in range(3))
    bias = layers.alibi_bias(3, jnp.arange(12), jnp.arange(12))
    ours = kernels.causal_attention(q, k, v, implementation="xla", bias=bias)
    np.testing.assert_array_equal(
        ours, jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8) + bias
    scores = jnp.where(jnp.tril(jnp.ones((12, 12), bool)), scores, -jnp.inf)
    reference = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v)
    np.testing.assert_allclose(ours, reference, **TOL)
    if jax.default_backend() == "cpu":  # 'auto' on CPU is the blockwise path, bit for bit
        np.testing.assert_array_equal(kernels.causal_attention(q, k, v, bias=bias),
                                      cpu.blockwise_causal_attention(q, k, v, bias=bias))
    for name in ("auto", "cpu_blockwise", "xla_softmax"):
        np.testing.assert_allclose(
            kernels.causal_attention(q, k, v, implementation=name, bias=bias), reference, **TOL)


@pytest.mark.parametrize("setting, backend, needs, chosen", [
    ("auto", "cpu", {}, "cpu_blockwise"),
    ("auto", "cpu", dict(dropout=True), "cpu_blockwise"),
    ("auto", "cpu", dict(mask=True), "xla"),
    ("auto", "cpu", dict(square=False, mask=True, dropout=True), "xla_softmax"),
    ("auto", "gpu", {}, "xla"),
    ("auto", "tpu", dict(dropout=True), "xla_softmax"),
    ("auto", "gpu", dict(same_head_dim=False), "xla_softmax"),
    ("xla", "cpu", {}, "xla"),
    ("xla", "cpu", dict(dropout=True), "xla_softmax"),
    ("cpu_blockwise", "gpu", {}, "cpu_blockwise"),
    ("cpu_blockwise", "cpu", dict(mask=True), "xla"),
    ("xla_softmax", "gpu", {}, "xla_softmax"),
])
def test_choose_attention(setting, backend, needs, chosen):
    """'auto': blockwise for CPU training, jax.nn.dot_product_attention elsewhere, the
    materialised softmax with dropout; a named setting the call cannot use takes the generic
    path."""
    call = kernels.AttentionCall(**{**dict(square=True, mask=False, bias=False, dropout=False,
                                           same_head_dim=True), **needs})
    assert kernels.choose_attention(setting, backend, call) == chosen


def test_an_unknown_attention_setting_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"unknown model.attention 'flash': choose one of "
                                          r"\('auto', 'cpu_blockwise', 'xla', 'xla_softmax', "
                                          r"'splash', 'splash_interpret', 'cudnn'\)"
                       ) as e:
        model_config(dict(attention="flash"))
    assert "\n" not in str(e.value)
    assert model_config(dict(attention="XLA")).attention == "xla"


def test_layer_norm_backward_equals_autodiff():
    x = 3.0 * normal(0, (2, 5, 16)) + 1.0
    w = normal(1, (2, 5, 16))

    def plain(x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-5)

    ours = lambda x: kernels.standardize(x, 1e-5)  # noqa: E731
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


def test_dense_is_flax_dense_and_its_decode_layout_gives_the_same_product():
    """layers.Dense has nn.Dense's parameters (names, shapes, init values: checkpoints are
    unchanged); for one row, the transposed copies from decode_layout give the same product
    for d_in > d_out, d_in < d_out; square kernels get no copy."""
    x = jax.random.normal(jax.random.key(2), (1, 1, 48))
    for d_out in (16, 48, 80):
        ours = layers.Dense(d_out, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                            kernel_init=layers.normal_init())
        flax_dense = nn.Dense(d_out, kernel_init=layers.normal_init())
        params = ours.init(jax.random.key(3), x)["params"]
        jax.tree.map(np.testing.assert_array_equal, params,
                     flax_dense.init(jax.random.key(3), x)["params"])
        params = {"kernel": params["kernel"], "bias": params["bias"] + 0.5}
        plain = ours.apply({"params": params}, x)
        np.testing.assert_allclose(plain, flax_dense.apply({"params": params}, x), rtol=1e-6)
        copies = kernels.decode_layout(params)
        assert ("kernel_t" in copies) == (d_out != 48)
        if copies:
            np.testing.assert_array_equal(copies["kernel_t"], params["kernel"].T)
        fast = jax.jit(lambda p, c, x: ours.apply({"params": p, kernels.DECODE_LAYOUT: c}, x))
        np.testing.assert_allclose(fast(params, copies, x), plain, rtol=1e-5, atol=1e-6)
        # More than one row: the copies are not used (batched products keep W's layout).
        rows = jnp.concatenate([x, x + 1.0], axis=1)
        np.testing.assert_allclose(fast(params, copies, rows),
                                   ours.apply({"params": params}, rows), rtol=1e-6)


def test_cross_entropy_and_its_gradient_equal_optax():
    logits = 4.0 * normal(0, (3, 7, 11))
    targets = jax.random.randint(jax.random.key(1), (3, 7), 0, 11)
    g = normal(2, (3, 7))
    ref = optax.softmax_cross_entropy_with_integer_labels
    (y, dz), (y_ref, dz_ref) = jax.jit(lambda z: [
        (f(z, targets), jax.grad(lambda z: jnp.sum(f(z, targets) * g))(z))
        for f in (kernels.cross_entropy, ref)])(logits)
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
