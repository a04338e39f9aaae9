"""How close a student is to its teacher, and how sure a comparison of methods is.

    cka = hidden_state_agreement(student, s_params, teacher, t_params, batches, mapping)
    diff = paired_difference(a, b)      # seeds paired: a[i] and b[i] share seed i

Linear CKA (Kornblith et al., 2019) of two sets of N token representations X (N, d_x) and
Y (N, d_y), each centred over the tokens:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It lies in [0, 1], is 1 when Y = X Q s for an orthogonal Q and a scalar s, and compares
widths d_x != d_y directly, so a student's block k is compared with the teacher block
map(k) under every method, with or without stitching layers.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def linear_cka(x, y) -> float:
    """Linear CKA of x (N, d_x) and y (N, d_y) (rows: the same N tokens), in float64."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    y = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def hidden_state_agreement(student, student_params, teacher, teacher_params,
                           batches: Iterable[dict], mapping: Sequence[int]) -> list[float]:
    """Linear CKA, per student block k = 1..L_s, between the student's hidden state after
    block k and the teacher's after block mapping[k - 1], over the tokens of `batches`
    (padding excluded through attention_mask)."""
    hidden = _paired_hidden_states(student, teacher, tuple(mapping))
    s_rows = [[] for _ in mapping]
    t_rows = [[] for _ in mapping]
    for batch in batches:
        keep = np.asarray(batch["attention_mask"]).reshape(-1) > 0
        s_h, t_h = hidden(student_params, teacher_params, jnp.asarray(batch["input_ids"]))
        for k in range(len(mapping)):
            s_rows[k].append(np.asarray(s_h[k], np.float32).reshape(keep.size, -1)[keep])
            t_rows[k].append(np.asarray(t_h[k], np.float32).reshape(keep.size, -1)[keep])
    return [linear_cka(np.concatenate(s), np.concatenate(t)) for s, t in zip(s_rows, t_rows)]


@functools.lru_cache(maxsize=16)
def _paired_hidden_states(student, teacher, mapping: tuple[int, ...]):
    """jit (s_params, t_params, ids) -> ([student h_1..h_L], [teacher h_map(1)..h_map(L)]),
    one program per (student, teacher, mapping) for the whole process."""
    @jax.jit
    def hidden(s_params, t_params, ids):
        s = student.apply({"params": s_params}, ids, output_hidden_states=True, head=False)
        t = teacher.apply({"params": t_params}, ids, output_hidden_states=True, head=False)
        return ([s.hidden_states[k] for k in range(1, len(mapping) + 1)],
                [t.hidden_states[m] for m in mapping])

    return hidden


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_difference(a: Sequence[float], b: Sequence[float], *,
                      confidence: float = 0.95) -> dict:
    """d_i = a_i - b_i over paired seeds: {'mean', 'sd', 'n', 'low', 'high'} with the
    Student-t interval mean +- t_{(1+confidence)/2, n-1} sd / sqrt(n), and 'spread', the
    larger seed standard deviation of a and b (how much one method's result moves with the
    seed). 'exceeds_spread': |mean| > spread; 'significant': the interval excludes 0."""
    from scipy import stats  # (a dependency of jax)

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"paired_difference needs two equal-length lists of >= 2 values, got "
                         f"{a.size} and {b.size}")
    d = a - b
    mean, sd = mean_sd(d)
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * sd / math.sqrt(d.size)
    spread = max(mean_sd(a)[1], mean_sd(b)[1])
    return {"mean": mean, "sd": sd, "n": int(d.size), "low": mean - half, "high": mean + half,
            "spread": spread, "exceeds_spread": abs(mean) > spread,
            "significant": not (mean - half <= 0.0 <= mean + half)}
