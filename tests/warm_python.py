"""A warm stand-in for `python -m cleangpt_jax.<tool> ...` in tests/test_docs.py's commands.

Each documented command is a fresh interpreter that spends seconds importing jax, flax, orbax,
datasets and the project before its tiny run. Here one server process imports them once and
forks a child per command, which runs the module as `python -m` would: as __main__, with the
command's argv, environment, working directory and standard streams (the client's own file
descriptors, passed over a Unix socket), exiting through the interpreter's normal shutdown
with the command's exit status. The client (what the command line calls instead of python)
imports nothing heavy.

The fork is only a stand-in while it cannot differ from a fresh process: the server refuses to
start (and every command runs in a real interpreter) unless, after its imports, no JAX backend
is initialised and the only threads besides the main one are those numpy (OpenBLAS's pool) and
pyarrow (jemalloc's background thread) start when imported, which both libraries restart in a
forked child; a command whose environment differs from the server's (other than
the shell's own PWD, OLDPWD, SHLVL, _) is run by a real interpreter, since jax and the Hugging
Face libraries read their settings from the environment when they are imported.

    python warm_python.py serve SOCKET                  # prints "ready" or "cold: why"
    python warm_python.py SOCKET -m MODULE ARGS...      # like python -m MODULE ARGS...
"""

import json
import os
import socket
import sys

SHELL_VARIABLES = ("PWD", "OLDPWD", "SHLVL", "_")
# The tool modules themselves are not preloaded: runpy runs them as __main__.
PRELOAD = ("cleangpt_jax.trainer", "cleangpt_jax.loop", "cleangpt_jax.generation",
           "cleangpt_jax.loading", "cleangpt_jax.evaluation", "cleangpt_jax.hf",
           "cleangpt_jax.distill.runner", "cleangpt_jax.data", "cleangpt_jax.tokenizers",
           "ml_collections.config_flags", "absl.app", "datasets", "pyarrow.compute",
           "transformers", "matplotlib.figure", "matplotlib.backends.backend_agg", "PIL.Image")


def _comparable(env) -> dict:
    return {k: v for k, v in env.items() if k not in SHELL_VARIABLES}


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _cold_reason(fork_safe_threads: int) -> str:
    """'' when a fork of this process is a clean start for a command; else why not."""
    from jax._src import xla_bridge

    if xla_bridge._backends:  # noqa: SLF001 -- no public way to ask
        return "a JAX backend is initialised"
    threads = _threads()
    return (f"{threads} threads after the imports, {fork_safe_threads} expected"
            if threads != fork_safe_threads else "")


def _preload() -> int:
    """Import what the tools import; returns the number of threads numpy and pyarrow start."""
    import importlib

    import numpy  # noqa: F401
    import pyarrow  # noqa: F401

    fork_safe_threads = _threads()
    sys.modules["torch"] = None  # as cleangpt_jax.loop does for tensorboardX: torch stays out
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]
    for name in PRELOAD:
        importlib.import_module(name)
    return fork_safe_threads


def _reap(block: bool) -> None:
    """Collect finished children (so that their CPU time counts in this process's)."""
    while True:
        try:
            if os.waitpid(-1, 0 if block else os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def serve(path: str):
    """Accept commands until SIGTERM, then wait for the running ones and exit. Returns
    (argv, env, cwd) in a forked command process."""
    import signal

    import gc

    reason = _cold_reason(_preload())
    print("ready" if not reason else f"cold: {reason}", flush=True)
    if reason:
        sys.exit(0)
    gc.freeze()  # the children's collections leave the preloaded objects' pages shared
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(0.2)
    while not stop:
        _reap(block=False)
        try:
            conn, _ = listener.accept()
        except (TimeoutError, InterruptedError):
            continue
        conn.setblocking(True)
        if os.fork() == 0:  # a waiter per command: forks the command, reports its status
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fresh interpreter
            listener.close()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                conn.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                return request["argv"], request["env"], request["cwd"]
            for fd in fds:
                os.close(fd)
            _, status = os.waitpid(pid, 0)
            conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
            os._exit(0)
        conn.close()
    listener.close()
    os.unlink(path)
    _reap(block=True)
    sys.exit(0)


def run_command(argv, env, cwd) -> None:
    """In the forked process: become `python -m argv[1] argv[2:]` (argv[0] is "-m")."""
    import runpy

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[0] = cwd  # python -m puts the working directory first
    sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in argv[0]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


def client(path: str, args: list[str]) -> None:
    """Run `python args` through the server at `path` (a real interpreter when it cannot)."""
    real = [sys.executable, *args]
    server_env = os.environ.get("WARM_PYTHON_ENV")
    env = {k: v for k, v in os.environ.items() if k not in ("WARM_PYTHON_ENV",
                                                              "WARM_PYTHON_SOCKET")}
    if args[0] != "-m" or not server_env or not os.path.exists(path):
        os.execve(sys.executable, real, env)
    with open(server_env, encoding="utf-8") as f:
        if _comparable(env) != _comparable(json.load(f)):
            os.execve(sys.executable, real, env)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = {"argv": args, "env": env, "cwd": os.getcwd()}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    status = b""
    while chunk := conn.recv(64):
        status += chunk
    code = int(status) if status else 1
    if code < 0:  # killed by a signal: end the same way
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        command = serve(sys.argv[2])
        run_command(*command)
    else:
        client(sys.argv[1], sys.argv[2:])
