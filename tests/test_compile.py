"""python -m cleangpt_jax.compile: the programs a run executes, compiled for TPU slices by
libtpu's compiler on this CPU machine (tiny models: seconds each), and configs/gpt2_124m.py.

The compile tests need libtpu (the `tpu` extra, installed in CI) and are skipped exactly when
it is missing; the config tests run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from cleangpt_jax import train_setup
from cleangpt_jax.config import config_module, get_config, load_config_file, model_config
from cleangpt_jax.distill import config as distill_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_CONFIG = os.path.join(REPO, "configs", "gpt2_124m.py")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="the TPU compiler (libtpu, the 'tpu' extra) is missing")
GiB = 1024 ** 3
# topology -> (devices: one per chip, also for megacore v4; processes; HBM per chip)
TOPOLOGIES = {"v4:2x2x2": (8, 2, 32 * GiB), "v5e:2x2": (4, 1, 16 * GiB),
              "v6e:2x2": (4, 1, 32 * GiB), "v5e:4x4": (16, 4, 16 * GiB)}
JSON_KEYS = {"topology", "num_devices", "what", "hbm_bytes_per_device", "hbm_capacity_bytes",
             "fits", "flops_per_device", "compile_seconds"}


def load_gpt2_config(preset=None):
    return config_module(GPT2_CONFIG), load_config_file(
        GPT2_CONFIG + (f":{preset}" if preset else ""))


def tiny_train_config(**model):
    cfg = get_config()
    cfg.model.update({**dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64),
                      **model})
    cfg.train.update(batch_size=16, grad_accum_steps=1)
    return cfg


@pytest.fixture(scope="module")
def compile_lib():
    from cleangpt_jax import compile as compile_lib

    return compile_lib


# ------------------------------------------------------------------------ configs/gpt2_124m.py

@pytest.mark.parametrize("preset,shape", [(None, (12, 12, 768)), ("medium", (24, 16, 1024)),
                                          ("large", (36, 20, 1280)), ("xl", (48, 25, 1600))])
def test_gpt2_presets_build_and_validate(preset, shape):
    module, cfg = load_gpt2_config(preset)
    assert "python -m cleangpt_jax.train --config=configs/gpt2_124m.py" in module.__doc__
    c = model_config(cfg.model, vocab_size=50257)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (*shape, 1024)
    assert (c.dtype, c.param_dtype, c.head_dim) == ("bfloat16", "float32", 64)
    assert cfg.tokenizer.type == "gpt2" and cfg.data.source == "hf"
    train_setup.check_train_config(cfg)
    assert cfg.train.batch_size * c.block_size == 524_288  # tokens per update
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        module.get_config("huge")


# -------------------------------------------------------------------------------- the tool

@needs_libtpu
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_train_step_compiles_for_every_generation(compile_lib, topology):
    """The sharded train step on each generation's slice (v4 as megacore: one device per
    chip), including a 4-host one: per-device bytes, FLOPs near 6N + 12LHQT, the TPU's
    attention path (not the CPU one this machine would take)."""
    n_devices, n_processes, capacity = TOPOLOGIES[topology]
    devices = compile_lib.topology_devices(topology)
    assert len(devices) == n_devices and all(d.core_on_chip == 0 for d in devices)
    assert len({d.process_index for d in devices}) == n_processes
    (report,) = compile_lib.compile_programs(tiny_train_config(), topology, "train")
    assert (report.topology, report.num_devices, report.program_devices) == (
        topology, n_devices, n_devices)
    assert report.hbm_capacity_bytes == capacity and report.fits
    assert report.hbm_bytes_per_device == (report.argument_bytes + report.output_bytes
                                           - report.alias_bytes + report.temp_bytes
                                           + report.code_bytes) > 0
    assert report.alias_bytes > 0  # the donated train state is updated in place
    assert 0.5 < report.flops_per_device / report.flops_estimate_per_device < 2.5
    assert report.attention == "xla"  # TPU's generic path: Splash needs T % 128 == 0 (T = 16)


@needs_libtpu
def test_fsdp_shards_the_state(compile_lib):
    """train.fsdp=4 splits parameters and both AdamW moments (12 bytes per float32 parameter)
    over the 4 chips: each holds about a quarter of them (plus TPU tile padding), where a
    replica would hold them all. The blocks run as one lax.scan (model.scan_layers, what
    GPT-2 XL needs to fit), whose FLOPs the report flags as counted once."""
    cfg = tiny_train_config(n_embd=64, n_layer=2, scan_layers=True)
    cfg.train.fsdp = 4
    (report,) = compile_lib.compile_programs(cfg, "v5e:2x2", "train")
    assert report.fits and report.flops_count_one_block
    # one of the two blocks counted: unrolled, the compiler counts more than the estimate
    assert report.flops_per_device < 0.75 * report.flops_estimate_per_device
    assert "scanned blocks counted once" in report.line()
    c = model_config(cfg.model)
    n_params = (c.vocab_size * c.n_embd + c.block_size * c.n_embd
                + 12 * c.n_layer * c.n_embd ** 2)
    assert report.argument_bytes < 0.6 * 12 * n_params


@needs_libtpu
def test_every_distillation_stage_kind_compiles(compile_lib, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", n_layer=4, n_head=2, n_embd=64, n_positions=32, vocab_size=64)))
    cfg = distill_config.get_config()
    cfg.model.update(model_type="vanilla", n_layer=2, n_head=2, n_embd=32, block_size=16)
    cfg.distill.update(teacher=str(teacher))
    cfg.distill.final.enabled = True
    cfg.train.batch_size = 8
    reports = compile_lib.compile_programs(cfg, "v6e:2x2", "distill")
    assert [r.program for r in reports] == ["block_2", "head", "final"]
    assert all(r.what == "distill" and r.fits and r.flops_per_device > 0 for r in reports)
    with pytest.raises(ValueError, match="needs a distillation config"):
        compile_lib.compile_programs(tiny_train_config(), "v6e:2x2", "distill")


@needs_libtpu
def test_generate_program_compiles_on_one_chip(compile_lib):
    (report,) = compile_lib.compile_programs(tiny_train_config(), "v5e:2x2", "generate",
                                             batch_size=2, prompt_length=5, max_new_tokens=20)
    assert (report.program, report.num_devices, report.program_devices) == ("generate", 4, 1)
    assert report.fits and report.flops_per_device > 0


@needs_libtpu
def test_a_model_too_big_for_the_chip_does_not_fit(compile_lib):
    """One block and a 2M x 1024 float32 embedding: 8 GiB of parameters, 24 GiB with the AdamW
    moments, replicated on every 16 GiB v5e chip (cheap to compile: few, large arrays). XLA:TPU
    refuses it; the report says so, with the bytes the compiler names."""
    cfg = tiny_train_config(vocab_size=2 ** 21, n_embd=1024, n_head=8)
    (report,) = compile_lib.compile_programs(cfg, "v5e:2x2", "train")
    assert not report.fits and "HBM" in report.out_of_memory
    assert report.hbm_bytes_per_device > report.hbm_capacity_bytes
    assert "DOES NOT FIT" in report.line()


@needs_libtpu
def test_bad_input_is_one_line_naming_the_fix(compile_lib, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown TPU topology 'v9:2x2'.*e\.g\. v4:2x2x2"):
        compile_lib.topology_devices("v9:2x2")
    with pytest.raises(ValueError, match="unknown --what='eval'"):
        compile_lib.compile_programs(tiny_train_config(), "v5e:2x2", "eval")
    with pytest.raises(ValueError, match="model.vocab_size is taken from"):
        cfg = tiny_train_config()
        cfg.model.vocab_size = None
        compile_lib.compile_programs(cfg, "v5e:2x2", "train")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r'pip install -e "\.\[tpu\]"'):
        compile_lib.topology_devices("v5e:2x2")


@needs_libtpu
def test_the_command_line_prints_json_for_the_gpt2_config():
    """The tool as a user runs it (the one subprocess): configs/gpt2_124m.py with its shapes
    overridden small, on the 4-host v5e:4x4, --json."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-m", "cleangpt_jax.compile", f"--config={GPT2_CONFIG}:medium",
         "--topology=v5e:4x4", "--json", "--config.model.n_layer=1",
         "--config.model.n_embd=64", "--config.model.n_head=2", "--config.model.block_size=32",
         "--config.train.batch_size=16", "--config.train.grad_accum_steps=1"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = out.stdout.strip().splitlines()
    report = json.loads(line)
    assert JSON_KEYS <= set(report)
    assert (report["topology"], report["num_devices"], report["what"]) == ("v5e:4x4", 16,
                                                                            "train")
    assert report["fits"] is True and report["hbm_capacity_bytes"] == 16 * GiB
