"""Where the log records go: `train.loggers`, any of 'jsonl', 'tensorboard', 'wandb'.

    train.loggers = "jsonl,tensorboard"          (the default; "jsonl,tensorboard,wandb" adds W&B)

jsonl        WORKDIR/metrics.jsonl (what `evaluate`, the plots and a resume's bookkeeping read)
tensorboard  WORKDIR/events.out.tfevents.* (`pip install -e ".[tensorboard]"`, then
             `tensorboard --logdir runs`)
wandb        Weights & Biases (`pip install -e ".[wandb]"`): one W&B run per workdir, in project
             train.wandb_project, with the run's resolved config. Its id is kept in
             WORKDIR/wandb_run_id.txt, so a resumed run continues the same W&B run
             (resume='allow'); its local files go to WORKDIR/wandb/. WANDB_MODE=offline keeps
             everything local (`wandb sync WORKDIR/wandb/offline-run-*` uploads it later).
             Steps a resumed run repeats (those past its last checkpoint) are not logged to W&B
             twice: W&B keeps a run's first record of a step.
"""

from __future__ import annotations

import math
import os
import secrets

from cleangpt_jax.config import ConfigError

LOGGERS = ("jsonl", "tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id.txt"


def parse_loggers(setting) -> tuple[str, ...]:
    """The loggers of 'a,b' (or a sequence), validated; ConfigError for an unknown name."""
    names = setting.split(",") if isinstance(setting, str) else list(setting or ())
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"unknown train.loggers {unknown}: choose any of {LOGGERS}, "
                          f"comma-separated (e.g. --config.train.loggers=jsonl,tensorboard)")
    return names


class WandbLogger:
    """Scalars of every record to one W&B run per workdir (see the module docstring)."""

    def __init__(self, workdir: str, *, config=None, project: str | None = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.loggers has 'wandb' but wandb is not installed: "
                              "pip install -e '.[wandb]', or drop wandb from train.loggers"
                              ) from None
        from cleangpt_jax.workdir import write_atomically

        path = os.path.join(workdir, WANDB_ID_FILE)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: letters and digits
            write_atomically(path, run_id + "\n")
        settings = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        self.run = wandb.init(project=project or "cleangpt_jax", dir=workdir, id=run_id,
                              resume="allow", name=os.path.basename(os.path.normpath(workdir)),
                              config=settings)
        self.id = run_id

    def write(self, step: int, record: dict) -> None:
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if scalars:
            self.run.log(scalars, step=int(step))

    def close(self) -> None:
        self.run.finish()
