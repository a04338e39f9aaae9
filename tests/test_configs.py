"""Every training config in configs/: it loads, documents its command, validates, and (unless it
needs the Hugging Face hub) trains two steps of a tiny version of itself (same architecture
flags, tiny sizes). tests/test_train.py runs configs/shakespeare_char.py through the real CLI.
configs/distill_*.py belong to distillation and are tested with it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cleangpt_jax import hf, train_setup, trainer
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ModelConfig, config_module, get_config, model_config
from helpers import QUIET_RUN, persistent_compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
TRAIN_CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                       if f.endswith(".py") and not f.startswith(("distill_", "_")))
# Their data come from the hub (roneneldan/TinyStories, HuggingFaceFW/fineweb-edu);
# configs/gpt2_124m.py is compiled for TPU with tiny shapes in tests/test_compile.py.
NEEDS_HUB = {"tinystories_gpt2", "gpt2_124m"}
EXPECTED = {"shakespeare_char", "vanilla_char", "vanilla_gpt2", "sasp_char", "sasp_gpt2",
            "factored_char", "factored_gpt2", "factored_alibi_char", "tinystories_gpt2",
            "gpt2_teacher_shakespeare"}
# Tiny sizes; what makes each config itself (model_type, use_v/use_proj, bias, activation,
# positions, the tokenizer and the data) stays as the file sets it. The optimizer settings,
# dropout and vocab_size are made the same for all, so configs that share an architecture share
# one compiled step (compilation is what a two-step run costs).
_DEFAULT_TRAIN = get_config().train
TINY = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
        "model.dropout": 0.0, "model.vocab_size": 300,
        "train.batch_size": 4, "train.num_steps": 2, "train.eval_every": 0,
        "train.log_every": 1, "train.checkpoint_every": 0, "train.sample_max_new_tokens": 0,
        **QUIET_RUN,
        **{f"train.{k}": _DEFAULT_TRAIN[k] for k in (
            "learning_rate", "min_lr", "warmup_steps", "lr_schedule", "weight_decay",
            "grad_clip", "adam_b1", "adam_b2", "adam_eps", "grad_accum_steps")},
        "data.max_samples": 3}  # the first 3 plays: 2 to train on, 1 for validation


def load(name):
    return config_module(os.path.join(CONFIG_DIR, f"{name}.py"))


def flat_keys(cfg, prefix="") -> set[str]:
    out = set()
    for k, v in cfg.items():
        if hasattr(v, "items") and k != "mixture":
            out |= flat_keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def tiny_overrides(name, tmp_dir, gpt2_dir) -> dict:
    out = {**TINY, "data.cache_dir": str(tmp_dir / "tokens")}
    if load(name).get_config().tokenizer.type == "gpt2":
        out["tokenizer.name_or_path"] = gpt2_dir
    return out


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
    """A persistent compilation cache (configs that share an architecture compile it once), and
    XLA's optimisation passes off: compiling is what a two-step run costs."""
    path = str(tmp_path_factory.mktemp("jit_cache"))
    with persistent_compile_cache(path, fast_compile=True):
        yield path


def test_the_expected_configs_exist_document_their_command_and_validate():
    assert EXPECTED <= set(TRAIN_CONFIGS)
    default_keys = flat_keys(get_config())
    for name in TRAIN_CONFIGS:
        module = load(name)
        assert f"python -m cleangpt_jax.train --config=configs/{name}.py" in module.__doc__, name
        cfg = module.get_config()
        assert flat_keys(cfg) == default_keys, name  # no invented or dropped keys
        model_config(cfg.model)  # raises ConfigError on a bad combination
        train_setup.check_train_config(cfg)


def test_config_semantics():
    assert load("shakespeare_char").get_config().to_dict() == get_config().to_dict()
    for name in TRAIN_CONFIGS:
        cfg = load(name).get_config()
        gpt2_named = name.endswith("_gpt2") or name == "gpt2_124m"
        assert (cfg.tokenizer.type == "gpt2") == gpt2_named, name
        arch = name.split("_")[0]
        if arch in ("vanilla", "sasp", "factored"):
            assert cfg.model.model_type == arch, name
    for name in ("sasp_char", "sasp_gpt2"):  # as the original's SASP examples
        assert load(name).get_config().model.use_proj and load(name).get_config().model.use_v
    assert load("factored_alibi_char").get_config().model.position_encoding == "alibi"
    tiny = load("tinystories_gpt2").get_config()
    assert (tiny.data.source, tiny.data.name) == ("hf", "roneneldan/TinyStories")
    teacher = load("gpt2_teacher_shakespeare").get_config()
    assert teacher.data.source == "shakespeare" and teacher.tokenizer.type == "character"
    # A teacher export_hf can write as GPT2LMHeadModel: GPT-2's exact block.
    mcfg = model_config(teacher.model, vocab_size=80)
    assert (mcfg.bias, mcfg.activation, mcfg.tie_embeddings, mcfg.n_embd // mcfg.n_head) == (
        True, "gelu_tanh", True, 64)
    assert hf.hf_config(mcfg)["activation_function"] == "gelu_new"


def test_a_model_built_without_a_config_is_the_default_configs_model():
    """One default per setting: ModelConfig's defaults (what code building a model without a
    config gets) are exactly the default config's model section."""
    assert model_config(get_config().model) == ModelConfig()
    assert model_config(get_config()).to_dict() == ModelConfig().to_dict()


def test_resume_check_ignores_the_attention_implementation_only():
    """A run saved with one attention implementation resumes under another (they compute the
    same numbers), and under a config.json written before the setting existed; any change of
    what the model computes is still reported."""
    saved = get_config().to_dict()
    del saved["model"]["attention"]
    now = get_config()
    now.model.attention = "xla"
    assert workdir_lib.config_differences(saved, now) == []
    now.model.n_layer = 6
    assert workdir_lib.config_differences(saved, now) == ["model.n_layer: 4 -> 6"]


@pytest.mark.parametrize("name", [n for n in TRAIN_CONFIGS if n not in NEEDS_HUB])
def test_config_trains_two_tiny_steps(name, tmp_path, gpt2_tokenizer_dir, jit_cache):
    cfg = load(name).get_config()
    for key, value in tiny_overrides(name, tmp_path, gpt2_tokenizer_dir).items():
        section, field = key.split(".")
        cfg[section][field] = value
    summary = trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert summary.step == 2 and np.isfinite(summary.train_loss)
    run = workdir_lib.load_run(str(tmp_path / "run"))
    assert run.step == 2 and run.model_config.model_type == cfg.model.model_type
