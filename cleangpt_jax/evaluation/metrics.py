"""The numbers of an evaluation: perplexity, the student-teacher comparison, the layer plan and
the side-by-side generations. All models score the same `(input_ids, attention_mask)` batches,
m = attention_mask.

Perplexity, token-weighted over the whole stream, padding masked. Logits at t predict token
t + 1; the shift happens in `cleangpt_jax.losses.causal_lm_loss_terms`, the project's one LM
loss, called identically for the student and the teacher (labels = input_ids, never shifted
here):

    NLL = sum_{b,t} m[b,t+1] * -log p(x[b,t+1] | x[b,<=t]) / sum_{b,t} m[b,t+1]
    PPL = exp(NLL),   ratio = PPL_student / PPL_teacher

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

Generation: the same prompts, the same settings and seed for every model, greedy (temperature
0) and sampled, side by side, through `cleangpt_jax.generation.run_generation`.

The models are `cleangpt_jax.loading.LM`s; a failed check raises a one-line ConfigError.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cleangpt_jax.config import ConfigError
from cleangpt_jax.loading import LM
from cleangpt_jax.losses import causal_lm_loss_terms


def check_teacher(student: LM, teacher: LM, probe_text: str = "") -> None:
    """One-line errors for a teacher that cannot be scored on the student's token stream."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise ConfigError(
            f"the teacher {teacher.source!r} has vocab_size {vt} but the student has {vs}: "
            f"perplexities are only comparable on one tokenization; pass the teacher the student "
            f"was distilled from (or one with the student's tokenizer)")
    probe = probe_text or "The quick brown fox jumps over the lazy dog. 1234"
    if list(student.tokenizer.encode(probe)) != list(teacher.tokenizer.encode(probe)):
        raise ConfigError(
            f"the teacher's tokenizer ({teacher.source!r}) tokenizes text differently from the "
            f"student's: both vocabularies have {vs} tokens but they are not the same "
            f"tokenizer; pass the teacher the student was trained or distilled with")



def _forward(model, params, batch, hidden: bool):
    """(loss terms (sum, count), hidden states or None): the one scoring call for every model."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model.apply({"params": params}, ids, deterministic=True, output_hidden_states=hidden,
                      segment_ids=batch.get("segment_ids"))
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
        raise ConfigError("there are no evaluation batches: the data has no full window "
                          "of block_size tokens")
    return jax.tree.map(lambda *xs: np.sum([np.asarray(x, np.float64) for x in xs], axis=0),
                        *terms)


def _mean_nll(nll_sum: float, count: float) -> float:
    if count <= 0:
        raise ConfigError("no target tokens were scored (every position is padding): use "
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
            raise ConfigError(f"the layer map {list(layer_map)} has {len(layer_map)} entries "
                              f"for {student.config.n_layer} student blocks")
        if max(j for _, j in pairs) > teacher.config.n_layer:
            raise ConfigError(f"the layer map {list(layer_map)} names teacher blocks beyond "
                              f"the teacher's {teacher.config.n_layer}")
        if stitching is None and student.config.n_embd != teacher.config.n_embd:
            raise ConfigError(f"the student is {student.config.n_embd} wide and the teacher "
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


def compare_generations(models: Mapping[str, LM], prompts: Sequence[str], *,
                        max_new_tokens: int, temperature: float, top_k: int | None,
                        top_p: float | None, seed: int) -> dict:
    """Every model continues every prompt, greedily and sampled with the same settings and seed.

    models: {name: LM}, e.g. {'student': ..., 'teacher': ...}. Returns {settings, samples}:
    samples[n] = {prompt, greedy: {name: text}, sampled: {name: text}}, text being the
    continuation only.
    """
    from cleangpt_jax.generation import run_generation

    settings = {"greedy": {"temperature": 0.0, "top_k": None, "top_p": None},
                "sampled": {"temperature": float(temperature), "top_k": top_k or None,
                            "top_p": top_p}}
    samples = [{"prompt": p, "greedy": {}, "sampled": {}} for p in prompts]
    if prompts:
        for name, lm in models.items():
            prompt_lengths = [max(1, len(lm.tokenizer.encode(p))) for p in prompts]
            for mode, kw in settings.items():
                ids, _ = run_generation(lm.model, lm.params, lm.tokenizer, list(prompts),
                                        max_new_tokens=max_new_tokens, seed=seed, **kw)
                for sample, row, n in zip(samples, ids, prompt_lengths):
                    sample[mode][name] = lm.tokenizer.decode(row[n:])
    return {"settings": {"max_new_tokens": max_new_tokens, "seed": seed, **settings},
            "samples": samples}


