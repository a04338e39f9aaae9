"""A local Google Cloud Storage emulator for tests: gs:// without a network or credentials.

`gcp-storage-emulator` (PyPI, the `test` extra) serves GCS's JSON API over HTTP. Three
environment variables point everything at it, and they are all a user or a test sets:

    TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT   TensorStore (Orbax's array storage)
    GOOGLE_AUTH_TOKEN_FOR_TESTING=...                 TensorStore: a fixed token, no OAuth
    STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT      gcsfs (fsspec/etils: every other file)

(gcsfs's storage-layout lookup, which stalls against an emulator, is switched off by
cleangpt_jax.storage whenever STORAGE_EMULATOR_HOST is set.)

Use the `gcs_emulator` fixture (one emulator per test session, i.e. per xdist worker):

    from gcs_emulator import gcs_emulator  # noqa: F401  (import the fixture into the module)

    def test_x(gcs_emulator):
        url = gcs_emulator.new_url("run")      # gs://BUCKET/run-<unique>, nothing there yet
        subprocess.run([...], env=dict(os.environ, **gcs_emulator.env))

While the fixture is active the three variables are set in os.environ; they are restored when
the session ends and the emulator is stopped.

The emulator is run through this file (`python tests/gcs_emulator.py PORT BUCKET`), which adds
what TensorStore's OCDBT writes rely on and gcp-storage-emulator leaves out: the
x-goog-generation header on downloads, the ifGenerationMatch / ifGenerationNotMatch
preconditions (412 / 304 as GCS answers), and one request at a time (its in-memory store is
not thread-safe); and what a cancelled upload needs: DELETE on a resumable upload session
forgets it and answers 499, as GCS does (gcsfs's `discard`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

EMULATOR_VARIABLES = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                      "STORAGE_EMULATOR_HOST")
DEFAULT_BUCKET = "cleangpt-test"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(endpoint: str) -> dict[str, str]:
    """The three variables that point TensorStore and gcsfs at `endpoint` (http://host:port)."""
    return {"TENSORSTORE_GCS_HTTP_URL": endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
            "STORAGE_EMULATOR_HOST": endpoint}


@dataclasses.dataclass
class GcsEmulator:
    """A running emulator: `endpoint` http://127.0.0.1:PORT holding the empty `bucket`."""
    process: subprocess.Popen
    endpoint: str
    bucket: str
    _names: itertools.count = dataclasses.field(default_factory=itertools.count)

    @property
    def env(self) -> dict[str, str]:
        """The three variables to pass to a subprocess (`dict(os.environ, **emulator.env)`)."""
        return emulator_env(self.endpoint)

    def new_url(self, name: str = "run") -> str:
        """gs://BUCKET/NAME-<n>-<pid>: a prefix in the bucket that no other caller gets."""
        return f"gs://{self.bucket}/{name}-{next(self._names)}-{os.getpid()}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _bucket_ready(endpoint: str, bucket: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_emulator(bucket: str = DEFAULT_BUCKET) -> GcsEmulator:
    """Start gcp-storage-emulator (in memory) on a free local port with `bucket` created, and
    wait until the bucket answers. Raises RuntimeError with the emulator's stderr if it does
    not come up within START_TIMEOUT_S."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(port), bucket],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    emulator = GcsEmulator(process=process, endpoint=endpoint, bucket=bucket)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _bucket_ready(endpoint, bucket):
        if not emulator.alive() or time.monotonic() > deadline:
            emulator.stop()
            log.seek(0)
            raise RuntimeError(f"gcp-storage-emulator did not start on {endpoint}: "
                               f"{log.read().decode(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return emulator


@contextlib.contextmanager
def running_emulator(bucket: str = DEFAULT_BUCKET):
    """Inside the block an emulator runs and os.environ holds exactly its three variables
    (`EMULATOR_VARIABLES`); afterwards the emulator is stopped and os.environ restored."""
    emulator = start_emulator(bucket)
    old = {k: os.environ.get(k) for k in EMULATOR_VARIABLES}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        emulator.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcsfs = sys.modules.get("gcsfs")
        if gcsfs is not None:  # cached filesystems (and their listings) point at this emulator
            gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GcsEmulator for the whole session; the three variables are set in os.environ."""
    with running_emulator() as emulator:
        yield emulator


# ------------------------------------------------------------------- the emulator process
def _object_generation(storage, bucket: str, name: str) -> str | None:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return None


def _with_gcs_semantics(handler, lock):
    """`handler` (bucket, object) of gcp-storage-emulator with GCS's generation preconditions
    and download header, run under `lock`."""
    from http import HTTPStatus

    def handle(request, response, storage, *args, **kwargs):
        with lock:
            query = request.query
            params = request.params or {}
            bucket = params.get("bucket_name")
            name = params.get("object_id") or (query.get("name") or [None])[0]
            if name is None and (query.get("uploadType") or [None])[0] == "multipart" \
                    and isinstance(request.data, dict):
                name = (request.data.get("meta") or {}).get("name")
            current = _object_generation(storage, bucket, name) if bucket and name else None
            match = (query.get("ifGenerationMatch") or [None])[0]
            not_match = (query.get("ifGenerationNotMatch") or [None])[0]
            if match is not None and (current or "0") != match:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                return None
            if not_match is not None and current is not None and current == not_match:
                response.status = HTTPStatus.NOT_MODIFIED
                response["x-goog-generation"] = current
                return None
            out = handler(request, response, storage, *args, **kwargs)
            if current is not None and request.method == "GET" and bucket and name:
                response["x-goog-generation"] = current
            return out
    return handle


def _cancel_upload(request, response, storage, *args, **kwargs):
    """DELETE on a resumable upload session: the session is forgotten, no object appears, and
    the answer is GCS's 499 ('Client Closed Request')."""
    from http import HTTPStatus
    from types import SimpleNamespace

    from gcp_storage_emulator.exceptions import NotFound

    try:
        storage.delete_resumable_file_obj(request.query.get("upload_id")[0])
        # (not an HTTPStatus member; the server reads .value and .phrase)
        response.status = SimpleNamespace(value=499, phrase="Client Closed Request")
    except (NotFound, TypeError):
        response.status = HTTPStatus.NOT_FOUND


def _serve(port: int, bucket: str) -> None:
    import logging
    import threading

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    logging.getLogger().setLevel(logging.CRITICAL)
    lock = threading.RLock()
    for pattern, handlers in server.HANDLERS:
        if objects.upload_partial in handlers.values():  # (the resumable upload session's URL)
            handlers[server.DELETE] = _cancel_upload
        for method, handler in list(handlers.items()):
            handlers[method] = _with_gcs_semantics(handler, lock)
    objects.insert = _with_gcs_semantics(objects.insert, lock)  # (the router's fallback)
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.start()
    threading.Event().wait()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
