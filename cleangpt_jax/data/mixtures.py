"""Mixtures: several token streams, mixed row by row with weights that change over training.

    schedule = make_schedule({"type": "linear", "start_weights": [1, 0], "end_weights": [1, 1],
                              "transition_steps": 1000}, num_sources=2)
    mixture = Mixture((stream_a, stream_b), schedule)      # batch_for_step accepts it

A schedule is any callable step -> weights (float64, shape (K,), summing to 1) for K sources.
`data.mixture.schedule` names a registered one (`register_schedule`): 'constant', 'linear'
(a transition between two weight vectors), 'step' (piecewise constant) or 'exponential' (decay).
Which source each row of a step reads is drawn in `batches`, from (seed, step, row).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from cleangpt_jax.config import ConfigError

# weights = schedule(step): float64 (K,), non-negative, summing to 1.
Schedule = Callable[[int], np.ndarray]

SCHEDULES: dict[str, Callable[..., Schedule]] = {}


def register_schedule(name: str):
    """Function decorator: `data.mixture.schedule.type = name` builds a Schedule by calling the
    function with the schedule's other keys as keyword arguments."""
    def register(make):
        SCHEDULES[name] = make
        return make
    return register


def _weights(values, what: str) -> np.ndarray:
    """`values` as float64 weights, checked: a non-empty list, all >= 0, a positive sum."""
    w = np.asarray(values, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"{what} must be a non-empty list of non-negative weights with a "
                          f"positive sum, got {values!r}")
    return w


def _normalised(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


@register_schedule("constant")
def constant_schedule(weights: Sequence[float]) -> Schedule:
    """w(step) = weights / sum(weights)."""
    w = _weights(weights, "constant schedule weights")
    return lambda step: _normalised(w)


@register_schedule("linear")
def linear_schedule(start_weights: Sequence[float], end_weights: Sequence[float],
                    transition_steps: int, start_step: int = 0) -> Schedule:
    """w(step) = start + (end - start) * t, renormalised, where
    t = clip((step - start_step) / transition_steps, 0, 1)."""
    start = _weights(start_weights, "linear schedule start_weights")
    end = _weights(end_weights, "linear schedule end_weights")
    if start.shape != end.shape:
        raise ConfigError(f"linear schedule: start_weights has {start.size} entries, "
                          f"end_weights {end.size}")
    if not transition_steps > 0:
        raise ConfigError(f"linear schedule: transition_steps must be positive, "
                          f"got {transition_steps}")

    def schedule(step):
        t = min(max((step - start_step) / transition_steps, 0.0), 1.0)
        return _normalised((1 - t) * start + t * end)
    return schedule


@register_schedule("step")
def step_schedule(boundaries: Sequence[tuple[int, Sequence[float]]]) -> Schedule:
    """w(step) = the weights of the last boundary (start_step, weights) with start_step <= step.

    boundaries: [(0, weights), (s1, weights), ...]; the first one starts at step 0.
    """
    try:
        bounds = sorted((int(s), list(w)) for s, w in boundaries)
    except (TypeError, ValueError):
        raise ConfigError(f"step schedule boundaries must be [(step, weights), ...], "
                          f"got {boundaries!r}") from None
    if not bounds or bounds[0][0] != 0:
        raise ConfigError(f"step schedule boundaries must start at step 0, got {boundaries!r}")
    weights = [_weights(w, f"step schedule weights at step {s}") for s, w in bounds]
    if len({w.size for w in weights}) != 1:
        raise ConfigError("step schedule: every boundary needs one weight per source")
    starts = [s for s, _ in bounds]
    return lambda step: _normalised([w for s, w in zip(starts, weights) if s <= step][-1])


@register_schedule("exponential")
def exponential_schedule(weights: Sequence[float], decay_rates: Sequence[float]) -> Schedule:
    """w_i(step) = weights_i * exp(-decay_rates_i * step), renormalised (in log space, so the
    weights never underflow to 0/0)."""
    w = _weights(weights, "exponential schedule weights")
    rates = np.asarray(decay_rates, dtype=np.float64)
    if rates.shape != w.shape or not np.all(np.isfinite(rates)):
        raise ConfigError(f"exponential schedule: decay_rates needs {w.size} finite numbers "
                          f"(one per source), got {decay_rates!r}")
    with np.errstate(divide="ignore"):
        log_w = np.log(w)

    def schedule(step):
        logits = log_w - rates * step
        e = np.exp(logits - logits.max())
        return e / e.sum()
    return schedule


def _num_weights(schedule: Schedule) -> int:
    """How many sources `schedule` weighs."""
    return len(schedule(0))


def make_schedule(spec, num_sources: int) -> Schedule:
    """A Schedule from a config dict: {'type': name, **arguments} (see SCHEDULES); 'constant' when
    the type is not given."""
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    kind = spec.pop("type", "constant")
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown mixture schedule type {kind!r}: "
                          f"choose one of {sorted(SCHEDULES)}")
    try:
        schedule = SCHEDULES[kind](**spec)
    except TypeError as e:
        raise ConfigError(f"mixture schedule {kind!r}: {e} "
                          f"(see {SCHEDULES[kind].__name__})") from None
    if _num_weights(schedule) != num_sources:
        raise ConfigError(f"mixture schedule {kind!r} has {_num_weights(schedule)} weights, "
                          f"the mixture {num_sources} sources: give one weight per source")
    return schedule


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Token streams mixed row by row with weights `schedule(step)` (uniform when schedule is None).

    Row r of step s comes from source k with probability w_k(s), drawn deterministically from
    (seed, s): `batch_for_step` accepts a Mixture wherever it accepts a stream. Within source k,
    global row g reads window g mod W_k of that source's own shuffled epochs, so each source's
    windows are still drawn without replacement. `names` label the sources in reports.
    """

    streams: tuple
    schedule: Schedule | None = None
    names: tuple = ()

    def __post_init__(self):
        if not self.streams:
            raise ConfigError("a Mixture needs at least one token stream")
        if self.schedule is not None and _num_weights(self.schedule) != len(self.streams):
            raise ConfigError(f"the mixture schedule has {_num_weights(self.schedule)} weights for "
                              f"{len(self.streams)} sources: give one weight per source")

    def __len__(self) -> int:
        """Total tokens over the sources."""
        return sum(len(s) for s in self.streams)

    def weights(self, step: int) -> np.ndarray:
        """The sources' weights at `step`: float64 (len(streams),), summing to 1."""
        if self.schedule is None:
            return np.full(len(self.streams), 1.0 / len(self.streams))
        return self.schedule(step)
