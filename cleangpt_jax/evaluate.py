"""Evaluate a trained or distilled model, alone or against a teacher.

    python -m cleangpt_jax.evaluate --workdir=runs/default
    python -m cleangpt_jax.evaluate --workdir=runs/distill --teacher=gpt2
    python -m cleangpt_jax.evaluate --workdir=runs/x --teacher=path/to/hf_or_workdir \
        --config.data.source=text --config.data.files='notes/*.txt' --config.eval.num_batches=20

Any training or distillation workdir is a valid student. `--teacher` is a Hugging Face hub name,
an HF GPT-2 directory or a cleangpt_jax workdir (default: the run's `distill.teacher`, if any;
`--teacher=none` evaluates a distilled student alone).
The data are the run's own (config.json's data section); `--config.data.key=value` overrides
them and `--config.eval.key=value` sets what is measured (`evaluation.get_eval_config`).
Outputs (summary.json, report.md, PNG plots) go to --output_dir (default WORKDIR/eval); see
`cleangpt_jax.evaluation` for what each number means. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import os

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from cleangpt_jax import config as config_lib
from cleangpt_jax import evaluation
from cleangpt_jax.cli import die, flag_error, flags_parser

_WORKDIR = flags.DEFINE_string("workdir", None, "The student: a training or distillation run.")
_TEACHER = flags.DEFINE_string("teacher", None, "HF hub name, HF GPT-2 directory or workdir "
                               "(default: the run's distill.teacher; 'none': no teacher).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where the outputs go (default WORKDIR/eval).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of the student (default: latest).")


def define_config_flag():
    """--config.data.* and --config.eval.*. config_flags applies the overrides while defining
    the flag (a wrong key raises there), hence a function called under `run`'s error handling."""
    default = ml_collections.ConfigDict({"data": config_lib.get_config().data,
                                         "eval": evaluation.get_eval_config()})
    return config_flags.DEFINE_config_dict(
        "config", default, "Overrides: --config.data.key=value (the run's data section) and "
        "--config.eval.key=value (what is measured).")


_KEY_HINT = "only --config.data.* (the run's data section) and --config.eval.* " \
            "(evaluation.get_eval_config) can be set"


def main(argv):
    if len(argv) > 1:
        die(f"unexpected arguments {argv[1:]}: flags look like --workdir=DIR --teacher=gpt2", 2)
    if not _WORKDIR.value:
        die("--workdir is required: the training or distillation run to evaluate", 2)
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every restore at INFO
        logging.set_verbosity(logging.WARNING)
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    data = {k: v for k, v in overrides.items() if k.startswith("data.")}
    try:
        summary = evaluation.evaluate_workdir(
            _WORKDIR.value, teacher=_TEACHER.value, data=data, eval_config=flags.FLAGS.config.eval,
            output_dir=_OUTPUT_DIR.value, step=_STEP.value)
    except ValueError as e:  # every project error is a ValueError subclass with a fix in it
        die(e)
    ppl = summary["perplexity"]
    line = f"student perplexity {ppl['student']:.4f}"
    if ppl["teacher"] is not None:
        line += f", teacher {ppl['teacher']:.4f}, ratio {ppl['ratio']:.4f}"
    print(line)
    if summary["files"]:
        out = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, "eval")
        print(f"report: {os.path.join(out, summary['files']['report'])}")


def run():
    try:
        define_config_flag()
    except Exception as e:  # noqa: BLE001
        flag_error(e, key_hint=_KEY_HINT)
    app.run(main, flags_parser=flags_parser(_KEY_HINT))


if __name__ == "__main__":
    run()
