"""What each distillation stage trains, for how long, against which teacher layer.

Stages, in order (docs/distillation.md, "The stages"):
    block_k, k = 1..L_s   student block k + stitch_k (+ wte/wpe at k = 1; + all earlier blocks
                          and the embeddings when freeze_previous_blocks is False), against
                          teacher hidden state map(k); skipped with distill.block_stages False
    head                  ln_f + the output head (an untied lm_head unless distill.head.untie
                          is False, in which case the tied wte is the head and moves)
    final                 every student parameter, logit KD + LM loss (DistilGPT2's recipe)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from cleangpt_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str                 # 'block_<k>' | 'head' | 'final'
    kind: str                 # 'block' | 'head' | 'final'
    steps: int
    learning_rate: float
    weight_decay: float
    grad_clip: float | None
    block: int | None = None  # student block k, 1-based
    teacher_layer: int | None = None


def layer_map(spec: str | Sequence[int], n_student: int, n_teacher: int) -> list[int]:
    """Teacher hidden-state index (1-based block) for student blocks 1..L_s.

    'uniform' spreads the student over the teacher: map(k) = round(k * L_t / L_s), so 12 -> 6
    gives 2, 4, ..., 12 and the last student block always matches the last teacher block.
    """
    if n_student > n_teacher:
        raise ConfigError(f"the student has {n_student} blocks but the teacher only "
                          f"{n_teacher}: use model.n_layer <= {n_teacher}")
    if isinstance(spec, str):
        if spec != "uniform":
            raise ConfigError(f"distill.layer_map must be 'uniform' or a list of teacher block "
                              f"indices, got {spec!r}")
        return [round(k * n_teacher / n_student) for k in range(1, n_student + 1)]
    mapping = [int(x) for x in spec]
    if len(mapping) != n_student:
        raise ConfigError(f"distill.layer_map has {len(mapping)} entries for {n_student} student "
                          f"blocks: give one teacher block (1..{n_teacher}) per student block")
    if any(not 1 <= m <= n_teacher for m in mapping):
        raise ConfigError(f"distill.layer_map {mapping} is out of range: teacher blocks are "
                          f"numbered 1..{n_teacher}")
    if any(b <= a for a, b in zip(mapping, mapping[1:])):
        raise ConfigError(f"distill.layer_map {mapping} must be strictly increasing")
    return mapping


def per_block(value: Any, n_blocks: int, key: str) -> list:
    """One value for every block, or a list with one value per block (as the original allowed)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_blocks:
            raise ConfigError(f"distill.{key} has {len(value)} values for {n_blocks} blocks: "
                              f"give one value or one per block")
        return list(value)
    return [value] * n_blocks


def _steps(steps, epochs, steps_per_epoch: int | None, key: str) -> int:
    """A stage's optimizer steps: `epochs` passes over the training data when set."""
    if epochs is None:
        return int(steps)
    if steps_per_epoch is None:
        raise ConfigError(f"distill.{key} needs the training data's size (steps_per_epoch)")
    if float(epochs) <= 0:
        raise ConfigError(f"distill.{key} must be positive, got {epochs}")
    return max(1, round(float(epochs) * steps_per_epoch))


def build_stages(distill_cfg, n_student: int, n_teacher: int,
                 steps_per_epoch: int | None = None) -> list[Stage]:
    """The stages of a run, in order; every list-valued setting is checked against L_s."""
    d = distill_cfg
    stages = []
    if d.block_stages:
        mapping = layer_map(d.layer_map, n_student, n_teacher)
        epochs = per_block(d.epochs_per_block, n_student, "epochs_per_block")
        steps = per_block(d.steps_per_block, n_student, "steps_per_block")
        lrs = per_block(d.learning_rate, n_student, "learning_rate")
        wds = per_block(d.weight_decay, n_student, "weight_decay")
        clips = per_block(d.grad_clip, n_student, "grad_clip")
        stages = [Stage(f"block_{k}", "block",
                        _steps(steps[k - 1], epochs[k - 1], steps_per_epoch, "epochs_per_block"),
                        float(lrs[k - 1]), float(wds[k - 1]), clips[k - 1], block=k,
                        teacher_layer=mapping[k - 1])
                  for k in range(1, n_student + 1)]
    for name in ("head", "final"):
        s = d[name]
        if s.enabled:
            steps = _steps(s.steps, s.epochs, steps_per_epoch, f"{name}.epochs")
            stages.append(Stage(name, name, steps, float(s.learning_rate),
                                float(s.weight_decay), s.grad_clip))
    if not stages:
        raise ConfigError("no stage to run: distill.block_stages, distill.head.enabled and "
                          "distill.final.enabled are all off")
    for s in stages:
        if s.steps <= 0:
            raise ConfigError(f"stage {s.name} has {s.steps} steps: every enabled stage needs "
                              f"at least one step")
        if not s.learning_rate > 0:
            raise ConfigError(f"stage {s.name} has learning rate {s.learning_rate}: it must be "
                              f"positive")
    return stages


def is_trainable(stage: Stage, path: tuple[str, ...], *, freeze_previous_blocks: bool,
                 tie_embeddings: bool) -> bool:
    """Whether the leaf at `path` ('student'|'stitch', ...) is trained in `stage`."""
    group, top = path[0], path[1]
    if stage.kind == "block":
        k = stage.block
        if group == "stitch":
            return top == f"stitch_{k}"
        if top == f"h_{k - 1}":
            return True
        if top in ("wte", "wpe"):
            return k == 1 or not freeze_previous_blocks
        if top.startswith("h_") and not freeze_previous_blocks:
            return int(top[2:]) < k - 1
        return False
    if group == "stitch":
        return False
    if stage.kind == "head":
        head = "wte" if tie_embeddings else "lm_head"
        return top in ("ln_f", head)
    return True  # final: the whole student
