"""Evaluate a trained model, or a student against its teacher, on one token stream.

    python -m cleangpt_jax.evaluate --workdir=runs/distill --teacher=gpt2     # the CLI
    summary = evaluate_workdir("runs/distill", teacher="gpt2")                 # the same call

    student, teacher = load_student("runs/x"), load_teacher("gpt2")
    result = compare(student, teacher, batches, layer_map=[2, 4, 6], stitching=None)

What is measured (all on the same `(input_ids, attention_mask)` batches, m = attention_mask):

Perplexity, token-weighted over the whole stream, padding masked. Logits at t predict token
t + 1; the shift happens in `cleangpt_jax.losses.causal_lm_loss_terms`, the project's one LM
loss, called identically for the student and the teacher (labels = input_ids, never shifted
here):

    NLL = sum_{b,t} m[b,t+1] * -log p(x[b,t+1] | x[b,<=t]) / sum_{b,t} m[b,t+1]
    PPL = exp(NLL),   ratio = PPL_student / PPL_teacher

Batches are the stream's non-overlapping windows of T tokens (`data.eval_batches`),
so the first token of each window is context only.

Hidden states, per student layer i = 0..L_s (0 = embeddings), against teacher layer
j = map(i) (map(0) = 0; map(k) = the run's distillation layer map, or the uniform map
round(k * L_t / L_s)). Both models' states are pre-ln_f (the teacher is our Vanilla model, not
HF's, whose last state is post-ln_f). With different widths the student state goes through the
run's trained stitching layer k (layer 1 for the embeddings), as in distillation; with equal
widths it is compared raw:

    s = stitch_max(i,1)(h_s[i]) if d_s != d_t else h_s[i],   t = h_t[map(i)]
    MSE_i    = sum_{b,t} m[b,t] * mean_d (s - t)^2 / sum m
    cosine_i = sum_{b,t} m[b,t] * <s, t> / (|s| |t|) / sum m

(the per-token terms are the distillation loss registry's 'mse' and 1 - 'cosine').

Generation: the same prompts (windows of the evaluation stream, or `eval.prompts`), the same
settings and seed for every model, greedy (temperature 0) and sampled, side by side, through
`cleangpt_jax.generation.run_generation` (the original sampled the student but decoded the
teacher greedily, so its columns were not comparable).

Outputs in the output directory (default WORKDIR/eval):

    summary.json      the keys below
    report.md         the same as tables, with the generations side by side
    perplexity.png    bar chart of the perplexities
    layers.png        per-layer MSE and cosine (only when layers were compared)

summary.json keys:

    student       {source, step, model_type, n_layer, n_embd, vocab_size, num_params}
    teacher       the same for the teacher, or null
    data          {source, split, batch_size, block_size, num_batches, tokens}: tokens = scored
                  target tokens
    loss          {student, teacher}: mean NLL in nats per token (teacher null without one)
    perplexity    {student, teacher, ratio}: ratio = student / teacher (null without a teacher)
    layers        {student_layer, teacher_layer, mse, cosine, stitched} (lists over i = 0..L_s;
                  stitched: whether stitching layers were applied), or null
    layers_note   why layers were not compared, or null
    generation    {settings: {max_new_tokens, seed, greedy: {...}, sampled: {...}},
                   samples: [{prompt, greedy: {student, teacher?}, sampled: {...}}]}
    files         {summary, report, perplexity_plot, layers_plot (or null)}: file names
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cleangpt_jax.losses import causal_lm_loss_terms

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PERPLEXITY_PLOT = "perplexity.png"
LAYERS_PLOT = "layers.png"
SUMMARY_KEYS = ("student", "teacher", "data", "loss", "perplexity", "layers", "layers_note",
                "generation", "files")


class EvaluationError(ValueError):
    """An evaluation that cannot work as asked; the message says how to fix it."""


def get_eval_config() -> ml_collections.ConfigDict:
    """The `eval` section: what `python -m cleangpt_jax.evaluate` measures and how.

    Override with --config.eval.key=value (the data section with --config.data.key=value).
    """
    e = ml_collections.ConfigDict()
    e.split = "val"  # 'val' | 'train': which token stream of the data section to score
    e.batch_size = 8  # global: rows per batch, a multiple of the device count
    e.num_batches = ml_collections.FieldReference(None, field_type=int)  # None: the whole split
    # Window length T; None: the student's block_size (capped by the teacher's positions).
    e.block_size = ml_collections.FieldReference(None, field_type=int)
    e.prompts = ()  # explicit prompts; empty: num_prompts windows of the evaluation stream
    e.num_prompts = 3
    e.prompt_tokens = 20
    e.max_new_tokens = 50  # 0 = no generation comparison
    e.temperature = 0.8  # the sampled comparison (the greedy one uses temperature 0)
    e.top_k = 50  # 0 = off
    e.top_p = ml_collections.FieldReference(None, field_type=float)
    e.seed = 0
    return e


# ------------------------------------------------------------------------------ the models

@dataclasses.dataclass
class LM:
    """A model under evaluation: flax module, params, tokenizer and where it came from."""

    name: str  # 'student' | 'teacher': the key in every result
    model: Any
    params: Any
    tokenizer: Any
    source: str
    step: int | None = None

    @property
    def config(self):
        return self.model.config

    def describe(self) -> dict:
        c = self.config
        return {"source": self.source, "step": self.step, "model_type": c.model_type,
                "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                "num_params": int(sum(np.size(x) for x in jax.tree.leaves(self.params)))}


def _is_workdir(path: str) -> bool:
    from cleangpt_jax.workdir import CHECKPOINT_DIR, CONFIG_FILE

    return (os.path.isdir(os.path.join(path, CHECKPOINT_DIR))
            and os.path.isfile(os.path.join(path, CONFIG_FILE)))


def load_student(workdir: str, step: int | None = None, *, mesh=None):
    """(LM, run config) from any training or distillation workdir (latest checkpoint)."""
    from cleangpt_jax.workdir import load_run

    run = load_run(workdir, step, mesh=mesh)
    return LM("student", run.model, run.params, run.tokenizer, workdir, run.step), run.config


def load_teacher(name_or_path: str, *, fallback_tokenizer=None, mesh=None) -> LM:
    """A teacher: a cleangpt_jax workdir (e.g. from import_hf), or an HF GPT-2 hub name or
    directory loaded with `cleangpt_jax.hf.load_gpt2` into our Vanilla model.

    Its tokenizer: the directory's cleangpt_jax tokenizer (an exported character-level model),
    else its HF tokenizer files, else (a directory holding only weights) `fallback_tokenizer`,
    the student's; a hub name brings its own.
    """
    from cleangpt_jax import hf
    from cleangpt_jax.models import get_model
    from cleangpt_jax.tokenizers import create_tokenizer, gpt2, load_tokenizer, read_marker

    name_or_path = os.fspath(name_or_path)
    local = os.path.isdir(name_or_path)
    if local and _is_workdir(name_or_path):
        from cleangpt_jax.workdir import load_run

        run = load_run(name_or_path, mesh=mesh)
        return LM("teacher", run.model, run.params, run.tokenizer, name_or_path, run.step)
    config, params = hf.load_gpt2(name_or_path, mesh=mesh)
    if local and read_marker(name_or_path) is not None:
        tokenizer = load_tokenizer(name_or_path)
    elif local and fallback_tokenizer is not None and not gpt2.has_hf_tokenizer_files(name_or_path):
        tokenizer = fallback_tokenizer
    else:
        tokenizer = create_tokenizer("gpt2", name_or_path=name_or_path)
    return LM("teacher", get_model(config=config), params, tokenizer, name_or_path)


def check_teacher(student: LM, teacher: LM, probe_text: str = "") -> None:
    """One-line errors for a teacher that cannot be scored on the student's token stream."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise EvaluationError(
            f"the teacher {teacher.source!r} has vocab_size {vt} but the student has {vs}: "
            f"perplexities are only comparable on one tokenization; pass the teacher the student "
            f"was distilled from (or one with the student's tokenizer)")
    probe = probe_text or "The quick brown fox jumps over the lazy dog. 1234"
    if list(student.tokenizer.encode(probe)) != list(teacher.tokenizer.encode(probe)):
        raise EvaluationError(
            f"the teacher's tokenizer ({teacher.source!r}) tokenizes text differently from the "
            f"student's: both vocabularies have {vs} tokens but they are not the same "
            f"tokenizer; pass the teacher the student was trained or distilled with")


# ------------------------------------------------------------------------------ the metrics

def _forward(model, params, batch, hidden: bool):
    """(loss terms (sum, count), hidden states or None): the one scoring call for every model."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model.apply({"params": params}, ids, deterministic=True, output_hidden_states=hidden)
    return causal_lm_loss_terms(out.logits, ids, mask), out.hidden_states


@functools.partial(jax.jit, static_argnames=("model",))
def _lm_step(model, params, batch):
    (nll, count), _ = _forward(model, params, batch, False)
    return {"nll": nll, "tokens": count}


@functools.partial(jax.jit, static_argnames=("student", "teacher", "pairs", "stitch_bias"))
def _compare_step(student, teacher, pairs, stitch_bias, s_params, t_params, stitching, batch):
    from cleangpt_jax.distill import apply_stitch, get_loss

    hidden = pairs is not None
    (s_nll, count), s_h = _forward(student, s_params, batch, hidden)
    (t_nll, _), t_h = _forward(teacher, t_params, batch, hidden)
    out = {"student_nll": s_nll, "teacher_nll": t_nll, "tokens": count}
    if hidden:
        m = batch["attention_mask"].astype(jnp.float32)
        mse, cos = get_loss("mse"), get_loss("cosine")
        d_t = teacher.config.n_embd
        mse_sums, cos_sums = [], []
        for i, j in pairs:
            s = apply_stitch(stitching, max(i, 1), s_h[i], d_t, stitch_bias)
            t = t_h[j].astype(jnp.float32)
            mse_sums.append(jnp.sum(mse(s, t, 1.0) * m))
            cos_sums.append(jnp.sum((1.0 - cos(s, t, 1.0)) * m))
        out.update(mse=jnp.stack(mse_sums), cosine=jnp.stack(cos_sums), positions=jnp.sum(m))
    return out


def _place(batch, mesh):
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    from cleangpt_jax.sharding import global_batch

    return global_batch(batch, mesh)


def _accumulate(step_fn, batches, mesh) -> dict:
    """The per-batch sums of `step_fn` added up in float64 on the host.

    Steps are dispatched without waiting (the device runs ahead); the small per-batch results
    are read back only at the end, so a long evaluation loses no precision to float32 sums.
    """
    terms = [step_fn(_place(batch, mesh)) for batch in batches]
    if not terms:
        raise EvaluationError("there are no evaluation batches: the data has no full window "
                              "of block_size tokens")
    return jax.tree.map(lambda *xs: np.sum([np.asarray(x, np.float64) for x in xs], axis=0),
                        *terms)


def _mean_nll(nll_sum: float, count: float) -> float:
    if count <= 0:
        raise EvaluationError("no target tokens were scored (every position is padding): use "
                              "more data or a smaller eval.block_size")
    return float(nll_sum / count)


def perplexity(model, params, batches: Sequence[dict], *, mesh=None) -> dict:
    """{loss, perplexity, tokens} of one model over `batches` of {input_ids, attention_mask}."""
    total = _accumulate(functools.partial(_lm_step, model, params), batches, mesh)
    loss = _mean_nll(total["nll"], total["tokens"])
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(total["tokens"])}


def compare(student: LM, teacher: LM, batches: Sequence[dict], *, layer_map=None,
            stitching=None, mesh=None) -> dict:
    """Both models on the identical batches, in one compiled step per batch.

    layer_map: teacher block (1-based) for student blocks 1..L_s, or None to skip the
    hidden-state comparison. stitching: {'stitch_<k>': Dense params} applied to the student's
    states (needed when the widths differ), or None for raw states.
    Returns {loss, perplexity, tokens, layers}: loss/perplexity are {student, teacher, ratio}
    (ratio under perplexity only); layers is {student_layer, teacher_layer, mse, cosine,
    stitched} or None.
    """
    pairs = None
    if layer_map is not None:
        pairs = tuple(enumerate([0] + [int(j) for j in layer_map]))
        if len(pairs) != student.config.n_layer + 1:
            raise EvaluationError(f"the layer map {list(layer_map)} has {len(layer_map)} entries "
                                  f"for {student.config.n_layer} student blocks")
        if max(j for _, j in pairs) > teacher.config.n_layer:
            raise EvaluationError(f"the layer map {list(layer_map)} names teacher blocks beyond "
                                  f"the teacher's {teacher.config.n_layer}")
        if stitching is None and student.config.n_embd != teacher.config.n_embd:
            raise EvaluationError(f"the student is {student.config.n_embd} wide and the teacher "
                                  f"{teacher.config.n_embd}: comparing hidden states needs the "
                                  f"run's stitching layers")
    stitch_bias = bool(stitching) and "bias" in stitching["stitch_1"]
    step = functools.partial(_compare_step, student.model, teacher.model, pairs, stitch_bias,
                             student.params, teacher.params, stitching)
    total = _accumulate(step, batches, mesh)
    s_loss = _mean_nll(total["student_nll"], total["tokens"])
    t_loss = _mean_nll(total["teacher_nll"], total["tokens"])
    result = {"loss": {"student": s_loss, "teacher": t_loss},
              "perplexity": {"student": math.exp(s_loss), "teacher": math.exp(t_loss),
                             "ratio": math.exp(s_loss - t_loss)},
              "tokens": int(total["tokens"]), "layers": None}
    if pairs is not None:
        n = max(float(total["positions"]), 1.0)
        result["layers"] = {"student_layer": [i for i, _ in pairs],
                            "teacher_layer": [j for _, j in pairs],
                            "mse": [float(x) / n for x in total["mse"]],
                            "cosine": [float(x) / n for x in total["cosine"]],
                            "stitched": stitching is not None}
    return result


def layer_plan(student: LM, teacher: LM, run_config, stitching):
    """(layer_map or None, stitching to apply or None, note): how the run's layers line up.

    The map is the run's distillation layer map when it was distilled from a teacher of this
    depth, else the uniform map. Stitching is applied only when the widths differ.
    """
    ls, lt = student.config.n_layer, teacher.config.n_layer
    ds, dt = student.config.n_embd, teacher.config.n_embd
    if ls > lt:
        return None, None, (f"the student has more blocks ({ls}) than the teacher ({lt}): "
                            f"no layer map")
    from cleangpt_jax import distill

    d = run_config.get("distill") if run_config is not None else None
    if d is not None and d.get("teacher_n_layer") == lt and d.get("layer_map") is not None:
        mapping = distill.layer_map_from_config(run_config)
    else:
        mapping = distill.layer_map("uniform", ls, lt)
    if ds == dt:
        return mapping, None, None
    if not stitching:
        return None, None, (f"the widths differ (student {ds}, teacher {dt}) and the run has no "
                            f"stitching layers")
    for k in range(1, ls + 1):
        kernel = stitching.get(f"stitch_{k}", {}).get("kernel")
        if kernel is None or tuple(np.shape(kernel)) != (ds, dt):
            return None, None, (f"the run's stitching layers do not map width {ds} to this "
                                f"teacher's {dt} (stitch_{k}): compare against the teacher the "
                                f"student was distilled from")
    return mapping, stitching, None


# ------------------------------------------------------------------------------ generation

def default_prompts(tokens, tokenizer, num_prompts: int, prompt_tokens: int) -> list[str]:
    """`num_prompts` texts of `prompt_tokens` tokens, evenly spaced through `tokens`."""
    tokens = np.asarray(tokens)
    if num_prompts <= 0 or len(tokens) <= prompt_tokens:
        return []
    starts = np.linspace(0, len(tokens) - prompt_tokens - 1, num_prompts).astype(int)
    prompts = [tokenizer.decode(tokens[s:s + prompt_tokens]) for s in starts]
    return [p for p in prompts if p.strip()]


def compare_generations(models: Sequence[LM], prompts: Sequence[str], *, max_new_tokens: int,
                        temperature: float, top_k: int | None, top_p: float | None,
                        seed: int) -> dict:
    """Every model continues every prompt, greedily and sampled with the same settings and seed.

    Returns {settings, samples}: samples[n] = {prompt, greedy: {name: text},
    sampled: {name: text}}, text being the continuation only.
    """
    from cleangpt_jax.generation import run_generation

    settings = {"greedy": {"temperature": 0.0, "top_k": None, "top_p": None},
                "sampled": {"temperature": float(temperature), "top_k": top_k or None,
                            "top_p": top_p}}
    samples = [{"prompt": p, "greedy": {}, "sampled": {}} for p in prompts]
    if prompts:
        for lm in models:
            prompt_lengths = [max(1, len(lm.tokenizer.encode(p))) for p in prompts]
            for mode, kw in settings.items():
                ids, _ = run_generation(lm.model, lm.params, lm.tokenizer, list(prompts),
                                        max_new_tokens=max_new_tokens, seed=seed, **kw)
                for sample, row, n in zip(samples, ids, prompt_lengths):
                    sample[mode][lm.name] = lm.tokenizer.decode(row[n:])
    return {"settings": {"max_new_tokens": max_new_tokens, "seed": seed, **settings},
            "samples": samples}


# ------------------------------------------------------------------------------ outputs

def _figure(ncols: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg canvas)

    fig = Figure(figsize=(5.5 * ncols, 4), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def plot_perplexity(summary: dict, path: str) -> str:
    ppl = summary["perplexity"]
    names = [n for n in ("student", "teacher") if ppl.get(n) is not None]
    fig, (ax,) = _figure()
    bars = ax.bar(names, [ppl[n] for n in names], color=["tab:blue", "tab:orange"][:len(names)])
    ax.bar_label(bars, fmt="%.3f")
    title = "Perplexity"
    if ppl.get("ratio") is not None:
        title += f" (student / teacher = {ppl['ratio']:.3f})"
    ax.set_title(title)
    ax.set_ylabel("perplexity")
    fig.savefig(path, dpi=100)
    return path


def plot_layers(layers: dict, path: str) -> str:
    fig, (ax_mse, ax_cos) = _figure(2)
    x = layers["student_layer"]
    labels = [f"{i}\n(t{j})" for i, j in zip(x, layers["teacher_layer"])]
    for ax, key, title in ((ax_mse, "mse", "Hidden-state MSE"),
                           (ax_cos, "cosine", "Hidden-state cosine similarity")):
        ax.plot(x, layers[key], marker="o")
        ax.set_xticks(x, labels)
        ax.set_xlabel("student layer (teacher layer); 0 = embeddings")
        ax.set_title(title + (" (stitched)" if layers["stitched"] else ""))
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def _cell(text) -> str:
    """Text for one Markdown table cell: newlines as <br>, pipes and HTML escaped, other control
    characters (a random model's bytes) shown as escapes."""
    if text is None:
        return ""
    text = "".join(c if c == "\n" or c.isprintable() else ascii(c)[1:-1] for c in str(text))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "<br>".join(text.replace("|", "\\|").split("\n"))


def _fmt(x, spec=".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_report(summary: dict) -> str:
    """The Markdown report of a summary."""
    s, t = summary["student"], summary["teacher"]
    ppl, loss, data = summary["perplexity"], summary["loss"], summary["data"]
    lines = [f"# Evaluation of `{s['source']}` (step {s['step']})", "",
             f"Data: {data['source']} ({data['split']} split), {data['tokens']} scored tokens in "
             f"{data['num_batches']} batches of {data['batch_size']} x {data['block_size']}.", "",
             "| model | source | type | layers | width | params | loss (nats/token) | perplexity |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in (("student", s), ("teacher", t)):
        if m is not None:
            lines.append(f"| {name} | `{m['source']}` | {m['model_type']} | {m['n_layer']} | "
                         f"{m['n_embd']} | {m['num_params']:,} | {_fmt(loss[name])} | "
                         f"{_fmt(ppl[name], '.3f')} |")
    if ppl.get("ratio") is not None:
        lines += ["", f"Perplexity ratio student / teacher: **{ppl['ratio']:.4f}**"]
    lines += ["", f"![perplexity]({summary['files']['perplexity_plot']})", ""]
    layers = summary["layers"]
    if layers is not None:
        how = "through the run's stitching layers" if layers["stitched"] else "raw (equal widths)"
        lines += ["## Hidden states", "",
                  f"Pre-ln_f states, masked means over real tokens, student states {how}.", "",
                  "| student layer | teacher layer | MSE | cosine |", "|---|---|---|---|"]
        for i, j, mse, cos in zip(layers["student_layer"], layers["teacher_layer"],
                                  layers["mse"], layers["cosine"]):
            lines.append(f"| {i} | {j} | {mse:.6g} | {cos:.6f} |")
        lines += ["", f"![layers]({summary['files']['layers_plot']})", ""]
    elif summary.get("layers_note"):
        lines += ["## Hidden states", "", f"Not compared: {summary['layers_note']}.", ""]
    gen = summary["generation"]
    if gen["samples"]:
        st = gen["settings"]
        names = [n for n in ("student", "teacher") if summary[n] is not None]
        lines += ["## Generations", "",
                  f"{st['max_new_tokens']} new tokens, seed {st['seed']}; greedy, and sampled "
                  f"with temperature {st['sampled']['temperature']}, top_k "
                  f"{st['sampled']['top_k']}, top_p {st['sampled']['top_p']}.", ""]
        for n, sample in enumerate(gen["samples"], 1):
            lines += [f"### Prompt {n}", "", f"> {_cell(sample['prompt'])}", "",
                      "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for mode in ("greedy", "sampled"):
                lines.append(f"| {mode} | " + " | ".join(_cell(sample[mode].get(name))
                                                         for name in names) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict, output_dir: str) -> dict:
    """summary.json, report.md and the PNGs into `output_dir`; returns {kind: path}."""
    os.makedirs(output_dir, exist_ok=True)
    summary["files"] = {"summary": SUMMARY_FILE, "report": REPORT_FILE,
                        "perplexity_plot": PERPLEXITY_PLOT,
                        "layers_plot": LAYERS_PLOT if summary["layers"] is not None else None}
    paths = {k: os.path.join(output_dir, v) for k, v in summary["files"].items() if v}
    plot_perplexity(summary, paths["perplexity_plot"])
    if summary["layers"] is not None:
        plot_layers(summary["layers"], paths["layers_plot"])
    with open(paths["report"], "w", encoding="utf-8") as f:
        f.write(render_report(summary))
    with open(paths["summary"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return paths


# ------------------------------------------------------------------------------ a whole run

def _apply_data_overrides(config, overrides: dict | None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in (overrides or {}).items():
        key = key.removeprefix("data.")
        if key not in config.data:
            raise EvaluationError(f"unknown data key {key!r}: the run's data section has "
                                  f"{sorted(config.data)}")
        config.data[key] = value
    return config


def _check_eval_config(e, student: LM, teacher: LM | None) -> int:
    """The window length, after checking the eval section against the models."""
    if e.split not in ("val", "train"):
        raise EvaluationError(f"eval.split must be 'val' or 'train', got {e.split!r}")
    limit = min(m.config.max_position_embeddings for m in (student, teacher) if m is not None)
    block = int(e.block_size or min(student.config.block_size, limit))
    if not 2 <= block <= limit:
        raise EvaluationError(f"eval.block_size={block} must be in [2, {limit}] (the positions "
                              f"the models accept)")
    if e.num_batches is not None and e.num_batches <= 0:
        raise EvaluationError(f"eval.num_batches must be positive or None, got {e.num_batches}")
    if e.max_new_tokens < 0:
        raise EvaluationError(f"eval.max_new_tokens must be >= 0, got {e.max_new_tokens}")
    return block


def evaluate_workdir(workdir: str, *, teacher: str | None = None, data: dict | None = None,
                     eval_config: ml_collections.ConfigDict | None = None,
                     output_dir: str | None = None, step: int | None = None) -> dict:
    """Evaluate the run in `workdir` (against `teacher`) and write the outputs; returns the summary.

    `data`: overrides of the run's data section ({key: value}); `eval_config`: the eval section
    (`get_eval_config()` by default). The teacher defaults to the run's `distill.teacher`;
    teacher='none' evaluates the student alone.
    """
    from cleangpt_jax import data as data_lib, sharding
    from cleangpt_jax.workdir import is_writer

    e = eval_config if eval_config is not None else get_eval_config()
    mesh = sharding.create_mesh()
    student, config = load_student(workdir, step, mesh=mesh)
    config = _apply_data_overrides(config, data)
    if teacher is None and config.get("distill") is not None:
        teacher = config.distill.get("teacher")
    if teacher is not None and str(teacher).lower() in ("", "none"):
        teacher = None
    t_lm = None
    if teacher is not None:
        t_lm = load_teacher(teacher, fallback_tokenizer=student.tokenizer, mesh=mesh)
        check_teacher(student, t_lm)  # before any data work: a wrong teacher fails at once
    block = _check_eval_config(e, student, t_lm)
    n_devices = mesh.devices.size
    if e.batch_size <= 0 or e.batch_size % n_devices:
        raise EvaluationError(f"eval.batch_size={e.batch_size} must be a positive multiple of the "
                              f"device count {n_devices} (each device scores whole rows)")

    with config.unlocked():
        config.model.block_size = block  # load_dataset checks that the stream holds one window
    token_data = data_lib.load_dataset(config, student.tokenizer)
    tokens = token_data.val if e.split == "val" else token_data.train
    if tokens is None:
        raise EvaluationError("the data has no validation split (data.val_fraction=0 and no "
                              "data.val_split): set one, or pass --config.eval.split=train")
    batches = data_lib.eval_batches(
        tokens, global_batch_size=int(e.batch_size), block_size=block,
        num_batches=e.num_batches, process_index=jax.process_index(),
        process_count=jax.process_count())
    first_stream = getattr(tokens, "streams", (tokens,))[0]  # a Mixture's first source

    layers, layers_note = None, None
    if t_lm is None:
        ppl = perplexity(student.model, student.params, batches, mesh=mesh)
        result = {"loss": {"student": ppl["loss"], "teacher": None},
                  "perplexity": {"student": ppl["perplexity"], "teacher": None, "ratio": None},
                  "tokens": ppl["tokens"]}
    else:
        check_teacher(student, t_lm, student.tokenizer.decode(first_stream[:256]))  # real text
        from cleangpt_jax.distill import load_stitching

        layer_map, stitching, layers_note = layer_plan(student, t_lm, config,
                                                       load_stitching(workdir))
        if stitching is not None:  # restored onto one device; the step runs on the mesh
            stitching = jax.device_put(stitching, sharding.replicated(mesh))
        result = compare(student, t_lm, batches, layer_map=layer_map, stitching=stitching,
                         mesh=mesh)
        layers = result["layers"]

    models = [student] + ([t_lm] if t_lm is not None else [])
    prompts = list(e.prompts) or default_prompts(first_stream, student.tokenizer,
                                                 int(e.num_prompts), int(e.prompt_tokens))
    generation = compare_generations(
        models, prompts if e.max_new_tokens > 0 else [], max_new_tokens=int(e.max_new_tokens),
        temperature=float(e.temperature), top_k=int(e.top_k or 0) or None, top_p=e.top_p,
        seed=int(e.seed))

    summary = {
        "student": student.describe(),
        "teacher": t_lm.describe() if t_lm is not None else None,
        "data": {"source": data_lib.data_label(config.data), "split": e.split,
                 "batch_size": int(e.batch_size), "block_size": block,
                 "num_batches": len(batches), "tokens": result["tokens"]},
        "loss": result["loss"], "perplexity": result["perplexity"],
        "layers": layers, "layers_note": layers_note, "generation": generation, "files": None}
    if is_writer():
        write_outputs(summary, output_dir or os.path.join(workdir, "eval"))
    return summary
