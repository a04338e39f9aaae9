"""The three architectures: shapes, causality, hidden states, parameter counts, init
properties, the SASP efficient form, the Token-Factored stream split, ALiBi, precision and
input validation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleangpt_jax.config import ConfigError, model_config
from cleangpt_jax.models import get_model, layers, register_model, Vanilla
from cleangpt_jax.models.factored import FactoredAttention
from cleangpt_jax.models.sasp import ShapedAttention

# Tests of what programs compute: XLA optimisations off, one compile cache (conftest).
pytestmark = pytest.mark.usefixtures("fast_compile")

V, T, D, H, L = 50, 16, 32, 4, 2
BASE = dict(n_layer=L, n_head=H, n_embd=D, block_size=T, vocab_size=V, dropout=0.0)

VARIANTS = {
    "vanilla": dict(model_type="vanilla"),
    "vanilla_bias_tanh": dict(model_type="vanilla", bias=True, activation="gelu_tanh"),
    "vanilla_alibi": dict(model_type="vanilla", position_encoding="alibi"),
    "vanilla_untied": dict(model_type="vanilla", tie_embeddings=False),
    "sasp": dict(model_type="sasp"),
    "sasp_proj": dict(model_type="sasp", use_proj=True),
    "sasp_v": dict(model_type="sasp", use_v=True),
    "sasp_llama": dict(model_type="sasp", llama_mlp=True, bias=True),
    "factored": dict(model_type="factored"),
    "factored_alibi": dict(model_type="factored", position_encoding="alibi"),
    "factored_alibi_mix": dict(model_type="factored", position_encoding="alibi", use_v=True,
                               use_proj=True),
}


def build(**overrides):
    cfg = model_config({**BASE, **overrides})
    model = get_model(cfg.model_type, config=cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, T)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    return cfg, model, params, ids


def count(tree):
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def expected_param_count(c):
    """Closed form, written independently of the model code."""
    d, b = c.n_embd, int(c.bias)
    ln = d + b * d
    n = (c.vocab_size * d * (1 if c.tie_embeddings else 2)
         + (c.block_size * d if c.position_encoding == "learned" else 0) + ln)
    if c.llama_mlp:
        hidden = math.ceil(int(2.1 / 3 * 4 * d) / 8) * 8
        mlp = 2 * (d * hidden + b * hidden) + hidden * d + b * d
    else:
        mlp = d * 4 * d + b * 4 * d + 4 * d * d + b * d
    if c.model_type == "vanilla":
        block = 2 * ln + d * 3 * d + b * 3 * d + d * d + b * d + mlp
    elif c.model_type == "sasp":
        qkv = 3 if c.use_v else 2
        block = ln + 2 + 3 + d * qkv * d + b * qkv * d + mlp
        block += (d * d + b * d) if c.use_proj else 0
    else:
        block = 2 * ln + d * 2 * d + b * 2 * d + mlp
        block += c.n_head ** 2 * (int(c.use_v) + int(c.use_proj))
    return n + c.n_layer * block


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_causality_hidden_states_and_param_count(variant):
    cfg, model, params, ids = build(**VARIANTS[variant])
    out = model.apply({"params": params}, ids, output_hidden_states=True)
    assert out.logits.shape == (2, T, V) and out.logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out.logits)))

    # hidden_states: L + 1 pre-LN_f states; the last through LN_f + tied head is the logits.
    assert len(out.hidden_states) == L + 1
    assert all(h.shape == (2, T, D) for h in out.hidden_states)
    relogits = model.apply({"params": params}, out.hidden_states[-1], method=model.logits)
    np.testing.assert_allclose(relogits, out.logits, rtol=1e-6, atol=1e-6)
    assert model.apply({"params": params}, ids).hidden_states is None

    # Causality: changing token t changes no logits before t, and does change position t.
    t = T // 2
    changed = ids.at[:, t].set((ids[:, t] + 1) % V)
    out2 = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(out2.logits[:, :t], out.logits[:, :t])
    assert not np.allclose(out2.logits[:, t], out.logits[:, t])

    assert count(params) == expected_param_count(cfg)


def test_untied_head_is_its_own_parameter():
    cfg, model, params, ids = build(model_type="vanilla", tie_embeddings=False)
    out = model.apply({"params": params}, ids)
    moved = dict(params, wte={"embedding": params["wte"]["embedding"]})
    moved["lm_head"] = params["lm_head"] * 2.0
    assert not np.allclose(model.apply({"params": moved}, ids).logits, out.logits)
    h = model.apply({"params": params}, ids, output_hidden_states=True).hidden_states[-1]
    np.testing.assert_array_equal(model.apply({"params": moved}, ids, output_hidden_states=True)
                                  .hidden_states[-1], h)  # the head does not feed the stream


def test_num_blocks_runs_only_a_prefix():
    cfg, model, params, ids = build(model_type="vanilla")
    full = model.apply({"params": params}, ids, output_hidden_states=True)
    part = model.apply({"params": params}, ids, output_hidden_states=True, num_blocks=1)
    assert part.logits is None and len(part.hidden_states) == 2
    np.testing.assert_allclose(part.hidden_states[1], full.hidden_states[1], rtol=1e-6)
    # The truncated forward does not touch the later blocks' parameters at all.
    pruned = {k: v for k, v in params.items() if k != "h_1"}
    model.apply({"params": pruned}, ids, num_blocks=1)
    with pytest.raises(ConfigError, match="num_blocks"):
        model.apply({"params": params}, ids, num_blocks=L + 1)


def test_dropout_needs_rng_and_changes_output():
    cfg, model, params, ids = build(model_type="sasp", dropout=0.3)
    a = model.apply({"params": params}, ids, deterministic=False,
                    rngs={"dropout": jax.random.key(1)}).logits
    b = model.apply({"params": params}, ids, deterministic=False,
                    rngs={"dropout": jax.random.key(2)}).logits
    assert not np.allclose(a, b)
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, ids, deterministic=False)


# ----------------------------------------------------------------------------- SASP

def sasp_attention(use_v=False, use_proj=False):
    cfg = model_config({**BASE, "model_type": "sasp", "use_v": use_v, "use_proj": use_proj})
    attn = ShapedAttention(cfg)
    h = jax.random.normal(jax.random.key(3), (2, T, D))
    params = attn.init(jax.random.key(4), h, attn_bias=None, deterministic=True)["params"]
    return cfg, attn, params, h


@pytest.mark.parametrize("use_v", [False, True])
def test_sasp_key_value_kernels_start_at_zero(use_v):
    _, _, params, _ = sasp_attention(use_v=use_v)
    kernel = np.asarray(params["c_attn"]["kernel"])
    assert kernel.shape == (D, (3 if use_v else 2) * D)
    assert np.all(kernel[:, D:] == 0)
    assert np.std(kernel[:, :D]) == pytest.approx(0.02, rel=0.3)
    # The same holds inside the full model (the generic init must not overwrite it).
    _, _, model_params, _ = build(model_type="sasp", use_v=use_v)
    assert np.all(np.asarray(model_params["h_0"]["attn"]["c_attn"]["kernel"])[:, D:] == 0)


def test_sasp_attention_is_alpha_identity_at_init():
    _, attn, params, h = sasp_attention()
    params = dict(params, alpha=jnp.float32(1.7))  # any alpha: A = alpha * I when beta = gamma
    y, _ = attn.apply({"params": params}, h, attn_bias=None, deterministic=True)
    np.testing.assert_allclose(y, 1.7 * h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_v", [False, True])
def test_sasp_efficient_form_equals_explicit_matrices(use_v):
    cfg, attn, params, h = sasp_attention(use_v=use_v)
    params = jax.tree_util.tree_map(  # leave the zero-init point so softmax is not uniform
        lambda p: p + 0.3 * jax.random.normal(jax.random.key(5), p.shape), params)
    y, _ = attn.apply({"params": params}, h, attn_bias=None, deterministic=True)

    qkv = h @ params["c_attn"]["kernel"]
    q, k = qkv[..., :D], qkv[..., D:2 * D]
    v = qkv[..., 2 * D:] if use_v else h
    hd = D // H
    split = lambda x: x.reshape(2, T, H, hd).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    causal = np.tril(np.ones((T, T), bool))
    scores = np.where(causal, np.einsum("bhtd,bhsd->bhts", q, k) / np.sqrt(hd), -np.inf)
    soft = jax.nn.softmax(scores, axis=-1)
    mc = causal / np.arange(1, T + 1)[:, None]
    a = params["beta"] * soft + params["alpha"] * np.eye(T) - params["gamma"] * mc
    ref = np.einsum("bhts,bhsd->bhtd", a, v).transpose(0, 2, 1, 3).reshape(2, T, D)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Factored

def test_factored_streams_change_only_through_their_sublayer():
    """Probe each block: xt moves by exactly the attention output, xe by exactly the MLP's."""
    cfg, model, params, ids = build(model_type="factored")
    seen = {"attn": [], "mlp": [], "state_in": [], "state_out": []}

    def probe(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            if isinstance(context.module, FactoredAttention):
                seen["attn"].append(out[0])  # (y, cache): no cache here
            elif isinstance(context.module, layers.MLP):
                seen["mlp"].append(out)
            elif type(context.module).__name__ == "FactoredBlock":
                seen["state_in"].append(args[0])
                seen["state_out"].append(out[0])
        return out

    with nn.intercept_methods(probe):
        model.apply({"params": params}, ids)
    assert len(seen["attn"]) == len(seen["mlp"]) == L
    for (xt, xe), (xt2, xe2), a, m in zip(seen["state_in"], seen["state_out"], seen["attn"],
                                          seen["mlp"]):
        np.testing.assert_allclose(xt2 - xt, a, atol=1e-6)
        np.testing.assert_allclose(xe2 - xe, m, atol=1e-6)
    np.testing.assert_array_equal(seen["state_in"][0][1], 0.0)  # xe_0 = 0


def test_alibi_slopes_match_reference():
    np.testing.assert_allclose(layers.alibi_slopes(4), [0.25, 0.0625, 0.015625, 0.00390625])
    np.testing.assert_allclose(layers.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    np.testing.assert_allclose(layers.alibi_slopes(6),
                               [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125])


def test_alibi_runs_past_block_size_up_to_max_positions():
    cfg, model, params, _ = build(model_type="factored", position_encoding="alibi")
    assert cfg.max_position_embeddings == 4 * T
    long_ids = jnp.zeros((1, 4 * T), jnp.int32)
    out = model.apply({"params": params}, long_ids)
    assert out.logits.shape == (1, 4 * T, V) and bool(jnp.all(jnp.isfinite(out.logits)))
    with pytest.raises(ConfigError, match="max_position_embeddings|maximum"):
        model.apply({"params": params}, jnp.zeros((1, 4 * T + 1), jnp.int32))


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("model_type", ["vanilla", "sasp", "factored"])
def test_bfloat16_compute_is_close_and_params_stay_float32(model_type):
    _, model32, params, ids = build(model_type=model_type)
    cfg16 = model_config({**BASE, "model_type": model_type, "dtype": "bfloat16"})
    model16 = get_model(config=cfg16)
    params16 = model16.init(jax.random.key(0), ids)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params16))
    a = model32.apply({"params": params}, ids).logits
    b = model16.apply({"params": params}, ids).logits
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b))) < 0.05 * float(jnp.max(jnp.abs(a))) + 0.02


# ----------------------------------------------------------------------------- errors

def test_bad_inputs_get_clear_errors():
    cfg, model, params, ids = build(model_type="vanilla")
    with pytest.raises(ConfigError, match="block_size|crop"):
        model.apply({"params": params}, jnp.zeros((1, T + 1), jnp.int32))
    with pytest.raises(ConfigError, match="vocab_size"):
        model.apply({"params": params}, ids.at[0, 0].set(V))
    with pytest.raises(ConfigError, match="integer"):
        model.apply({"params": params}, ids.astype(jnp.float32))
    with pytest.raises(ConfigError, match="batch"):
        model.apply({"params": params}, ids[0])


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=30, n_head=4), "not divisible"),
    (dict(model_type="transformerxl"), "unknown model.model_type"),
    (dict(activation="relu"), "unknown model.activation"),
    (dict(n_layer=0), "positive"),
    (dict(block_size=-4), "positive"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dropout=1.5), "dropout"),
    (dict(position_encoding="rope"), "position_encoding"),
    (dict(max_position_embeddings=64), "alibi"),
    (dict(position_encoding="alibi", max_position_embeddings=8), "max_position_embeddings"),
    (dict(dtype="float8"), "dtype"),
    (dict(model_type="vanilla", use_v=True), "use_v"),
    (dict(model_type="factored", llama_mlp=True), "llama_mlp"),
    (dict(n_heads=4), "unknown model config key"),
    (dict(attention="flash"), "unknown model.attention"),
])
def test_invalid_configs_are_rejected(overrides, message):
    """Building a model from a bad config fails with one line that names the setting (the
    model type is checked against the registry, the rest by ModelConfig)."""
    with pytest.raises(ConfigError, match=message):
        get_model(config={**BASE, **overrides})


def test_model_type_is_case_insensitive_and_registry_is_open():
    assert model_config({**BASE, "model_type": "SASP"}).model_type == "sasp"
    assert type(get_model("Factored", config=BASE)).__name__ == "Factored"

    @register_model("my_vanilla")
    class MyVanilla(Vanilla):
        pass

    assert isinstance(get_model("My_Vanilla", config=BASE), MyVanilla)
    with pytest.raises(ConfigError, match="vanilla"):
        get_model("nope", config=BASE)
    with pytest.raises(ConfigError, match="vocab_size"):
        get_model("vanilla", config={**BASE, "vocab_size": None}).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
