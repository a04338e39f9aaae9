r"""Compile, ahead of time, the program a run would execute on a TPU slice, without a TPU.

    python -m cleangpt_jax.compile --config=configs/gpt2_124m.py --topology=v5e:2x2
    python -m cleangpt_jax.compile --config=configs/gpt2_124m.py:xl --topology=v5e:2x4 \
        --config.train.fsdp=8 --config.train.batch_size=32
    python -m cleangpt_jax.compile --config=configs/distill_gpt2_vanilla.py --topology=v6e:2x2 \
        --what=distill --json
    python -m cleangpt_jax.compile --config=configs/gpt2_124m.py --topology=v5e:1x1 \
        --what=generate --batch_size=8 --max_new_tokens=256

Needs the `tpu` extra (`pip install -e ".[tpu]"`: libtpu), not a TPU: libtpu describes the
slice (`jax.experimental.topologies.get_topology_desc`) and runs the real XLA:TPU compiler on
any machine. The programs are the project's own, built from the config as a run builds them,
over abstract arrays (jax.ShapeDtypeStruct: no parameter is ever materialised):

    train     train_step.make_train_step over the ('data', 'fsdp') mesh of every chip of the
              slice (train.fsdp, train.batch_size, train.grad_accum_steps as in a run)
    distill   distill.stage_step.compiled_step of each stage kind of the plan: the last (largest)
              block stage, the head stage and the final stage, whichever are enabled
    generate  generation.program() on one chip (what `python -m cleangpt_jax.generate` runs):
              --batch_size prompts of --prompt_length tokens, --max_new_tokens

One line per program (or one JSON object with --json): the topology and its device count, the
per-device bytes of compiled.memory_analysis() (arguments, outputs, temporaries; the total is
arguments + outputs - donated aliases + temporaries + code), the chip's HBM capacity and whether
the total fits it, the compiler's FLOPs per device (compiled.cost_analysis()) next to the
estimate (training: (6 N + 12 L H Q T) per token, N the parameter count, L layers, H heads,
Q head size, T context, times the device's B T / n_devices tokens), the compile time, and the
attention implementation the model's training forward takes there (`attention_under`).
XLA:TPU refuses to compile a program that needs more HBM than the chip has: such a program is
reported with fits false, the bytes the compiler's message names and the message itself.

Megacore generations (v4, v5p) present one device per chip, as a TPU VM does (libtpu's
'megacore' chip config). A multi-host slice (v5e:4x4: 16 chips, 4 hosts) compiles the one
global program every host runs. Nothing is read from or written to a workdir.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from cleangpt_jax import cli, storage
from cleangpt_jax.metrics import param_count, train_flops_per_token

FLAGS = flags.FLAGS
WHAT = ("train", "distill", "generate")
GiB = 1024 ** 3
# HBM per chip (Cloud TPU documentation), by the device_kind libtpu reports.
HBM_CAPACITY_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,    # v5e
    "TPU v5": 95 * GiB,         # v5p (96 GiB physical, 95 GiB usable)
    "TPU v6 lite": 32 * GiB,    # v6e (Trillium)
}
# Chips whose two TensorCores a TPU VM presents as one device.
MEGACORE_KINDS = ("TPU v4", "TPU v5")
GPT2_VOCAB_SIZE = 50257
# The hub's GPT-2 checkpoints (n_layer, n_head, n_embd), so that a distillation teacher named
# by its hub name needs no download.
GPT2_HUB_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                   "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
INSTALL_HINT = 'pip install -e ".[tpu]" (libtpu: the TPU compiler)'


@dataclasses.dataclass
class Report:
    """What one compiled program needs per device."""

    topology: str
    num_devices: int
    what: str                   # 'train' | 'distill:<stage>' kinds | 'generate'
    program: str                # e.g. 'train', 'block_24', 'head', 'final', 'generate'
    program_devices: int        # devices the program runs on (generate: one chip)
    # None when the compiler refused the program for want of HBM (`out_of_memory`).
    argument_bytes: int | None
    output_bytes: int | None
    alias_bytes: int | None     # outputs that reuse donated argument buffers
    temp_bytes: int | None
    code_bytes: int | None
    hbm_bytes_per_device: int | None  # argument + output - alias + temp + code; when out of
    #                                   memory, the bytes the compiler's message names (its
    #                                   temporaries, a lower bound of the total)
    hbm_capacity_bytes: int
    fits: bool
    flops_per_device: float | None
    flops_estimate_per_device: float | None
    compile_seconds: float
    attention: str
    out_of_memory: str | None = None  # the compiler's message when it ran out of HBM
    # True with model.scan_layers: XLA's cost analysis counts a loop body once, so
    # flops_per_device then leaves out all but one block's FLOPs (the estimate does not).
    flops_count_one_block: bool = False

    def line(self) -> str:
        def gib(n):
            return "?" if n is None else f"{n / GiB:.2f} GiB"

        flops = "n/a" if self.flops_per_device is None else f"{self.flops_per_device:.3g}"
        estimate = ("" if self.flops_estimate_per_device is None
                    else f" (6N+12LHQT estimate {self.flops_estimate_per_device:.3g})")
        where = (f"{self.topology} ({self.num_devices} devices) {self.program}"
                 f"{'' if self.program_devices == self.num_devices else ' on 1 chip'}")
        if self.out_of_memory is not None:
            return (f"{where}: DOES NOT FIT, needs at least {gib(self.hbm_bytes_per_device)} "
                    f"of {gib(self.hbm_capacity_bytes)} HBM per device (compiler: "
                    f"{self.out_of_memory}); {self.compile_seconds:.1f}s; attention "
                    f"{self.attention}")
        return (f"{where}: arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)}, "
                f"temporaries {gib(self.temp_bytes)}, total {gib(self.hbm_bytes_per_device)} "
                f"of {gib(self.hbm_capacity_bytes)} HBM per device: "
                f"{'fits' if self.fits else 'DOES NOT FIT'}; FLOPs per device {flops}"
                f"{' (scanned blocks counted once)' if self.flops_count_one_block else ''}"
                f"{estimate}; compiled in {self.compile_seconds:.1f}s; attention "
                f"{self.attention}")


# --------------------------------------------------------------------------- the topology

def topology_devices(name: str) -> list:
    """The devices of TPU topology `name` (e.g. 'v5e:2x2', 'v4:2x2x2'), one per chip.

    libtpu describes v4 and v5p chips as two TensorCores by default; a TPU VM runs them in
    megacore mode (one device per chip), which is what jax.make_mesh expects, so those
    generations are described with the 'megacore' chip config.
    """
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"the TPU compiler is not installed: {INSTALL_HINT}")
    from jax.experimental import topologies

    # Compiling needs no TPU, so several processes may load libtpu at once (it otherwise takes
    # a machine-wide lock meant for processes that drive a TPU).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
        if devices[0].device_kind in MEGACORE_KINDS and any(d.core_on_chip for d in devices):
            devices = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                                   chip_config_name="megacore").devices
    except Exception as e:  # noqa: BLE001 -- libtpu raises JaxRuntimeError
        message = " ".join(str(e).split())
        if "topology" in message.lower() or "external name" in message:
            raise ValueError(f"unknown TPU topology {name!r} ({message[:200]}): give "
                             f"GENERATION:SHAPE, e.g. v4:2x2x2, v5e:2x2, v5e:4x4, v5p:2x2x1, "
                             f"v6e:2x2") from None
        raise ValueError(f"libtpu cannot describe topology {name!r}: {message[:300]}") from None
    return list(devices)


def hbm_capacity(device) -> int:
    kind = device.device_kind
    if kind not in HBM_CAPACITY_BYTES:
        raise ValueError(f"no HBM capacity known for {kind!r}: add it to "
                         f"cleangpt_jax.compile.HBM_CAPACITY_BYTES")
    return HBM_CAPACITY_BYTES[kind]


def attention_under(mesh, model_cfg, segments: bool = False) -> str:
    """The attention implementation the model's training forward takes in a program traced
    under `mesh` (kernels.attention_path: on a TPU topology's mesh, 'auto' is Splash where the
    kernel can serve the model, the generic XLA path where it cannot, e.g. ALiBi); segments:
    the batches carry segment ids (data.document_mask)."""
    from cleangpt_jax import kernels

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return kernels.attention_path(model_cfg, segments=segments)


# --------------------------------------------------------------------------- measurement

def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def measure(lower: Callable[[], Any], *, topology: str, num_devices: int, what: str,
            program: str, program_devices: int, capacity: int, attention: str,
            flops_estimate: float | None, scanned: bool = False) -> Report:
    """Compile `lower()` (a jax.stages.Lowered) and read its per-device memory and FLOPs;
    `scanned`: the program runs its blocks as one lax.scan (model.scan_layers)."""
    t0 = time.perf_counter()
    lowered = lower()
    common = dict(topology=topology, num_devices=num_devices, what=what, program=program,
                  program_devices=program_devices, hbm_capacity_bytes=capacity,
                  flops_estimate_per_device=flops_estimate, attention=attention,
                  flops_count_one_block=scanned)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 -- JaxRuntimeError; only running out of HBM is ours
        message = " ".join(str(e).split())
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        # e.g. 'Ran out of memory on HBM, the total memory required for HLO temporaries
        # (40.19G) exceeds available HBM (15.75G).'
        sizes = re.findall(r"\(([0-9.]+)([KMGT])\)", message)
        needed = (int(float(sizes[0][0]) * 1024 ** "KMGT".index(sizes[0][1]) * 1024)
                  if sizes else None)
        return Report(argument_bytes=None, output_bytes=None, alias_bytes=None,
                      temp_bytes=None, code_bytes=None, hbm_bytes_per_device=needed,
                      fits=False, flops_per_device=None,
                      compile_seconds=round(time.perf_counter() - t0, 2),
                      out_of_memory=message.split("RESOURCE_EXHAUSTED: ")[-1][:300], **common)
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return Report(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                  alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
                  code_bytes=m.generated_code_size_in_bytes, hbm_bytes_per_device=int(total),
                  fits=bool(total <= capacity), flops_per_device=_cost_flops(compiled),
                  compile_seconds=round(seconds, 2), **common)


# --------------------------------------------------------------------------- the programs

def vocab_size(cfg) -> int:
    """model.vocab_size, or the GPT-2 tokenizer's; a character vocabulary comes from the
    corpus, which this tool does not read."""
    if cfg.model.vocab_size is not None:
        return int(cfg.model.vocab_size)
    if cfg.tokenizer.type == "gpt2":
        return GPT2_VOCAB_SIZE
    raise ValueError(f"model.vocab_size is taken from the {cfg.tokenizer.type!r} tokenizer's "
                     f"corpus at run time: give it, e.g. --config.model.vocab_size=65")


def abstract_batch(batch_size: int, block_size: int, batch_sharding,
                   segments: bool = False) -> dict:
    """The global batch a run feeds: input_ids and attention_mask (B, T) int32, and
    segment_ids (B, T) int32 when `segments` (data.document_mask)."""
    row = jax.ShapeDtypeStruct((batch_size, block_size), jnp.int32, sharding=batch_sharding)
    return {"input_ids": row, "attention_mask": row, **({"segment_ids": row} if segments else {})}


def train_programs(cfg, devices, topology: str) -> list[Report]:
    from cleangpt_jax import sharding, train_step
    from cleangpt_jax.config import model_config
    from cleangpt_jax.models import get_model
    from cleangpt_jax.optim import make_optimizer

    t = cfg.train
    model_cfg = model_config(cfg.model, vocab_size=vocab_size(cfg))
    mesh = sharding.create_mesh(int(t.fsdp), devices=devices)
    sharding.check_batch_size(t.batch_size, mesh, t.grad_accum_steps)
    model = get_model(config=model_cfg)
    optimizer, _ = make_optimizer(t, int(t.num_steps))
    loss_terms = train_step.get_strategy(t.strategy, model, cfg)
    init = train_step.model_init_fn(model)
    state, shardings = train_step.abstract_train_state(init, optimizer, mesh)
    step = train_step.make_train_step(loss_terms, optimizer, mesh=mesh,
                                      state_shardings=shardings,
                                      grad_accum_steps=int(t.grad_accum_steps))
    segments = bool(cfg.data.get("document_mask"))
    batch = abstract_batch(t.batch_size, model_cfg.block_size, sharding.batch_sharding(mesh),
                           segments)
    tokens_per_device = t.batch_size * model_cfg.block_size / len(devices)
    estimate = train_flops_per_token(param_count(state.params), model_cfg) * tokens_per_device
    return [measure(lambda: step.trace(state, batch).lower(), topology=topology,
                    num_devices=len(devices), what="train", program="train",
                    program_devices=len(devices), capacity=hbm_capacity(devices[0]),
                    attention=attention_under(mesh, model_cfg, segments),
                    flops_estimate=estimate, scanned=model_cfg.scan_layers)]


def teacher_config(cfg):
    """The teacher's ModelConfig as `loading.load_lm` would give it: a hub GPT-2 name (shapes
    known here, nothing downloaded) or a local directory's config.json."""
    from cleangpt_jax import hf

    name, dtype = cfg.distill.teacher, cfg.distill.teacher_dtype or cfg.model.dtype
    if name in GPT2_HUB_SHAPES:
        n_layer, n_head, n_embd = GPT2_HUB_SHAPES[name]
        fields = dict(model_type="gpt2", n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      n_positions=1024, vocab_size=GPT2_VOCAB_SIZE)
        return hf.config_from_hf(fields, dtype=dtype, source=name)
    path = storage.join(str(name), hf.CONFIG_FILE)
    if not storage.isfile(path):
        raise ValueError(f"distill.teacher={name!r} is neither a GPT-2 hub name "
                         f"({', '.join(GPT2_HUB_SHAPES)}) nor a directory with {hf.CONFIG_FILE}"
                         f": name one of those")
    return hf.config_from_hf(json.loads(storage.read_text(path)), dtype=dtype, source=path)


def distill_stage_steps(cfg, devices) -> tuple[Any, Any, list[tuple[Any, Callable, tuple]]]:
    """(the student's ModelConfig, the mesh, [(stage, jitted step, abstract arguments)]) for
    each stage
    kind of `cfg`'s plan: the last (largest) block stage, then the head and final stages that
    are enabled. The steps are `distill.stage_step.compiled_step`'s, over a mesh of `devices`;
    the arguments are what `runner.run_stage` passes: (trainable, opt_state, frozen,
    teacher_params, batch, rng), as ShapeDtypeStructs with the run's shardings. The steps are
    traced under the mesh, so 'auto' attention takes the devices' platform: TPU here, the
    machine's own accelerator in scripts/device_check.sh."""
    from cleangpt_jax import sharding
    from cleangpt_jax.distill import plan as plan_lib
    from cleangpt_jax.distill import runner, stage_step, student_init
    from cleangpt_jax.models import get_model

    if "distill" not in cfg:
        raise ValueError("--what=distill needs a distillation config (a distill section), "
                         "e.g. --config=configs/distill_gpt2_vanilla.py")
    runner.check_config(cfg)
    t_cfg = teacher_config(cfg)
    s_cfg = runner.student_config(cfg, t_cfg)
    mesh = sharding.create_mesh(int(cfg.train.fsdp), devices=devices)
    sharding.check_batch_size(cfg.train.batch_size, mesh)
    stages = plan_lib.build_stages(cfg.distill, s_cfg.n_layer, t_cfg.n_layer, steps_per_epoch=1)
    teacher, student = get_model(config=t_cfg), get_model(config=s_cfg)
    setup = runner.Setup(cfg, teacher, None, student, None, None, mesh, stages, None)
    tree = sharding.abstract_state(jax.eval_shape(lambda: student_init.init_tree(setup, 0)), mesh)
    teacher_params = sharding.abstract_state(
        jax.eval_shape(runner.train_step.model_init_fn(teacher), jax.random.key(0)), mesh)
    batch = abstract_batch(cfg.train.batch_size, s_cfg.block_size, sharding.batch_sharding(mesh),
                           bool(cfg.data.get("document_mask")))
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=sharding.replicated(mesh))
    blocks = [st for st in stages if st.kind == "block"]
    steps = []
    for stage in blocks[-1:] + [st for st in stages if st.kind != "block"]:
        paths = stage_step.trainable_paths(tree, stage, cfg, s_cfg.tie_embeddings)
        compiled = stage_step.compiled_step(stage_step.step_spec(setup, stage, paths), mesh)
        trainable, frozen = stage_step.split(tree, paths)
        opt_state = sharding.abstract_state(jax.eval_shape(compiled.init, trainable), mesh)
        steps.append((stage, compiled.step,
                      (trainable, opt_state, frozen, teacher_params, batch, rng)))
    return s_cfg, mesh, steps


def distill_programs(cfg, devices, topology: str) -> list[Report]:
    s_cfg, mesh, steps = distill_stage_steps(cfg, devices)
    return [measure(lambda: step.trace(*args).lower(), topology=topology,
                    num_devices=len(devices), what="distill", program=stage.name,
                    program_devices=len(devices), capacity=hbm_capacity(devices[0]),
                    attention=attention_under(mesh, s_cfg, bool(cfg.data.document_mask)),
                    flops_estimate=None, scanned=s_cfg.scan_layers)
            for stage, step, args in steps]


def generate_program(cfg, devices, topology: str, *, batch_size: int, prompt_length: int,
                     max_new_tokens: int) -> list[Report]:
    """generation.program() for `batch_size` prompts of `prompt_length` tokens on one chip, with
    the static settings `generation.generate` derives (sampling with top_k 50)."""
    from jax.sharding import SingleDeviceSharding

    from cleangpt_jax import generation, sharding
    from cleangpt_jax.config import model_config
    from cleangpt_jax.models import get_model
    from cleangpt_jax.train_step import model_init_fn

    model_cfg = model_config(cfg.model, vocab_size=vocab_size(cfg))
    generation.check_generation_args(max_new_tokens)
    model = get_model(config=model_cfg)
    on_chip = SingleDeviceSharding(devices[0])

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    params = jax.tree.map(lambda x: sds(x.shape, x.dtype),
                          jax.eval_shape(model_init_fn(model), jax.random.key(0)))
    learned = model_cfg.position_encoding == "learned"
    limit = model_cfg.block_size if learned else model_cfg.max_position_embeddings
    width = min(generation.bucket(prompt_length), limit)
    steps = generation.bucket(max_new_tokens)
    cache_len = width + (min(steps, model_cfg.block_size) if learned else steps)
    key = jax.eval_shape(lambda: jax.random.key(0)).dtype
    args = (params, sds((batch_size, width), jnp.int32), sds((batch_size,), jnp.int32),
            sds((), jnp.int32), sds((), jnp.float32), None, sds((), key), sds((), jnp.int32),
            sds((), jnp.int32))
    static = dict(model=model, cache_len=cache_len, steps=steps,
                  windowed=learned and width + steps > model_cfg.block_size, top_k=50,
                  greedy_only=False, return_logits=False, decode_layout=False)
    program, chip = generation.program(), sharding.create_mesh(devices=devices[:1])

    def lower():
        with jax.sharding.use_abstract_mesh(chip.abstract_mesh):  # (the chip's platform)
            return program.trace(*args, **static).lower()

    return [measure(lower, topology=topology, num_devices=len(devices), what="generate",
                    program="generate", program_devices=1, capacity=hbm_capacity(devices[0]),
                    attention=attention_under(chip, model_cfg), flops_estimate=None)]


def compile_programs(cfg: ml_collections.ConfigDict, topology: str, what: str = "train", *,
                     batch_size: int = 1, prompt_length: int = 64,
                     max_new_tokens: int = 256) -> list[Report]:
    """Compile `what` for `cfg` on TPU `topology`; one Report per program."""
    if what not in WHAT:
        raise ValueError(f"unknown --what={what!r}: choose one of {WHAT}")
    devices = topology_devices(topology)
    if what == "train":
        return train_programs(cfg, devices, topology)
    if what == "distill":
        return distill_programs(cfg, devices, topology)
    return generate_program(cfg, devices, topology, batch_size=batch_size,
                            prompt_length=prompt_length, max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------------------ the tool

def define_flags(flag_values: flags.FlagValues = FLAGS):
    d = dict(flag_values=flag_values)
    config_flags.DEFINE_config_file("config", None, "The run's config file (FILE.py or "
                                    "FILE.py:preset); --config.a.b=v overrides as in a run.", **d)
    flags.DEFINE_string("topology", None, "TPU slice, GENERATION:SHAPE, e.g. v5e:2x2, v4:2x2x2, "
                        "v5p:2x2x1, v6e:2x2, v5e:4x4 (16 chips, 4 hosts).", **d)
    flags.DEFINE_enum("what", "train", list(WHAT), "The program(s) to compile.", **d)
    flags.DEFINE_bool("json", False, "One JSON object per program instead of a line.", **d)
    flags.DEFINE_integer("batch_size", 1, "--what=generate: prompts per call.", **d)
    flags.DEFINE_integer("prompt_length", 64, "--what=generate: tokens per prompt.", **d)
    flags.DEFINE_integer("max_new_tokens", 256, "--what=generate: new tokens per prompt.", **d)


@cli.tool(usage="--config=FILE --topology=v5e:2x2 --what=train")
def main(argv):
    if not FLAGS.topology:
        cli.die("--topology is required, e.g. --topology=v5e:2x2", 2)
    if FLAGS["config"].value is None:
        cli.die("--config is required: the run's config file, e.g. "
                "--config=configs/gpt2_124m.py", 2)
    # Compile only: never take this machine's accelerator (a TPU VM's chips stay free), and
    # write nothing (no persistent compilation cache entries either).
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)
    cfg = cli.config_flag_value()
    for report in compile_programs(cfg, FLAGS.topology, FLAGS.what,
                                   batch_size=FLAGS.batch_size,
                                   prompt_length=FLAGS.prompt_length,
                                   max_new_tokens=FLAGS.max_new_tokens):
        print(json.dumps(dataclasses.asdict(report)) if FLAGS.json else report.line(),
              flush=True)


if __name__ == "__main__":
    cli.run(main, define_flags=define_flags)
