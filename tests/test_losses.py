"""The causal LM loss: the shift, the masks and the token-weighted mean."""

import jax.numpy as jnp
import numpy as np

from cleangpt_jax.losses import IGNORE_INDEX, causal_lm_loss, causal_lm_loss_terms


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_shift_and_mask_on_a_hand_computed_example():
    # Row 0: 3 real tokens; row 1: 2 real tokens then padding.
    logits = np.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
                       [[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0], [9.0, 0.0, 0.0]]],
                      np.float32)
    labels = np.array([[0, 1, 2, 0], [1, 0, 2, 2]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    lp = log_softmax(logits)
    # Position t is scored against labels[t + 1]; row 1 scores only its position 0 -> label 0.
    terms = [-lp[0, 0, 1], -lp[0, 1, 2], -lp[0, 2, 0], -lp[1, 0, 0]]
    total, n = causal_lm_loss_terms(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    assert float(n) == 4
    np.testing.assert_allclose(float(total), sum(terms), rtol=1e-6)
    np.testing.assert_allclose(float(causal_lm_loss(logits, labels, mask)), np.mean(terms),
                               rtol=1e-6)


def test_padding_and_ignored_targets_change_nothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (2, 6))
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    ref = float(causal_lm_loss(logits, labels, mask))
    # Whatever sits in the padded positions (logits or labels) does not matter...
    logits2, labels2 = logits.copy(), labels.copy()
    logits2[0, 4:] = 100.0
    labels2[0, 4:] = 7
    assert float(causal_lm_loss(logits2, labels2, mask)) == ref
    # ... and IGNORE_INDEX labels are the same as a zero mask.
    labels3 = labels.copy()
    labels3[0, 4:] = IGNORE_INDEX
    assert float(causal_lm_loss(logits, labels3)) == ref
    # Token-weighted: the mean over all scored tokens, not the mean of per-row means.
    per_row = [causal_lm_loss(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1]) for i in (0, 1)]
    assert abs(ref - float(np.mean(per_row))) > 1e-4
    np.testing.assert_allclose(ref, (3 * float(per_row[0]) + 5 * float(per_row[1])) / 8, rtol=1e-6)


def test_nothing_scored_gives_zero_not_nan():
    logits = np.zeros((1, 3, 4), np.float32)
    assert float(causal_lm_loss(logits, np.zeros((1, 3), int), np.zeros((1, 3), int))) == 0.0
