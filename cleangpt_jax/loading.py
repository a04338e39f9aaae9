"""Load a language model from wherever it lives: a cleangpt_jax workdir, a Hugging Face GPT-2
directory or a hub name.

    lm = load_lm("runs/default")              # a training or distillation run (latest step)
    lm = load_lm("runs/teacher-hf")           # an HF GPT-2 directory (e.g. export_hf's)
    lm = load_lm("gpt2", dtype="bfloat16")    # a hub name: weights, config and tokenizer
    logits = lm.model.apply({"params": lm.params}, ids).logits   # (B, T, V) for (B, T) ids

Which kind a source is: an existing directory holding checkpoints/ and config.json is a
workdir (`cleangpt_jax.workdir.load_run`); anything else is a GPT-2 checkpoint
(`cleangpt_jax.hf.load_gpt2` into our Vanilla model), local or fetched from the hub.
`kind='workdir'` / `kind='hf'` skip the guess (a CLI flag that names the kind).

A GPT-2 checkpoint's tokenizer is the directory's own: cleangpt_jax's (an exported
character-level model) or its HF tokenizer files; a directory holding only weights takes
`fallback_tokenizer` when one is given. Every loaded pair passes `check_vocab`: a tokenizer
with V_tok ids fits a model with V_model embedding rows only if V_tok <= V_model.

`import_to_workdir` writes a GPT-2 checkpoint as a workdir (`python -m cleangpt_jax.import_hf`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from cleangpt_jax import hf, storage
from cleangpt_jax import workdir as workdir_lib
from cleangpt_jax.config import ConfigError, get_config
from cleangpt_jax.models import get_model
from cleangpt_jax.tokenizers import check_vocab, load_tokenizer, read_marker
from cleangpt_jax.tokenizers.gpt2 import has_hf_tokenizer_files

KINDS = ("workdir", "hf")


@dataclasses.dataclass
class LM:
    """A loaded model: flax module, params, tokenizer, and where it came from.

    step: the workdir checkpoint's step (None for a GPT-2 checkpoint); run_config: the
    workdir's config.json (None for a GPT-2 checkpoint).
    """

    model: Any
    params: Any
    tokenizer: Any
    source: str
    step: int | None = None
    run_config: ml_collections.ConfigDict | None = None

    @property
    def config(self):
        return self.model.config

    def describe(self) -> dict:
        """{source, step, model_type, n_layer, n_embd, vocab_size, num_params}."""
        c = self.config
        return {"source": self.source, "step": self.step, "model_type": c.model_type,
                "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                "num_params": int(sum(np.size(x) for x in jax.tree.leaves(self.params)))}


def is_workdir(path) -> bool:
    """Whether `path` is a directory with a run's checkpoints/ and config.json."""
    path = os.fspath(path)
    return (storage.isdir(storage.join(path, workdir_lib.CHECKPOINT_DIR))
            and storage.isfile(storage.join(path, workdir_lib.CONFIG_FILE)))


def load_lm(name_or_path, *, step: int | None = None, mesh=None, dtype: str | None = None,
            kind: str | None = None, fallback_tokenizer=None) -> LM:
    """The model, params and tokenizer of a workdir, an HF GPT-2 directory or a hub name.

    step: a workdir checkpoint (default: the latest). mesh: parameters laid out for it
    (`cleangpt_jax.sharding`), else on the first local device. dtype: 'float32' | 'bfloat16' |
    'float16', the parameter and compute dtype (None: a workdir's own, float32 for GPT-2).
    kind: 'workdir' | 'hf' | None (guess, see the module docstring).
    """
    source = os.fspath(name_or_path)
    if kind not in (None, *KINDS):
        raise ConfigError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if kind is None:
        kind = "workdir" if is_workdir(source) else "hf"
    if kind == "workdir":
        return _load_workdir(source, step, mesh, dtype)
    _refuse_workdir_as_hf(source)
    if step is not None:
        raise ConfigError(f"step={step} applies to workdir checkpoints, and {source!r} is a "
                          f"Hugging Face GPT-2 checkpoint")
    directory = hf.resolve_checkpoint(source, tokenizer=True)
    config, params = hf.load_gpt2(directory, dtype=dtype or "float32", mesh=mesh)
    if read_marker(directory) is None and not has_hf_tokenizer_files(directory) \
            and fallback_tokenizer is not None:
        tokenizer = fallback_tokenizer
    else:
        try:
            tokenizer = load_tokenizer(directory)
        except ValueError as e:
            raise ConfigError(f"{e}: a GPT-2 checkpoint needs its tokenizer saved next to the "
                              f"weights (export_hf writes it)") from None
    check_vocab(tokenizer.vocab_size, config.vocab_size, where=f"{source!r}",
                fix="the tokenizer and the model do not belong together")
    return LM(get_model(config=config), params, tokenizer, source)


def _refuse_workdir_as_hf(source: str) -> None:
    """A cleangpt_jax run is not a GPT-2 checkpoint: say what it is and what to pass."""
    kind = workdir_lib.run_kind(source) if storage.isdir(source) else None
    if kind is None:
        return
    if not is_workdir(source):
        raise ConfigError(f"{source!r} is a cleangpt_jax {kind} run without a checkpoint yet: "
                          f"train until one is written, or pass a run that has one")
    raise ConfigError(f"{source!r} is a cleangpt_jax {kind} run, not a Hugging Face GPT-2 "
                      f"checkpoint: pass it as a workdir (generate --workdir={source}, a "
                      f"teacher path), or export one with export_hf")


def _load_workdir(workdir: str, step, mesh, dtype) -> LM:
    run = workdir_lib.load_run(workdir, step, mesh=mesh)
    model, params = run.model, run.params
    if dtype is not None and dtype != run.model_config.param_dtype:
        mcfg = run.model_config.replace(dtype=dtype, param_dtype=dtype)
        model = get_model(config=mcfg)
        params = jax.tree.map(lambda x: x.astype(mcfg.params_dtype), params)
    check_vocab(run.tokenizer.vocab_size, model.config.vocab_size, where=f"{workdir!r}",
                fix="the run's tokenizer/ and checkpoint do not belong together")
    return LM(model, params, run.tokenizer, workdir, run.step, run.config)


def import_to_workdir(name_or_path, workdir, *, dtype: str = "float32") -> str:
    """Convert an HF GPT-2 checkpoint (hub name or directory) into a cleangpt_jax workdir.

    Writes config.json (the default config with the converted model section and the
    checkpoint's tokenizer), tokenizer/ and a params-only Orbax checkpoint at step 0, so that
    `load_lm(workdir)` (generate, evaluate, distillation) uses it like a trained run. The
    workdir must be new or empty. Returns `workdir`.
    """
    workdir = os.fspath(workdir)
    storage.check_reachable(workdir, "workdir")
    if storage.exists(workdir) and (not storage.isdir(workdir) or storage.listdir(workdir)):
        raise ConfigError(f"workdir {workdir!r} already exists and is not empty: import into a "
                          f"new directory")
    lm = load_lm(name_or_path, dtype=dtype, kind="hf")
    config = get_config()
    config.model.update(lm.config.to_dict())
    config.tokenizer.type = lm.tokenizer.tokenizer_type
    config.tokenizer.name_or_path = storage.join(storage.absolute(workdir),
                                                 workdir_lib.TOKENIZER_DIR)
    return workdir_lib.write_model_workdir(workdir, config, lm.tokenizer, lm.params,
                                           meta={"hf_source": os.fspath(name_or_path)},
                                           kind="import")
