"""Convert a Hugging Face GPT-2 checkpoint into a workdir that generate/evaluate/distill load.

    python -m cleangpt_jax.import_hf --name_or_path=gpt2 --workdir=runs/gpt2
    python -m cleangpt_jax.import_hf --name_or_path=runs/teacher-hf --workdir=runs/teacher-copy

`--name_or_path` is a hub name (downloads config, weights and tokenizer files) or a local
directory. The workdir gets config.json, tokenizer/ and a params-only Orbax checkpoint (step 0):
`cleangpt_jax.loading.import_to_workdir`. Errors print one line and exit non-zero.
"""

from absl import flags

from cleangpt_jax import cli
from cleangpt_jax.config import DTYPES

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
    d = {"flag_values": flag_values}
    flags.DEFINE_string("name_or_path", "gpt2",
                        "Hub name (gpt2, distilgpt2, org/name) or directory.", **d)
    flags.DEFINE_string("workdir", None, "Workdir to create (new or empty).", **d)
    flags.DEFINE_enum("dtype", "float32", list(DTYPES),
                      "Parameter dtype of the converted weights.", **d)
    flags.mark_flag_as_required("workdir", **d)


@cli.tool(usage="--name_or_path=gpt2 --workdir=DIR")
def main(argv, flag_values: flags.FlagValues = FLAGS):
    from cleangpt_jax.loading import import_to_workdir  # after flags: keeps --help fast

    name = flag_values.name_or_path
    workdir = import_to_workdir(name, flag_values.workdir, dtype=flag_values.dtype)
    print(f"Imported {name} into {workdir}")


def run(flag_values: flags.FlagValues | None = None):
    cli.run(main, define_flags=define_flags, flag_values=flag_values)


if __name__ == "__main__":
    run()
