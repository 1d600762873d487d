"""Workdir and data paths that may be buckets (``gs://``, ``s3://``) or local.

Everything the project writes or reads in a workdir goes through ``etils.epath``
(Orbax's own path layer, backed by ``tf.io.gfile``), never ``os.path``/``open``: a
bucket URI stays a bucket URI, so a preempted slice that comes back on new VMs
finds its checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a URI as it is, a local path made absolute (Orbax
    refuses relative ones)."""
    return epath.Path(path) if is_uri(path) else epath.Path(path).resolve()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Temporary file, then rename: a crash never leaves a truncated JSON behind."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)  # overwrites, locally and on buckets


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(epath.Path(path).read_text())
