"""Train a model.

    python -m cleangpt_jax.train                              # the default: char-level Shakespeare
    python -m cleangpt_jax.train --config=configs/sasp_char.py --config.train.num_steps=500
    python -m cleangpt_jax.train --config=configs/x.py --workdir=runs/x

Without --config the default config (`cleangpt_jax.config.get_config()`) is used, and
`--config.key=value` overrides work on it too. Without --workdir the run goes to
runs/<config file name> (runs/default for the default config), so rerunning the same command
resumes from the latest checkpoint. Ctrl-C / SIGTERM save a checkpoint and exit cleanly.
Errors in the config, the data or the workdir print one line and exit non-zero.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from cleangpt_jax import config as config_lib
from cleangpt_jax.cli import die, flag_error, flags_parser

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: runs/<config file name>); rerun to resume.")


def define_config_flag():
    """--config, defaulting to cleangpt_jax/config.py so overrides work without a file.
    config_flags applies --config.x=y overrides while defining the flag, hence a function."""
    return config_flags.DEFINE_config_file(
        "config", default=config_lib.__file__,
        help_string="Config file with get_config() (default: cleangpt_jax/config.py); "
                    "override keys with --config.section.key=value.", lock_config=True)


def config_name(path: str | None) -> str:
    if not path or os.path.abspath(path) == os.path.abspath(config_lib.__file__):
        return "default"
    return os.path.splitext(os.path.basename(path))[0]


def default_workdir(path: str | None) -> str:
    return os.path.join("runs", config_name(path))


def main(argv):
    if len(argv) > 1:
        die(f"unexpected arguments {argv[1:]}: flags look like --config=FILE "
            f"--config.train.num_steps=100 --workdir=DIR", 2)
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        config = flags.FLAGS.config
        config.get("train")  # a config file that failed to load raises here
    except (IOError, OSError) as e:
        die(f"cannot load --config={path}: {e.__cause__ or e}", 2)
    workdir = _WORKDIR.value or default_workdir(path)
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)

    from cleangpt_jax.trainer import train_and_evaluate  # after flags: keeps --help fast

    try:
        summary = train_and_evaluate(config, workdir)
    except ValueError as e:  # every project error is a ValueError subclass with a fix in it
        die(e)
    if summary.samples:
        for prompt, text in zip(config.train.sample_prompts, summary.samples):
            print(f"\n----- sample (prompt {prompt!r}, step {summary.step}) -----\n{text}")
    print(f"\nworkdir: {summary.workdir}")


def run():
    try:
        define_config_flag()
    except Exception as e:  # noqa: BLE001
        flag_error(e)
    app.run(main, flags_parser=flags_parser())


if __name__ == "__main__":
    run()
