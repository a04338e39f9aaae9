"""The sampler: greedy, temperature, top-k, top-p (per row, batch > 1) and their combination,
each against an independent numpy computation (the settings are checked by
`generation.check_generation_args`, tested in test_generation.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleangpt_jax import sampling

# Tests of what programs compute: XLA optimisations off, one compile cache (conftest).
pytestmark = pytest.mark.usefixtures("fast_compile")

B, V, DRAWS = 6, 40, 4000


@pytest.fixture(scope="module")
def logits():
    """Rows of very different shapes, so a nucleus computed from the wrong row (the original's
    batch > 1 bug) keeps the wrong tokens: flat, peaked, two-peaked, random scales."""
    rng = np.random.default_rng(0)
    rows = [rng.normal(0, 0.1, V),                      # nearly uniform: a big nucleus
            rng.normal(0, 1.0, V) + 8 * (np.arange(V) == 7),   # one dominant token
            rng.normal(0, 1.0, V) + 3 * np.isin(np.arange(V), [3, 30]),
            rng.normal(0, 2.0, V),
            rng.normal(0, 4.0, V),
            rng.normal(0, 0.5, V)]
    return np.stack(rows).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _sampler(top_k):
    """One compiled sampler per top_k (a shape); temperature and top_p are traced."""
    keys = jax.random.split(jax.random.key(1), DRAWS)
    return jax.jit(lambda z, t, p: jax.vmap(
        lambda k: sampling.sample(k, z, temperature=t, top_k=top_k, top_p=p))(keys))


def draws(logits, temperature=1.0, top_k=None, top_p=1.0):
    """(DRAWS, B) tokens from independent keys, through the jitted sampler."""
    return np.asarray(_sampler(top_k)(jnp.asarray(logits), temperature, top_p))


def softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def nucleus(row, p):
    """Indices of the smallest set of most likely tokens with total probability >= p (numpy,
    float64): token r (in descending order) is in it when the mass before it is < p."""
    probs = softmax64(row)
    order = np.argsort(-probs, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    return set(order[before < p - 1e-6].tolist()), set(order[before < p + 1e-6].tolist())


def top_k_set(row, k):
    return set(np.argsort(-np.asarray(row), kind="stable")[:k].tolist())


def test_greedy_and_temperature_zero_are_argmax(logits):
    expected = np.argmax(logits, -1)
    np.testing.assert_array_equal(sampling.greedy(jnp.asarray(logits)), expected)
    np.testing.assert_array_equal(sampling.sample(jax.random.key(0), jnp.asarray(logits),
                                                  temperature=0), expected)
    # A traced temperature of 0 (what a jitted decode loop passes) is greedy too, whatever the
    # other settings.
    np.testing.assert_array_equal(draws(logits, temperature=0.0, top_p=0.5),
                                  np.tile(expected, (DRAWS, 1)))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_sampling_follows_the_softmax(logits, temperature):
    tokens = draws(logits, temperature=temperature)
    expected = softmax64(logits / temperature)
    for b in range(B):
        freq = np.bincount(tokens[:, b], minlength=V) / DRAWS
        # 4000 draws: a frequency's standard error is at most 0.008.
        np.testing.assert_allclose(freq, expected[b], atol=0.035, err_msg=f"row {b}")


def test_top_k_never_leaves_the_top_k(logits):
    k = 6  # the combined test's k: one compiled sampler for both
    tokens = draws(logits, temperature=2.0, top_k=k)   # hot: mass spreads beyond the top k
    filtered = np.asarray(sampling.filter_logits(jnp.asarray(logits), temperature=2.0, top_k=k))
    for b in range(B):
        allowed = top_k_set(logits[b], k)
        assert set(np.flatnonzero(np.isfinite(filtered[b])).tolist()) == allowed
        assert set(tokens[:, b].tolist()) == allowed, f"row {b}"  # every allowed token shows up


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_top_p_keeps_each_rows_own_nucleus(logits, p):
    tokens = draws(logits, top_p=p)
    filtered = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_p=p))
    sizes = []
    for b in range(B):
        surely, maybe = nucleus(logits[b], p)
        kept = set(np.flatnonzero(np.isfinite(filtered[b])).tolist())
        assert surely <= kept <= maybe, f"row {b}: kept {sorted(kept)}, nucleus {sorted(surely)}"
        assert set(tokens[:, b].tolist()) <= kept, f"row {b} drew outside its nucleus"
        sizes.append(len(kept))
        # Inside the nucleus, tokens keep their relative probabilities.
        probs = softmax64(logits[b])[sorted(kept)]
        freq = np.bincount(tokens[:, b], minlength=V)[sorted(kept)] / DRAWS
        np.testing.assert_allclose(freq, probs / probs.sum(), atol=0.035)
    assert len(set(sizes)) > 2, f"the rows' nuclei should differ in size: {sizes}"


def test_combined_is_temperature_then_top_k_then_top_p(logits):
    t, k, p = 0.7, 6, 0.8
    tokens = draws(logits, temperature=t, top_k=k, top_p=p)
    filtered = np.asarray(sampling.filter_logits(jnp.asarray(logits), temperature=t, top_k=k,
                                                 top_p=p))
    for b in range(B):
        z = logits[b] / t
        top = top_k_set(z, k)
        # top-p over the top-k survivors, renormalised among themselves.
        surely, maybe = nucleus(np.where(np.isin(np.arange(V), list(top)), z, -np.inf), p)
        kept = set(np.flatnonzero(np.isfinite(filtered[b])).tolist())
        assert surely <= kept <= maybe <= top, f"row {b}"
        assert set(tokens[:, b].tolist()) <= kept, f"row {b}"
        np.testing.assert_allclose(filtered[b][sorted(kept)], z[sorted(kept)], rtol=1e-6)


def test_top_p_after_top_k_is_the_nucleus_of_all_tokens_top_k_kept():
    """Issue 13 item 22: top-k keeps the ties of its k-th value, and top-p must renormalise over
    all of them (it kept 4 tokens here, the nucleus of just the k sorted values)."""
    row = np.array([1.0] * 4 + [0.0] * 46, np.float32)
    t, k, p = 0.5, 5, 0.95
    z = row / t
    kept_by_k = z >= np.sort(z)[::-1][k - 1]               # the ties at the k-th value too
    probs = softmax64(np.where(kept_by_k, z, -np.inf))
    order = np.argsort(-probs, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    cutoff = z[order[before < p]].min()                     # ties at the cutoff are kept
    reference = set(np.flatnonzero(kept_by_k & (z >= cutoff)).tolist())
    filtered = np.asarray(sampling.filter_logits(jnp.asarray(row[None]), temperature=t,
                                                 top_k=k, top_p=p))[0]
    assert set(np.flatnonzero(np.isfinite(filtered)).tolist()) == reference
    assert len(reference) == 50


def test_top_p_one_and_large_top_k_change_nothing(logits):
    z = jnp.asarray(logits)
    np.testing.assert_array_equal(sampling.filter_logits(z, top_p=1.0), logits)
    np.testing.assert_array_equal(sampling.filter_logits(z, top_k=V + 5), logits)
    np.testing.assert_array_equal(sampling.filter_logits(z, top_k=0), logits)
    # The most likely token survives any top_p, however small.
    tiny = np.asarray(sampling.filter_logits(z, top_p=1e-6))
    np.testing.assert_array_equal(np.argmax(tiny, -1), np.argmax(logits, -1))
    assert (np.isfinite(tiny).sum(-1) == 1).all()


def test_same_key_same_tokens_other_key_other_tokens(logits):
    z = jnp.asarray(logits)
    a = [np.asarray(sampling.sample(jax.random.key(s), z, top_k=20)) for s in (3, 3, 4)]
    np.testing.assert_array_equal(a[0], a[1])
    many = [np.asarray(sampling.sample(jax.random.key(s), z)) for s in range(5, 10)]
    assert any(not np.array_equal(a[0], m) for m in many)
