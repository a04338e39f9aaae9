"""Export a trained Vanilla run as a Hugging Face GPT-2 directory.

    python -m cleangpt_jax.export_hf --workdir=runs/teacher --out=runs/teacher-hf

The output (config.json + model.safetensors + tokenizer) loads with
`transformers.GPT2LMHeadModel.from_pretrained(out)` and anywhere cleangpt_jax accepts a hub name
(`cleangpt_jax.loading.load_lm`: a distillation teacher, `generate --hf`, `evaluate --teacher`).
Errors print one line and exit non-zero.
"""

from absl import flags

from cleangpt_jax import cli

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
    d = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "Training run to export (its latest checkpoint).", **d)
    flags.DEFINE_string("out", None, "Output directory (new or empty, unless --overwrite).", **d)
    flags.DEFINE_integer("step", None, "Checkpoint step to export instead of the latest.", **d)
    flags.DEFINE_bool("overwrite", False, "Replace the files of a non-empty --out directory.",
                      **d)
    flags.mark_flags_as_required(["workdir", "out"], **d)


@cli.tool(usage="--workdir=DIR --out=DIR")
def main(argv, flag_values: flags.FlagValues = FLAGS):
    from cleangpt_jax import hf  # after flags: keeps --help fast

    out = hf.export_run(flag_values.workdir, flag_values.out, step=flag_values.step,
                        overwrite=flag_values.overwrite)
    print(f"Exported {flag_values.workdir} as GPT-2 to {out}")


def run(flag_values: flags.FlagValues | None = None):
    cli.run(main, define_flags=define_flags, flag_values=flag_values)


if __name__ == "__main__":
    run()
