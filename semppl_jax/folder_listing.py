"""What an image folder holds: listed once a run, by one process, with prefix listings.

Walking a folder on a bucket costs a request per entry (``tf.io.gfile.walk`` stats
each one: about 1.3 M requests for ImageNet, on every host). A prefix listing
returns up to 1,000 names a request, so here process 0 lists the folder once per
run (TensorStore's key-value store for ``gs://`` and ``s3://``, the same client
Orbax writes checkpoints with; ``os.walk`` on a local disk), writes the names to
the workdir's cache and broadcasts their digest; the other processes read the
cached names and check the digest. A folder that changed since the cache was
written gets a new digest, so the change is seen at the next start.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
from collections.abc import Iterator

from absl import logging
from etils import epath

from semppl_jax import multihost
from semppl_jax.errors import MissingDataError
from semppl_jax.paths import is_uri

PREFIX_LISTED = ("gs://", "s3://")  # schemes TensorStore lists by prefix


def list_files(top: str) -> list[str]:
    """Paths of every file under ``top`` (any nesting), relative to it, sorted, and every
    directory as ``name/`` (on a bucket: the placeholder objects some tools create); none
    if ``top`` does not exist (a bucket has no directories, only names). No per-file request."""
    top = top.rstrip("/")
    if top.startswith(PREFIX_LISTED):
        import tensorstore as ts

        store = ts.KvStore.open(top + "/").result()
        return sorted(n for n in (k.decode() for k in store.list().result()) if n)
    found: list[str] = []
    if is_uri(top):  # another scheme: tf.io.gfile's walk (a request per directory and entry)
        import tensorflow as tf

        logging.info("listing %s with tf.io.gfile.walk (no prefix listing for this scheme)", top)
        walk = ((d.rstrip("/"), dirs, files) for d, dirs, files in tf.io.gfile.walk(top))
    else:
        walk = os.walk(top, followlinks=True)
    for d, dirs, files in walk:
        rel = d[len(top) + 1:] if d != top else ""
        prefix = f"{rel}/" if rel else ""
        found += [prefix + f for f in files] + [f"{prefix}{sub.rstrip('/')}/" for sub in dirs]
    return sorted(found)


def digest(names: list[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def _cache_path(cache_dir: str, top: str) -> epath.Path:
    return epath.Path(cache_dir) / f"listing_{hashlib.sha1(top.encode()).hexdigest()[:16]}.txt.gz"


def _read_cache(path: epath.Path, header_only: bool = False) -> tuple[str, list[str]] | None:
    """(digest, names) from the cache file; with ``header_only`` the digest alone (one line read)."""
    if not path.exists():
        return None
    with path.open("rb") as f, gzip.GzipFile(fileobj=f) as z:
        key = z.readline().decode().rstrip("\n")
        rest = [] if header_only else z.read().decode().split("\n")
    return key, [n for n in rest if n]


def _write_cache(path: epath.Path, key: str, names: list[str]) -> None:
    """Process 0 alone, atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    tmp.write_bytes(gzip.compress("\n".join([key, *names]).encode(), compresslevel=3))
    tmp.replace(path)


_THIS_RUN: list[dict] = []  # the listings made so far, inside ``one_listing_a_run``


@contextlib.contextmanager
def one_listing_a_run() -> Iterator[None]:
    """Within it, a folder listed once (by ``shared_listing``) is not listed again: the
    launcher's run reads its folder at start-up (the preset's figures, then the data)."""
    _THIS_RUN.append({})
    try:
        yield
    finally:
        _THIS_RUN.pop()


def shared_listing(top: str, cache_dir: str | None) -> tuple[list[str], str]:
    """(the files under ``top``, their digest), listed by process 0 alone and read by the
    others from ``cache_dir``; without a cache every process lists for itself."""
    if _THIS_RUN:
        run = _THIS_RUN[-1]
        if (top, cache_dir) not in run:
            run[top, cache_dir] = _shared_listing(top, cache_dir)
        return run[top, cache_dir]
    return _shared_listing(top, cache_dir)


def _shared_listing(top: str, cache_dir: str | None) -> tuple[list[str], str]:
    if not cache_dir:
        names = list_files(top)
        return names, digest(names)
    path = _cache_path(cache_dir, top)
    listed: list[list[str]] = []  # process 0's own listing

    def list_and_cache() -> str:
        listed.append(list_files(top))
        key = digest(listed[0])
        cached = _read_cache(path, header_only=True)
        if cached is None or cached[0] != key:
            _write_cache(path, key, listed[0])
        return key

    key = multihost.decided_by_process_zero(list_and_cache)
    if listed:
        return listed[0], key
    cached = _read_cache(path)
    if cached is None or cached[0] != key:
        raise MissingDataError(f"the listing of {top} that process 0 wrote to {path} is "
                               f"{'missing' if cached is None else 'another one'} here: is the workdir a "
                               f"filesystem (or bucket) every process shares?")
    return cached[1], key
