"""Workdir and data paths that may be buckets (``gs://``, ``s3://``) or local.

Everything the project writes or reads in a workdir goes through ``etils.epath``
(Orbax's own path layer, backed by ``tf.io.gfile``), never ``os.path``/``open``: a
bucket URI stays a bucket URI, so a preempted slice that comes back on new VMs
finds its checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from absl import logging
from etils import epath

T = TypeVar("T")


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URI as it is, a local path made absolute (Orbax
    refuses relative ones)."""
    return epath.Path(path) if is_uri(path) else epath.Path(path).resolve()


WRITE_ATTEMPTS = 4  # a write to the workdir is tried this often (1, 2, 4 s apart) before the run stops
_NOT_TRANSIENT = (PermissionError, NotADirectoryError, IsADirectoryError, FileNotFoundError)


def with_retries(write: Callable[[], T], what: str, attempts: int = WRITE_ATTEMPTS, pause: float = 1.0) -> T:
    """``write()``, again after a transient failure (a bucket's 503, an NFS hiccup, a full disk
    that frees up); a failure that stays, or cannot pass, stops the run with a message naming
    ``what``. Nothing already written is touched: the last checkpoint stays complete."""
    from semppl_jax.errors import WorkdirError

    for attempt in range(attempts):
        try:
            return write()
        except _NOT_TRANSIENT as e:
            raise WorkdirError(f"cannot write {what}: {e}") from e
        except Exception as e:  # noqa: BLE001 - I/O errors: OSError, or TensorFlow's for a bucket
            if not io_error(e):
                raise
            if attempt + 1 == attempts:
                raise WorkdirError(f"writing {what} failed {attempts} times ({e}); the run stops here, its last "
                                   f"complete checkpoint intact: rerun to resume once the workdir can be "
                                   f"written") from e
            logging.warning("writing %s failed (%s); trying again in %.0f s", what, e, pause * 2 ** attempt)
            time.sleep(pause * 2 ** attempt)
    raise AssertionError("unreachable")


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_STORAGE_TEXT = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")
_STORAGE_TF_ERRORS = ("UnavailableError", "DeadlineExceededError", "AbortedError", "PermissionDeniedError")


def io_error(error: BaseException) -> bool:
    """Whether ``error`` is the storage's (a full or read-only disk, a refused write, a bucket that
    does not answer), not a bug: only these become messages (``errors.WorkdirError``)."""
    if isinstance(error, OSError):
        return error.errno in STORAGE_ERRNOS or error.errno is None
    if type(error).__module__.startswith("tensorflow"):
        return type(error).__name__ in _STORAGE_TF_ERRORS or any(t in str(error) for t in _STORAGE_TEXT)
    return any(t in str(error) for t in _STORAGE_TEXT)  # TensorStore's, through Orbax (os_error_code 28, ...)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Temporary file, then rename: a crash never leaves a truncated JSON behind."""
    path = epath.Path(path)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
        tmp.write_text(json.dumps(obj, indent=2))
        tmp.replace(path)  # overwrites, locally and on buckets

    with_retries(write, str(path))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(epath.Path(path).read_text())
