"""Throughput, model FLOPs utilisation (MFU) and device memory, as the loops log them.

    speed = Throughput(flops_per_token, peak_flops_per_device=config.train.peak_flops)
    ...                                   # the loop times its steps as it already does
    record.update(speed.record(steps=k, seconds=s, tokens_per_step=B * T))

Nothing here touches the device per step: `record` turns timings the loop already has at a log
step (wall seconds of k steps) into numbers, and reads the allocator's counters, a host call
that does not wait for the device.

    tokens_per_sec          = k B T / s                     (all devices)
    tokens_per_sec_device   = tokens_per_sec / n_devices
    step_time_s             = s / k
    mfu                     = tokens_per_sec * flops_per_token / (n_devices * peak)
    memory_gib, peak_memory_gib   device 0's bytes in use and their peak (GPU, TPU; absent on CPU)

FLOPs per token (PaLM appendix B, nanoGPT's estimate_mfu): forward and backward of the matmuls,
6 N + 12 L H Q T for N parameters, L layers, H heads of size Q and T positions; a forward alone
is a third of that, 2 N + 4 L H Q T. The peak per device: `PEAK_FLOPS` (dense bf16, by the
device_kind the backend reports), a configured override, or on CPU (and any unknown chip) the
best FLOP/s of a float32 matmul measured once per process (all cores: one CPU device).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

TERA = 1e12
# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = (
    ("H200", 989 * TERA), ("H100", 989 * TERA), ("A100", 312 * TERA),
    ("TPU v6 lite", 918 * TERA), ("TPU v6e", 918 * TERA), ("TPU v5 lite", 197 * TERA),
    ("TPU v5e", 197 * TERA), ("TPU v5p", 459 * TERA), ("TPU v5", 459 * TERA),
    ("TPU v4", 275 * TERA),
)
GiB = 1024 ** 3
SPEED_KEYS = ("tokens_per_sec", "tokens_per_sec_device", "step_time_s", "mfu")
MEMORY_KEYS = ("memory_gib", "peak_memory_gib")
# What a log record holds that depends on the wall clock or the machine, not on the run's
# numbers: a resumed run's records equal an uninterrupted run's without these.
TIMING_KEYS = SPEED_KEYS + MEMORY_KEYS + ("compile_s",)


def param_count(params) -> int:
    """Number of scalars in a (possibly abstract) parameter tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def lm_param_count(params) -> int:
    """The parameters a token's matmuls use: all but the learned position table `wpe` (a
    lookup), as nanoGPT counts them."""
    return param_count({k: v for k, v in params.items() if k != "wpe"})


def train_flops_per_token(n_params: int, model_cfg) -> float:
    """6 N + 12 L H Q T: the matmul FLOPs of one token's forward and backward (PaLM's
    appendix B; nanoGPT's estimate_mfu)."""
    c = model_cfg
    return 6.0 * n_params + 12.0 * c.n_layer * c.n_head * c.head_dim * c.block_size


def forward_flops_per_token(n_params: int, n_layer: int, model_cfg) -> float:
    """2 N + 4 L H Q T: one token's forward through N parameters and L attention layers."""
    c = model_cfg
    return 2.0 * n_params + 4.0 * n_layer * c.n_head * c.head_dim * c.block_size


def distill_flops_per_token(n_trainable: int, trainable_layers: int, student_cfg,
                            teacher_params: int, teacher_layers: int, teacher_cfg) -> float:
    """A distillation stage: forward and backward of what it trains (n_trainable parameters,
    trainable_layers attention layers of the student) plus the teacher's forward through its
    first teacher_layers blocks (teacher_params of its parameters). The frozen student prefix,
    a forward only, is left out."""
    trained = 6.0 * n_trainable + 12.0 * trainable_layers * (
        student_cfg.n_head * student_cfg.head_dim * student_cfg.block_size)
    return trained + forward_flops_per_token(teacher_params, teacher_layers, teacher_cfg)


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of a float32 (n x n) @ (n x n) on the default backend; measured once per
    process (a few tenths of a second on a CPU)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def peak_flops_per_device(override: float | None = None, device=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it comes from: 'config' | 'table' | 'measured')."""
    if override:
        return float(override), "config"
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "")
    if device.platform != "cpu":
        for name, flops in PEAK_FLOPS:
            if name.lower() in kind.lower():
                return flops, "table"
    return measured_matmul_flops(), "measured"


def device_memory(device=None) -> dict[str, float]:
    """{'memory_gib', 'peak_memory_gib'} of one device's allocator; {} where the backend keeps
    no counters (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 -- a backend without the call
        stats = {}
    out = {}
    if "bytes_in_use" in stats:
        out["memory_gib"] = stats["bytes_in_use"] / GiB
    if "peak_bytes_in_use" in stats:
        out["peak_memory_gib"] = stats["peak_bytes_in_use"] / GiB
    return out


def untimed(records: list[dict]) -> list[dict]:
    """Log records without their TIMING_KEYS: what a resumed run must repeat exactly."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


class Throughput:
    """The speed part of a log record, from timings the loop already took."""

    def __init__(self, flops_per_token: float, *, peak_flops_per_device: float | None = None,
                 n_devices: int | None = None):
        self.flops_per_token = float(flops_per_token)
        self.n_devices = n_devices or jax.device_count()
        self._override = peak_flops_per_device
        self._peak: tuple[float, str] | None = None

    @property
    def peak(self) -> tuple[float, str]:
        """(peak FLOP/s of all devices, its source); measured (on CPU) at the first call."""
        if self._peak is None:
            per_device, source = peak_flops_per_device(self._override)
            # CPU: one device is every core, and the measured matmul already used them all.
            cpu = jax.local_devices()[0].platform == "cpu" and source == "measured"
            self._peak = (per_device * (1 if cpu else self.n_devices), source)
        return self._peak

    def record(self, *, steps: int, seconds: float, tokens_per_step: int) -> dict[str, float]:
        """tokens_per_sec, tokens_per_sec_device, step_time_s, mfu, and the memory counters,
        for `steps` steps of `tokens_per_step` tokens that took `seconds`; {} when nothing was
        timed: zeros when nothing was (the first step compiles and is not counted), so that
        every record has the same keys."""
        if steps <= 0 or seconds <= 0:
            return {k: 0.0 for k in SPEED_KEYS} | device_memory()
        tokens_per_sec = steps * tokens_per_step / seconds
        return {"tokens_per_sec": tokens_per_sec,
                "tokens_per_sec_device": tokens_per_sec / self.n_devices,
                "step_time_s": seconds / steps,
                "mfu": tokens_per_sec * self.flops_per_token / self.peak[0],
                **device_memory()}


def format_speed(record: dict) -> str:
    """'1234 tok/s, 12.3 ms/step, MFU 4.5%, mem 1.2/3.4 GiB' for the parts `record` has."""
    parts = []
    if record.get("tokens_per_sec"):
        parts += [f"{record['tokens_per_sec']:.0f} tok/s",
                  f"{1e3 * record['step_time_s']:.1f} ms/step", f"MFU {100 * record['mfu']:.2f}%"]
    if "memory_gib" in record:
        parts.append(f"mem {record['memory_gib']:.2f}/{record.get('peak_memory_gib', 0):.2f} GiB")
    return ", ".join(parts)
