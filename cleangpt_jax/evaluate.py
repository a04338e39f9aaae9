r"""Evaluate a trained or distilled model, alone or against a teacher.

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
`cleangpt_jax.evaluation.metrics` for what each number means and
`cleangpt_jax.evaluation.report` for the files. Errors print one line and exit non-zero.
"""

from __future__ import annotations


import ml_collections
from absl import flags
from ml_collections import config_flags

from cleangpt_jax import cli, storage
from cleangpt_jax import config as config_lib
from cleangpt_jax import evaluation
from cleangpt_jax import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
    """--workdir, --teacher, --output_dir, --step, and --config.data.* / --config.eval.*.
    config_flags applies the overrides while defining the flag (a wrong key raises there),
    hence a function called under `cli.run`'s error handling."""
    d = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "The student: a training or distillation run.", **d)
    flags.DEFINE_string("teacher", None, "HF hub name, HF GPT-2 directory or workdir "
                        "(default: the run's distill.teacher; 'none': no teacher).", **d)
    flags.DEFINE_string("output_dir", None, "Where the outputs go (default WORKDIR/eval).", **d)
    flags.DEFINE_integer("step", None, "Checkpoint step of the student (default: latest).", **d)
    default = ml_collections.ConfigDict({"data": config_lib.get_config().data,
                                         "eval": evaluation.get_eval_config()})
    return config_flags.DEFINE_config_dict(
        "config", default, "Overrides: --config.data.key=value (the run's data section) and "
        "--config.eval.key=value (what is measured).", **d)


_KEY_HINT = "only --config.data.* (the run's data section) and --config.eval.* " \
            "(evaluation.get_eval_config) can be set"


@cli.tool(usage="--workdir=DIR --teacher=gpt2")
def main(argv, flag_values: flags.FlagValues = FLAGS):
    if not flag_values.workdir:
        cli.die("--workdir is required: the training or distillation run to evaluate", 2)
    out = flag_values.output_dir or storage.join(flag_values.workdir, "eval")
    workdir_lib.check_output_dir(out, "--output_dir")  # before the work, not after it
    overrides = config_flags.get_override_values(flag_values["config"])
    data = {k: v for k, v in overrides.items() if k.startswith("data.")}
    summary = evaluation.evaluate_workdir(
        flag_values.workdir, teacher=flag_values.teacher, data=data,
        eval_config=flag_values.config.eval, output_dir=flag_values.output_dir,
        step=flag_values.step)
    ppl = summary["perplexity"]
    line = f"student perplexity {ppl['student']:.4f}"
    if ppl["teacher"] is not None:
        line += f", teacher {ppl['teacher']:.4f}, ratio {ppl['ratio']:.4f}"
    scored = summary["data"]
    print(f"{line} (over {scored['tokens']} tokens of the {scored['split']} split)")
    if summary["files"]:
        print(f"report: {storage.join(out, summary['files']['report'])}")


def run(flag_values: flags.FlagValues | None = None):
    cli.run(main, define_flags=define_flags, key_hint=_KEY_HINT, flag_values=flag_values)


if __name__ == "__main__":
    run()
