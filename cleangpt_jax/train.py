"""Train a model.

    python -m cleangpt_jax.train                              # the default: char-level Shakespeare
    python -m cleangpt_jax.train --config=configs/sasp_char.py --config.train.num_steps=500
    python -m cleangpt_jax.train --config=configs/x.py --workdir=runs/x

Without --config the default config (`cleangpt_jax.config.get_config()`) is used, and
`--config.key=value` overrides work on it too. Without --workdir the run goes to
runs/<config file name> (runs/default for the default config), so rerunning the same command
resumes from the latest checkpoint. Ctrl-C / SIGTERM save a checkpoint and stop; the exit
status is then 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), 0 only for a run
that finished. Errors in the config, the data or the workdir print one line and exit non-zero.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from cleangpt_jax import cli
from cleangpt_jax import config as config_lib

def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
    """--workdir and --config (defaulting to cleangpt_jax/config.py so overrides work without a
    file). config_flags applies --config.x=y overrides while defining the flag, hence a
    function, called under `cli.run`'s error handling."""
    flags.DEFINE_string("workdir", None,
                        "Run directory (default: runs/<config file name>); rerun to resume.",
                        flag_values=flag_values)
    return config_flags.DEFINE_config_file(
        "config", default=config_lib.__file__,
        help_string="Config file with get_config() (default: cleangpt_jax/config.py); "
                    "override keys with --config.section.key=value.", lock_config=True,
        flag_values=flag_values)


def config_name(path: str | None) -> str:
    if not path or os.path.abspath(path) == os.path.abspath(config_lib.__file__):
        return "default"
    return os.path.splitext(os.path.basename(path))[0]


def default_workdir(path: str | None) -> str:
    return os.path.join("runs", config_name(path))


@cli.tool(usage="--config=FILE --config.train.num_steps=100 --workdir=DIR")
def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    config = cli.config_flag_value(flag_values=flag_values)
    workdir = flag_values.workdir or default_workdir(
        config_flags.get_config_filename(flag_values["config"]))

    from cleangpt_jax import loop  # after flags: keeps --help fast
    from cleangpt_jax import workdir as workdir_lib
    from cleangpt_jax.trainer import train_and_evaluate

    summary = train_and_evaluate(config, workdir)
    if summary.samples:  # (the prompts as resolved: None is the start of a validation text)
        prompts = workdir_lib.load_config(summary.workdir).train.sample_prompts
        for prompt, text in zip(prompts, summary.samples):
            print(f"\n----- sample (prompt {prompt!r}, step {summary.step}) -----\n{text}")
    print(f"\nworkdir: {summary.workdir}")
    if summary.interrupted:  # saved, not finished: a script must not take it for done
        sys.exit(loop.exit_status(summary.stop_signal))


def run(flag_values: flags.FlagValues | None = None):
    cli.run(main, define_flags=define_flags, flag_values=flag_values)


if __name__ == "__main__":
    run()
