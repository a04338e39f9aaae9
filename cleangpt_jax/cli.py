"""What every `python -m cleangpt_jax.<tool>` shares: errors as one line, absl flag parsing.

    app.run(main, flags_parser=cli.flags_parser())

A tool never shows a traceback or absl's usage text for bad input: `die` prints
`error: <message>` (the message names the problem and the fix) and exits non-zero.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from absl import flags

CONFIG_KEY_HINT = "check its spelling against the config file's get_config()"


def die(message, code: int = 1) -> NoReturn:
    """Print `error: message` as one line on stderr and exit."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def flag_error(e: Exception, argv: list[str] | None = None,
               key_hint: str = CONFIG_KEY_HINT) -> NoReturn:
    """Exit (code 2) with one line for a flag that failed: an override of a config key the
    config lacks (named as written on the command line), a bad value, a config file that
    raised while loading."""
    if isinstance(e, (AttributeError, KeyError)):
        # ml_collections: "'key'" or "'key'\nDid you mean \"other\" instead of \"key\"?"
        while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(...))
            e = e.args[0]
        first, _, suggestion = str(e.args[0] if e.args else e).partition("\n")
        name = first.strip("'\" ")
        written = [a.split("=")[0] for a in (argv or sys.argv)[1:]
                   if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        die(f"unknown config key {written[0] if written else name!r}: "
            f"{suggestion.strip() + ' ' if suggestion.strip() else ''}{key_hint}", 2)
    die(e if isinstance(e, flags.Error) else f"{type(e).__name__}: {e}", 2)


def flags_parser(key_hint: str = CONFIG_KEY_HINT):
    """A `flags_parser` for absl's app.run that turns every parsing failure into one line."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # noqa: BLE001 -- also a config file that raised while loading
            flag_error(e, argv, key_hint)
    return parse
