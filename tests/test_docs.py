"""Every `python -m cleangpt_jax...` command written in README.md and docs/*.md runs.

The commands are extracted from the files' fenced shell blocks, so the docs cannot drift from
the code. A file's commands form sequences: commands that name a common run directory
(`runs/X`, written or read) run in document order in one scratch directory, any other command
alone. Each sequence is one test that names its failing command. They run through bash with:

  - tiny sizes appended to each invocation (`TINY`; a later flag overrides an earlier one);
  - Hugging Face hub names (`gpt2`, ...) replaced by a local random GPT-2 directory with a
    byte-level BPE tokenizer, and hub datasets by a local dataset directory (JSON lines with
    train/validation splits and `text`/`story` columns), because CI has no network. The same
    code paths (`from_pretrained`-style loading, `datasets.load_dataset`) read them;
  - one persistent compilation cache shared by every subprocess, with XLA's optimisation
    passes off (no numbers are compared here): a program compiles once for all commands.

The sequences are independent, so they all start at the first sequence test, side by side in
a thread pool (a command's time is mostly single-threaded compilation); each test then waits
for its own sequence. A sequence whose first commands are another's, line for line (the
tutorial repeats the distillation guide's teacher commands and README's `train`), continues
from a copy of that one's directory after them rather than running them a second time.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from helpers import QUIET_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
INVOCATION = re.compile(r"python -m (cleangpt_jax(?:\.\w+)+)")
WARM_PYTHON = os.path.join(ROOT, "tests", "warm_python.py")

_MODEL = ["--config.model.n_layer=2", "--config.model.n_embd=32", "--config.model.n_head=2",
          "--config.model.block_size=32"]
_DATA = ["--config.data.max_samples=2"]
_QUIET = [f"--config.{k}={v}" for k, v in QUIET_RUN.items()]
TINY = {
    "cleangpt_jax.train": _MODEL + _DATA + [
        "--config.train.num_steps=2", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_every=2", "--config.train.eval_steps=1",
        "--config.train.warmup_steps=1", "--config.train.sample_max_new_tokens=0"] + _QUIET,
    # (no end-of-run samples: the documented generate commands run the generator, and each
    # run's samples would compile a generation loop of their own)
    "cleangpt_jax.distill": ["--config.model.n_layer=1", "--config.model.n_embd=16",
                             "--config.model.n_head=2", "--config.model.block_size=32",
                             "--config.train.batch_size=8", "--config.distill.steps_per_block=2",
                             "--config.distill.head.steps=2", "--config.distill.final.steps=2",
                             "--config.distill.eval_steps=1"] + _DATA + _QUIET,
    "cleangpt_jax.generate": ["--max_new_tokens=4"],
    "cleangpt_jax.evaluate": ["--config.eval.num_batches=1", "--config.eval.max_new_tokens=4",
                              "--config.eval.num_prompts=1"] + _DATA,
    "cleangpt_jax.token_analysis": _DATA,
}


def doc_commands(relpath: str) -> list[tuple[int, str]]:
    """(line number, command line) of each shell line that runs `python -m cleangpt_jax...`,
    backslash continuations joined."""
    out, in_block, in_shell, pending, start = [], False, False, "", 0
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                in_block = not in_block
                in_shell = in_block and stripped[3:].strip() in ("bash", "sh", "shell", "")
                continue
            if not in_shell:
                continue
            if not pending:
                start = n
            pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
            if stripped.endswith("\\"):
                continue
            command, pending = pending.split(" #")[0].strip(), ""
            if INVOCATION.search(command):
                out.append((start, command))
    return out



def run_dirs(line: str) -> set[str]:
    """The run directories (`runs/...`) a shell line writes or reads. A train without
    --workdir writes runs/<config file name>, runs/default without --config."""
    dirs = set()
    for segment in re.split(r"\s*(?:&&|;|&)\s*", line):
        if not INVOCATION.search(segment):
            continue
        words = shlex.split(segment)
        values = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
        dirs |= {os.path.normpath(v) for v in values.values() if v.startswith("runs/")}
        if INVOCATION.search(segment).group(1) == "cleangpt_jax.train" and "workdir" not in values:
            config = values.get("config")
            dirs.add(os.path.join("runs", os.path.splitext(os.path.basename(config))[0]
                                  if config else "default"))
    return dirs


def doc_sequences(relpath: str) -> list[list[tuple[int, str]]]:
    """The file's commands (doc_commands) grouped into sequences: the connected groups of
    commands that share a run directory, each in document order, ordered by first line."""
    sequences: list[tuple[set[str], list[tuple[int, str]]]] = []
    for lineno, line in doc_commands(relpath):
        dirs = run_dirs(line)
        joined = [s for s in sequences if s[0] & dirs]
        merged = (set(dirs), sorted([(lineno, line)] + [c for s in joined for c in s[1]]))
        for s in joined:
            merged[0].update(s[0])
        sequences = [s for s in sequences if all(s is not j for j in joined)] + [merged]
    return sorted((s[1] for s in sequences), key=lambda commands: commands[0][0])


SEQUENCES = {f"{relpath}:{commands[0][0]}": (relpath, commands)
             for relpath in DOC_FILES for commands in doc_sequences(relpath)}


def _config_file(args: list[str]):
    for a in args:
        if a.startswith("--config=") and a.endswith(".py"):
            return runpy.run_path(os.path.join(ROOT, a.split("=", 1)[1]))["get_config"]()
    return None


def adapt(segment: str, local_gpt2: str, local_data: str = "LOCAL_DATA") -> str:
    """One `python -m cleangpt_jax.X ...` invocation, made tiny and offline."""
    words = shlex.split(segment)
    module = next(w for w in words if w.startswith("cleangpt_jax"))
    # Hub names on the command line -> the local GPT-2 directory / the local dataset.
    words = [re.sub(r"^(--[\w.]+=)(%s)$" % "|".join(map(re.escape, HUB_MODELS)),
                    lambda m: m.group(1) + local_gpt2, w) for w in words]
    words = [re.sub(r"^(--config\.data\.name=).*$", lambda m: m.group(1) + local_data, w)
             for w in words]
    extra = list(TINY.get(module, []))
    cfg = _config_file(words)
    if module == "cleangpt_jax.distill":
        from cleangpt_jax.distill.config import get_config as distill_default

        cfg = cfg or distill_default()
        if str(cfg.distill.teacher) in HUB_MODELS and not any(
                w.startswith("--config.distill.teacher=") for w in words):
            extra.append(f"--config.distill.teacher={local_gpt2}")
        # Epoch budgets override step counts (and cannot be reset to None on a command line).
        d = cfg.distill
        epochs = {"epochs_per_block": d.epochs_per_block, "head.epochs": d.head.epochs,
                  "final.epochs": d.final.epochs}
        extra += [f"--config.distill.{key}=0.0001" for key, v in epochs.items() if v is not None]
    if cfg is not None:
        if cfg.tokenizer.type == "gpt2" and str(cfg.tokenizer.name_or_path) in HUB_MODELS:
            extra.append(f"--config.tokenizer.name_or_path={local_gpt2}")
        if cfg.data.source == "hf" and not any(w.startswith("--config.data.name=")
                                               for w in words):
            extra.append(f"--config.data.name={local_data}")
    return shlex.join(words + extra)


def adapt_line(line: str, local_gpt2: str, local_data: str = "LOCAL_DATA") -> str:
    """Adapt every invocation in a shell line; other parts (pip installs) are dropped, shell
    operators (&&, &, ;) and environment assignments are kept."""
    parts = re.split(r"(\s*(?:&&|;|&)\s*)", line)
    kept = []
    for part in parts:
        if re.fullmatch(r"\s*(?:&&|;|&)\s*", part):
            kept.append(part)
        elif INVOCATION.search(part):
            start = INVOCATION.search(part).start()
            kept.append(part[:start] + adapt(part[start:], local_gpt2, local_data))
        elif part.strip() == "wait":
            kept.append(part)
        else:
            kept.append(None)
    # Drop non-invocations together with the operator that joins them to the rest.
    out = []
    for i, part in enumerate(kept):
        if part is None:
            if out:
                out.pop()
            elif i + 1 < len(kept):
                kept[i + 1] = ""
            continue
        out.append(part)
    return "".join(out).strip()


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    """A local stand-in for a hub dataset such as roneneldan/TinyStories: JSON lines with train
    and validation splits, each record's text under both `text` and `story`."""
    import json

    from cleangpt_jax.data import corpus

    path = tmp_path_factory.mktemp("hub") / "stories"
    path.mkdir()
    text = corpus.shakespeare_text()[:60_000]
    docs = [text[i:i + 600] for i in range(0, len(text), 600)]
    for split, part in (("train", docs[:-10]), ("validation", docs[-10:])):
        with open(path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for doc in part:
                f.write(json.dumps({"text": doc, "story": doc}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def local_gpt2(tmp_path_factory, gpt2_tokenizer_dir) -> str:
    """A random GPT-2 (2 layers, 32 wide) saved with its BPE tokenizer: our stand-in for `gpt2`."""
    import shutil

    import torch
    import transformers

    path = tmp_path_factory.mktemp("hub") / "gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    for name in os.listdir(gpt2_tokenizer_dir):
        shutil.copy(os.path.join(gpt2_tokenizer_dir, name), path / name)
    return str(path)


def test_docs_contain_commands():
    found = {f: doc_commands(f) for f in DOC_FILES}
    assert found["README.md"], "README.md shows no python -m cleangpt_jax command"
    assert sum(map(len, found.values())) >= 10, found


def test_adapt_line_keeps_operators_and_drops_installs():
    line = "pip install -e . && python -m cleangpt_jax.generate --hf=gpt2 --prompt='a b'"
    assert adapt_line(line, "/x") == ("python -m cleangpt_jax.generate --hf=/x "
                                      "'--prompt=a b' --max_new_tokens=4")
    two = ("A=1 python -m cleangpt_jax.generate --workdir=r & "
           "python -m cleangpt_jax.generate --workdir=r; wait")
    assert adapt_line(two, "/x") == ("A=1 python -m cleangpt_jax.generate --workdir=r "
                                     "--max_new_tokens=4 & python -m cleangpt_jax.generate "
                                     "--workdir=r --max_new_tokens=4; wait")



def test_a_sequence_is_the_commands_that_share_a_run_directory():
    assert run_dirs("python -m cleangpt_jax.train") == {"runs/default"}
    assert run_dirs("python -m cleangpt_jax.train --config=configs/sasp_char.py") == {
        "runs/sasp_char"}
    assert run_dirs("python -m cleangpt_jax.export_hf --workdir=runs/t --out=runs/t_hf && "
                    "python -m cleangpt_jax.generate --hf=gpt2") == {"runs/t", "runs/t_hf"}
    readme = [n for n, _ in SEQUENCES["README.md:27"][1]]
    assert readme == [n for n, _ in doc_commands("README.md")]  # all of them use runs/default

def run_commands(commands: list[tuple[int, str, str]], cwd, env) -> tuple[int, object] | None:
    """Run (line number, line, adapted command)s in order in `cwd`: (index, process) of the
    first failure (later commands depend on it and do not run), or None. `python` is the
    warm stand-in (tests/warm_python.py) when env names its server, else this interpreter."""
    python = sys.executable
    if env.get("WARM_PYTHON_SOCKET"):
        python = f"{sys.executable} {WARM_PYTHON} {env['WARM_PYTHON_SOCKET']}"
    for i, (_, _, command) in enumerate(commands):
        proc = subprocess.run(["bash", "-c", command.replace("python ", f"{python} ")],
                              cwd=cwd, env=env, input="ROMEO:\nsettings\nexit\n",
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return i, proc
    return None


def failure_report(relpath: str, command: tuple[int, str, str], proc) -> str:
    lineno, line, adapted = command
    return (f"{relpath}:{lineno}: {line}\nran: {adapted}\n{proc.stdout[-1500:]}\n"
            f"{proc.stderr[-3000:]}")


def shared_prefix(a: list[tuple[int, str, str]], b: list[tuple[int, str, str]]) -> int:
    """How many first commands two sequences share (the same adapted command lines)."""
    n = 0
    while n < min(len(a), len(b)) and a[n][2] == b[n][2]:
        n += 1
    return n


def run_sequences(host: str, branches: list[tuple[str, int]], plans: dict, root,
                  env) -> dict[str, str | None]:
    """Run sequence `host`, and each branch (key, k): a sequence whose first k commands are
    the host's (the same command lines, both starting from an empty directory), so it continues
    from a copy of the host's directory taken after them instead of running them again.
    {key: the first failure's report (naming that sequence's own doc line) or None}."""
    import shutil

    def directory(key):
        path = root / re.sub(r"\W", "_", key)
        path.mkdir()
        for name in ("configs", "docs", "README.md"):
            os.symlink(os.path.join(ROOT, name), path / name)
        return path

    relpath, commands = plans[host]
    cwd, done, failed, starts = directory(host), 0, None, {}
    for split in sorted({k for _, k in branches} | {len(commands)}):
        failed = run_commands(commands[done:split], cwd, env)
        if failed:
            failed = (done + failed[0], failed[1])
            break
        for key, k in branches:
            if k == split:
                starts[key] = root / re.sub(r"\W", "_", key)
                shutil.copytree(cwd, starts[key], symlinks=True)
        done = split
    reports = {host: failed and failure_report(relpath, commands[failed[0]], failed[1])}
    for key, k in branches:
        relpath, commands = plans[key]
        if key not in starts:  # the host failed within the shared commands
            reports[key] = failure_report(relpath, commands[failed[0]], failed[1])
            continue
        rest = run_commands(commands[k:], starts[key], env)
        reports[key] = rest and failure_report(relpath, commands[k + rest[0]], rest[1])
    return reports


@pytest.fixture(scope="module")
def doc_env(tmp_path_factory, fast_compile):
    """Scratch root and subprocess environment of this module's commands and notebook: one
    token cache and one persistent compilation cache (XLA's optimisation passes off; nothing
    here compares numbers), so a program compiles once for every process that runs it."""
    root = tmp_path_factory.mktemp("doc_commands")
    return root, dict(fast_compile, CLEANGPT_JAX_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1",
                      HF_DATASETS_CACHE=str(root / "hf_datasets"))


@pytest.fixture(scope="module")
def warm_env(doc_env):
    """doc_env's environment for the commands, naming a warm_python server started with that
    same environment (plus the names of its socket and of its environment's file); the
    environment alone when the server says it cannot be a clean stand-in. The server runs
    until the module's commands are done and is waited for."""
    import json

    root, env = doc_env
    socket_path, env_file = str(root / "warm.sock"), str(root / "warm_env.json")
    with open(env_file, "w") as f:
        json.dump(env, f)
    server = subprocess.Popen([sys.executable, WARM_PYTHON, "serve", socket_path], env=env,
                              stdout=subprocess.PIPE, text=True)
    state = server.stdout.readline().strip()
    if state != "ready":
        server.wait()
        yield env
        return
    yield dict(env, WARM_PYTHON_SOCKET=socket_path, WARM_PYTHON_ENV=env_file)
    server.terminate()
    server.wait(timeout=300)


@pytest.fixture(scope="module")
def sequence_runs(request, local_gpt2, local_data, doc_env, warm_env):
    """Every selected sequence of SEQUENCES, started now in a thread pool, the longest first,
    a sequence that begins with another's commands as a branch of it (run_sequences):
    {test id: (future of {test id: its failure report or None}, test id)}."""
    from concurrent.futures import ThreadPoolExecutor

    root, env = doc_env[0], warm_env
    selected = [item.callspec.params["sequence"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_documented_command_sequence_runs"]
    # Adapting imports config files: do it here, not in the threads (concurrent imports).
    plans = {key: (SEQUENCES[key][0], [(n, line, adapt_line(line, local_gpt2, local_data))
                                       for n, line in SEQUENCES[key][1]])
             for key in selected}
    pool = ThreadPoolExecutor(max(2, os.cpu_count() or 1))
    hosts: dict[str, list[tuple[str, int]]] = {}  # host key -> its branches (key, k)
    for key in sorted(plans, key=lambda key: -len(plans[key][1])):
        k, host = max(((shared_prefix(plans[h][1], plans[key][1]), h) for h in hosts),
                      default=(0, None))
        if k:
            hosts[host].append((key, k))
        else:
            hosts[key] = []
    jobs = {host: pool.submit(run_sequences, host, branches, plans, root, env)
            for host, branches in hosts.items()}
    futures = {key: (job, key) for host, job in jobs.items()
               for key in [host] + [b for b, _ in hosts[host]]}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_documented_command_sequence_runs(sequence, sequence_runs):
    job, key = sequence_runs[sequence]
    report = job.result()[key]
    assert report is None, report
