"""Functions registered by name and picked by a config setting: the one extension mechanism
for training strategies (`train.strategy`) and distillation losses (`distill.hidden_loss`,
`distill.head.logit_loss`, ...).

    STRATEGIES = Registry("train.strategy", "strategies")

    @STRATEGIES.register("my_loss")
    def my_loss(model, config): ...

    STRATEGIES["My_Loss"]          # names are case-insensitive; unknown ones raise ConfigError
"""

from __future__ import annotations

from typing import Callable

from cleangpt_jax.config import ConfigError


class Registry:
    """{name: function}; `setting` and `plural` only word the error for an unknown name."""

    def __init__(self, setting: str, plural: str):
        self.setting, self.plural = setting, plural
        self._fns: dict[str, Callable] = {}

    def register(self, name: str, fn: Callable | None = None):
        """Register `fn` under `name`; without `fn`, a decorator."""

        def add(f):
            self._fns[name.lower()] = f
            return f

        return add(fn) if fn is not None else add

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._fns[str(name).lower()]
        except KeyError:
            raise ConfigError(f"unknown {self.setting} {name!r}: registered {self.plural} are "
                              f"{self.names()} (add one with register)") from None
