"""Distillation runs.

One offline teacher (configs/gpt2_teacher_shakespeare.py, tiny, trained a few steps and exported
with export_hf: the recipe of the HF-bridge issue) and one uninterrupted reference run of
configs/distill_shakespeare_offline.py (tiny) serve most tests: an in-process run stopped by
SIGTERM and rerun must reproduce the reference bit for bit, and the reference's stage
checkpoints show what each stage trains (the real CLI killed with SIGKILL in every stage kind
is tests/test_fault_injection.py's). A random transformers GPT-2 with a BPE tokenizer is the
teacher of the loss-type runs and the error checks. A persistent compilation cache lets the
CLI reuse the in-process compilations.
"""

from __future__ import annotations

import importlib.util
import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from cleangpt_jax import data as data_lib
from cleangpt_jax import hf, loop, optim, trainer
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ConfigError
from cleangpt_jax.distill import records, runner, student_init
from cleangpt_jax.distill import stage_step
from cleangpt_jax.distill import config as distill_config
from cleangpt_jax.loading import load_lm
from cleangpt_jax.metrics import untimed
from helpers import QUIET_RUN, one_line_error, persistent_compile_cache, run_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_CONFIG = "configs/distill_shakespeare_offline.py"
TEACHER_WIDTH = 32
# The tiny offline run: 4 -> 2 blocks (map 2, 4), width 16 -> 32 through stitching, dropout on,
# head (KL) and final (CE on the teacher's argmax + LM loss) stages: 4 + 4 + 3 + 3 steps.
OFFLINE = {"data.max_samples": 3, "model.model_type": "vanilla", "model.n_layer": 2,
           "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16, "model.dropout": 0.1,
           "train.batch_size": 4, "distill.steps_per_block": 4, "distill.learning_rate": 3e-3,
           "distill.warmup_steps": 0, "distill.checkpoint_every": 2, "distill.log_every": 1,
           "distill.eval_steps": 2, "distill.head.steps": 3, "distill.head.learning_rate": 3e-3,
           "distill.final.steps": 3, "distill.final.logit_loss": "ce", **QUIET_RUN}
STAGES = ["block_1", "block_2", "head", "final"]
TEXT = ("Once upon a time there was a little fox who liked to read. The fox read books about "
        "the sea, the stars and the old oak tree. ") * 40


def load_config_file(path):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3],
                                                  os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply(cfg, overrides: dict):
    cfg.update_from_flattened_dict(overrides)
    return cfg


def cli_flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def changed(before, after) -> set[str]:
    """Top-level names ('wte', 'h_0', 'stitch_1', ...) with a leaf that differs."""
    a, b = flat(before), flat(after)
    assert a.keys() == b.keys()
    return {k.split("/")[1] for k in a if not np.array_equal(a[k], b[k])}


def assert_trees_equal(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Token cache and compile settings for this module and its subprocesses: a persistent
    compilation cache and XLA's optimisation passes off. Every run compared bitwise (in-process,
    resumed or killed subprocesses) is compiled with these settings."""
    root = tmp_path_factory.mktemp("distill")
    with persistent_compile_cache(str(root / "jit_cache"), fast_compile=True) as sub_env:
        yield types.SimpleNamespace(root=root, tokens=str(root / "tokens"), sub_env=sub_env)


@pytest.fixture(scope="module")
def offline_teacher(env):
    """The offline recipe's first two commands, tiny: train configs/gpt2_teacher_shakespeare.py
    (4 blocks x 32, context 32) for 3 steps on the first 3 plays, export it with export_hf."""
    cfg = apply(load_config_file("configs/gpt2_teacher_shakespeare.py").get_config(), {
        "model.n_layer": 4, "model.n_head": 2, "model.n_embd": TEACHER_WIDTH,
        "model.block_size": 32, "train.batch_size": 4, "train.num_steps": 3,
        "train.warmup_steps": 1, "train.eval_every": 0, "train.checkpoint_every": 0,
        "train.sample_max_new_tokens": 0, "train.log_every": 1, "data.max_samples": 3, **QUIET_RUN,
        "data.cache_dir": env.tokens})
    workdir = str(env.root / "teacher")
    trainer.train_and_evaluate(cfg, workdir)
    out = hf.export_run(workdir, str(env.root / "teacher_hf"))
    return types.SimpleNamespace(workdir=workdir, hf_dir=out)


@pytest.fixture(scope="module")
def offline(env, offline_teacher):
    """Overrides of configs/distill_shakespeare_offline.py for the tiny offline run."""
    overrides = {**OFFLINE, "distill.teacher": offline_teacher.hf_dir,
                 "data.cache_dir": env.tokens}
    return types.SimpleNamespace(
        overrides=overrides,
        config=lambda **extra: apply(load_config_file(OFFLINE_CONFIG).get_config(),
                                     {**overrides, **extra}))


@pytest.fixture(scope="module")
def reference(env, offline):
    """The uninterrupted tiny offline run, in process."""
    workdir = str(env.root / "reference")
    summary = runner.run(offline.config(), workdir, progress=False)
    return types.SimpleNamespace(workdir=workdir, summary=summary,
                                 params=workdir_lib.load_run(workdir).params,
                                 metrics=workdir_lib.read_metrics(workdir))


@pytest.fixture(scope="module")
def gpt2_teacher(env):
    """A random GPT2LMHeadModel (2 blocks x 32, 32 positions) with a local BPE tokenizer, as
    `save_pretrained` writes it, and a small text corpus."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    from cleangpt_jax.tokenizers.testing import build_local_gpt2_tokenizer

    directory = str(env.root / "gpt2")
    build_local_gpt2_tokenizer(directory, texts=[TEXT])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=TEACHER_WIDTH,
                               n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
                    ).save_pretrained(directory)
    text = env.root / "corpus.txt"
    text.write_text(TEXT)

    def config(**overrides):
        cfg = distill_config.get_config()
        return apply(cfg, {"distill.teacher": directory, "data.source": "text",
                           "data.files": str(text), "data.val_fraction": 0.0,
                           "data.cache_dir": env.tokens, "model.model_type": "vanilla",
                           "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16,
                           "model.block_size": 16, "train.batch_size": 4,
                           "distill.steps_per_block": 2, "distill.head.steps": 2,
                           "distill.checkpoint_every": 0, "distill.warmup_steps": 0,
                           **overrides})

    return types.SimpleNamespace(dir=directory, config=config)


# ---------------------------------------------------------------------------------- tests
def test_offline_teacher_recipe_gives_a_gpt2_directory(offline_teacher):
    """train -> export_hf -> a directory `load_gpt2` (hence distillation) takes like 'gpt2'."""
    run = workdir_lib.load_run(offline_teacher.workdir)
    config, params = hf.load_gpt2(offline_teacher.hf_dir)
    assert (config.model_type, config.bias, config.activation, config.tie_embeddings) == (
        "vanilla", True, "gelu_tanh", True)
    assert (config.n_layer, config.n_embd, config.vocab_size) == (4, TEACHER_WIDTH,
                                                                   run.tokenizer.vocab_size)
    assert_trees_equal(params, run.params)
    tok = load_lm(offline_teacher.hf_dir).tokenizer  # its character tokenizer
    assert tok.tokenizer_type == "character" and tok.encode("ROMEO:") == \
        run.tokenizer.encode("ROMEO:")


def test_the_final_student_is_a_model_workdir_and_a_gpt2_export(reference, offline_teacher):
    run = workdir_lib.load_run(reference.workdir)
    teacher_cfg, _ = hf.load_gpt2(offline_teacher.hf_dir)
    assert (run.model_config.model_type, run.model_config.n_embd) == ("vanilla", 16)
    assert run.model_config.vocab_size == teacher_cfg.vocab_size
    assert run.step == 14 and run.tokenizer.tokenizer_type == "character"
    assert run.config.distill.layer_map == [2, 4] and run.config.distill.teacher_n_layer == 4
    stitching = records.load_stitching(reference.workdir)
    assert sorted(stitching) == ["stitch_1", "stitch_2"]
    assert stitching["stitch_2"]["kernel"].shape == (16, TEACHER_WIDTH)
    val = reference.summary["student_val"]
    assert np.isfinite(val["val_ppl"]) and reference.metrics[-1]["val_ppl"] == val["val_ppl"]

    torch = pytest.importorskip("torch")
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(os.path.join(reference.workdir, "hf")).eval()
    ids = np.array([run.tokenizer.encode("ROMEO: What, ho!")])
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(run.model.apply({"params": run.params}, ids).logits)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_each_stage_changes_only_its_parameters(offline, reference):
    """block_1: embeddings + h_0 + stitch_1; block_2: h_1 + stitch_2; the head stage starts
    from W_t K_2^T and trains ln_f + lm_head (the tied-embedding weights stay bit-identical);
    final: every student parameter, no stitching layer."""
    s = runner.setup(ml_collections.ConfigDict(offline.config().to_dict()))
    init = student_init.init_tree(s, 0)
    b1, b2, head, final = (runner.completed_tree(s, reference.workdir, n) for n in STAGES)
    assert changed(init, b1) == {"wte", "wpe", "h_0", "stitch_1"}
    assert changed(b1, b2) == {"h_1", "stitch_2"}
    head_init = student_init.init_head_from_teacher(s, b2)
    assert changed(b2, head_init) == {"lm_head"}
    w_t = np.asarray(s.teacher_params["wte"]["embedding"])
    g_t = np.asarray(s.teacher_params["ln_f"]["scale"])
    kernel = np.asarray(b2["stitch"]["stitch_2"]["kernel"])
    # W_t diag(g_t) K^T (distill.head.fold_ln_scale, the default), W_t K^T without the fold.
    np.testing.assert_allclose(head_init["student"]["lm_head"], (w_t * g_t) @ kernel.T,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(g_t, 1.0, atol=1e-4)  # (the fold is visible)
    s.config.distill.head.fold_ln_scale = False
    np.testing.assert_allclose(student_init.init_head_from_teacher(s, b2)["student"]["lm_head"],
                               w_t @ kernel.T, rtol=1e-5, atol=1e-6)
    assert changed(head_init, head) == {"lm_head", "ln_f"}
    np.testing.assert_array_equal(head["student"]["wte"]["embedding"],
                                  b1["student"]["wte"]["embedding"])
    assert changed(head, final) == {"wte", "wpe", "h_0", "h_1", "ln_f", "lm_head"}
    assert_trees_equal(final["stitch"], b2["stitch"])


def test_each_stage_loss_falls(reference):
    """Per stage, the mean of the last two logged losses is below the first two."""
    for name in STAGES:
        losses = [m["distill_loss"] for m in reference.metrics if m["stage"] == name]
        assert np.mean(losses[-2:]) < np.mean(losses[:2]), (name, losses)
    assert [m["name"] for m in reference.summary["stages"]] == STAGES


def test_sigterm_mid_stage_then_rerun_equals_uninterrupted(env, offline, reference, monkeypatch):
    """SIGTERM inside the head stage: the step finishes, is saved, the run stops; the same
    call again runs only the head (from its step 2) and final stages, bit for bit. A third
    call, on the finished run, runs nothing and leaves one 'student' record."""
    workdir = str(env.root / "sigterm")
    real = data_lib.batch_for_step

    def batch_for_step(tokens, *, step, **kw):
        if step == 9:  # the head stage's second batch
            os.kill(os.getpid(), __import__("signal").SIGTERM)
        return real(tokens, step=step, **kw)

    monkeypatch.setattr(data_lib, "batch_for_step", batch_for_step)
    config = offline.config()
    config.data.prefetch = 0  # (the signal comes as the step's batch is built, not ahead)
    with pytest.raises(KeyboardInterrupt, match="stopped in stage head at step 2") as e:
        runner.run(config, workdir, progress=False)
    monkeypatch.undo()
    assert loop.exit_status(e.value.signum) == 143  # what the CLI exits with, as train does
    assert [m["name"] for m in records.read_manifest(workdir)] == ["block_1", "block_2"]

    ran = []
    real_run_stage = runner.run_stage
    monkeypatch.setattr(runner, "run_stage",
                        lambda s, stage, *a, **k: ran.append(stage.name) or
                        real_run_stage(s, stage, *a, **k))
    runner.run(offline.config(), workdir, progress=False)
    assert ran == ["head", "final"]
    assert_trees_equal(workdir_lib.load_run(workdir).params, reference.params)
    assert untimed(workdir_lib.read_metrics(workdir)) == untimed(reference.metrics)
    runner.run(offline.config(), workdir, progress=False)  # the finished run, rerun: no stage
    assert ran == ["head", "final"]
    metrics = workdir_lib.read_metrics(workdir)
    assert [m["stage"] for m in metrics].count("student") == 1
    assert untimed(metrics) == untimed(reference.metrics)


def test_nan_loss_stops_keeps_the_good_stages_and_a_fixed_rerun_finishes(env, offline,
                                                                          reference,
                                                                          monkeypatch):
    """A teacher whose block 4 yields NaN: block_1 (teacher block 2) completes, block_2 stops
    at its first step with a one-line error and saves nothing; rerun with the healthy teacher,
    the run resumes at block_2 and ends where the reference does."""
    workdir = str(env.root / "nan")
    real = hf.load_gpt2

    def poisoned(*a, **k):
        config, params = real(*a, **k)
        h3 = params["h_3"]["mlp"]["c_fc"]
        h3["bias"] = jnp.full_like(h3["bias"], jnp.nan)
        return config, params

    monkeypatch.setattr(hf, "load_gpt2", poisoned)
    with pytest.raises(loop.NonFiniteError,
                       match="stage block_2: loss is nan at step 1; stopped") as e:
        runner.run(offline.config(), workdir, progress=False)
    assert "completed stages are kept" in one_line_error(e)
    monkeypatch.undo()
    assert [m["name"] for m in records.read_manifest(workdir)] == ["block_1"]
    block_2 = os.path.join(workdir, "stages", "block_2")
    assert not [d for d in os.listdir(block_2) if d.isdigit()]  # nothing saved after the NaN
    runner.run(offline.config(), workdir, progress=False)
    assert_trees_equal(workdir_lib.load_run(workdir).params, reference.params)


def test_a_diverged_update_is_never_saved(env, offline, reference, monkeypatch):
    """block_1's last update turns its weights into NaN (a NaN learning rate at its last
    step; its loss, computed before the update, is finite): the stage stops there and its
    newest checkpoint (one every step) holds the finite weights of the step before."""
    real = optim.lr_schedule
    monkeypatch.setattr(optim, "lr_schedule", lambda t, n: (
        lambda s: jnp.where(s == n - 1, jnp.nan, real(t, n)(s))))
    monkeypatch.setattr(stage_step, "compiled_step", stage_step.compiled_step.__wrapped__)  # uncached
    workdir = str(env.root / "diverged")
    with pytest.raises(loop.NonFiniteError) as e:
        runner.run(offline.config(**{"distill.checkpoint_every": 1}), workdir, progress=False)
    assert one_line_error(e) == (
        "stage block_1: parameter norm is nan at step 4; stopped, the stage's checkpoint at "
        "step 3 and the completed stages are kept. Lower distill.learning_rate or set "
        "distill.grad_clip, then rerun")
    s = runner.setup(offline.config())
    template = runner.sharding.abstract_state(jax.eval_shape(lambda: student_init.init_tree(s, 0)),
                                              s.mesh)
    c = records.stage_checkpointer(workdir, "block_1", read_only=True)
    assert c.all_steps() == [2, 3]  # max_to_keep=2
    assert all(np.isfinite(v).all() for v in flat(c.restore(3, params=template).params).values())
    c.close()


def test_changed_settings_are_refused_on_resume(offline, reference):
    before = sorted(os.listdir(os.path.join(reference.workdir, "stages")))
    with pytest.raises(ConfigError, match="other settings") as e:
        runner.run(offline.config(**{"model.n_embd": 32}), reference.workdir, progress=False)
    assert "student.n_embd: 16 -> 32" in one_line_error(e)
    assert sorted(os.listdir(os.path.join(reference.workdir, "stages"))) == before


@pytest.mark.parametrize("overrides, stages", [
    # Equal widths: identity stitching, head copied from the teacher (the copies must not
    # alias the teacher's buffers: the head step donates them); cosine / MSE losses.
    ({"model.model_type": "factored", "model.n_layer": 1, "model.n_embd": TEACHER_WIDTH,
      "distill.hidden_loss": "cosine", "distill.head.logit_loss": "mse"}, ["block_1", "head"]),
    # A layer-map list, KL on hidden states, no head stage (the student keeps a tied head).
    ({"model.model_type": "sasp", "model.n_layer": 1, "distill.layer_map": [1],
      "distill.hidden_loss": "kl_div", "distill.head.enabled": False}, ["block_1"]),
])
def test_loss_types_architectures_and_head_stage_on_or_off(gpt2_teacher, tmp_path, overrides,
                                                           stages):
    cfg = gpt2_teacher.config(**overrides)
    workdir = str(tmp_path / "run")
    summary = runner.run(cfg, workdir, progress=False)
    assert [m["name"] for m in summary["stages"]] == stages
    assert all(np.isfinite(m["final_loss"]) for m in summary["stages"])
    run = workdir_lib.load_run(workdir)
    assert run.model_config.model_type == overrides["model.model_type"]
    assert run.model_config.tie_embeddings == ("head" not in stages)
    assert not os.path.exists(os.path.join(workdir, "hf"))  # only Vanilla students export
    s = runner.setup(ml_collections.ConfigDict(cfg.to_dict()))
    if "head" in stages:
        init = student_init.init_tree(s, 0)
        np.testing.assert_array_equal(init["stitch"]["stitch_1"]["kernel"],
                                      np.eye(TEACHER_WIDTH))
        block = runner.completed_tree(s, workdir, "block_1")
        head_init = student_init.init_head_from_teacher(s, block)
        np.testing.assert_array_equal(head_init["student"]["lm_head"],
                                      s.teacher_params["wte"]["embedding"])
        # ln_f too, as far as the student has it (a bias-free student drops the LN bias).
        for k, v in head_init["student"]["ln_f"].items():
            np.testing.assert_array_equal(v, s.teacher_params["ln_f"][k])
    else:
        assert summary["layer_map"] == [1] and run.config.distill.layer_map == [1]


def test_init_from_teacher_copies_mapped_blocks_and_eval_every_records_val(gpt2_teacher,
                                                                         tmp_path):
    """distill.init_from_teacher (DistilGPT2's initialisation): a 1-block student at the
    teacher's width starts as teacher block map(1) = 2 with the teacher's embeddings, ln_f and
    head; a 2-block one computes the teacher's logits. distill.eval_every writes the student's
    val_loss every N global steps, the last one the summary's own."""
    copy = {"model.n_embd": TEACHER_WIDTH, "model.bias": True, "model.activation": "gelu_tanh",
            "distill.init_from_teacher": True, "data.val_fraction": 0.2,
            "distill.eval_every": 2, "distill.eval_steps": 1}
    cfg = gpt2_teacher.config(**copy, **{"model.n_layer": 1, "distill.block_stages": False,
                                         "distill.head.enabled": False,
                                         "distill.final.enabled": True,
                                         "distill.final.steps": 4})
    s = runner.setup(ml_collections.ConfigDict(cfg.to_dict()))
    student, teacher = flat(student_init.init_tree(s, 0)["student"]), flat(s.teacher_params)
    for k, v in student.items():
        source = ("h_1" + k[3:] if k.startswith("h_0") else
                  "wte/embedding" if k == "lm_head" else k)
        np.testing.assert_array_equal(v, teacher[source][:len(v)], err_msg=k)
    summary = runner.run(cfg, str(tmp_path / "run"), progress=False)
    vals = [m for m in workdir_lib.read_metrics(str(tmp_path / "run")) if "val_loss" in m]
    assert [m["step"] for m in vals] == [2, 4, 4] and vals[0]["stage"] == "final"
    assert vals[1]["val_loss"] == summary["student_val"]["val_loss"]

    s = runner.setup(ml_collections.ConfigDict(gpt2_teacher.config(**copy).to_dict()))
    ids = np.arange(16, dtype=np.int32)[None] % 300
    ours = s.student.apply({"params": student_init.init_tree(s, 0)["student"]}, ids).logits
    theirs = s.teacher.apply({"params": s.teacher_params}, ids).logits
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="student's model.activation='gelu'"):
        runner.setup(gpt2_teacher.config(**{**copy, "model.activation": "gelu"}))
    with pytest.raises(ConfigError, match="has no teacher leaf of its shape"):
        runner.setup(gpt2_teacher.config(**{**copy, "model.n_embd": 16}))


@pytest.mark.parametrize("overrides, message", [
    ({"model.vocab_size": 500}, "differs from the teacher's vocabulary"),
    ({"distill.layer_map": [1, 3]}, "out of range"),
    ({"distill.layer_map": [2, 1]}, "strictly increasing"),
    ({"distill.stitching": False}, "needs equal widths"),
    ({"distill.hidden_loss": "huber"}, "registered losses"),
    ({"model.block_size": 64}, "exceeds the teacher's 32 positions"),
    ({"distill.learning_rate": [1e-3]}, "has 1 values for 2 blocks"),
    ({"distill.profile_steps": "0,2"}, r"need 1 <= START <= END"),
    ({"train.loggers": "tensorboard,foo"}, r"unknown train.loggers \['foo'\]"),
])
def test_bad_setups_get_one_line_errors_and_write_nothing(gpt2_teacher, tmp_path, overrides,
                                                         message):
    with pytest.raises(ValueError, match=message) as e:
        runner.run(gpt2_teacher.config(**overrides), str(tmp_path / "run"), progress=False)
    one_line_error(e)
    assert not os.path.exists(tmp_path / "run")


def test_teacher_directory_without_weights_is_a_one_line_cli_error(tmp_path, capsys,
                                                                   monkeypatch):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32,
         "vocab_size": 300}))
    from cleangpt_jax.distill.__main__ import run

    monkeypatch.chdir(REPO)
    code, _, err = run_tool(run, ["distill", f"--workdir={tmp_path / 'run'}",
                                  f"--config.distill.teacher={empty}"], capsys, monkeypatch)
    assert code != 0
    assert err.strip().splitlines() == [
        f"error: no weights in '{empty}': expected model.safetensors (or "
        f"model.safetensors.index.json) or pytorch_model.bin next to config.json"], err
    assert not os.path.exists(tmp_path / "run")


def test_distill_configs_document_their_command_and_plan(offline_teacher):
    for name in ("distill_gpt2_factored", "distill_gpt2_sasp", "distill_gpt2_vanilla",
                 "distill_shakespeare_offline"):
        path = f"configs/{name}.py"
        module = load_config_file(path)
        assert f"python -m cleangpt_jax.distill --config={path}" in module.__doc__, name
        cfg = module.get_config()
        runner.check_config(cfg)
        n_teacher = 4 if "offline" in name else 12
        stages = runner.plan_lib.build_stages(cfg.distill, cfg.model.n_layer, n_teacher,
                                              steps_per_epoch=100)
        assert [st.name for st in stages][:2] == ["block_1", "block_2"], name
        assert stages[-1].name in ("head", "final")
    readme = load_config_file("configs/distill_gpt2_factored.py").get_config()
    assert (readme.model.model_type, readme.model.n_embd, readme.model.n_head) == (
        "factored", 384, 6)
    assert (readme.data.name, readme.data.text_column) == ("roneneldan/TinyStories", "text")
    assert readme.distill.teacher == "gpt2" and readme.distill.epochs_per_block == 3
    vanilla = load_config_file("configs/distill_gpt2_vanilla.py").get_config()
    assert (vanilla.model.bias, vanilla.model.activation, vanilla.model.n_embd) == (
        True, "gelu_tanh", 768)
    doc = load_config_file(OFFLINE_CONFIG).__doc__
    for command in ("python -m cleangpt_jax.train --config=configs/gpt2_teacher_shakespeare.py "
                    "--workdir=runs/teacher",
                    "python -m cleangpt_jax.export_hf --workdir=runs/teacher "
                    "--out=runs/teacher_hf",
                    "--config.distill.teacher=runs/teacher_hf --workdir=runs/distill"):
        assert command in doc
