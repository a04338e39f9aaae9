"""Whether the Hugging Face hub can be reached, asked once per process before the first lookup.

`huggingface_hub`, `transformers` and `datasets` retry an unreachable hub with back-off (tens of
seconds and a dozen warning lines per lookup). Every lookup of a hub name in this package first
calls `offline_reason()`: it tries one TCP connection to the hub's endpoint (`HF_ENDPOINT`,
default https://huggingface.co) with a short timeout. When that fails, the libraries are put in
offline mode (what `HF_HUB_OFFLINE=1` does), so a name already in the local cache still loads
and anything else fails at once, with the one-line `offline_error`.

With a proxy configured (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY) the direct probe says nothing, so
it is skipped and the libraries decide.
"""

from __future__ import annotations

import functools
import os
import sys

from cleangpt_jax import storage

PROBE_TIMEOUT_SECONDS = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                    "all_proxy")


@functools.cache
def offline_reason() -> str:
    """'' when the hub may be reachable; else why not, with the libraries now offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return ""
    reason = storage.unreachable(constants.ENDPOINT, PROBE_TIMEOUT_SECONDS)
    if reason:
        _go_offline()
    return reason


def _go_offline() -> None:
    """Offline mode for the libraries already imported and for those imported later."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # what transformers' is_offline_mode() reads
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def offline_error(what: str, name: str) -> str:
    """The one-line reason a hub lookup of `name` failed, when the hub is unreachable; '' else.
    what: 'tokenizer', 'dataset', 'model'."""
    reason = offline_reason()
    if not reason:
        return ""
    return (f"could not load {what} {name!r}: the Hugging Face hub cannot be reached ({reason}) "
            f"and {name!r} is not in the local cache: pass a local directory, or retry online")
