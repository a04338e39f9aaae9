"""KV-cache generation: cached logits equal the uncached forward at every step for every
architecture, greedy equals an uncached argmax loop, mixed prompt lengths, EOS, the sliding
window, ALiBi lengths, bucketing (no recompilation), seeded sampling inside the loop, the Python
API, and the generate CLI on a workdir written by a tiny training run."""

import contextlib
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleangpt_jax import generation, kernels
from cleangpt_jax.config import ConfigError, model_config
from cleangpt_jax.generation import generate, run_generation
from cleangpt_jax.models import get_model

# Tests of what programs compute: XLA optimisations off, one compile cache (conftest).
pytestmark = pytest.mark.usefixtures("fast_compile")

V, BLOCK, MAX_POS = 48, 16, 40
BASE = dict(n_layer=2, n_head=4, n_embd=32, block_size=BLOCK, vocab_size=V, dropout=0.0)
ALIBI = dict(position_encoding="alibi", max_position_embeddings=MAX_POS)
VARIANTS = {
    "vanilla": dict(model_type="vanilla"),
    "sasp_proj": dict(model_type="sasp", use_proj=True),          # V = LN(x): use_v off
    "sasp_v_llama": dict(model_type="sasp", use_v=True, llama_mlp=True, bias=True),
    "factored": dict(model_type="factored"),
    "factored_alibi": dict(model_type="factored", **ALIBI),
    "factored_alibi_v_proj": dict(model_type="factored", use_v=True, use_proj=True, **ALIBI),
}
PROMPTS = [[5, 17, 3], [9, 1, 44, 20, 7, 30, 12, 2, 41, 8, 19], [33]]  # lengths 3, 11, 1
TOL = dict(rtol=1e-5, atol=2e-5)
ROWS = 32  # the uncached reference always runs (ROWS, width): one compile per model


def build(**overrides):
    """A tiny model whose parameters are perturbed away from their init (SASP's zero-init keys
    would otherwise make every attention uniform and hide cache bugs)."""
    cfg = model_config({**BASE, **overrides})
    model = get_model(config=cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, BLOCK), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
    return model, params


def padded(prompts, width=None, rows=None):
    """Right-padded (rows or B, width) ids and the lengths (generate's prompt_lengths form)."""
    lengths = np.asarray([len(p) for p in prompts])
    ids = np.zeros((rows or len(prompts), width or lengths.max()), np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    return ids, lengths


class Uncached:
    """The reference: full forwards without a cache over right-padded rows of `width` tokens
    (causality keeps the padding out of the positions read)."""

    def __init__(self, model, params, width):
        self.width = width
        self.fn = jax.jit(lambda ids: model.apply({"params": params}, ids).logits)

    def last_logits(self, rows):
        """(len(rows), V): the logits at each row's last token, each row on its own."""
        out = []
        for i in range(0, len(rows), ROWS):
            chunk = rows[i:i + ROWS]
            logits = np.asarray(self.fn(jnp.asarray(padded(chunk, self.width, ROWS)[0])))
            out += [logits[b, len(r) - 1] for b, r in enumerate(chunk)]
        return np.stack(out)

    def prefix_logits(self, prompts, tokens, crop=None):
        """(B, N, V): for each row and step i, the logits at the last token of
        prompt + tokens[:i] (cropped to its last `crop` tokens): what an uncached decoding
        loop computes for the token it draws at step i."""
        rows = [(list(p) + list(tokens[b, :i]))[-crop if crop else 0:]
                for b, p in enumerate(prompts) for i in range(tokens.shape[1])]
        return self.last_logits(rows).reshape(len(prompts), tokens.shape[1], -1)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    model, params = build(**VARIANTS[request.param])
    alibi = model.config.position_encoding == "alibi"
    # ALiBi rows run past block_size up to max_position_embeddings (11 + 29 = 40); learned rows
    # stay inside block_size (the sliding window has its own test).
    n_new = MAX_POS - 11 if alibi else BLOCK - 11
    ids, lengths = padded(PROMPTS)
    out = generate(model, params, ids, n_new, temperature=0, prompt_lengths=lengths,
                   return_logits=True)
    # Batch 1 decodes with the decode-layout weight copies on CPU (kernels.decode_layout), here
    # even for these few tokens.
    with mock.patch.object(kernels.cpu, "DECODE_LAYOUT_MIN_STEPS", 0):
        alone = generate(model, params, np.asarray([PROMPTS[1]]), n_new, temperature=0,
                         return_logits=True)
    return dict(name=request.param, model=model, params=params, n_new=n_new, out=out,
                alone=alone, reference=Uncached(model, params, MAX_POS if alibi else BLOCK))


def test_cached_logits_equal_the_uncached_forward_at_every_step(variant):
    """Each row of a mixed-length batch: the logits token i was drawn from equal the uncached
    forward of that row alone (prompt + the i tokens before it), at its last position."""
    out = variant["out"]
    tokens, logits = np.asarray(out.tokens), np.asarray(out.logits)
    assert tokens.shape == (3, variant["n_new"]) and logits.shape == (3, variant["n_new"], V)
    np.testing.assert_allclose(logits, variant["reference"].prefix_logits(PROMPTS, tokens), **TOL)


def test_batch_one_decoding_equals_the_uncached_forward(variant):
    """A single row takes the batch-1 path (on CPU, Dense layers read transposed weight copies):
    its logits at every step still equal the uncached forward, and its tokens equal the same
    prompt's row in the mixed batch."""
    alone = variant["alone"]
    tokens, logits = np.asarray(alone.tokens), np.asarray(alone.logits)
    np.testing.assert_allclose(logits, variant["reference"].prefix_logits(PROMPTS[1:2], tokens),
                               **TOL)
    np.testing.assert_array_equal(tokens[0], np.asarray(variant["out"].tokens)[1])


def test_greedy_equals_the_uncached_argmax_loop(variant):
    """Token i is the argmax of the uncached logits of its prefix, for every i: by induction
    that is the output of a loop that reruns the whole sequence for each token."""
    tokens = np.asarray(variant["out"].tokens)
    expected = variant["reference"].prefix_logits(PROMPTS, tokens).argmax(-1)
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(variant["out"].lengths, variant["n_new"])


def test_alibi_errors_beyond_max_position_embeddings():
    model, params = build(**VARIANTS["factored_alibi"])
    ids, lengths = padded(PROMPTS)
    with pytest.raises(ConfigError, match=r"a prompt of 11 tokens plus max_new_tokens=30 "
                                              r"needs 41 positions, more than model\."
                                              r"max_position_embeddings=40") as e:
        generate(model, params, ids, MAX_POS - 10, temperature=0, prompt_lengths=lengths)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------- one model, many cases
@pytest.fixture(scope="module")
def vanilla():
    """The Vanilla model, its uncached reference and its greedy PROMPTS output (the programs
    the variant fixture compiled, when it ran first)."""
    model, params = build(**VARIANTS["vanilla"])
    ids, lengths = padded(PROMPTS)
    greedy = generate(model, params, ids, BLOCK - 11, temperature=0, prompt_lengths=lengths,
                      return_logits=True)
    return dict(model=model, params=params, greedy=np.asarray(greedy.tokens),
                reference=Uncached(model, params, BLOCK))


@contextlib.contextmanager
def compiled_programs():
    """Yields the list of programs XLA compiles for this process inside the block (a persistent
    cache hit counts too: it is a program the process did not have), from jax.monitoring's
    backend compile event."""
    names = []

    def listen(event, duration, *, fun_name="?", **_):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_rows_get_what_they_get_alone_and_prompt_buckets_share_a_program(vanilla):
    """Rows of the mixed-length batch equal their prompts generated on their own (every row is
    also checked against its own uncached forward above); prompts of 1 and 3 tokens with 5 or
    8 new tokens share one compiled program (buckets of 8): once the first has run, the others
    compile nothing, nor do the same prompts given as attention_mask or as unpadded rows."""
    model, params, n = vanilla["model"], vanilla["params"], BLOCK - 11
    alone = lambda p, k=n: np.asarray(generate(model, params, np.asarray([p]), k,  # noqa: E731
                                               temperature=0).tokens)[0]
    np.testing.assert_array_equal(alone(PROMPTS[2]), vanilla["greedy"][2])
    with compiled_programs() as compiled:
        np.testing.assert_array_equal(alone(PROMPTS[0]), vanilla["greedy"][0])
        assert alone(PROMPTS[0], 8)[:n].tolist() == vanilla["greedy"][0].tolist()
    assert compiled == [], "a prompt length in the same bucket recompiled"
    assert [generation.bucket(n) for n in (1, 3, 8, 9, 11, 16, 17)] == [8, 8, 8, 16, 16, 16, 32]
    # attention_mask (left padding here) describes the same prompts as prompt_lengths.
    ids = np.zeros((3, BLOCK), np.int32)
    for b, p in enumerate(PROMPTS):
        ids[b, BLOCK - len(p):] = p
    with compiled_programs() as compiled:
        again = generate(model, params, ids, n, temperature=0, attention_mask=ids > 0,
                         return_logits=True)
        # Unpadded rows of any lengths (run_generation's form) describe them too.
        rows = generate(model, params, PROMPTS, n, temperature=0, return_logits=True)
    np.testing.assert_array_equal(again.tokens, vanilla["greedy"])
    np.testing.assert_array_equal(rows.tokens, vanilla["greedy"])
    assert compiled == []  # same shapes as the PROMPTS batch: its program


def test_eos_stops_each_row_and_pads_after_it(vanilla):
    model, params, free = vanilla["model"], vanilla["params"], vanilla["greedy"]
    n = free.shape[1]
    ids, lengths = padded(PROMPTS)
    # EOS = the first token row 0 draws at step >= 1 that it has not drawn before.
    step = next(i for i in range(1, n) if free[0, i] not in free[0, :i])
    eos, pad = int(free[0, step]), int(free[0, step] + 1) % V
    out = generate(model, params, ids, n, temperature=0, prompt_lengths=lengths,
                   eos_token_id=eos, pad_token_id=pad, return_logits=True)
    tokens = np.asarray(out.tokens)
    for b in range(3):
        hits = np.flatnonzero(free[b] == eos)
        stop = hits[0] + 1 if hits.size else n
        assert out.lengths[b] == stop
        np.testing.assert_array_equal(tokens[b, :stop], free[b, :stop])
        assert (tokens[b, stop:] == pad).all()
    assert out.lengths[0] == step + 1 < n


def test_sliding_window_past_block_size_equals_the_cropped_forward(vanilla):
    """Learned positions past block_size: each token comes from the forward of the last
    block_size tokens, rows of different lengths switching at different steps."""
    model, params = vanilla["model"], vanilla["params"]
    long = list(np.arange(30) % V)
    prompts = [[5, 17, 3], [9, 1, 44, 20, 7, 30, 12, 2, 41, 8, 19, 4], long, long[-BLOCK:]]
    ids, lengths = padded(prompts)
    out = generate(model, params, ids, 14, temperature=0, prompt_lengths=lengths,
                   return_logits=True)
    tokens = np.asarray(out.tokens)
    cropped = vanilla["reference"].prefix_logits(prompts, tokens, crop=BLOCK)
    np.testing.assert_allclose(np.asarray(out.logits), cropped, **TOL)
    np.testing.assert_array_equal(tokens, cropped.argmax(-1))
    # A prompt longer than block_size is cropped to its last block_size tokens.
    np.testing.assert_array_equal(tokens[2], tokens[3])


def test_sampling_inside_the_loop_respects_top_k_top_p_and_the_seed(vanilla):
    model, params = vanilla["model"], vanilla["params"]
    ids, lengths = padded(PROMPTS)
    n, t, k, p = BLOCK - 11, 1.5, 5, 0.8
    sample = lambda seed, **kw: generate(model, params, ids, n, prompt_lengths=lengths,  # noqa
                                         return_logits=True, rng=seed, **kw)
    seen = []
    for seed in range(8):
        out = sample(seed, temperature=t, top_k=k, top_p=p)
        tokens, logits = np.asarray(out.tokens), np.asarray(out.logits, np.float64) / t
        for b in range(3):
            for i in range(n):
                z = logits[b, i]
                top = np.argsort(-z)[:k]
                probs = np.exp(z[top] - z[top].max())
                probs /= probs.sum()
                before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
                assert tokens[b, i] in top[before < p + 1e-6], (seed, b, i)
        seen.append(tokens)
    np.testing.assert_array_equal(sample(0, temperature=t, top_k=k, top_p=p).tokens, seen[0])
    assert not np.array_equal(seen[1], seen[0])
    # temperature 0 is greedy whatever the other settings and the seed.
    np.testing.assert_array_equal(sample(3, temperature=0, top_k=k, top_p=p).tokens,
                                  vanilla["greedy"])


def test_generate_rejects_bad_input_with_one_line_errors(vanilla):
    model, params = vanilla["model"], vanilla["params"]
    ids = np.asarray([[1, 2, 3]])
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(temperature=-1.0), "temperature must be a number >= 0"),
        (dict(input_ids=np.asarray([[1, V]])), r"prompt token ids must lie in \[0, vocab_size"),
        (dict(input_ids=np.zeros((1, 0), np.int32)), "prompt row 0 is empty"),
        (dict(prompt_lengths=[5]), "prompt_lengths must hold one length"),
        (dict(input_ids=[[1, 2], [3]], prompt_lengths=[1, 1]), "pass unpadded rows without"),
        (dict(eos_token_id=V), r"eos_token_id=48 is outside \[0, vocab_size=48\)"),
    ]
    for overrides, message in cases:
        kw = dict(input_ids=ids, max_new_tokens=4, temperature=1.0)
        kw.update(overrides)
        with pytest.raises(ValueError, match=message) as e:
            generate(model, params, **kw)
        assert "\n" not in str(e.value), overrides


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=-0.2), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_settings_get_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        generation.check_generation_args(4, **kwargs)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- API and CLI
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny character-level run (3 steps) whose end-of-run sample is kept for comparison."""
    from cleangpt_jax.config import get_config
    from cleangpt_jax.trainer import train_and_evaluate

    root = tmp_path_factory.mktemp("generate_run")
    cfg = get_config()
    # bias=True: a GPT-2-compatible model, so that --hf of its export is the same model.
    cfg.model.update(dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True))
    cfg.data.max_samples = 2
    cfg.data.cache_dir = str(root / "cache")
    cfg.train.update(dict(num_steps=3, batch_size=4, warmup_steps=1, eval_every=0, log_every=1,
                          checkpoint_every=3, sample_prompts=("ROMEO:",),
                          sample_max_new_tokens=20, sample_temperature=0.8, sample_top_k=10))
    summary = train_and_evaluate(cfg, str(root / "run"))
    return dict(workdir=str(root / "run"), samples=summary.samples, seed=cfg.train.seed)


@pytest.fixture(scope="module")
def loaded(trained_run):
    from cleangpt_jax.workdir import load_run

    return load_run(trained_run["workdir"])


@pytest.fixture(scope="module")
def greedy_texts(loaded):
    """run_generation on a batch of prompts, one of them empty: ids and texts, greedy, 12 new."""
    return run_generation(loaded.model, loaded.params, loaded.tokenizer,
                          ["ROMEO:", "", "JULIET:"], max_new_tokens=12, temperature=0)


def test_run_generation_api_and_training_samples_share_one_path(trained_run, loaded,
                                                                greedy_texts):
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    ids, text = run_generation(model, params, tok, "ROMEO:", max_new_tokens=20, temperature=0.8,
                               top_k=10, seed=trained_run["seed"])
    assert trained_run["samples"] == [text]          # what training printed at its end
    assert ids[:6] == tok.encode("ROMEO:") and len(ids) == 26
    assert text == tok.decode(ids) and text.startswith("ROMEO:")
    many_ids, texts = greedy_texts
    assert [len(i) for i in many_ids] == [18, 13, 19]
    assert many_ids[1][0] == tok.bos_token_id        # the empty prompt starts from BOS
    assert texts[0].startswith("ROMEO:") and texts[2].startswith("JULIET:")
    assert texts == [tok.decode(i) for i in many_ids]
    with pytest.raises(ConfigError, match="prompt_text must be a string"):
        run_generation(model, params, tok, [], max_new_tokens=5)


def run_cli(env, *args, stdin=None):
    """The generate CLI in a subprocess with `env` (the fast_compile fixture's environment: the
    same compile setting as this process, so its greedy text can be compared with ours)."""
    return subprocess.run([sys.executable, "-m", "cleangpt_jax.generate", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))


def test_cli_generates_then_goes_interactive(trained_run, greedy_texts, fast_compile):
    """One real CLI run: --prompt first, then interactive commands from stdin."""
    script = "\n".join(["/temperature 0", "/max_new_tokens 12", "/top_p 0.5", "/top_p off",
                        "settings", "JULIET:", "/top_p 1.5", "/top_k -2", "/bogus 3", "quit",
                        "never generated"])
    proc = run_cli(fast_compile, f"--workdir={trained_run['workdir']}", "--prompt=ROMEO:",
                   "--max_new_tokens=12", "--temperature=0", "--interactive",
                   stdin=script + "\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith(greedy_texts[1][0] + "\n")                # the --prompt
    assert "\nmax_new_tokens=12 temperature=0.0 top_k=50 top_p=off seed=1\n" in out
    assert greedy_texts[1][2] + "\n" in out.split("seed=1\n", 1)[1]  # the interactive prompt
    assert "never generated" not in proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 3, proc.stderr
    assert "top_p must be in (0, 1]" in errors[0] and "top_k must be an integer >= 0" in errors[1]
    assert "unknown setting 'bogus'" in errors[2]


def cli_main(args, capsys):
    """Run the CLI's own flag parsing and main in-process; returns (exit code, stdout, stderr)."""
    from absl import flags

    from cleangpt_jax import generate as cli

    values = flags.FlagValues()
    cli.define_flags(values)
    values(["generate", *args])
    code = 0
    try:
        cli.main(["generate"], flag_values=values)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_hf_loads_an_exported_gpt2_directory(trained_run, loaded, greedy_texts, tmp_path,
                                                 capsys):
    """--hf: the run exported as a GPT-2 directory (weights + tokenizer) is the same model and
    generates the same texts as the workdir it came from (several --prompt: one batch)."""
    from cleangpt_jax import generate as cli
    from cleangpt_jax import hf

    hf.export_run(trained_run["workdir"], tmp_path / "hf")
    assert cli.load(hf=str(tmp_path / "hf")).model == loaded.model
    code, out, err = cli_main([f"--hf={tmp_path / 'hf'}", "--prompt=ROMEO:", "--prompt=",
                               "--prompt=JULIET:", "--max_new_tokens=12", "--temperature=0"],
                              capsys)
    assert code == 0, err
    chunks = out.split("----- prompt ")[1:]
    assert [c.split("\n", 1)[1][:-2] for c in chunks] == greedy_texts[1]  # each text + "\n\n"
    code, _, err = cli_main([f"--hf={tmp_path / 'hf'}", "--step=3"], capsys)
    assert code != 0
    assert err.strip() == "error: --step applies to --workdir checkpoints, not to --hf"


@pytest.mark.parametrize("args, message", [
    (["--workdir={missing}"], r"error: workdir '.*missing' does not exist"),
    (["--workdir={empty}"], r"error: .*no checkpoint"),
    (["--workdir={run}", "--max_new_tokens=0"], "error: max_new_tokens must be a positive"),
    (["--workdir={run}", "--top_p=1.5"], r"error: top_p must be in \(0, 1\]"),
    (["--workdir={run}", "--top_p=0"], r"error: top_p must be in \(0, 1\]"),
    (["--workdir={run}", "--top_k=-1"], "error: top_k must be an integer >= 0"),
    ([], "error: pass --workdir=RUN .* or --hf="),
])
def test_cli_bad_input_gets_a_one_line_error(args, message, trained_run, tmp_path, capsys):
    """Through the CLI's own flag parsing and main (in-process: one subprocess per case would
    cost seconds each; test_cli_generates_then_goes_interactive runs the real entry point)."""
    import re

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(
        open(os.path.join(trained_run["workdir"], "config.json")).read())
    os.symlink(os.path.join(trained_run["workdir"], "tokenizer"), tmp_path / "empty" / "tokenizer")
    code, _, err = cli_main([a.format(missing=tmp_path / "missing", empty=tmp_path / "empty",
                                      run=trained_run["workdir"]) for a in args], capsys)
    assert code not in (0, None)
    err = err.strip().splitlines()
    assert len(err) == 1 and re.match(message, err[0]), err
