"""Hugging Face GPT-2 <-> Vanilla bridge: teacher weights in, Vanilla models out.

    config, params = load_gpt2("gpt2")                 # hub name, or a local directory
    model = get_model(config=config)
    out = model.apply({"params": params}, ids, output_hidden_states=True)
    export_gpt2(config, params, "out/my-gpt2", tokenizer=tok)   # GPT2LMHeadModel.from_pretrained

transformers v5 ships no Flax classes, so the weights are read here, tensor by tensor, from
`model.safetensors` (or `pytorch_model.bin` when torch is installed). Layout facts:

  HF name ("transformer." prefix optional)     ours                           shape
  wte.weight                                   wte/embedding                  (V, d)
  wpe.weight                                   wpe/embedding                  (T, d)
  h.{i}.ln_1.{weight,bias}                     h_{i}/ln_1/{scale,bias}        (d,)
  h.{i}.attn.c_attn.{weight,bias}              h_{i}/attn/c_attn/{kernel,bias} (d, 3d), (3d,)
  h.{i}.attn.c_proj.{weight,bias}              h_{i}/attn/c_proj/...          (d, d), (d,)
  h.{i}.ln_2.{weight,bias}                     h_{i}/ln_2/...                 (d,)
  h.{i}.mlp.c_fc.{weight,bias}                 h_{i}/mlp/c_fc/...             (d, 4d), (4d,)
  h.{i}.mlp.c_proj.{weight,bias}               h_{i}/mlp/c_proj/...           (4d, d), (d,)
  ln_f.{weight,bias}                           ln_f/{scale,bias}              (d,)
  lm_head.weight (untied heads only)           lm_head                        (V, d)

HF's `Conv1D` stores its weight as [in, out], the layout of a flax Dense kernel: no transpose.
With tie_word_embeddings (GPT-2's default) `lm_head.weight` is `wte` and is skipped;
`h.{i}.attn.bias` / `attn.masked_bias` are causal-mask buffers in old checkpoints (skipped).
Hidden states differ in one place: HF's last `hidden_states` entry is after ln_f, ours are all
before it (ours[L] through ln_f equals HF's last).

A GPT-2 config maps onto a Vanilla `ModelConfig` with bias=True, activation 'gelu_tanh'
('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast', 'gelu_python_tanh', 'gelu_accurate') or 'gelu'
(exact: 'gelu', 'gelu_python'), n_positions -> block_size, tie_word_embeddings ->
tie_embeddings, and dropout = the common value of attn_pdrop, resid_pdrop and embd_pdrop (a
config where they differ is refused: ours has one dropout rate). Export writes zeros for the biases
a bias=False model lacks (LayerNorm biases included), which leaves its function unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cleangpt_jax import storage
from cleangpt_jax.config import DTYPES, ConfigError, ModelConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "cleangpt_tokenizer.json")

# GPT-2 activation_function -> ours, and back (export writes the GPT-2 spelling).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_python_tanh": "gelu_tanh", "gelu_accurate": "gelu_tanh",
               "gelu": "gelu", "gelu_python": "gelu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

_TOP_LEVEL = {"wte.weight": "wte/embedding", "wpe.weight": "wpe/embedding",
              "ln_f.weight": "ln_f/scale", "ln_f.bias": "ln_f/bias"}
_PER_BLOCK = {"ln_1.weight": "ln_1/scale", "ln_1.bias": "ln_1/bias",
              "attn.c_attn.weight": "attn/c_attn/kernel", "attn.c_attn.bias": "attn/c_attn/bias",
              "attn.c_proj.weight": "attn/c_proj/kernel", "attn.c_proj.bias": "attn/c_proj/bias",
              "ln_2.weight": "ln_2/scale", "ln_2.bias": "ln_2/bias",
              "mlp.c_fc.weight": "mlp/c_fc/kernel", "mlp.c_fc.bias": "mlp/c_fc/bias",
              "mlp.c_proj.weight": "mlp/c_proj/kernel", "mlp.c_proj.bias": "mlp/c_proj/bias"}
_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2" or "org/name"


# ----------------------------------------------------------------------------- names and shapes

def param_names(config: ModelConfig) -> dict[str, str]:
    """GPT2LMHeadModel tensor name -> our param path, e.g. "transformer.h.0.ln_1.weight" ->
    "h_0/ln_1/scale"; "lm_head.weight" -> "lm_head" for an untied head."""
    names = {f"transformer.{hf}": ours for hf, ours in _TOP_LEVEL.items()}
    for i in range(config.n_layer):
        names.update({f"transformer.h.{i}.{hf}": f"h_{i}/{ours}"
                      for hf, ours in _PER_BLOCK.items()})
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head"
    return names


def _canonical(name: str) -> str:
    """Checkpoints saved from GPT2Model (the hub's `gpt2`) lack the "transformer." prefix."""
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def abstract_params(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the params `get_model(config=config).init` creates."""
    from cleangpt_jax.models import get_model

    model = get_model(config=config)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return flax.traverse_util.flatten_dict(tree["params"], sep="/")


# ----------------------------------------------------------------------------- configs

def config_from_hf(hf_config: Mapping[str, Any], *, dtype="float32",
                   source: str = "config.json") -> ModelConfig:
    """The Vanilla `ModelConfig` of a GPT-2 `config.json` dict; refuses what it cannot represent.

    `dtype` ('float32' | 'bfloat16' | 'float16') is both the parameter and the compute dtype.
    """
    c = dict(hf_config)
    model_type = c.get("model_type")
    if model_type != "gpt2" or "n_embd" not in c:
        raise ConfigError(f"{source} describes a {model_type!r} model, not GPT-2 (model_type "
                          "'gpt2' with n_embd/n_layer/n_head): only GPT2LMHeadModel checkpoints "
                          "can be loaded")
    required = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    missing = [k for k in required if k not in c]
    if missing:
        raise ConfigError(f"{source} lacks the GPT-2 field(s) {missing}: it is not a complete "
                          "GPT2Config")
    d = c["n_embd"]
    unsupported = {
        "scale_attn_by_inverse_layer_idx": (c.get("scale_attn_by_inverse_layer_idx", False), False),
        "scale_attn_weights": (c.get("scale_attn_weights", True), True),
        "add_cross_attention": (c.get("add_cross_attention", False), False),
    }
    for key, (value, needed) in unsupported.items():
        if bool(value) != needed:
            raise ConfigError(f"{source} sets {key}={value}, which the Vanilla model cannot "
                              f"represent (it needs {key}={needed}): this checkpoint cannot be "
                              "converted")
    if c.get("n_inner") not in (None, 4 * d):
        raise ConfigError(f"{source} sets n_inner={c['n_inner']}, but the Vanilla MLP is 4 * "
                          f"n_embd = {4 * d} wide: this checkpoint cannot be converted")
    act = c.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ConfigError(f"{source} uses activation_function={act!r}: supported are "
                          f"{sorted(ACTIVATIONS)}")
    pdrops = {k: float(c.get(k, 0.1)) for k in ("attn_pdrop", "resid_pdrop", "embd_pdrop")}
    if len(set(pdrops.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in pdrops.items())
        raise ConfigError(f"{source} sets {listed}, but the Vanilla model has one dropout rate: "
                          "give the three one value there to load it")
    # reorder_and_upcast_attn only changes HF's eager numerics (float32 softmax); ours is float32.
    try:
        return ModelConfig(
            model_type="vanilla", n_layer=c["n_layer"], n_head=c["n_head"], n_embd=d,
            block_size=c["n_positions"], vocab_size=c["vocab_size"],
            dropout=pdrops["resid_pdrop"], bias=True, activation=ACTIVATIONS[act],
            layer_norm_epsilon=float(c.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(c.get("tie_word_embeddings", True)),
            dtype=_dtype_name(dtype), param_dtype=_dtype_name(dtype))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def hf_config(config: ModelConfig, tokenizer=None) -> dict[str, Any]:
    """The GPT2Config dict (config.json) of a Vanilla model; checks that GPT-2 can represent it."""
    if config.model_type != "vanilla":
        raise ConfigError(f"cannot export a {config.model_type!r} model as GPT-2: only 'vanilla' "
                          "models have GPT2LMHeadModel's architecture (use it as a cleangpt_jax "
                          "workdir instead)")
    if config.position_encoding != "learned":
        raise ConfigError("cannot export a model with "
                          f"position_encoding={config.position_encoding!r} as GPT-2: "
                          "GPT2LMHeadModel has learned positions (wpe) only")
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None, "activation_function": EXPORT_ACTIVATIONS[config.activation],
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False,
        "tie_word_embeddings": config.tie_embeddings, "use_cache": True,
        "dtype": config.param_dtype,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **special,
    }


def _dtype_name(dtype) -> str:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}: choose one of {list(DTYPES)}")
    return name


# ----------------------------------------------------------------------------- finding checkpoints

def resolve_checkpoint(name_or_path, *, tokenizer: bool = False) -> str:
    """A local directory holding config.json and the weights (and tokenizer files if asked).

    An existing directory is used as is. A name that looks like a path (absolute, ./, ../, ~, or
    whose parent directory exists) but is missing is an error; anything else is a hub repo id,
    fetched (weights and config only, plus tokenizer files when `tokenizer`) with huggingface_hub.
    """
    name = os.fspath(name_or_path)
    if storage.is_url(name):  # (safetensors and tokenizers read local files: a local copy)
        storage.check_reachable(name, "checkpoint")
        if storage.isdir(name):
            return storage.local_copy(name)
        what = "is a file" if storage.isfile(name) else "not found"
        raise ConfigError(f"{name!r} {what}: pass the directory holding {CONFIG_FILE} and the "
                          "weights")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ConfigError(f"{path!r} is a file: pass the directory holding {CONFIG_FILE} and the "
                          "weights, or a Hugging Face hub name like 'gpt2'")
    parent = os.path.dirname(path.rstrip(os.sep))
    looks_local = (name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(path)
                   or (parent and os.path.isdir(parent)) or not _HUB_NAME.fullmatch(name))
    if looks_local:
        raise ConfigError(f"directory {path!r} not found: pass an existing directory with "
                          f"{CONFIG_FILE} and model.safetensors, or a Hugging Face hub name like "
                          "'gpt2'")
    return _download(name, tokenizer=tokenizer)


def _download(repo_id: str, *, tokenizer: bool) -> str:
    """snapshot_download of config + safetensors; pytorch_model.bin only when there are none."""
    from huggingface_hub import snapshot_download

    from cleangpt_jax import hub

    offline = hub.offline_error("model", repo_id)
    extra = list(TOKENIZER_FILES) if tokenizer else []
    try:
        path = snapshot_download(repo_id, allow_patterns=[
            CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, "model-*-of-*.safetensors", *extra])
        if not _weight_files(path, torch_ok=False):
            path = snapshot_download(repo_id, allow_patterns=[
                CONFIG_FILE, TORCH_FILE, TORCH_INDEX, "pytorch_model-*-of-*.bin", *extra])
    except Exception as e:  # network, auth, missing repo: one line for the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(offline or f"could not fetch {repo_id!r} from the Hugging Face hub "
                          f"({type(e).__name__}: {reason}): check the name and the network, or "
                          "pass a local directory") from None
    return path


def _weight_files(directory: str, *, torch_ok: bool = True) -> list[str]:
    """The weight files of `directory`: safetensors first (sharded via the index), then torch."""
    candidates = [(SAFETENSORS_INDEX, SAFETENSORS_FILE)]
    if torch_ok:
        candidates.append((TORCH_INDEX, TORCH_FILE))
    for index, single in candidates:
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, s) for s in shards]
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    return []


def _read_tensors(files: list[str]) -> Iterator[tuple[str, Any]]:
    """(name, numpy array) one tensor at a time, so only one tensor is ever held twice."""
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from _read_torch(path)


def _read_torch(path: str) -> Iterator[tuple[str, Any]]:
    try:
        import torch
    except ImportError:
        raise ConfigError(f"{path} is a PyTorch checkpoint and torch is not installed: pip "
                          "install torch (CPU build), or convert the checkpoint to "
                          "model.safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for name in list(state):
        t = state.pop(name).detach()
        yield name, (t.float() if t.dtype == torch.bfloat16 else t).numpy()


# ----------------------------------------------------------------------------- load

def load_gpt2(name_or_path, *, dtype="float32", mesh: jax.sharding.Mesh | None = None
              ) -> tuple[ModelConfig, dict]:
    """Load a GPT2LMHeadModel checkpoint as a Vanilla model: (ModelConfig, params).

    `name_or_path`: a local directory (config.json + model.safetensors, sharded safetensors, or
    pytorch_model.bin when torch is installed) or a hub repo id ("gpt2", "distilgpt2", "org/name").
    Tensors are read, converted to `dtype` and placed one at a time: on the default device, or,
    with `mesh`, with the param shardings of `cleangpt_jax.sharding` for that mesh. Every tensor's
    shape is checked against the config; extra or missing tensors are errors.
    """
    directory = resolve_checkpoint(name_or_path)
    config = _read_config(directory, dtype)
    files = _weight_files(directory)
    if not files:
        raise ConfigError(f"no weights in {directory!r}: expected {SAFETENSORS_FILE} (or "
                          f"{SAFETENSORS_INDEX}) or {TORCH_FILE} next to {CONFIG_FILE}")
    expected = abstract_params(config)
    names = param_names(config)
    shardings = _shardings(mesh, expected)
    np_dtype = config.params_dtype
    flat = {}
    for hf_name, array in _read_tensors(files):
        name = _canonical(hf_name)
        if _BUFFERS.fullmatch(name) or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        if name not in names:
            raise ConfigError(f"unexpected tensor {hf_name!r} in {directory!r}: not part of "
                              f"GPT2LMHeadModel with n_layer={config.n_layer} (is {CONFIG_FILE} "
                              "right?)")
        path = names[name]
        want = expected[path].shape
        if tuple(array.shape) != tuple(want):
            raise ConfigError(f"tensor {hf_name!r} has shape {tuple(array.shape)} but "
                              f"{CONFIG_FILE} implies {tuple(want)}: the config and the weights do "
                              "not match")
        array = np.asarray(array, dtype=np_dtype)
        flat[path] = (jax.device_put(array) if shardings is None else
                      jax.make_array_from_callback(array.shape, shardings[path],
                                                   lambda index, a=array: a[index]))
        del array
    missing = [hf for hf, ours in names.items() if ours not in flat]
    if missing:
        raise ConfigError(f"{directory!r} lacks {len(missing)} tensor(s) of GPT2LMHeadModel, e.g. "
                          f"{missing[:3]}: the checkpoint is incomplete or not a GPT-2 model")
    return config, flax.traverse_util.unflatten_dict(flat, sep="/")


def _read_config(directory: str, dtype) -> ModelConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"no {CONFIG_FILE} in {directory!r}: a GPT-2 checkpoint directory needs "
                          "config.json next to its weights")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    return config_from_hf(raw, dtype=dtype, source=path)


def _shardings(mesh, expected: Mapping[str, jax.ShapeDtypeStruct]):
    """{path: NamedSharding} on `mesh`, the layout training uses (None without a mesh)."""
    if mesh is None:
        return None
    from cleangpt_jax import sharding

    return sharding.state_shardings(dict(expected), mesh)


# ----------------------------------------------------------------------------- export

def export_gpt2(model_config: ModelConfig, params, out_dir, tokenizer=None, *,
                overwrite: bool = False) -> str:
    """Write `out_dir` so that `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads it.

    Files: config.json (GPT2Config), model.safetensors (HF names, "transformer." prefix, zeros for
    the biases of a bias=False model), and the tokenizer when given, which both
    `transformers.AutoTokenizer` and `cleangpt_jax.tokenizers.load_tokenizer` load (a GPT-2
    tokenizer is saved in HF format; a character tokenizer in its own format plus, from
    `to_hf_tokenizer`, tokenizer.json + tokenizer_config.json). Only Vanilla models with learned
    positions are exportable. Everything is checked before anything is written; files land by
    rename, and a non-empty `out_dir` needs overwrite=True.
    Returns `out_dir`.
    """
    config = model_config
    hf_cfg = hf_config(config, tokenizer)
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise ConfigError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size "
                          f"{config.vocab_size}: export the tokenizer the model was trained with")
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    expected = abstract_params(config)
    for path in sorted(set(expected) | set(flat)):
        if path not in flat:
            raise ConfigError(f"params lack {path!r} (shape {expected[path].shape}) that the model "
                              "config requires: params and config do not belong together")
        if path not in expected:
            raise ConfigError(f"params hold {path!r}, which a {config.model_type} model with this "
                              "config does not have: params and config do not belong together")
        if tuple(flat[path].shape) != tuple(expected[path].shape):
            raise ConfigError(f"param {path!r} has shape {tuple(flat[path].shape)} but the model "
                              f"config implies {tuple(expected[path].shape)}")
    out_dir = os.fspath(out_dir)
    storage.check_reachable(out_dir, "output directory")
    if storage.isdir(out_dir) and storage.listdir(out_dir) and not overwrite:
        raise ConfigError(f"output directory {out_dir!r} is not empty: choose a new directory or "
                          "overwrite it explicitly (--overwrite)")
    if storage.exists(out_dir) and not storage.isdir(out_dir):
        raise ConfigError(f"output path {out_dir!r} is a file: choose a directory")

    from cleangpt_jax import sharding

    full = abstract_params(config.replace(bias=True))  # GPT-2 always has every bias
    dtype = config.params_dtype
    tensors = {}
    for hf_name, path in param_names(config).items():
        value = (sharding.to_host(flat[path]) if path in flat
                 else np.zeros(full[path].shape, dtype))
        tensors[hf_name] = np.ascontiguousarray(value)
    if jax.process_index() != 0:
        return out_dir

    from safetensors.numpy import save_file

    if storage.is_url(out_dir):  # staged locally, then each file in one upload
        staging = storage.scratch_dir("export-")
    else:
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_file(tensors, os.path.join(staging, SAFETENSORS_FILE), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        if hasattr(tokenizer, "to_hf_tokenizer"):  # a character tokenizer, for AutoTokenizer
            tokenizer.to_hf_tokenizer().save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if storage.is_url(out_dir):
            storage.upload_dir(staging, out_dir)
        else:
            os.makedirs(out_dir, exist_ok=True)
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir

# ----------------------------------------------------------------------------- workdirs

def export_run(workdir, out_dir, *, step: int | None = None, overwrite: bool = False) -> str:
    """Export a Vanilla run's checkpoint (latest unless `step`) and tokenizer with `export_gpt2`.
    `out_dir` may hold an earlier export (replaced with `overwrite`), never a run."""
    from cleangpt_jax.workdir import load_run, run_kind

    workdir, out_dir = os.fspath(workdir), os.fspath(out_dir)
    kind = run_kind(out_dir)
    if kind is not None:
        raise ConfigError(f"--out {out_dir!r} holds a {kind} run, which an "
                          f"export never replaces (--overwrite replaces an earlier export "
                          f"only): pass a new --out directory")
    run = load_run(workdir, step)
    hf_config(run.model_config, run.tokenizer)  # refuse other architectures before writing
    return export_gpt2(run.model_config, run.params, out_dir, tokenizer=run.tokenizer,
                       overwrite=overwrite)
