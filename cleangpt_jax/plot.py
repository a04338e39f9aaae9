"""Pictures of runs: loss and learning-rate curves read from WORKDIR/metrics.jsonl.

    python -m cleangpt_jax.plot --workdir=runs/distill --workdir=runs/scratch --out=cmp.png

    write_curves(workdir)          WORKDIR/curves.png, drawn at the end of `train` and `distill`
    figure = draw([load(a), load(b)])       several runs on the same axes

The figure's first row holds two panels over the (global) optimizer step:
    language-model loss   train_loss (solid), val_loss (dashed, dots) in nats per token; a
                          distillation's final student as a star (its val_loss), its teacher
                          as a dotted horizontal line (log of teacher_val_ppl)
    learning rate         `lr` of every record (a distillation restarts it in every stage)
and, when a distillation is drawn (unless --nostages), one panel per stage below them:
`distill_loss` against the stage's own step, on a log scale when it spans more than 5x (a
hidden-state loss can fall by orders of magnitude; the LM loss panel takes one past 20x). Each
run has one colour, named in the legend by its workdir, model shape and method.

matplotlib is imported only when a figure is drawn (the Agg canvas, no pyplot state), so the
training path does not load it at start-up. Every PNG is written by `save_png`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys

from absl import flags

from cleangpt_jax import cli, storage
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ConfigError

CURVES_FILE = "curves.png"
_STAGE_COLUMNS = 4  # stage panels per row


@dataclasses.dataclass
class RunCurves:
    """One workdir's records, split by what they hold (each a list of metrics.jsonl dicts)."""

    workdir: str
    label: str          # 'name: vanilla 4x128, trained' (legend text)
    train: list[dict]   # records with train_loss
    val: list[dict]     # training evaluations: val_loss, no stage
    stages: dict[str, list[dict]]   # distillation: stage name -> its distill_loss records
    stage_titles: dict[str, tuple[str, str]]  # stage name -> (title, y label)
    student: dict | None  # a distillation's final-student record (stage 'student')
    lr: list[dict]      # every record with lr, in step order


# --------------------------------------------------------------------------------- reading
def _read_records(workdir: str) -> list[dict]:
    """metrics.jsonl's records; ConfigError (one line, with the fix) for a missing workdir,
    a workdir without metrics.jsonl, a line that is not a JSON object with a step."""
    if not storage.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is not a directory: pass a training or "
                          f"distillation workdir")
    path = storage.join(workdir, workdir_lib.METRICS_FILE)
    if not storage.isfile(path):
        raise ConfigError(f"--workdir={workdir} has no {workdir_lib.METRICS_FILE}: it is not a "
                          f"run's workdir, or the run has not logged a step yet")
    records = []
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n} is not JSON ({e}): the file is damaged; "
                              f"remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ConfigError(f"{path} line {n} is not a metrics record (an object with an "
                              f"integer step): remove that line")
        records.append(record)
    return records


def _json(path: str) -> dict:
    if not storage.isfile(path):
        return {}
    try:
        value = json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _label(workdir: str, config: dict, plan: dict, kind: str | None) -> str:
    """'<workdir name>: <model_type> <n_layer>x<n_embd>, <method>'."""
    name = storage.basename(workdir)
    model = config.get("model") or plan.get("student") or {}
    shape = (f"{model.get('model_type', '?')} {model.get('n_layer', '?')}x"
             f"{model.get('n_embd', '?')}" if model else "")
    distill = config.get("distill") or plan.get("distill") or {}
    if kind == "distill" or distill:
        teacher = str(distill.get("teacher", "?")).rstrip("/")
        method = f"distilled from {os.path.basename(teacher) or teacher}"
    else:
        strategy = (config.get("train") or {}).get("strategy", "lm")
        method = "trained" if strategy == "lm" else f"trained ({strategy})"
    return f"{name}: " + ", ".join(p for p in (shape, method) if p)


def _stage_title(name: str, stage: dict, distill: dict) -> tuple[str, str]:
    """(panel title, y label) of a distillation stage from its plan entry and the settings."""
    kind = stage.get("kind") or ("block" if name.startswith("block") else name)
    if kind == "block":
        target = stage.get("teacher_layer")
        title = f"{name}: hidden state" + (f" vs teacher block {target}" if target else "")
        return title, f"hidden {distill.get('hidden_loss', 'distillation')} loss"
    sub = distill.get(kind) or {}
    loss = sub.get("logit_loss", "logit")
    temperature = f", T={sub['temperature']:g}" if "temperature" in sub else ""
    lm = sub.get("lm_weight")
    extra = f" + {lm:g} x LM" if lm else ""
    units = " (nats/token)" if loss in ("kl_div", "ce") else ""
    return f"{name}: logits{temperature}", f"{loss}{extra}{units}"


def load(workdir: str) -> RunCurves:
    """A workdir's curves: its metrics.jsonl split into training, evaluation, per-stage and
    final-student records, with a legend label from config.json (or, while a distillation
    runs, its stages/plan.json). ConfigError when there is nothing to draw."""
    from cleangpt_jax.distill.records import PLAN_FILE, stages_dir

    records = _read_records(workdir)
    config = _json(storage.join(workdir, workdir_lib.CONFIG_FILE))
    plan = _json(storage.join(stages_dir(workdir), PLAN_FILE))
    distill = config.get("distill") or plan.get("distill") or {}
    plan_stages = {st.get("name"): st for st in plan.get("stages", []) if isinstance(st, dict)}
    curves = RunCurves(workdir=workdir, label=_label(workdir, config, plan,
                                                     workdir_lib.run_kind(workdir)),
                       train=[], val=[], stages={}, stage_titles={}, student=None, lr=[])
    for r in sorted(records, key=lambda r: r["step"]):
        stage = r.get("stage")
        if stage == "student":
            curves.student = r
        elif stage is not None and _finite(r.get("distill_loss")):
            curves.stages.setdefault(stage, []).append(r)
            if stage not in curves.stage_titles:
                curves.stage_titles[stage] = _stage_title(stage, plan_stages.get(stage, {}),
                                                          distill)
        else:  # (one record may hold both)
            if _finite(r.get("train_loss")):
                curves.train.append(r)
            if _finite(r.get("val_loss")):
                curves.val.append(r)
        if _finite(r.get("lr")):
            curves.lr.append(r)
    if not (curves.train or curves.val or curves.stages or curves.student):
        raise ConfigError(f"{storage.join(workdir, workdir_lib.METRICS_FILE)} holds no loss "
                          f"records (train_loss, val_loss or distill_loss): nothing to draw")
    return curves


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------------- drawing
def _series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pairs = [(r[x], r[key]) for r in records if _finite(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _log_if_wide(ax, values: list[float], ratio: float = 20.0) -> None:
    """A log y axis when the positive values span more than `ratio` (a loss falling by orders
    of magnitude); linear otherwise."""
    values = [v for v in values if v > 0]
    if values and max(values) / min(values) > ratio:
        ax.set_yscale("log")


def draw(runs: list[RunCurves], *, stages: bool = True):
    """The figure of `runs` (one colour each): the language-model loss and learning-rate
    panels, then (with `stages`) one panel per distillation stage when any run has stages."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global state
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    stage_names = []
    for run in runs if stages else ():
        stage_names += [s for s in run.stages if s not in stage_names]
    columns = max(2, min(_STAGE_COLUMNS, len(stage_names)))
    rows = 1 + math.ceil(len(stage_names) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * rows + 0.4 * len(runs)), layout="constrained")
    grid = fig.add_gridspec(rows, columns * 2)  # the top row's two panels share it evenly
    ax_loss = fig.add_subplot(grid[0, :columns])
    ax_lr = fig.add_subplot(grid[0, columns:])
    stage_axes = {name: fig.add_subplot(grid[1 + i // columns,
                                             2 * (i % columns):2 * (i % columns) + 2])
                  for i, name in enumerate(stage_names)}
    colours = [f"C{i % 10}" for i in range(len(runs))]
    lm_values, styles = [], {}

    for run, colour in zip(runs, colours):
        x, y = _series(run.train, "train_loss")
        if y:
            ax_loss.plot(x, y, color=colour, lw=1.4)
            lm_values += y
            styles["train loss"] = Line2D([], [], color="0.3", lw=1.4)
        x, y = _series(run.val, "val_loss")
        if y:
            ax_loss.plot(x, y, color=colour, ls="--", marker="o", ms=3.5, lw=1.2)
            lm_values += y
            styles["validation loss"] = Line2D([], [], color="0.3", ls="--", marker="o", ms=3.5)
        s = run.student
        if s is not None and _finite(s.get("val_loss")):
            ax_loss.plot([s["step"]], [s["val_loss"]], color=colour, marker="*", ms=13, ls="")
            ax_loss.annotate(f"{s['val_loss']:.3f}", (s["step"], s["val_loss"]),
                             textcoords="offset points", xytext=(-8, -4), ha="right", va="top",
                             fontsize=8, color=colour)
            lm_values.append(s["val_loss"])
            styles["distilled student, validation"] = Line2D([], [], color="0.3", marker="*",
                                                              ms=11, ls="")
            if _finite(s.get("teacher_val_ppl")) and s["teacher_val_ppl"] > 0:
                teacher = math.log(s["teacher_val_ppl"])
                ax_loss.axhline(teacher, color=colour, ls=":", lw=1.2)
                lm_values.append(teacher)
                styles["teacher, validation"] = Line2D([], [], color="0.3", ls=":")
        x, y = _series(run.lr, "lr")
        ax_lr.plot(x, y, color=colour, lw=1.4)
        for name, records in run.stages.items() if stages else ():
            ax = stage_axes[name]
            x, y = _series(records, "distill_loss", x="stage_step")
            ax.plot(x, y, color=colour, lw=1.4)

    ax_loss.set(title="Language-model loss", xlabel="step", ylabel="loss (nats/token)")
    if not lm_values:
        ax_loss.text(0.5, 0.5, "no language-model loss recorded", ha="center", va="center",
                     transform=ax_loss.transAxes, color="0.4")
    _log_if_wide(ax_loss, lm_values)
    if styles:
        ax_loss.legend(handles=list(styles.values()), labels=list(styles), fontsize=8,
                       loc="best")
    ax_lr.set(title="Learning rate", xlabel="step", ylabel="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (ax_loss, ax_lr):
        ax.set_xlim(left=0)  # a distillation's lone final point still shows where training starts
    titles = {}
    for run in runs:
        for name, t in run.stage_titles.items():
            titles.setdefault(name, t)
    for name, ax in stage_axes.items():
        title, ylabel = titles[name]
        ax.set(title=title, xlabel="stage step", ylabel=ylabel)
        _log_if_wide(ax, [v for line in ax.get_lines() for v in line.get_ydata()], ratio=5.0)
    for ax in (ax_loss, ax_lr, *stage_axes.values()):
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    fig.legend(handles=[Line2D([], [], color=c, lw=2) for c in colours],
               labels=[run.label for run in runs], loc="outside upper center",
               ncols=1 if len(runs) > 2 else len(runs), fontsize=9, frameon=False)
    return fig


def save_png(fig, path: str) -> str:
    """Write `fig` as a PNG at `path`, a local path or a URL (its directory created); returns
    `path`. The one place a picture of a run reaches storage."""
    if storage.parent(path):
        storage.makedirs(storage.parent(path))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    storage.write_bytes(path, buffer.getvalue())
    return path


def write_curves(workdir: str) -> str | None:
    """WORKDIR/curves.png of the run's metrics.jsonl on process 0 (None elsewhere, and when
    the run logged nothing to draw)."""
    if not workdir_lib.is_writer():
        return None
    try:
        curves = load(workdir)
    except ConfigError:  # no record yet: a run stopped before its first log
        return None
    return save_png(draw([curves]), storage.join(workdir, CURVES_FILE))


# ------------------------------------------------------------------------------------- CLI
def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
    d = {"flag_values": flag_values}
    flags.DEFINE_multi_string("workdir", None, "A training or distillation workdir; repeat the "
                              "flag to draw several runs on the same axes.", **d)
    flags.DEFINE_boolean("stages", True, "One panel per distillation stage under the loss and "
                         "learning-rate panels (--nostages: those two only).", **d)
    flags.DEFINE_string("out", None, "The PNG to write (default: WORKDIR/curves.png for one "
                        "workdir, curves.png in the current directory for several).", **d)


@cli.tool(usage="--workdir=runs/a --workdir=runs/b --out=cmp.png")
def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    workdirs = flag_values.workdir or []
    if not workdirs:
        cli.die("--workdir is required: a training or distillation workdir (repeat it to "
                "compare runs)", 2)
    out = flag_values.out or (storage.join(workdirs[0], CURVES_FILE) if len(workdirs) == 1
                              else CURVES_FILE)
    if not out.lower().endswith(".png"):
        cli.die(f"--out={out} must name a .png file", 2)
    if storage.isdir(out):
        cli.die(f"--out={out} is a directory: name a .png file", 2)
    runs = [load(w) for w in workdirs]
    print(save_png(draw(runs, stages=flag_values.stages), out), file=sys.stdout, flush=True)


def run(flag_values: flags.FlagValues | None = None):
    cli.run(main, define_flags=define_flags, flag_values=flag_values)


if __name__ == "__main__":
    run()
