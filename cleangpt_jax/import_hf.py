"""Convert a Hugging Face GPT-2 checkpoint into a workdir that generate/evaluate/distill load.

    python -m cleangpt_jax.import_hf --name_or_path=gpt2 --workdir=runs/gpt2
    python -m cleangpt_jax.import_hf --name_or_path=runs/teacher-hf --workdir=runs/teacher-copy

`--name_or_path` is a hub name (downloads config, weights and tokenizer files) or a local
directory. The workdir gets config.json, tokenizer/ and a params-only Orbax checkpoint (step 0).
"""

from absl import app, flags, logging

from cleangpt_jax import hf
from cleangpt_jax.config import DTYPES

FLAGS = flags.FLAGS
flags.DEFINE_string("name_or_path", "gpt2", "Hub name (gpt2, distilgpt2, org/name) or directory.")
flags.DEFINE_string("workdir", None, "Workdir to create (new or empty).")
flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Parameter dtype of the converted weights.")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs every checkpoint access at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        workdir = hf.import_to_workdir(FLAGS.name_or_path, FLAGS.workdir, dtype=FLAGS.dtype)
    except ValueError as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    print(f"Imported {FLAGS.name_or_path} into {workdir}")


if __name__ == "__main__":
    app.run(main)
