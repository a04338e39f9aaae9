"""The files of an evaluation: summary.json, report.md and the PNG plots.

    summary.json      the keys below (SUMMARY_KEYS)
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

What each number means: `cleangpt_jax.evaluation.metrics`.
"""

from __future__ import annotations

import json
import os

from cleangpt_jax import storage
from cleangpt_jax.plot import save_png

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PERPLEXITY_PLOT = "perplexity.png"
LAYERS_PLOT = "layers.png"
SUMMARY_KEYS = ("student", "teacher", "data", "loss", "perplexity", "layers", "layers_note",
                "generation", "files")


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
    return save_png(fig, path)


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
    return save_png(fig, path)


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
    """summary.json, report.md and the PNGs into `output_dir`; returns {kind: path}. A URL
    `output_dir` (gs://...): written locally, then each file in one upload."""
    if storage.is_url(output_dir):
        local = write_outputs(summary, storage.scratch_dir("eval-"))
        storage.upload_dir(os.path.dirname(local["report"]), output_dir)
        return {k: storage.join(output_dir, os.path.basename(v)) for k, v in local.items()}
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


