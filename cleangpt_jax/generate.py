r"""Generate text from a training run or a Hugging Face GPT-2 checkpoint.

    python -m cleangpt_jax.generate --workdir=runs/default --prompt="ROMEO:"
    python -m cleangpt_jax.generate --workdir=runs/default --prompt="ROMEO:" --prompt="JULIET:" \
        --max_new_tokens=200 --temperature=0.7 --top_k=40 --top_p=0.95 --seed=1
    python -m cleangpt_jax.generate --workdir=runs/default --step=1000 --interactive
    python -m cleangpt_jax.generate --hf=runs/teacher-hf --prompt="Once upon a time"

The model: --workdir loads config.json, tokenizer/ and the latest checkpoint (or --step) of a
training or distillation run; --hf loads a GPT-2 checkpoint (a hub name such as gpt2, or a
local directory such as the one `export_hf` writes) with the tokenizer saved beside it. Both go
through `cleangpt_jax.loading.load_lm`.

Several --prompt flags are generated together as one batch, and each result is printed as the
prompt followed by its continuation. No --prompt (and no --interactive) means an empty prompt:
generation starts from the tokenizer's BOS (else EOS) token. Settings: --max_new_tokens
(default 50), --temperature (0.8; 0 = greedy), --top_k (50; 0 = off), --top_p (off; a value in
(0, 1]), --seed (0). Decoding is `cleangpt_jax.generation.run_generation`.

Interactive mode (--interactive, after any --prompt) reads one prompt per line from stdin and
prints its continuation. Lines that are commands instead of prompts:

    /temperature 0.5      set a setting for the prompts that follow; likewise /top_k 40,
    /top_p 0.9            /max_new_tokens 200, /seed 3; `/top_k off` and `/top_p off` turn
                          a filter off (as do /top_k 0 and /top_p 1)
    settings              print the current settings (also /settings)
    help                  print this list of commands (also /help)
    exit, quit            leave (so does the end of input, Ctrl-D)

Each generation uses the current seed and then advances it by one, so repeating a prompt gives
a fresh sample and a session replays exactly from its first seed. Changing a setting does not
recompile (except top_k, which sets a shape). A bad setting prints a one-line `error: ...` and
keeps the old value. Outside interactive mode, errors print one line and exit non-zero.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, TextIO

from absl import flags

from cleangpt_jax import cli

if TYPE_CHECKING:
    from cleangpt_jax.loading import LM

COMMANDS = ("/temperature X", "/top_k K|off", "/top_p P|off", "/max_new_tokens N", "/seed S",
            "settings", "help", "exit | quit")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The CLI's flags, on `flag_values` (a private FlagValues in tests)."""
    d = dict(flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Training or distillation run to load.", **d)
    flags.DEFINE_string("hf", None, "Instead of --workdir: a GPT-2 hub name or local HF "
                        "directory (config.json + weights + tokenizer files).", **d)
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).", **d)
    flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.", **d)
    flags.DEFINE_integer("max_new_tokens", 50, "Tokens to generate per prompt.", **d)
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.", **d)
    flags.DEFINE_integer("top_k", 50, "Keep the k most likely tokens; 0 = off.", **d)
    flags.DEFINE_float("top_p", None, "Keep the nucleus of probability top_p, in (0, 1].", **d)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", **d)
    flags.DEFINE_bool("interactive", False, "Read prompts from stdin until exit/quit.", **d)


@dataclasses.dataclass
class Settings:
    """Sampling settings of the CLI (validated by `check`)."""

    max_new_tokens: int = 50
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0

    def check(self) -> "Settings":
        from cleangpt_jax import generation

        generation.check_generation_args(self.max_new_tokens, self.temperature, self.top_k,
                                         self.top_p)
        return self

    def with_value(self, name: str, text: str) -> "Settings":
        """A copy with `name` parsed from `text` (ValueError with a one-line message if bad)."""
        kinds = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
                 "seed": int}
        if name not in kinds:
            raise ValueError(f"unknown setting {name!r}: the settings are {', '.join(kinds)}")
        if text.lower() in ("off", "none") and name in ("top_k", "top_p"):
            value = None
        else:
            try:
                value = kinds[name](text)
            except ValueError:
                kind = "an integer" if kinds[name] is int else "a number"
                raise ValueError(f"{name} needs {kind}, got {text!r}") from None
        return dataclasses.replace(self, **{name: value}).check()

    def describe(self) -> str:
        off = lambda v: "off" if v is None else v  # noqa: E731
        return (f"max_new_tokens={self.max_new_tokens} temperature={self.temperature} "
                f"top_k={off(self.top_k or None)} top_p={off(self.top_p)} seed={self.seed}")


def load(workdir: str | None = None, hf: str | None = None, step: int | None = None) -> LM:
    """The model of --workdir (a training run, latest checkpoint or `step`) or of --hf (a GPT-2
    hub name or local directory with its tokenizer): `cleangpt_jax.loading.load_lm`."""
    if bool(workdir) == bool(hf):
        raise ValueError("pass --workdir=RUN (a training run) or --hf=NAME_OR_DIR (a GPT-2 "
                         "checkpoint), exactly one of them")
    if hf and step is not None:
        raise ValueError("--step applies to --workdir checkpoints, not to --hf")
    from cleangpt_jax.loading import load_lm  # after flags: keeps --help fast

    return load_lm(workdir or hf, step=step, kind="workdir" if workdir else "hf")


def generate_texts(lm: LM, prompts: list[str], settings: Settings) -> list[str]:
    """Each prompt followed by its continuation, decoded (`run_generation`)."""
    from cleangpt_jax.generation import run_generation

    _, texts = run_generation(lm.model, lm.params, lm.tokenizer, list(prompts),
                              max_new_tokens=settings.max_new_tokens,
                              temperature=settings.temperature, top_k=settings.top_k,
                              top_p=settings.top_p, seed=settings.seed)
    return texts


def interact(lm: LM, settings: Settings, stdin: TextIO = sys.stdin,
             stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> Settings:
    """The interactive loop (see the module docstring); returns the final settings."""
    tty = stdin.isatty()
    if tty:
        source = lm.source if lm.step is None else f"{lm.source} (step {lm.step})"
        print(f"{source}: type a prompt, or one of {', '.join(COMMANDS)}", file=stdout)
    while True:
        if tty:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\r\n")
        command = line.strip()
        if command.lower() in ("exit", "quit", "/exit", "/quit"):
            break
        if command.lower() in ("settings", "/settings"):
            print(settings.describe(), file=stdout, flush=True)
            continue
        if command.lower() in ("help", "/help"):
            print("commands: " + ", ".join(COMMANDS), file=stdout, flush=True)
            continue
        if not command:
            continue
        if command.startswith("/"):
            name, _, value = command[1:].partition(" ")
            try:
                settings = settings.with_value(name.strip(), value.strip())
            except ValueError as e:
                print(f"error: {' '.join(str(e).split())}", file=stderr, flush=True)
            else:
                print(settings.describe(), file=stdout, flush=True)
            continue
        try:
            text = generate_texts(lm, [line], settings)[0]
        except ValueError as e:
            print(f"error: {' '.join(str(e).split())}", file=stderr, flush=True)
            continue
        print(text + "\n", file=stdout, flush=True)
        settings = dataclasses.replace(settings, seed=settings.seed + 1)
    return settings


@cli.tool(usage="--workdir=DIR --prompt=TEXT (quote a prompt with spaces)")
def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    f = flag_values
    settings = Settings(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                        top_k=f.top_k, top_p=f.top_p, seed=f.seed).check()
    lm = load(f.workdir, f.hf, f.step)
    prompts = list(f.prompt) or ([] if f.interactive else [""])
    if prompts:
        texts = generate_texts(lm, prompts, settings)
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"----- prompt {i + 1}: {prompts[i]!r} -----")
            print(text + ("\n" if len(texts) > 1 else ""), flush=True)
        settings = dataclasses.replace(settings, seed=settings.seed + 1)
    if f.interactive:
        interact(lm, settings)


def run(flag_values: flags.FlagValues | None = None):
    cli.run(main, define_flags=define_flags, flag_values=flag_values)


if __name__ == "__main__":
    run()
