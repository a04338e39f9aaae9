"""The one sharding helper: multi-host start-up, the device mesh, and how arrays are laid out on it.

Mesh axes are ('data', 'fsdp'), shape (n_devices / fsdp, fsdp):

  batch       (B, ...)  split over both axes: every device holds B / n_devices rows
  parameters  replicated when fsdp == 1 (plain data parallelism); with fsdp > 1 every leaf of
              rank >= 2 is split along its largest axis divisible by fsdp (ZeRO-3 style), and
              XLA gathers it where a matmul needs it. Optimizer moments have their parameter's
              shape and therefore get the same layout (`state_shardings` keys on shapes only).

Multi-host: `initialize_distributed` runs `jax.distributed.initialize()` when the config or the
environment asks (TPU pods, SLURM, an explicit coordinator); afterwards every process feeds
its own rows of the global batch (`global_batch`). Several CPU processes work too (JAX uses gloo
for cross-process CPU collectives by default, `jax_cpu_collectives_implementation`), e.g. two on
one machine: --config.train.coordinator_address=localhost:12345 --config.train.num_processes=2
--config.train.process_id=0 (and =1 in the second shell).
"""

from __future__ import annotations

import functools

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cleangpt_jax.config import ConfigError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)



# Environment variables that mean "this process is one of several": a coordinator set by hand,
# a multi-worker Cloud TPU slice, SLURM or Open MPI with more than one task.
def _environment_is_multiprocess() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(key, "1").isdigit() and int(env.get(key, "1")) > 1:
            return True
    return False


def initialize_distributed(train_cfg: Any) -> bool:
    """Start `jax.distributed` when asked; returns whether it is running.

    `train.distributed`: 'auto' (only when the environment says this is one process of
    several), True (always; on TPU VMs/SLURM JAX finds the coordinator itself) or False.
    `train.coordinator_address`, `train.num_processes`, `train.process_id` are passed through
    when set (e.g. 'localhost:1234', 2, 0 to run two CPU processes on one machine).
    Must run before anything else touches a JAX device.
    """
    mode = str(train_cfg.distributed).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"train.distributed must be 'auto', 'true' or 'false', got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    explicit = train_cfg.coordinator_address is not None
    if mode == "false" or (mode == "auto" and not explicit
                           and not _environment_is_multiprocess()):
        return False
    kwargs = {k: train_cfg[k] for k in ("coordinator_address", "num_processes", "process_id")
              if train_cfg[k] is not None}
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def create_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """Mesh ('data', 'fsdp') over all devices (default) with `fsdp` devices on the fsdp axis."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
        raise ConfigError(f"train.fsdp={fsdp!r} must be a positive divisor of the device "
                          f"count {n}")
    return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, devices=devices,
                         axis_types=(AxisType.Auto, AxisType.Auto))


def traced_under(mesh: Mesh):
    """Decorator: trace `fn` with `mesh` as the abstract mesh, so that what `fn` calls sees
    the devices the program is for (`kernels` picks a TPU kernel for a TPU topology's mesh
    even on a CPU host, and shard_maps it over the mesh)."""
    def decorate(fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args, **kwargs)
        return traced
    return decorate


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """Each of `grad_accum_steps` micro-batches must split evenly over the devices and the
    processes."""
    n = mesh.devices.size
    if global_batch_size % (n * grad_accum_steps):
        unit = n * grad_accum_steps
        raise ConfigError(
            f"train.batch_size={global_batch_size} is not divisible by device count {n} x "
            f"train.grad_accum_steps={grad_accum_steps}: use a multiple of {unit} (e.g. "
            f"{unit * max(1, round(global_batch_size / unit))})")


def leaf_spec(shape, fsdp: int) -> P:
    """PartitionSpec of one state leaf: its largest axis divisible by `fsdp` (rank >= 2 only)."""
    if fsdp == 1 or len(shape) < 2:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return P(*spec)
    return P()


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for a tree of arrays / ShapeDtypeStructs (params, optimizer state)."""
    fsdp = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(np.shape(x), fsdp)), tree)


def abstract_state(tree, mesh: Mesh):
    """ShapeDtypeStructs carrying the target shardings: what a checkpoint restores into."""
    shardings = state_shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble this process's rows into global arrays sharded on the batch axis.

    Each process passes its own (B / process_count, ...) slice; the result has the global
    shape (B, ...). On one process this is a plain sharded device_put.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, local_batch)


def to_host(tree):
    """Fully-replicated or process-spanning arrays as numpy on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)
