"""python -m cleangpt_jax.distill --config=configs/distill_shakespeare_offline.py --workdir=DIR

Distils the teacher named by `distill.teacher` into the student of the `model` section, stage
by stage; rerunning the same command resumes where it stopped (completed stages are skipped,
the current one continues from its last checkpoint). Ctrl-C / SIGTERM save and exit. Without
--config the default is cleangpt_jax/distill/config.py (GPT-2 from the hub into a 6-block
Token-Factored student). Errors print one line and exit non-zero.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cleangpt_jax.cli import die, flag_error, flags_parser

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for stage checkpoints, metrics and the student.")


def main(argv):
    if len(argv) > 1:
        die(f"unexpected arguments {argv[1:]}: flags look like --config=FILE "
            f"--config.distill.teacher=DIR --workdir=DIR", 2)
    if not _WORKDIR.value:
        die("--workdir is required: the directory for the stages and the distilled student", 2)
    try:
        config = flags.FLAGS.config
        config.get("distill")  # a config file that failed to load raises here
    except (IOError, OSError) as e:
        die(f"cannot load --config: {e.__cause__ or e}", 2)
    if "distill" not in config:
        die("the config has no `distill` section: start it from "
            "cleangpt_jax.distill.config.get_config()", 2)
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)

    from cleangpt_jax.distill import runner  # after flags: keeps --help fast

    try:
        summary = runner.run(config, _WORKDIR.value)
    except KeyboardInterrupt as e:
        print(f"Interrupted: {e}" if str(e) else "Interrupted.", file=sys.stderr, flush=True)
        sys.exit(130)
    except ValueError as e:  # ConfigError, DataError, HFError, DistillError, CheckpointError...
        die(e)
    for info in summary["stages"]:
        first, final = info["first_loss"], info["final_loss"]
        print(f"{info['name']:>10}: loss {first:.4f} -> {final:.4f}" if first is not None
              else f"{info['name']:>10}: done")
    t, st = summary["teacher_val"], summary["student_val"]
    if st is not None:
        print(f"validation perplexity: teacher {t['val_ppl']:.3f}, student {st['val_ppl']:.3f}")
    print(f"Student written to {summary['workdir']} (generate / evaluate take --workdir).")


def run():
    try:
        config_flags.DEFINE_config_file(
            "config", _DEFAULT, "Distillation config file (get_config()); override keys with "
            "--config.distill.key=value.", lock_config=True)
    except Exception as e:  # noqa: BLE001 -- a bad --config.x=y override
        flag_error(e)
    app.run(main, flags_parser=flags_parser())


if __name__ == "__main__":
    run()
