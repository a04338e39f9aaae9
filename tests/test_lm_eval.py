"""The lm-evaluation-harness adapter (cleangpt_jax.lm_eval) against the harness's own `hf`
backend on an exported tiny Vanilla model, and through `lm_eval.simple_evaluate` on YAML tasks
over a local jsonl file (no hub, no network)."""

from __future__ import annotations

import json
import math
import re
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

import lm_eval  # noqa: E402 -- the `lm_eval` extra (in `test`)

from lm_eval.api.instance import Instance  # noqa: E402

from cleangpt_jax import config as config_lib  # noqa: E402
from cleangpt_jax import lm_eval as adapter  # noqa: E402
from cleangpt_jax.config import ConfigError, model_config  # noqa: E402
from cleangpt_jax.hf import export_gpt2  # noqa: E402
from cleangpt_jax.models import get_model  # noqa: E402
from cleangpt_jax.tokenizers import load_tokenizer  # noqa: E402
from cleangpt_jax.workdir import write_model_workdir  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compile")

BLOCK = 32  # max_length: rolling windows and truncation happen at this length
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of "
        "such a man may be on his first entering a neighbourhood")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer_dir):
    """A random 2-block Vanilla GPT-2 (300-token BPE, block 32) as an HF directory and as a
    cleangpt_jax workdir holding the same parameters."""
    cfg = config_lib.get_config()
    cfg.model.update(model_type="vanilla", n_layer=2, n_head=4, n_embd=32, block_size=BLOCK,
                     vocab_size=300, bias=True, dropout=0.0)
    cfg.tokenizer.type = "gpt2"
    mcfg = model_config(cfg.model)
    model = get_model(config=mcfg)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, BLOCK), np.int32))["params"]
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                          params)  # random biases and LayerNorms too
    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    root = tmp_path_factory.mktemp("lm_eval")
    hf_dir = export_gpt2(mcfg, params, str(root / "hf"), tokenizer)
    workdir = write_model_workdir(str(root / "run"), cfg, tokenizer, params, kind="train")
    return ml_collections.ConfigDict({"hf": hf_dir, "workdir": workdir, "root": str(root)})


@pytest.fixture(scope="module")
def ours(tiny):
    """The adapter on the workdir, 4 rows per compiled call (as every call here)."""
    return adapter.CleanGPTLM(workdir=tiny.workdir, batch_size=4)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("", "It is"), ("It is a", " truth"), ("a single man", " in possession of"),
         (TEXT, " wife."),  # longer than max_length: the context is cut from the left
         ("fortune, must ", "be in want"),  # a trailing space moves into the continuation
         ("the", " the the the")]
STRINGS = [TEXT, "a wife.", TEXT[:70]]  # 3, 1 and 1-2 rolling windows


def test_loglikelihoods_match_the_harness_hf_backend(tiny, ours, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    theirs = HFLM(pretrained=tiny.hf, device="cpu", batch_size=4, dtype="float32")
    from_hf = adapter.CleanGPTLM(hf=tiny.hf, batch_size=4)
    assert ours.max_length == theirs.max_length == BLOCK
    assert len(ours.tok_encode(TEXT)) > 3 * BLOCK  # several windows, truncated contexts
    want = theirs.loglikelihood(requests("loglikelihood", PAIRS))
    got = from_hf.loglikelihood(requests("loglikelihood", PAIRS))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=2e-5, atol=2e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    want = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", [(s,) for s in STRINGS]))
    got = from_hf.loglikelihood_rolling(requests("loglikelihood_rolling",
                                                 [(s,) for s in STRINGS]))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # The workdir holding the same parameters scores the same.
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(s,) for s in STRINGS])),
        got, rtol=1e-6)


def test_generate_until_stops_at_the_stop_sequences_and_max_gen_toks(ours):
    free = ours.generate_until(requests("generate_until", [
        ("It is a", {"until": ["<never>"], "max_gen_toks": 12}),
        ("a single man", {"until": ["<never>"], "max_gen_toks": 12})]))
    from cleangpt_jax.generation import generate

    ids = generate(ours.lm.model, ours.lm.params, [ours.tok_encode("It is a")] * 4, 12,
                   temperature=0.0, eos_token_id=ours.eot_token_id)  # the adapter's shape
    row = [t for t in np.asarray(ids.tokens[0, :int(ids.lengths[0])]).tolist()
           if t != ours.eot_token_id]
    assert free[0] == ours.tok_decode(row) and len(row) <= 12
    assert len(free[1]) >= 4
    stop = free[1][len(free[1]) // 2:][:2]  # a stop string the free run produced mid-way
    cut = ours.generate_until(requests("generate_until", [
        ("a single man", {"until": [stop], "max_gen_toks": 12})]))
    assert cut == [free[1].split(stop)[0]] and stop not in cut[0]


def test_bad_model_args_get_one_line_errors(tiny):
    for kwargs, words in (({}, "exactly one of workdir"),
                          ({"hf": tiny.hf, "workdir": tiny.workdir}, "exactly one of workdir"),
                          ({"hf": tiny.hf, "max_length": BLOCK + 1}, "max_length=33")):
        with pytest.raises(ConfigError, match=words) as e:
            adapter.CleanGPTLM(**kwargs)
        assert "\n" not in str(e.value)


def test_simple_evaluate_runs_yaml_tasks_over_a_local_jsonl(tiny, ours, tmp_path):
    """A multiple-choice task (loglikelihood), a perplexity task (loglikelihood_rolling) and a
    generation task (generate_until) over one local jsonl file, through the registry name."""
    from lm_eval.tasks import TaskManager

    docs = [{"question": "It is a", "choices": [" truth", " wife", " man"], "answer": i % 3,
             "text": TEXT[i * 20:i * 20 + 60], "target": "x"} for i in range(4)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"""\
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
    """
    tasks = {
        "tiny_mc": """\
            output_type: multiple_choice
            doc_to_text: "{{question}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: answer
            metric_list:
              - metric: acc
        """,
        "tiny_ppl": """\
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: bits_per_byte
        """,
        "tiny_gen": """\
            output_type: generate_until
            doc_to_text: "{{question}}"
            doc_to_target: target
            generation_kwargs:
              until: [","]
              max_gen_toks: 12
            metric_list:
              - metric: exact_match
        """}
    for name, body in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\n" + textwrap.dedent(common) + textwrap.dedent(body))
    out = lm_eval.simple_evaluate(
        model=adapter.MODEL_NAME, model_args=f"workdir={tiny.workdir},batch_size=4",
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True)
    results = out["results"]
    acc = results["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    scores = ours.loglikelihood(requests("loglikelihood", [(d["question"], c) for d in docs
                                                           for c in d["choices"]]))
    picked = np.argmax(np.reshape([s[0] for s in scores], (len(docs), 3)), axis=1)
    assert acc == pytest.approx(np.mean(picked == [d["answer"] for d in docs]))
    total = sum(ours.loglikelihood_rolling(requests("loglikelihood_rolling",
                                                  [(d["text"],) for d in docs])))
    words = sum(len(re.split(r"\s+", d["text"])) for d in docs)
    assert results["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        math.exp(-total / words), rel=1e-5)
    generated = [s["resps"][0][0] for s in out["samples"]["tiny_gen"]]
    assert len(generated) == 4 and all("," not in g for g in generated)
    assert results["tiny_gen"]["exact_match,none"] == 0.0
