"""Paths that may be URLs: local files, gs:// buckets and anything else fsspec handles.

Against a local GCS emulator (STORAGE_EMULATOR_HOST set, see tests/gcs_emulator.py) gcsfs's
storage-layout lookup (a gRPC call to the control plane that an emulator does not serve) is
switched off: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, unless the user set it.
"""

from __future__ import annotations

import os
import sys


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


configure_gcs_emulator()
