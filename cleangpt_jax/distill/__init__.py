"""Block-by-block distillation of a GPT-2 teacher into any student (docs/distillation.md).

    python -m cleangpt_jax.distill --config=configs/distill_shakespeare_offline.py --workdir=DIR

    from cleangpt_jax import distill
    summary = distill.run(config, workdir)          # every stage, resumable; the final student

`plan` decides what each stage trains, for how long, against which teacher layer; `losses`
holds the loss registry (add one with `register_loss` and name it in the config); `stitching`
the stitching layers; `student_init` how the student and stitching layers start (DistilGPT2's
copy, the head from the teacher's); `stage_step` one stage's compiled update; `runner` the run:
setup and the stage loop with resume; `records` what it leaves on disk (per-stage Orbax checkpoints, the
manifest and plan, the final student written as a model workdir).
"""

from cleangpt_jax.distill.losses import LOSSES, distillation_loss, get_loss, register_loss
from cleangpt_jax.distill.plan import Stage, build_stages, layer_map
from cleangpt_jax.distill.stitching import Stitch, apply_stitch, init_stitching

_RECORDS = ("layer_map_from_config", "load_stitching")


def __getattr__(name):
    # The runner and its records pull in the data and HF stacks; import them when asked for.
    if name in _RECORDS:
        from cleangpt_jax.distill import records

        return getattr(records, name)
    if name == "run":
        from cleangpt_jax.distill import runner

        return runner.run
    raise AttributeError(name)


__all__ = ["LOSSES", "Stage", "Stitch", "apply_stitch", "build_stages",
           "distillation_loss", "get_loss", "init_stitching", "layer_map",
           "layer_map_from_config", "load_stitching", "register_loss", "run"]
