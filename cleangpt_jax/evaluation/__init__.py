"""Evaluate a trained model, or a student against its teacher, on one token stream.

    python -m cleangpt_jax.evaluate --workdir=runs/distill --teacher=gpt2     # the CLI
    summary = evaluate_workdir("runs/distill", teacher="gpt2")                 # the same call

    student = load_lm("runs/x", kind="workdir")          # cleangpt_jax.loading
    teacher = load_lm("gpt2")
    result = metrics.compare(student, teacher, batches, layer_map=[2, 4, 6], stitching=None)

The package: `metrics` (perplexity, hidden states, generations: what each number means),
`report` (summary.json, report.md, the plots: what each key holds) and, here, the whole run
over a workdir, configured by the `eval` section (`get_eval_config`).

Batches are the stream's non-overlapping windows of T tokens (`data.eval_batches`),
so the first token of each window is context only. Prompts are windows of the evaluation
stream, or `eval.prompts`. Outputs go to the output directory (default WORKDIR/eval).
"""

from __future__ import annotations


import jax
import ml_collections

from cleangpt_jax import storage
from cleangpt_jax.config import ConfigError
from cleangpt_jax.evaluation import metrics, report
from cleangpt_jax.loading import LM, load_lm


def get_eval_config() -> ml_collections.ConfigDict:
    """The `eval` section: what `python -m cleangpt_jax.evaluate` measures and how.

    Override with --config.eval.key=value (the data section with --config.data.key=value).
    """
    e = ml_collections.ConfigDict()
    e.split = "val"  # 'val' | 'train': which token stream of the data section to score
    e.batch_size = 8  # global: rows per batch, a multiple of the device count
    e.num_batches = ml_collections.FieldReference(None, field_type=int)  # None: the whole split
    # Window length T; None: the student's block_size (capped by the teacher's positions).
    e.block_size = ml_collections.FieldReference(None, field_type=int)
    e.prompts = ()  # explicit prompts; empty: num_prompts windows of the evaluation stream
    e.num_prompts = 3
    e.prompt_tokens = 20
    e.max_new_tokens = 50  # 0 = no generation comparison
    e.temperature = 0.8  # the sampled comparison (the greedy one uses temperature 0)
    e.top_k = 50  # 0 = off
    e.top_p = ml_collections.FieldReference(None, field_type=float)
    e.seed = 0
    return e


def _apply_data_overrides(config, overrides: dict | None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in (overrides or {}).items():
        key = key.removeprefix("data.")
        if key not in config.data:
            raise ConfigError(f"unknown data key {key!r}: the run's data section has "
                              f"{sorted(config.data)}")
        config.data[key] = value
    return config


def _check_eval_config(e, student: LM, teacher: LM | None) -> int:
    """The window length, after checking the eval section against the models."""
    if e.split not in ("val", "train"):
        raise ConfigError(f"eval.split must be 'val' or 'train', got {e.split!r}")
    limit = min(m.config.max_position_embeddings for m in (student, teacher) if m is not None)
    block = int(e.block_size or min(student.config.block_size, limit))
    if not 2 <= block <= limit:
        raise ConfigError(f"eval.block_size={block} must be in [2, {limit}] (the positions "
                          f"the models accept)")
    if e.num_batches is not None and e.num_batches <= 0:
        raise ConfigError(f"eval.num_batches must be positive or None, got {e.num_batches}")
    if e.max_new_tokens < 0:
        raise ConfigError(f"eval.max_new_tokens must be >= 0, got {e.max_new_tokens}")
    return block


def evaluate_workdir(workdir: str, *, teacher: str | None = None, data: dict | None = None,
                     eval_config: ml_collections.ConfigDict | None = None,
                     output_dir: str | None = None, step: int | None = None) -> dict:
    """Evaluate the run in `workdir` (against `teacher`) and write the outputs; returns the summary.

    `data`: overrides of the run's data section ({key: value}); `eval_config`: the eval section
    (`get_eval_config()` by default). The teacher defaults to the run's `distill.teacher`;
    teacher='none' evaluates the student alone.
    """
    from cleangpt_jax import data as data_lib, sharding
    from cleangpt_jax.workdir import is_writer

    e = eval_config if eval_config is not None else get_eval_config()
    mesh = sharding.create_mesh()
    student = load_lm(workdir, step=step, mesh=mesh, kind="workdir")
    config = _apply_data_overrides(student.run_config, data)
    if teacher is None and config.get("distill") is not None:
        teacher = config.distill.get("teacher")
    if teacher is not None and str(teacher).lower() in ("", "none"):
        teacher = None
    t_lm = None
    if teacher is not None:
        t_lm = load_lm(teacher, mesh=mesh, fallback_tokenizer=student.tokenizer)
        metrics.check_teacher(student, t_lm)  # before any data work: a wrong teacher fails now
    block = _check_eval_config(e, student, t_lm)
    n_devices = mesh.devices.size
    if e.batch_size <= 0 or e.batch_size % n_devices:
        raise ConfigError(f"eval.batch_size={e.batch_size} must be a positive multiple of the "
                          f"device count {n_devices} (each device scores whole rows)")

    with config.unlocked():
        config.model.block_size = block  # load_dataset checks that the stream holds one window
    token_data = data_lib.load_dataset(config, student.tokenizer)
    tokens = token_data.val if e.split == "val" else token_data.train
    if tokens is None:
        raise ConfigError("the data has no validation split (data.val_fraction=0 and no "
                          "data.val_split): set one, or pass --config.eval.split=train")
    batches = data_lib.eval_batches(
        tokens, global_batch_size=int(e.batch_size), block_size=block,
        num_batches=e.num_batches, process_index=jax.process_index(),
        process_count=jax.process_count())
    separator = data_lib.document_separator_id(config.data, student.tokenizer)
    batches = [data_lib.with_segment_ids(b, separator) for b in batches]
    first_stream = getattr(tokens, "streams", (tokens,))[0]  # a Mixture's first source

    layers, layers_note = None, None
    if t_lm is None:
        ppl = metrics.perplexity(student.model, student.params, batches, mesh=mesh)
        result = {"loss": {"student": ppl["loss"], "teacher": None},
                  "perplexity": {"student": ppl["perplexity"], "teacher": None, "ratio": None},
                  "tokens": ppl["tokens"]}
    else:
        real_text = student.tokenizer.decode(first_stream[:256])
        metrics.check_teacher(student, t_lm, real_text)
        from cleangpt_jax.distill import load_stitching

        layer_map, stitching, layers_note = metrics.layer_plan(student, t_lm, config,
                                                               load_stitching(workdir))
        if stitching is not None:  # restored onto one device; the step runs on the mesh
            stitching = jax.device_put(stitching, sharding.replicated(mesh))
        result = metrics.compare(student, t_lm, batches, layer_map=layer_map,
                                 stitching=stitching, mesh=mesh)
        layers = result["layers"]

    models = {"student": student, **({"teacher": t_lm} if t_lm is not None else {})}
    prompts = list(e.prompts) or metrics.default_prompts(
        first_stream, student.tokenizer, int(e.num_prompts), int(e.prompt_tokens))
    generation = metrics.compare_generations(
        models, prompts if e.max_new_tokens > 0 else [], max_new_tokens=int(e.max_new_tokens),
        temperature=float(e.temperature), top_k=int(e.top_k or 0) or None, top_p=e.top_p,
        seed=int(e.seed))

    summary = {
        "student": student.describe(),
        "teacher": t_lm.describe() if t_lm is not None else None,
        "data": {"source": data_lib.data_label(config.data), "split": e.split,
                 "batch_size": int(e.batch_size), "block_size": block,
                 "num_batches": len(batches), "tokens": result["tokens"]},
        "loss": result["loss"], "perplexity": result["perplexity"],
        "layers": layers, "layers_note": layers_note, "generation": generation, "files": None}
    if is_writer():
        report.write_outputs(summary, output_dir or storage.join(workdir, "eval"))
    return summary

