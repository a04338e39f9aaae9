"""How a distillation run's trainable tree starts: {'student': params, 'stitch': {...}}.

    tree = init_tree(setup, seed)                 # the student as `train` would initialise it,
                                                  # plus the stitching layers (one program)
    tree = init_head_from_teacher(setup, tree)    # before the head stage: lm_head from W_t

With distill.init_from_teacher the student's blocks, embeddings, ln_f and head are copied
from the teacher first (DistilGPT2's initialisation; `check_copyable` says up front whether
they fit). `setup` is a `runner.Setup`: the student and teacher modules, the teacher's
parameters, the config and the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from cleangpt_jax import sharding, train_step
from cleangpt_jax.config import ConfigError
from cleangpt_jax.distill import plan as plan_lib
from cleangpt_jax.distill.stitching import init_stitching, stitch_name

STITCH_SEED_SALT = 2


def init_tree(s, seed: int):
    """{'student': params, 'stitch': {'stitch_k': ...}} at initialisation, one compiled call.
    The student gets the parameters `python -m cleangpt_jax.train` gives it with this seed."""
    c = s.student.config
    init_student = train_step.model_init_fn(s.student)

    def init(seed_key):  # (the key is an argument: every seed shares the program)
        tree = {"student": init_student(train_step.params_key(seed_key))}
        if s.config.distill.stitching and s.config.distill.block_stages:
            key = jax.random.fold_in(seed_key, STITCH_SEED_SALT)
            tree["stitch"] = init_stitching(key, c.n_layer, c.n_embd, s.teacher.config.n_embd,
                                            s.config.distill.stitching_bias)
        return tree

    seed_key = jax.random.key(seed)
    shapes = jax.eval_shape(init, seed_key)
    tree = jax.jit(init, out_shardings=sharding.state_shardings(shapes, s.mesh))(seed_key)
    if s.config.distill.init_from_teacher:
        tree = init_from_teacher_blocks(s, tree)
    return tree


def _leaf_shapes(model) -> dict:
    """{leaf path: shape} of `model`'s parameters (traced, nothing allocated)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    return {p: x.shape for p, x in traverse_util.flatten_dict(shapes["params"]).items()}


def check_copyable(student, teacher) -> None:
    """distill.init_from_teacher needs every student leaf outside the head to exist in the
    teacher with the same shape (same architecture and width, fewer or equal blocks, a context
    no longer than the teacher's), and the same activation and LayerNorm."""
    s, t = _leaf_shapes(student), _leaf_shapes(teacher)
    def fits(path, shape):  # a shorter context takes the teacher's first position rows
        theirs = t.get(path)
        return theirs == shape or (path[0] == "wpe" and theirs is not None
                                   and theirs[1:] == shape[1:] and theirs[0] >= shape[0])

    missing = [p for p, shape in s.items() if p[0] != "lm_head" and not fits(p, shape)]
    for key in ("model_type", "activation", "layer_norm_epsilon", "position_encoding"):
        mine, theirs = getattr(student.config, key), getattr(teacher.config, key)
        if mine != theirs:
            raise ConfigError(f"distill.init_from_teacher copies teacher blocks, but the "
                              f"student's model.{key}={mine!r} is not the teacher's {theirs!r}: "
                              f"set model.{key}={theirs!r} or init_from_teacher=False")
    if missing:
        raise ConfigError(f"distill.init_from_teacher copies teacher blocks into the student, "
                          f"but the student's {'/'.join(missing[0])} has no teacher leaf of its "
                          f"shape: give the student the teacher's architecture and width "
                          f"(model_type, n_embd, n_head, bias) or set init_from_teacher=False")


def init_from_teacher_blocks(s, tree):
    """DistilGPT2's initialisation: student block k <- teacher block map(k) (distill.layer_map),
    and the embeddings (wpe: its first block_size rows), ln_f and the head <- the teacher's.
    Fresh buffers (donated later)."""
    student = traverse_util.flatten_dict(tree["student"])
    teacher = traverse_util.flatten_dict(s.teacher_params)
    mapping = plan_lib.layer_map(s.config.distill.layer_map, s.student.config.n_layer,
                                 s.teacher.config.n_layer)
    for path, leaf in student.items():
        top = path[0]
        if top.startswith("h_"):
            source = (f"h_{mapping[int(top[2:])] - 1}",) + path[1:]
        elif top == "lm_head":
            source = ("lm_head",) if ("lm_head",) in teacher else ("wte", "embedding")
        else:
            source = path
        student[path] = jnp.array(teacher[source][:leaf.shape[0]], leaf.dtype, copy=True)
    return dict(tree, student=traverse_util.unflatten_dict(student))


def init_head_from_teacher(s, tree):
    """lm_head (and ln_f at equal width) from the teacher: copies at equal widths, otherwise
    W_s = W_t K^T with K (d_s, d_t) the last stitching layer's kernel (h_t ~ h_s K), which
    maps the student's final hidden state into the space the teacher's head reads. With
    distill.head.fold_ln_scale the teacher's final LayerNorm scale g_t is folded in,
    W_s = W_t diag(g_t) K^T: the teacher's logits are (g_t * n(h_t) + b_t) W_t^T, so its head
    reads the normalised state through g_t (b_t and the stitching bias are dropped)."""
    student = dict(tree["student"])
    if "lm_head" not in student:
        return tree
    w_t = s.teacher_params["wte"]["embedding"]
    dtype = student["lm_head"].dtype
    if s.student.config.n_embd == s.teacher.config.n_embd:
        # Fresh buffers: these leaves are donated by the head step, the teacher's are not.
        student["lm_head"] = jnp.array(w_t, dtype, copy=True)
        if "ln_f" in student:
            student["ln_f"] = {k: jnp.array(s.teacher_params["ln_f"][k], v.dtype, copy=True)
                               for k, v in student["ln_f"].items()}
    else:
        kernel = tree["stitch"][stitch_name(s.student.config.n_layer)]["kernel"]
        w = w_t.astype(jnp.float32)
        if s.config.distill.head.fold_ln_scale and "scale" in s.teacher_params.get("ln_f", {}):
            w = w * s.teacher_params["ln_f"]["scale"].astype(jnp.float32)  # W_t diag(g_t)
        student["lm_head"] = (w @ kernel.T).astype(dtype)
    return dict(tree, student=student)
