"""What every `python -m cleangpt_jax.<tool>` shares: flag parsing, quiet Orbax, one-line errors.

    @cli.tool(usage="--workdir=DIR --out=DIR")
    def main(argv):
        ...                                    # a ValueError here prints one line, exit 1

    if __name__ == "__main__":
        cli.run(main, define_flags=define_flags)

A tool never shows a traceback or absl's usage text for bad input: `die` prints
`error: <message>` (the message names the problem and the fix) and exits non-zero; code 2 for
bad flags, 1 for everything else. Orbax logs every checkpoint access at INFO, so a tool logs
WARNING and up unless --verbosity is given.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn

from absl import app, flags, logging

CONFIG_KEY_HINT = ("check its spelling against the config file's get_config() (--print_config "
                   "lists every key)")
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
PRINT_CONFIG_HELP = ("Print every key of the resolved config (the --config file with its "
                     "--config.x=y overrides), its value and its one-line meaning, then exit.")


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
    if isinstance(e, flags.Error):
        die(e, 2)
    config_file = next((a for a in (argv or sys.argv)[1:] if a.startswith("--config=")), None)
    if config_file:  # the file failed to load: text that is not Python, a bug in get_config()
        die(f"cannot load {config_file}: {type(e).__name__}: {e} (a config file is Python code "
            f"defining get_config())", 2)
    die(f"{type(e).__name__}: {e}", 2)


def flags_parser(key_hint: str = CONFIG_KEY_HINT,
                 flag_values: flags.FlagValues = flags.FLAGS, help_hint: bool = False):
    """A `flags_parser` for absl's app.run that turns every parsing failure into one line.
    --help (absl prints the usage and exits 1) exits 0, after saying how to list the config
    keys when the tool has a --config (`help_hint`)."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flag_values(argv)
        except SystemExit as e:
            if e.code and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
                if help_hint:
                    print("Config keys: --print_config lists every key of the --config file, "
                          "its value and its meaning; change one with "
                          "--config.section.key=value.")
                sys.exit(0)
            raise
        except Exception as e:  # noqa: BLE001 -- also a config file that raised while loading
            flag_error(e, argv, key_hint)
    return parse


def quiet_logs(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Log WARNING and up unless --verbosity was given (Orbax logs every access at INFO)."""
    if "verbosity" not in flag_values or not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def tool(*, usage: str, errors: tuple[type[Exception], ...] = (ValueError,)):
    """Decorator for a tool's `main(argv, ...)`: positional arguments are refused (the message
    shows `usage`, flags as they are written), logs are quieted, and `errors` (the project's
    errors are ValueErrors with the fix in their message) print one line and exit 1."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapped(argv, *args, **kwargs):
            if len(argv) > 1:
                die(f"unexpected arguments {argv[1:]}: flags look like {usage}", 2)
            quiet_logs(kwargs.get("flag_values", flags.FLAGS))
            try:
                return main(argv, *args, **kwargs)
            except errors as e:
                die(e)
        return wrapped
    return decorate


def config_flag_value(name: str = "config", flag_values: flags.FlagValues = flags.FLAGS):
    """The ConfigDict of a config_flags file flag; a config file that failed to load exits (2)
    with one line naming it."""
    from ml_collections import config_flags

    try:
        config = flag_values[name].value
        config.get("model")  # a config file that failed to load raises here
    except (IOError, OSError) as e:
        path = config_flags.get_config_filename(flag_values[name])
        die(f"cannot load --{name}={path}: {e.__cause__ or e}", 2)
    return config


def run(main: Callable, *, define_flags: Callable | None = None,
        key_hint: str = CONFIG_KEY_HINT, flag_values: flags.FlagValues | None = None) -> None:
    """Start a tool: define its flags (config_flags applies --config.x=y overrides while
    defining the config flag, so a wrong key fails there), then parse them and call `main`,
    every failure as one line. Tools define their flags here, not at import, so that any of
    them can be imported next to the others.

    `define_flags(flag_values)` defines them, `main(argv, flag_values=...)` reads them. By
    default on absl's FLAGS through `app.run`; with a private `flag_values` (a test running a
    tool in-process on `sys.argv`) the same definition, parsing and errors, then `main`,
    without absl's process set-up. `main` runs with the persistent compilation cache on
    (`cleangpt_jax.compile_cache`)."""
    from cleangpt_jax.compile_cache import persistent_cache

    values = flags.FLAGS if flag_values is None else flag_values
    if define_flags is not None:
        try:
            define_flags(values)
        except Exception as e:  # noqa: BLE001 -- a bad --config.x=y override
            flag_error(e, key_hint=key_hint)

    has_config = "config" in values
    if has_config and "print_config" not in values:
        flags.DEFINE_bool("print_config", False, PRINT_CONFIG_HELP, flag_values=values)

    def cached_main(argv, **kwargs):  # compiled programs persist (cleangpt_jax.compile_cache)
        if has_config and values.print_config:
            from cleangpt_jax.config_help import format_config

            print(format_config(config_flag_value(flag_values=values)))
            return 0
        quiet_logs(values)  # (before the cache logs its set-up at INFO)
        with persistent_cache():
            return main(argv, **kwargs)

    if flag_values is None:
        app.run(cached_main, flags_parser=flags_parser(key_hint, help_hint=has_config))
    else:
        sys.exit(cached_main(flags_parser(key_hint, values)(sys.argv), flag_values=values))
