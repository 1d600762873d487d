"""Each process's share of a split, and the index every process agrees on.

A process reads a contiguous id range of the split (``share_range``). What every
process must agree on (labels and file names for the labelled subset, which images
cannot be used) comes from the :class:`SplitIndex`: each process scans its own share
once, the small arrays are all-gathered, and process 0 caches the result in the
run's workdir, keyed to the dataset's identity, so a restart reads no image to start.
An image is left out, by name, when it cannot be read or decoded, or when it is too
small for the smallest crop the views take (``min_side``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath

from semppl_jax import multihost
from semppl_jax.errors import DataError, MissingDataError
from semppl_jax.sources import Source, decode

OK, UNREADABLE, TOO_SMALL = 0, 1, 2  # what the scan found, per id


def share_range(num_ids: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Process ``process_index``'s ids: a contiguous range, sizes within one of each other."""
    return process_index * num_ids // process_count, (process_index + 1) * num_ids // process_count


@dataclasses.dataclass
class SplitIndex:
    """What every process must agree on about a split, per id."""

    status: np.ndarray  # int8: OK, UNREADABLE, TOO_SMALL
    labels: np.ndarray  # int32, -1 where unreadable
    file_names: np.ndarray  # str

    @property
    def readable(self) -> np.ndarray:
        return self.status == OK


def index_source(source: Source, validate: bool, index_dir: str | None = None, labels_needed: bool = True,
                 process_index: int | None = None, process_count: int | None = None, min_side: int = 1) -> Source:
    """Fills in which ids are usable (and, for TFDS, every id's label and file name).

    Needed only when ``validate`` (decode every image once, leave out and name those that
    fail or whose shorter side is under ``min_side``) or, for sequential sources, when
    labels are needed (the labelled subset). Each process scans its own share, the results
    are all-gathered, and with ``index_dir`` the index is cached there and reused while the
    dataset's identity matches.
    """
    if not validate and (source.random_access or not labels_needed):
        return source
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    key = dict(source.identity, validated=bool(validate), min_side=int(min_side) if validate else None)
    path = _index_path(source, index_dir, process_count, validate) if index_dir else None
    cached = path is not None and multihost.decided_by_process_zero(lambda: epath.Path(path).exists())
    index = _read_index(path, key) if cached else None
    if index is None:  # every process takes this branch or none: it leads into an all-gather
        index = _build_index(source, validate, min_side, process_index, process_count)
        if path and process_index == 0:
            _write_index(path, key, index)
    return _with_index(source, index, min_side)


def _index_path(source: Source, index_dir: str, process_count: int, validate: bool) -> str:
    """One index per split, process count and check: built once, refused if the data changes."""
    name = f"{source.name}_{source.split}"
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)[-48:]
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{index_dir}/{safe}_{digest}_{process_count}proc{'_checked' if validate else ''}.npz"


def scan_share(source: Source, lo: int, hi: int, validate: bool, min_side: int = 1) -> dict[str, np.ndarray]:
    """This process's records ``lo..hi-1``: what each is (``OK``, ``UNREADABLE``, ``TOO_SMALL``),
    with labels and names. Images are read; decoded only if ``validate``."""
    ds = source.records(np.arange(lo, hi))

    def probe(ex):
        if validate:
            shape = tf.shape(decode(ex["image"], source.encoded))
            small = tf.minimum(shape[0], shape[1]) < min_side
        else:
            small = tf.constant(False)
        return ex["image_id"], ex["true_label"], ex["file_name"], small

    status = np.full(hi - lo, UNREADABLE, np.int8)
    labels = np.full(hi - lo, -1, np.int32)
    names = np.full(hi - lo, "", object)
    for ids, ys, ns, small in ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(
            4096).as_numpy_iterator():
        status[ids - lo] = np.where(small, TOO_SMALL, OK)
        labels[ids - lo] = ys
        names[ids - lo] = [n.decode() if isinstance(n, bytes) else str(n) for n in ns]
    return dict(status=status, labels=labels, names=names)


def _build_index(source: Source, validate: bool, min_side: int, process_index: int,
                 process_count: int) -> SplitIndex:
    lo, hi = share_range(source.num_ids, process_index, process_count)
    mine = scan_share(source, lo, hi, validate, min_side)
    if source.random_access:  # the listing knows every name, usable or not: none to gather
        del mine["names"]
    parts = _allgather_shares(mine, process_count)
    status = np.concatenate([p["status"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    names = source.file_names if source.random_access else np.concatenate([p["names"] for p in parts])
    return SplitIndex(status, labels, names)


def _allgather_shares(mine: dict[str, np.ndarray], process_count: int) -> list[dict[str, np.ndarray]]:
    """Every process's share scan, in process order (small arrays; names, if there, as
    fixed-width bytes)."""
    if process_count == 1:
        return [mine]
    from jax.experimental import multihost_utils

    with_names = "names" in mine  # the same on every process: it follows the source's kind
    encoded = [n.encode() for n in mine["names"]] if with_names else []
    n, width = len(mine["status"]), max([len(b) for b in encoded] + [1])
    sizes = np.asarray(multihost_utils.process_allgather(np.array([n, width], np.int32)))
    rows, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    buf = np.zeros((rows, width), np.uint8)
    for i, b in enumerate(encoded):
        buf[i, :len(b)] = np.frombuffer(b, np.uint8)
    packed = np.zeros((rows, 2), np.int32)
    packed[:n, 0], packed[:n, 1] = mine["status"], mine["labels"]
    all_packed = np.asarray(multihost_utils.process_allgather(packed))
    all_names = np.asarray(multihost_utils.process_allgather(buf)) if with_names else None
    out = []
    for p in range(process_count):
        k = int(sizes[p, 0])
        part = dict(status=all_packed[p, :k, 0].astype(np.int8), labels=all_packed[p, :k, 1])
        if with_names:
            part["names"] = np.array([bytes(row).rstrip(b"\0").decode() for row in all_names[p, :k]], object)
        out.append(part)
    return out


def _read_index(path: str, key: dict) -> SplitIndex:
    path = epath.Path(path)
    if not path.exists():
        raise MissingDataError(f"the data index {path} exists for process 0 but not here: is the workdir "
                               f"a filesystem every process shares?")
    data = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    saved = json.loads(str(data["key"]))
    if saved != key:
        raise DataError(f"the data index {path} was built for another dataset ({saved}) than this one "
                        f"({key}): was the data changed under the run? Delete the file to index again.")
    return SplitIndex(data["status"], data["labels"], np.char.decode(data["file_names"], "utf-8"))


def _write_index(path: str, key: dict, index: SplitIndex) -> None:
    """Written by process 0 alone, atomically (temporary name, then rename)."""
    buf = io.BytesIO()
    np.savez(buf, key=np.array(json.dumps(key, sort_keys=True)), status=index.status, labels=index.labels,
             file_names=np.char.encode(np.asarray(index.file_names, str), "utf-8"))  # 1 byte a character
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def _with_index(source: Source, index: SplitIndex, min_side: int) -> Source:
    readable = index.readable
    labels = index.labels if source.labels is None else source.labels
    names = np.asarray(index.file_names) if source.file_names is None else source.file_names
    if not readable.any():
        raise DataError(f"dataset {source.name!r}, split {source.split!r}: none of its {source.num_ids} "
                        f"images could be used (e.g. {names[0]})")
    skipped, lost = (), 0
    if source.random_access:
        skipped = tuple(str(n) for n in names[~readable])
        for name, why in zip(names[~readable], index.status[~readable]):
            logging.warning("skipping %s: %s", name, f"smaller than {min_side} pixels on a side, the least the "
                            f"views' crops need" if why == TOO_SMALL else "it cannot be read or decoded")
    else:
        lost = int((~readable).sum())
        if lost:
            logging.warning("dataset %r, split %r: %d of its %d records could not be read (a damaged TFRecord "
                            "shard?) and are left out; using the %d that could", source.name, source.split,
                            lost, source.num_ids, source.num_ids - lost)
    return dataclasses.replace(source, readable=readable, labels=labels, file_names=names, skipped=skipped,
                               lost_records=lost)
