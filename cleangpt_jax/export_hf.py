"""Export a trained Vanilla run as a Hugging Face GPT-2 directory.

    python -m cleangpt_jax.export_hf --workdir=runs/teacher --out=runs/teacher-hf

The output (config.json + model.safetensors + tokenizer) loads with
`transformers.GPT2LMHeadModel.from_pretrained(out)` and anywhere cleangpt_jax accepts a hub name
(`cleangpt_jax.hf.load_gpt2`, a distillation teacher, `generate --hf`).
"""

from absl import app, flags, logging

from cleangpt_jax import hf

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run to export (its latest checkpoint).")
flags.DEFINE_string("out", None, "Output directory (new or empty, unless --overwrite).")
flags.DEFINE_integer("step", None, "Checkpoint step to export instead of the latest.")
flags.DEFINE_bool("overwrite", False, "Replace the files of a non-empty --out directory.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs every checkpoint access at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        out = hf.export_run(FLAGS.workdir, FLAGS.out, step=FLAGS.step, overwrite=FLAGS.overwrite)
    except ValueError as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    print(f"Exported {FLAGS.workdir} as GPT-2 to {out}")


if __name__ == "__main__":
    app.run(main)
