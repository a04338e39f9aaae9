"""Evaluation: perplexity, teacher comparison, hidden states, generations, the CLI.

The end-to-end teacher is a random `transformers.GPT2LMHeadModel` saved with save_pretrained
next to the local BPE tokenizer (`gpt2_tokenizer_dir`): the path a user's `--teacher=gpt2`
takes, without the hub. The student workdir holds the same weights converted to our Vanilla
model, so student against teacher must give ratio 1, MSE 0 and cosine 1 at every layer.
"""

import functools
import json
import os
import random
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from cleangpt_jax import evaluation
from cleangpt_jax.config import ConfigError
from cleangpt_jax.evaluation import metrics, report
from cleangpt_jax.loading import LM
from cleangpt_jax.distill import init_stitching
from cleangpt_jax.models import get_model
from cleangpt_jax.tokenizers import create_tokenizer
from helpers import run_tool, xla_flags

# Tests of what programs compute: XLA optimisations off, one compile cache (conftest).
pytestmark = pytest.mark.usefixtures("fast_compile")

BLOCK = 16
VOCAB = 50


# ------------------------------------------------------------------------------ helpers

def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def masked_nll(logits, ids, mask, shift=1):
    """Mean NLL of logits[t] against ids[t + shift] over real targets, in numpy (shift=0: the
    model's own input, the 'copy' bug; shift=2: labels shifted twice)."""
    lp = log_softmax(logits)
    t = ids.shape[1] - shift
    picked = np.take_along_axis(lp[:, :t], ids[:, shift:, None], axis=-1)[..., 0]
    w = mask[:, shift:].astype(np.float64)
    return float(-(picked * w).sum() / w.sum())


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, ids):
    out = model.apply({"params": params}, ids, output_hidden_states=True)
    return out.logits, out.hidden_states


def make_lm(*, vocab=VOCAB, n_layer=2, n_embd=32, seed=0, tokenizer=None):
    """A random Vanilla model: N(0, 0.02) weights, unit LayerNorm scales.

    The parameters are drawn in numpy on the model's parameter shapes (`jax.eval_shape`), which
    compiles nothing, unlike an eager `model.init`.
    """
    cfg = dict(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=BLOCK, vocab_size=vocab,
               dropout=0.0)
    model = get_model("vanilla", config=cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, BLOCK), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    return LM(model, params, tokenizer, f"random-{seed}")


def copy_lm(**kw):
    """A model that predicts its current input token with near certainty.

    wte ~ N(0, 1) (50x the usual scale) and wpe = 0: the residual stream is wte[x] plus block
    outputs two orders of magnitude smaller, and the tied head scores wte[x] . wte[v], about
    n_embd for v = x against a spread of sqrt(n_embd) for the others. Which target a position is
    scored against therefore changes its loss by tens of nats.
    """
    lm = make_lm(**kw)
    params = dict(lm.params)
    params["wte"] = {"embedding": lm.params["wte"]["embedding"] * 50.0}
    params["wpe"] = {"embedding": jnp.zeros_like(lm.params["wpe"]["embedding"])}
    return LM(lm.model, params, None, lm.source)


def pair_batches(seed=0):
    """Two batches of rows a a b b c c ... (distinct tokens per row); the second batch has a row
    that is padding after 3 tokens. Under a copy model the correct targets (t + 1) are right at
    every other position, targets shifted twice (t + 2) never, the inputs (t + 0) always."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        ids = np.stack([np.repeat(rng.permutation(VOCAB)[:BLOCK // 2], 2) for _ in range(2)])
        out.append({"input_ids": ids.astype(np.int32), "attention_mask": np.ones_like(ids)})
    out[1]["attention_mask"][1, 3:] = 0
    out[1]["input_ids"][1, 3:] = 0
    return out


def stacked(batches):
    ids = np.concatenate([b["input_ids"] for b in batches])
    return ids, np.concatenate([b["attention_mask"] for b in batches])


def run_cli(env, module, *args, devices=1):
    env = dict(env, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, timeout=300)


def one_line_error(returncode, stderr):
    assert returncode != 0
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2_tokenizer_dir):
    """A text corpus, an HF GPT-2 teacher directory and a student workdir with its weights.

    The student is the teacher converted to our Vanilla model and written like any training
    run (`write_model_workdir`), with the corpus as its data.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cleangpt_jax import sharding
    from cleangpt_jax import workdir as workdir_lib
    from cleangpt_jax.loading import import_to_workdir, load_lm

    root = tmp_path_factory.mktemp("eval")
    rnd = random.Random(0)
    words = "the king and queen had three sons who walk in the woods to pick flowers".split()
    text = "\n".join(" ".join(rnd.choice(words) for _ in range(12)) for _ in range(40))
    corpus = root / "corpus.txt"
    corpus.write_text(text)

    tok = create_tokenizer("gpt2", name_or_path=gpt2_tokenizer_dir)
    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=BLOCK, n_embd=32, n_layer=2,
                        n_head=2, bos_token_id=0, eos_token_id=0)
    teacher_dir = root / "hf_teacher"
    GPT2LMHeadModel(hf_cfg).save_pretrained(teacher_dir)
    for name in os.listdir(gpt2_tokenizer_dir):
        shutil.copy(os.path.join(gpt2_tokenizer_dir, name), teacher_dir / name)

    # The student: the teacher imported as a workdir, its data section pointed at the corpus.
    workdir = import_to_workdir(str(teacher_dir), str(root / "student"))
    cfg = workdir_lib.load_config(workdir)
    cfg.data.source, cfg.data.files = "text", str(corpus)
    cfg.data.val_fraction = 0.25
    cfg.data.cache_dir = str(root / "cache")
    workdir_lib.save_config(workdir, cfg)
    # Parameters laid out as evaluate_workdir lays them out, so compiled programs are shared.
    student = load_lm(workdir, mesh=sharding.create_mesh())
    assert student.step == 0 and student.run_config.data.files == str(corpus)
    return {"root": root, "corpus": str(corpus), "teacher_dir": str(teacher_dir),
            "workdir": workdir, "student": student, "tokenizer": student.tokenizer}


# Generation settings shared by the in-process tests, so that they reuse one compiled program.
GEN = dict(max_new_tokens=6, temperature=1.0, top_k=5, top_p=None, seed=3)


# ------------------------------------------------------------------------------ perplexity

def test_perplexity_equals_hand_computed_value():
    # Zero embeddings make every logit exactly 0: each target costs log V, perplexity is V.
    lm = make_lm()
    zero = dict(lm.params, wte={"embedding": jnp.zeros_like(lm.params["wte"]["embedding"])})
    batches = pair_batches()
    result = metrics.perplexity(lm.model, zero, batches)
    # Token-weighted over both batches: 3 full rows of 15 targets + 2 real targets in the last.
    assert result["tokens"] == 3 * (BLOCK - 1) + 2
    np.testing.assert_allclose(result["loss"], np.log(VOCAB), rtol=1e-6)
    np.testing.assert_allclose(result["perplexity"], VOCAB, rtol=1e-5)

    # A model whose per-token losses differ by tens of nats: the mean is over real targets
    # only, each counted once whatever its batch (a mean of batch means is far off). A constant
    # row is all easy targets, so the second batch's mean is far below the first's.
    copy = copy_lm()
    batches[1]["input_ids"][0] = 7
    result = metrics.perplexity(copy.model, copy.params, batches)
    ids, mask = stacked(batches)
    logits = np.asarray(forward(copy.model, copy.params, jnp.asarray(ids))[0])
    want = masked_nll(logits, ids, mask)
    np.testing.assert_allclose(result["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], np.exp(want), rtol=1e-4)
    per_batch = np.mean([masked_nll(logits[2 * i:2 * i + 2], *stacked(batches[i:i + 1]))
                         for i in range(2)])
    unmasked = masked_nll(logits, ids, np.ones_like(mask))
    assert abs(per_batch - want) > 1.0 and abs(unmasked - want) > 1.0


def test_teacher_against_itself_gives_ratio_one_mse_zero_cosine_one():
    lm = make_lm(seed=7)
    teacher = LM(lm.model, lm.params, None, "same")
    result = metrics.compare(lm, teacher, pair_batches(), layer_map=[1, 2])
    assert result["perplexity"]["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert result["loss"]["student"] == result["loss"]["teacher"]
    layers = result["layers"]
    assert layers["student_layer"] == [0, 1, 2] and layers["teacher_layer"] == [0, 1, 2]
    assert not layers["stitched"]
    np.testing.assert_allclose(layers["mse"], 0.0, atol=1e-12)
    np.testing.assert_allclose(layers["cosine"], 1.0, atol=1e-6)


def test_student_and_teacher_are_scored_on_identical_targets():
    student = copy_lm(seed=0)
    teacher = copy_lm(n_layer=4, n_embd=48, seed=1)
    batches = pair_batches(seed=3)
    # (With the stitching test's layers, so that both tests share one compiled step.)
    result = metrics.compare(student, teacher, batches, layer_map=[2, 4],
                                stitching=init_stitching(jax.random.key(2), 2, 32, 48, True))
    ids, mask = stacked(batches)
    for name, lm in (("student", student), ("teacher", teacher)):
        logits = np.asarray(forward(lm.model, lm.params, jnp.asarray(ids))[0])
        loss = result["loss"][name]
        # logits[t] scored against token t + 1 of the same batch, nothing else ...
        np.testing.assert_allclose(loss, masked_nll(logits, ids, mask), rtol=1e-5)
        # ... and a shift too many (the original's teacher) or too few is off by nats.
        assert masked_nll(logits, ids, mask, shift=2) - loss > 5.0
        assert loss - masked_nll(logits, ids, mask, shift=0) > 5.0
    alone = metrics.perplexity(student.model, student.params, batches)
    assert result["loss"]["student"] == pytest.approx(alone["loss"], rel=1e-6)
    assert result["tokens"] == alone["tokens"]


# ------------------------------------------------------------------------------ hidden states

def test_hidden_states_through_stitching_match_numpy():
    student = make_lm(n_layer=2, n_embd=32, seed=0)
    teacher = make_lm(n_layer=4, n_embd=48, seed=1)
    stitching = init_stitching(jax.random.key(2), 2, 32, 48, True)
    stitching = jax.tree.map(lambda x: x + 0.05, stitching)  # non-zero biases
    batches = pair_batches(seed=4)
    result = metrics.compare(student, teacher, batches, layer_map=[2, 4], stitching=stitching)
    layers = result["layers"]
    assert layers["teacher_layer"] == [0, 2, 4] and layers["stitched"]

    ids, m = stacked(batches)
    m = m.astype(np.float64)

    def states(lm):
        return [np.asarray(h, np.float64) for h in forward(lm.model, lm.params,
                                                           jnp.asarray(ids))[1]]

    hs, ht = states(student), states(teacher)
    for i, j in enumerate([0, 2, 4]):
        p = stitching[f"stitch_{max(i, 1)}"]  # the embeddings go through stitching layer 1
        s = hs[i] @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
        t = ht[j]
        mse = (((s - t) ** 2).mean(-1) * m).sum() / m.sum()
        cos = ((s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
               * m).sum() / m.sum()
        np.testing.assert_allclose(layers["mse"][i], mse, rtol=1e-4)
        np.testing.assert_allclose(layers["cosine"][i], cos, rtol=1e-4, atol=1e-6)


def test_layer_plan_uses_the_runs_map_and_stitching_only_across_widths():
    student = make_lm(n_layer=2, n_embd=32)
    wide = make_lm(n_layer=4, n_embd=48, seed=1)
    same = make_lm(n_layer=4, n_embd=32, seed=1)
    stitching = init_stitching(jax.random.key(2), 2, 32, 48, True)
    distilled = ml_collections.ConfigDict({"model": {"n_layer": 2}, "distill": {
        "layer_map": [1, 3], "teacher_n_layer": 4}})
    assert metrics.layer_plan(student, wide, distilled, stitching)[:2] == ([1, 3], stitching)
    # A run that was not distilled: the uniform map; equal widths compare raw states.
    assert metrics.layer_plan(student, same, None, stitching) == ([2, 4], None, None)
    mapping, stitch, note = metrics.layer_plan(student, wide, None, None)
    assert mapping is None and stitch is None and "widths differ" in note
    # Stitching layers of another teacher width are not applied.
    narrow = init_stitching(jax.random.key(2), 2, 32, 40, True)
    mapping, stitch, note = metrics.layer_plan(student, wide, distilled, narrow)
    assert mapping is None and "stitch_1" in note


# ------------------------------------------------------------------------------ generation

def test_generation_comparison_uses_the_same_prompts_settings_and_seed(setup):
    from cleangpt_jax.generation import run_generation

    student, tok = setup["student"], setup["tokenizer"]
    # Another model of the student's architecture (so the compiled generation is shared).
    params = dict(student.params, wte={"embedding": student.params["wte"]["embedding"] * 4.0})
    other = LM(student.model, params, tok, "other")
    twin = LM(student.model, student.params, tok, "twin")
    prompts = ["the king", "who walk in"]
    gen = metrics.compare_generations({"student": student, "teacher": other}, prompts,
                                      **GEN)
    settings = gen["settings"]
    assert settings["greedy"] == {"temperature": 0.0, "top_k": None, "top_p": None}
    assert settings["sampled"] == {"temperature": 1.0, "top_k": 5, "top_p": None}
    assert settings["seed"] == 3 and settings["max_new_tokens"] == 6
    assert [s["prompt"] for s in gen["samples"]] == prompts
    # Each model's column is exactly what run_generation gives it with the shared settings.
    for name, lm in (("student", student), ("teacher", other)):
        for mode, kw in (("greedy", settings["greedy"]), ("sampled", settings["sampled"])):
            ids, _ = run_generation(lm.model, lm.params, tok, prompts, max_new_tokens=6, seed=3,
                                    **kw)
            for sample, row, p in zip(gen["samples"], ids, prompts):
                assert sample[mode][name] == tok.decode(row[len(tok.encode(p)):])
    # A teacher with the student's weights continues identically, sampled included: the same
    # seed and settings (the original sampled from the student but decoded the teacher greedily).
    same = metrics.compare_generations({"student": student, "teacher": twin}, prompts, **GEN)
    for sample in same["samples"]:
        assert sample["greedy"]["student"] == sample["greedy"]["teacher"]
        assert sample["sampled"]["student"] == sample["sampled"]["teacher"]
    assert any(s["greedy"]["student"] != s["sampled"]["student"] for s in same["samples"])


# ------------------------------------------------------------------------------ whole runs

def test_student_alone_reports_perplexity_and_samples(setup, tmp_path):
    out = tmp_path / "alone"
    e = evaluation.get_eval_config()
    e.update(dict(batch_size=4, num_prompts=2, prompt_tokens=4, max_new_tokens=6, top_k=5,
                  temperature=1.0, seed=3))
    summary = evaluation.evaluate_workdir(setup["workdir"], eval_config=e, output_dir=str(out))
    assert tuple(summary) == report.SUMMARY_KEYS
    assert summary["teacher"] is None and summary["layers"] is None
    assert summary["perplexity"]["teacher"] is None and summary["perplexity"]["ratio"] is None
    assert summary["perplexity"]["student"] == pytest.approx(np.exp(summary["loss"]["student"]))
    assert summary["data"]["source"] == f"text:{setup['corpus']}"
    assert summary["student"]["num_params"] == sum(
        x.size for x in jax.tree.leaves(setup["student"].params))
    samples = summary["generation"]["samples"]
    assert len(samples) == 2 and all(set(s["sampled"]) == {"student"} for s in samples)
    assert sorted(os.listdir(out)) == ["perplexity.png", "report.md", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == summary
    report_md = (out / "report.md").read_text()
    assert "## Generations" in report_md and "## Hidden states" not in report_md


def test_cli_writes_report_json_and_plots(setup, fast_compile):
    """The real CLI on a 2-device mesh, student against its own weights as an HF teacher, with
    a data override."""
    other = setup["root"] / "other.txt"
    other.write_text(open(setup["corpus"]).read()[::-1])
    out = setup["root"] / "eval_out"
    proc = run_cli(fast_compile, "cleangpt_jax.evaluate", f"--workdir={setup['workdir']}",
                   f"--teacher={setup['teacher_dir']}", f"--output_dir={out}",
                   f"--config.data.files={other}", "--config.eval.max_new_tokens=6",
                   "--config.eval.num_prompts=2", "--config.eval.batch_size=4", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio 1.0000" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert tuple(summary) == report.SUMMARY_KEYS
    assert summary["data"]["source"] == f"text:{other}" and summary["data"]["split"] == "val"
    assert summary["data"]["tokens"] > 0 and summary["data"]["block_size"] == BLOCK
    assert summary["teacher"]["source"] == setup["teacher_dir"]
    assert summary["teacher"]["num_params"] == summary["student"]["num_params"]
    assert summary["perplexity"]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert summary["loss"]["student"] == pytest.approx(summary["loss"]["teacher"], abs=1e-6)
    layers = summary["layers"]
    assert layers["student_layer"] == [0, 1, 2] and layers["teacher_layer"] == [0, 1, 2]
    np.testing.assert_allclose(layers["mse"], 0.0, atol=1e-10)
    np.testing.assert_allclose(layers["cosine"], 1.0, atol=1e-5)
    samples = summary["generation"]["samples"]
    assert len(samples) == 2
    for s in samples:
        assert s["greedy"]["student"] == s["greedy"]["teacher"]
        assert s["sampled"]["student"] == s["sampled"]["teacher"]
    assert summary["files"] == {"summary": "summary.json", "report": "report.md",
                                "perplexity_plot": "perplexity.png", "layers_plot": "layers.png"}
    for name in ("perplexity.png", "layers.png"):
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100
    report_md = (out / "report.md").read_text()
    for part in ("Perplexity ratio student / teacher: **1.0000**", "## Hidden states",
                 "## Generations", "(layers.png)", "(perplexity.png)", "| greedy |",
                 "| sampled |"):
        assert part in report_md


# ------------------------------------------------------------------------------ bad input

def test_cli_without_checkpoint_prints_one_line(tmp_path, capsys, monkeypatch):
    """A run killed before its first checkpoint: config.json and tokenizer/, no checkpoints/."""
    from cleangpt_jax.config import get_config
    from cleangpt_jax.workdir import save_config

    run = tmp_path / "no_ckpt"
    save_config(str(run), get_config())
    create_tokenizer("character", text="abc").save_pretrained(run / "tokenizer")
    before = sorted(p.name for p in run.iterdir())
    from cleangpt_jax import evaluate

    code, _, err = run_tool(evaluate.run, ["evaluate", f"--workdir={run}"], capsys, monkeypatch)
    assert "no checkpoint" in one_line_error(code, err)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written or removed


def test_teacher_with_another_vocabulary_is_refused(setup, tmp_path):
    from cleangpt_jax.hf import export_gpt2

    chars = create_tokenizer("character", text="the king and queen")
    other = make_lm(vocab=chars.vocab_size, seed=5)
    teacher_dir = export_gpt2(other.model.config, other.params, str(tmp_path / "chars"),
                              tokenizer=chars)
    out = tmp_path / "unused"
    with pytest.raises(ConfigError,
                       match=rf"vocab_size {chars.vocab_size} but the student has 300") as e:
        evaluation.evaluate_workdir(setup["workdir"], teacher=teacher_dir, output_dir=str(out))
    assert "\n" not in str(e.value) and not out.exists()

    # The same vocabulary size but another tokenizer is refused too.
    a, b = (create_tokenizer("character", text=t) for t in ("the king", "the kinG"))
    model = get_model("vanilla", config=dict(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK,
                                             vocab_size=a.vocab_size))
    with pytest.raises(ConfigError, match="tokenizes text differently"):
        metrics.check_teacher(LM(model, None, a, "a"), LM(model, None, b, "b"), "the king")


def test_empty_dataset_is_a_clear_error(setup, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="empty") as e:
        evaluation.evaluate_workdir(setup["workdir"], teacher="none", data={"files": str(empty)},
                                    output_dir=str(tmp_path / "out"))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
