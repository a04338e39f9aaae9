"""Paths that may be URLs: local files, gs:// buckets and anything else fsspec handles.

Every file a tool reads or writes outside Orbax goes through these functions, so a workdir,
an output directory, a teacher, data files and caches may each be a local path or a URL
(`gs://bucket/run`, `s3://...`, `memory://...` for tests). Local paths keep their exact
behaviour: these are os.path / open / os.replace for them. A URL is anything with a
`scheme://` other than file://; fsspec (gcsfs for gs://, the `gcs` extra) serves it.

    is_url(p)  join(p, *parts)  absolute(p)  parent(p)  basename(p)
    exists(p)  isdir(p)  isfile(p)  listdir(p)  makedirs(p)  remove(p)  remove_tree(p)
    walk_files(dir) -> relative paths    every file below `dir`, at any depth ('/'-separated)
    move(src, dst)  glob_files(url_pattern)  file_version(p)
    read_text(p)  read_bytes(p)  write_text(p, text)  write_bytes(p, data)  open_file(p, mode)
    write_with(p, write)                 write(file) fills `p` atomically (streams, np.savez)
    local_copy(url_dir) -> local dir     upload_dir(local_dir, url_dir)
    check_reachable(p, what)             a ConfigError naming the URL when it cannot be used
    unreachable(endpoint)                '' or why one TCP connection to it fails (also the hub's)

Atomic writes: a local file is written beside and renamed over (`os.replace`); an object is
written in one upload (an object store has no rename, and an upload is all or nothing).
Errors: an unreachable endpoint, a missing bucket or a refused permission raise a one-line
ConfigError that names the URL (`storage_error`), never a silent local fallback.

Against a local GCS emulator (STORAGE_EMULATOR_HOST set, see tests/gcs_emulator.py) gcsfs's
storage-layout lookup (a gRPC call to the control plane that an emulator does not serve; it
can take about a minute before gcsfs falls back) is switched off:
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, unless the user set it.
"""

from __future__ import annotations

import atexit
import builtins
import io
import os
import re
import shutil
import sys
import tempfile
import uuid
from typing import BinaryIO, Callable

from cleangpt_jax.config import ConfigError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def configure_gcs_emulator() -> None:
    """With STORAGE_EMULATOR_HOST set, make gs:// use gcsfs's plain HTTP filesystem, which
    skips the bucket-type (storage layout) lookup its default filesystem makes before each
    open. gcsfs reads the switch when imported; if it was imported already, fsspec's gs://
    and gcs:// are re-registered to the plain class."""
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if "gcsfs" in sys.modules and \
            os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"].lower() not in ("true", "1"):
        import fsspec
        from gcsfs.core import GCSFileSystem
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)


# ------------------------------------------------------------------------------------ names
def is_url(path) -> bool:
    """Whether `path` names a remote or virtual filesystem (`scheme://...`, not file://)."""
    m = _URL.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return bool(m) and m.group(1).lower() != "file"


def _local(path) -> str:
    path = os.fspath(path)
    return path[len("file://"):] if path.lower().startswith("file://") else path


def join(path, *parts) -> str:
    if not is_url(path):
        return os.path.join(_local(path), *parts)
    out = os.fspath(path).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def absolute(path) -> str:
    """A local path made absolute; a URL as it is (without a trailing slash)."""
    return os.fspath(path).rstrip("/") if is_url(path) else os.path.abspath(_local(path))


def parent(path) -> str:
    if not is_url(path):
        return os.path.dirname(_local(path))
    head, _, tail = os.fspath(path).rstrip("/").rpartition("/")
    return head if not head.endswith(":/") else os.fspath(path).rstrip("/")


def basename(path) -> str:
    return os.fspath(path).rstrip("/").rpartition("/")[2] if is_url(path) \
        else os.path.basename(_local(path))


# ---------------------------------------------------------------------------- filesystems
def _fs(url: str):
    """(fsspec filesystem, path within it) for `url`."""
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover (fsspec comes with datasets)
        raise ConfigError(f"{url}: URLs need fsspec (pip install fsspec)") from e
    configure_gcs_emulator()  # (the variables may be set after this module was imported)
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = _URL.match(url).group(1)
        extra = " (pip install 'cleangpt_jax[gcs]')" if scheme in ("gs", "gcs") else ""
        raise ConfigError(f"{url}: no filesystem for {scheme}:// ({e}){extra}") from None


def storage_error(url: str, e: BaseException, doing: str = "access") -> ConfigError:
    """A one-line ConfigError naming `url` for an exception raised while `doing` it."""
    text = (str(e).strip().splitlines() or [""])[0][:200] or type(e).__name__
    return ConfigError(f"cannot {doing} {url} ({type(e).__name__}: {text}): check the bucket "
                       f"name, that it exists, the endpoint/network and your credentials")


def _call(url: str, doing: str, fn, *args, **kwargs):
    """fn(*args) on the URL's filesystem, its failures as `storage_error`s."""
    try:
        return fn(*args, **kwargs)
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # aiohttp, gcsfs HttpError, PermissionError, ...: one line for the user
        raise storage_error(url, e, doing) from None


def exists(path) -> bool:
    if not is_url(path):
        return os.path.exists(_local(path))
    fs, p = _fs(path)
    return _call(path, "read", fs.exists, p)


def isdir(path) -> bool:
    if not is_url(path):
        return os.path.isdir(_local(path))
    fs, p = _fs(path)
    return _call(path, "read", fs.isdir, p)


def isfile(path) -> bool:
    if not is_url(path):
        return os.path.isfile(_local(path))
    fs, p = _fs(path)
    return _call(path, "read", fs.isfile, p)


def listdir(path) -> list[str]:
    """The names (not paths) of the entries of directory `path`."""
    if not is_url(path):
        return os.listdir(_local(path))
    fs, p = _fs(path)
    fs.invalidate_cache(p)
    entries = _call(path, "list", fs.ls, p, detail=False)
    return sorted({e.rstrip("/").rpartition("/")[2] for e in entries} - {""})


def walk_files(path) -> list[str]:
    """The files at any depth below directory `path`, as sorted '/'-separated paths relative to
    it (directories themselves are not listed; [] when `path` is missing or a file). On an
    object store: every object under the prefix, from one listing."""
    if not is_url(path):
        root = _local(path)
        return sorted(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/")
                      for directory, _, names in os.walk(root) for name in names)
    fs, p = _fs(path)
    p = p.rstrip("/")
    fs.invalidate_cache(p)
    found = _call(path, "list", fs.find, p)
    # (find returns [p] for a file; a name ending in '/' is a directory placeholder object)
    return sorted(f[len(p) + 1:] for f in found if f.startswith(p + "/") and not f.endswith("/"))


def makedirs(path) -> None:
    """Create directory `path` and its parents (object stores have no directories: no-op
    beyond what the filesystem does)."""
    if not is_url(path):
        os.makedirs(_local(path), exist_ok=True)
        return
    fs, p = _fs(path)
    _call(path, "write", fs.makedirs, p, exist_ok=True)


def remove(path) -> None:
    if not is_url(path):
        os.remove(_local(path))
        return
    fs, p = _fs(path)
    _call(path, "delete", fs.rm, p)


def remove_tree(path) -> None:
    """Remove directory `path` and everything under it (on an object store: every object under
    the prefix); nothing to do when it does not exist."""
    try:
        if not is_url(path):
            shutil.rmtree(_local(path))
            return
        fs, p = _fs(path)
        _call(path, "delete", fs.rm, p, recursive=True)
        fs.invalidate_cache()
    except FileNotFoundError:
        pass


def move(src, dst) -> None:
    """Move a file or a directory tree (on an object store: copy, then delete; GCS's
    server-side move is not served by every endpoint)."""
    if not is_url(src) and not is_url(dst):
        shutil.move(_local(src), _local(dst))
        return
    if is_url(src) != is_url(dst):
        raise ValueError(f"cannot move {src} to {dst}: one is a URL, the other is not")
    fs, p = _fs(src)
    _, q = _fs(dst)
    p, q = p.rstrip("/"), q.rstrip("/")
    files = _call(src, "list", fs.find, p) or [p]
    for f in files:  # (one server-side copy each: fsspec's recursive copy is far slower)
        _call(src, "move", fs.cp_file, f, q + f[len(p):])
    _call(src, "move", fs.rm, p, recursive=True)
    fs.invalidate_cache()


def glob_files(pattern: str) -> list[str]:
    """The files (not directories) matching URL glob `pattern` (`**` recursive), as sorted
    URLs. (Local patterns: glob.glob, which the callers use directly.)"""
    fs, p = _fs(pattern)
    scheme = _URL.match(pattern).group(1)
    found = _call(pattern, "list", fs.glob, p, detail=True)
    return sorted(f"{scheme}://{name.lstrip('/')}" if not name.startswith(f"{scheme}://")
                  else name for name, info in found.items() if info.get("type") == "file")


def file_version(path) -> tuple:
    """(size, version) of a file: what changes when it is rewritten. Local: (st_size,
    st_mtime_ns); an object: its size and generation (or etag, or modification time)."""
    if not is_url(path):
        st = os.stat(_local(path))
        return st.st_size, st.st_mtime_ns
    fs, p = _fs(path)
    info = _call(path, "read", fs.info, p)
    version = next((info[k] for k in ("generation", "etag", "ETag", "mtime", "updated",
                                      "LastModified", "created") if info.get(k)), None)
    return int(info.get("size") or 0), str(version)


# ------------------------------------------------------------------------------- contents
def open_file(path, mode: str = "r", **kwargs):
    """A file object for reading or writing `path` (an object is uploaded on close)."""
    if not is_url(path):
        return builtins.open(_local(path), mode, **kwargs)
    fs, p = _fs(path)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return _call(path, "open", fs.open, p, mode, **kwargs)


def read_bytes(path) -> bytes:
    if not is_url(path):
        with builtins.open(_local(path), "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return _call(path, "read", fs.cat_file, p)


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_with(path, write: Callable[[BinaryIO], object]) -> None:
    """Make `path` hold what write(file) writes into a binary file, in one step: a reader sees
    the old contents or the new ones, never a part; if write fails, `path` is left as it was.
    A local file is written beside `path` (a hidden `.<name>.tmp-<random>`) and renamed over
    it (`os.replace`). An object is streamed into an upload that is committed only once write
    returns (fsspec's autocommit=False: for gs:// a resumable upload, finalised by `commit`,
    abandoned by `discard`), so nothing is staged on local disk. (For streams too big to hold
    in memory, and writers that want a file: np.savez, np.save.)"""
    if is_url(path):
        fs, p = _fs(path)
        if _URL.match(path).group(1).lower() == "memory":  # (commits a file when it opens
            buffer = io.BytesIO()                             # it; the data is in memory anyway)
            write(buffer)
            write_bytes(path, buffer.getvalue())
            return
        f = _call(path, "write", fs.open, p, "wb", autocommit=False)
        try:
            write(f)
            f.close()
            _call(path, "write", f.commit)
        except BaseException:
            f.discard()
            raise
        return
    directory, name = os.path.split(_local(path))
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with builtins.open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, _local(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path, data: bytes) -> None:
    """Replace `path` with `data` in one step (a reader sees the old file or the new one): a
    local file through `write_with`, an object in one upload."""
    if not is_url(path):
        write_with(path, lambda f: f.write(data))
        return
    fs, p = _fs(path)
    _call(path, "write", fs.pipe_file, p, data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------- directories, locally
_LOCAL_ROOT: list[str] = []


def _scratch(prefix: str) -> str:
    """A fresh local directory, removed when the process exits."""
    if not _LOCAL_ROOT:
        _LOCAL_ROOT.append(tempfile.mkdtemp(prefix="cleangpt_jax-storage-"))
        atexit.register(shutil.rmtree, _LOCAL_ROOT[0], True)
    return tempfile.mkdtemp(prefix=prefix, dir=_LOCAL_ROOT[0])


def local_copy(path) -> str:
    """A local directory with the files of directory `path`: `path` itself when local, else
    a download into a scratch directory (removed at exit) for libraries that read local
    files only (tokenizers, safetensors)."""
    if not is_url(path):
        return _local(path)
    fs, p = _fs(path)
    if not _call(path, "read", fs.isdir, p):
        raise FileNotFoundError(path)
    dest = _scratch("download-")
    _call(path, "download", fs.get, p.rstrip("/") + "/", dest + "/", recursive=True)
    return dest


def scratch_dir(prefix: str = "upload-") -> str:
    """A fresh local directory (removed at exit) to build files in before `upload_dir`."""
    return _scratch(prefix)


def upload_dir(local_dir: str, path, *, last: str | None = None) -> None:
    """Put every file under `local_dir` at the same relative path under `path` (a URL: each
    file in one upload; a local path: written beside and renamed). The file named `last`
    (relative to `local_dir`) goes after all the others: a reader that waits for it sees a
    complete directory."""
    for rel in sorted(walk_files(local_dir), key=lambda r: r == last):
        target = join(path, *rel.split("/"))
        with builtins.open(os.path.join(local_dir, rel), "rb") as f:
            data = f.read()
        if not is_url(path):
            makedirs(os.path.dirname(target))
        write_bytes(target, data)


# ------------------------------------------------------------------------------- checks
def _gcs_endpoint() -> str:
    """The HTTP endpoint gs:// requests go to (gcsfs's rule: the emulator's when set)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return "https://storage.googleapis.com"
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def unreachable(endpoint: str, timeout_s: float = 10.0) -> str:
    """'' when a TCP connection to `endpoint`'s host opens within timeout_s; else why not,
    as 'host:port: reason'. One connection, opened and closed: an unreachable endpoint (a GCS
    endpoint, the Hugging Face hub) is told at once, not after a client's retries."""
    import socket
    import urllib.parse

    u = urllib.parse.urlsplit(endpoint)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout_s).close()
        return ""
    except OSError as e:
        return f"{u.hostname}:{port}: {e.strerror or e}"


def check_reachable(path, what: str) -> None:
    """For a URL: a ConfigError naming `what` and the URL unless its filesystem answers and,
    for bucket stores (gs://, s3://, ...), its bucket exists. Local paths: nothing to check."""
    if not is_url(path):
        return
    fs, p = _fs(path)
    bucket = p.split("/", 1)[0]
    scheme = _URL.match(path).group(1).lower()
    try:
        if scheme in ("gs", "gcs") and (reason := unreachable(_gcs_endpoint())):
            raise ConnectionError(reason)
        if scheme in ("gs", "gcs", "s3", "s3a", "az", "abfs") and not fs.exists(bucket):
            raise ConfigError(f"{what} {path}: the bucket {scheme}://{bucket} does not exist "
                              f"(or is not visible with these credentials): create it or fix "
                              f"the name")
        fs.exists(p)
    except ConfigError:
        raise
    except Exception as e:
        text = (str(e).strip().splitlines() or [""])[0][:200] or type(e).__name__
        raise ConfigError(f"{what} {path} is not reachable ({type(e).__name__}: {text}): check "
                          f"the endpoint/network, the bucket and your credentials") from None
