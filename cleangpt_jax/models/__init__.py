"""Model registry: `get_model(name, config=cfg)` returns a flax linen Module.

    from cleangpt_jax.models import get_model, register_model
    model = get_model(cfg.model.model_type, config=cfg.model)
    params = model.init(jax.random.key(0), ids)["params"]
    out = model.apply({"params": params}, ids, deterministic=True, output_hidden_states=True)

Add an architecture by subclassing `CausalLM` (or any Module with the same call signature) and
decorating it with `@register_model("name")`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from cleangpt_jax.config import ConfigError, ModelConfig, model_config
from cleangpt_jax.models.base import CausalLM, ModelOutput
from cleangpt_jax.models.factored import Factored
from cleangpt_jax.models.sasp import SASP
from cleangpt_jax.models.vanilla import Vanilla

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str, cls: type[nn.Module] | None = None) -> Callable | type:
    """Register `cls` under `name` (case-insensitive); usable as a decorator."""

    def add(cls):
        _REGISTRY[name.lower()] = cls
        return cls

    return add(cls) if cls is not None else add


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model(model_type: str | None = None, *, config: Any) -> nn.Module:
    """Build the Module registered as `model_type` (default: config.model_type).

    `config` is the model section (ConfigDict or dict), a whole config with a `model` section,
    or a `ModelConfig`; it is validated here.
    """
    overrides = {} if model_type is None else {"model_type": model_type.lower()}
    cfg = model_config(config, **overrides)
    if cfg.model_type not in _REGISTRY:
        raise ConfigError(f"unknown model.model_type {cfg.model_type!r}: registered models are "
                          f"{registered_models()}")
    return _REGISTRY[cfg.model_type](cfg)


register_model("vanilla", Vanilla)
register_model("sasp", SASP)
register_model("factored", Factored)

__all__ = ["CausalLM", "Factored", "ModelConfig", "ModelOutput", "SASP", "Vanilla",
           "get_model", "register_model", "registered_models"]
