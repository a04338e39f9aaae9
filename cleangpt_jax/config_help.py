"""`--print_config`: every key of a resolved config, its value and its one-line meaning.

    train.learning_rate = 0.001        # peak AdamW learning rate, reached after warmup_steps

The meanings are the comments where the defaults are set, read from the source (one place
states a key's default and what it means): in `cleangpt_jax/config.py`, the comment after a
`ModelConfig` field and after (or in the comment block just above) a `cfg.<section>.<key> =`
line; in `cleangpt_jax/distill/config.py`, the same for `d.<key> =` (the `distill` section).
A key no comment describes (one a config file adds) shows its value alone.
"""

from __future__ import annotations

import inspect
import re

_ASSIGN = re.compile(r"^\s*(cfg|d)\.([A-Za-z_][\w.]*)\s*=(?!=)")
_FIELD = re.compile(r"^    ([a-z_]\w*)\s*:\s*[^=]+=")
_PREFIX = {"cfg": "", "d": "distill."}


def _comment(line: str) -> str | None:
    """The trailing '# ...' of a code line (a '#' inside a quoted string is not one)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[i + 1:].strip()
    return None


def _one_line(text: str) -> str:
    """The first sentence of a comment block."""
    text = " ".join(text.split())
    for cut in re.finditer(r"(?<=[a-z0-9)\]])\. ", text):
        if not text[:cut.start()].endswith(("e.g", "i.e")):
            return text[:cut.start()]
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


def _short(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[:text.rfind(" ", 0, limit)] + " ..."


def meanings_in(source: str) -> dict[str, str]:
    """{dotted key: one-line meaning} from a config module's source."""
    out, block, in_model = {}, [], False
    for line in source.splitlines():
        stripped = line.strip()
        if line.startswith("class ModelConfig"):
            in_model = True
        elif line and not line[0].isspace():
            in_model = False
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match, prefix = _ASSIGN.match(line), None
        if match:
            prefix, key = _PREFIX[match.group(1)], match.group(2)
        elif in_model and _FIELD.match(line):
            prefix, key = "model.", _FIELD.match(line).group(1)
        if prefix is not None:
            text = _comment(line) or " ".join(block)
            if text and not re.search(r"=\s*ml_collections\.ConfigDict\(\)", line):
                out[prefix + key] = _short(_one_line(text))
        block = []
    return out


def meanings() -> dict[str, str]:
    """Every documented key of the default training and distillation configs."""
    from cleangpt_jax import config
    from cleangpt_jax.distill import config as distill_config

    return {**meanings_in(inspect.getsource(config)),
            **meanings_in(inspect.getsource(distill_config))}


def flat_items(config) -> list[tuple[str, object]]:
    """[(dotted key, value)] of every leaf of a ConfigDict (or dict), in its order."""
    items = []

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                items.append((prefix + key, value))

    walk("", config.to_dict() if hasattr(config, "to_dict") else config)
    return items


def format_config(config) -> str:
    """One line per key: 'section.key = value  # meaning', the values aligned."""
    described = meanings()
    rows = [(f"{key} = {value!r}", described.get(key)) for key, value in flat_items(config)]
    width = min(max(len(left) for left, _ in rows), 48)
    return "\n".join(f"{left:<{width}}  # {text}" if text else left for left, text in rows)
