"""python -m cleangpt_jax.distill --config=configs/distill_shakespeare_offline.py --workdir=DIR

Distils the teacher named by `distill.teacher` into the student of the `model` section, stage
by stage; rerunning the same command resumes where it stopped (completed stages are skipped,
the current one continues from its last checkpoint). Ctrl-C / SIGTERM save and stop with exit
status 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as `train` does. Without
--config the default is cleangpt_jax/distill/config.py (GPT-2 from the hub into a 6-block
Token-Factored student). Errors print one line and exit non-zero.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from cleangpt_jax import cli

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
    """--workdir and --config, defaulting to cleangpt_jax/distill/config.py (see `cli.run`)."""
    flags.DEFINE_string("workdir", None,
                        "Directory for stage checkpoints, metrics and the student.",
                        flag_values=flag_values)
    return config_flags.DEFINE_config_file(
        "config", _DEFAULT, "Distillation config file (get_config()); override keys with "
        "--config.distill.key=value.", lock_config=True, flag_values=flag_values)


@cli.tool(usage="--config=FILE --config.distill.teacher=DIR --workdir=DIR")
def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    if not flag_values.workdir:
        cli.die("--workdir is required: the directory for the stages and the distilled "
                "student", 2)
    config = cli.config_flag_value(flag_values=flag_values)
    if "distill" not in config:
        cli.die("the config has no `distill` section: start it from "
                "cleangpt_jax.distill.config.get_config()", 2)

    from cleangpt_jax import loop  # after flags: keeps --help fast
    from cleangpt_jax.distill import runner

    try:
        summary = runner.run(config, flag_values.workdir)
    except KeyboardInterrupt as e:
        print(f"Interrupted: {e}" if str(e) else "Interrupted.", file=sys.stderr, flush=True)
        sys.exit(loop.exit_status(getattr(e, "signum", None)))
    for info in summary["stages"]:
        first, final = info["first_loss"], info["final_loss"]
        print(f"{info['name']:>10}: loss {first:.4f} -> {final:.4f}" if first is not None
              else f"{info['name']:>10}: done")
    t, st = summary["teacher_val"], summary["student_val"]
    if st is not None:
        print(f"validation perplexity: teacher {t['val_ppl']:.3f}, student {st['val_ppl']:.3f} "
              f"(over {st['val_tokens']} tokens of the validation split)")
    print(f"Student written to {summary['workdir']} (generate / evaluate take --workdir).")


def run(flag_values: flags.FlagValues | None = None):
    cli.run(main, define_flags=define_flags, flag_values=flag_values)


if __name__ == "__main__":
    run()
