"""Which training images carry labels: a fraction of each class, SimCLR's ImageNet lists,
or a user's CSV; and the class names such labels may use.

SimCLR's 1% / 10% lists are looked up on every process and, where missing, fetched
once by process 0 into a directory every process reads (``multihost.py``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from semppl_jax import multihost
from semppl_jax.errors import DataError, MissingDataError

SUBSET_FILES = {"1pct": "1percent.txt", "10pct": "10percent.txt"}
# Where SimCLR's lists are looked for when neither subset_cache_dir nor $SEMPPL_SUBSET_DIR is set.
DEFAULT_SUBSET_DIR = os.path.join(os.path.expanduser("~"), ".cache", "semppl_jax", "imagenet_subsets")
SIMCLR_SUBSET_URL = "https://raw.githubusercontent.com/google-research/simclr/master/imagenet_subsets/{}"
# A labels CSV's header, as spreadsheets and scripts name its two columns.
FILE_HEADERS = ("file_name", "filename", "file", "image", "image_name", "image_id", "name", "path", "img", "id")
CLASS_HEADERS = ("class", "label", "class_name", "category", "target", "y")


# ----------------------------------------------------------------------------- class names


def class_list(names: Iterable[str], where: str) -> list[str]:
    """The sorted distinct class names; two that differ only in case or surrounding
    spaces are refused, naming both (they would silently become two classes)."""
    distinct = sorted(set(names))
    seen: dict[str, str] = {}
    for name in distinct:
        key = name.strip().casefold()
        if key in seen:
            raise DataError(f"{where}: the classes {seen[key]!r} and {name!r} differ only in case or spaces; "
                            f"use one name for one class")
        seen[key] = name
    return distinct


# ----------------------------------------------------------------------------- the labels CSV


def read_labels_csv(path: str) -> dict[str, str]:
    """``file_name,class`` rows -> {base name: class}. A header row is recognised by its
    column names (``FILE_HEADERS``, ``CLASS_HEADERS``, any case, a spreadsheet's
    byte-order mark removed); any other first row is data."""
    if not tf.io.gfile.exists(path):
        raise MissingDataError(f"dataset.labels_file: no such file {path!r}")
    with tf.io.gfile.GFile(path, "rb") as f:
        text = f.read().decode("utf-8-sig")  # utf-8-sig drops a byte-order mark
    rows = [(i + 1, r) for i, r in enumerate(csv.reader(io.StringIO(text))) if r and any(c.strip() for c in r)]
    if rows and _is_header(rows[0][1]):
        rows = rows[1:]
    found: dict[str, str] = {}
    for line, row in rows:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"dataset.labels_file {path!r}, line {line}: expected 'file_name,class', got {row}")
        name, cls = os.path.basename(row[0].strip()), row[1].strip()
        if found.setdefault(name, cls) != cls:
            raise DataError(f"dataset.labels_file {path!r}, line {line}: {name!r} is given two classes "
                            f"({found[name]!r}, {cls!r})")
    if not found:
        raise DataError(f"dataset.labels_file {path!r} labels no file")
    return found


def _is_header(row: Sequence[str]) -> bool:
    first = row[0].strip().lower()
    second = row[1].strip().lower() if len(row) > 1 else ""
    return first in FILE_HEADERS or second in CLASS_HEADERS


# ----------------------------------------------------------------------------- label subsets


def resolve_subset_file(spec: str, cache_dir: str | None, fetch: bool = False) -> str:
    """'1pct'/'10pct' -> a copy of SimCLR's list (local or in a bucket).

    Looked up in ``cache_dir``, ``$SEMPPL_SUBSET_DIR`` and ``~/.cache/semppl_jax/imagenet_subsets``
    on every process; where any process lacks it and ``fetch`` is set, process 0 alone
    downloads it into ``cache_dir`` (a directory every process reads: the workdir's
    bucket or a shared filesystem) and the others read it from there.
    """
    fname = SUBSET_FILES[spec]
    candidates = [f"{d.rstrip('/')}/{fname}" for d in
                  (cache_dir, os.environ.get("SEMPPL_SUBSET_DIR"), DEFAULT_SUBSET_DIR) if d]
    found = next((path for path in candidates if tf.io.gfile.exists(path)), None)
    everywhere = multihost.allgather_json(found)
    missing = [p for p, f in enumerate(everywhere) if f is None]
    if not missing:
        return found
    url = SIMCLR_SUBSET_URL.format(fname)
    if not fetch:
        where = "" if len(missing) == len(everywhere) else f" on process(es) {missing}"
        raise MissingDataError(
            f"label_subset={spec!r}: {fname} not found in {candidates}{where}. Put SimCLR's list there "
            f"(from {url}), set dataset.subset_cache_dir, or allow a download with dataset.fetch_subsets=True.")
    if not cache_dir:
        raise DataError("dataset.fetch_subsets needs dataset.subset_cache_dir to download into")
    target = f"{cache_dir.rstrip('/')}/{fname}"
    multihost.decided_by_process_zero(lambda: _download(url, target))
    if not tf.io.gfile.exists(target):
        raise MissingDataError(f"label_subset={spec!r}: process 0 downloaded {target}, which this process "
                               f"cannot see: dataset.subset_cache_dir must be shared by every process")
    return target


def _download(url: str, target: str) -> str:
    """``url`` to ``target`` atomically (temporary name, then rename); process 0 alone."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise MissingDataError(f"could not download {url} ({e}); put the file at {target} by hand") from e
    tf.io.gfile.makedirs(os.path.dirname(target))
    tmp = f"{target}.tmp.{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, target, overwrite=True)
    return target


def read_subset_list(path: str) -> set[str]:
    if not tf.io.gfile.exists(path):
        raise MissingDataError(f"label_subset: no such file {path!r}")
    with tf.io.gfile.GFile(path) as f:
        names = {line.strip() for line in f if line.strip()}
    if not names:
        raise DataError(f"label_subset: {path!r} names no file")
    return names


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing ``round(fraction * n_c)`` (at least 1) images of each class;
    entries labelled -1 (unreadable) are never chosen."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"label_subset fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(idx))))
        mask[rng.choice(idx, n, replace=False)] = True
    return mask


def labelled_mask(source, spec: str, seed: int, cache_dir: str | None = None, fetch: bool = False) -> np.ndarray:
    """Which training images carry labels, as a mask over ids (never an unreadable one)."""
    if source.labels is None or source.file_names is None:
        raise ValueError(f"dataset {source.name!r}: the split is not indexed (split_index.index_source)")
    readable = np.ones(source.num_ids, bool) if source.readable is None else source.readable
    try:
        fraction = float(spec)
    except ValueError:
        fraction = None
    if fraction is not None:
        return stratified_subset(np.where(readable, source.labels, -1), fraction, seed)
    path = resolve_subset_file(spec, cache_dir, fetch) if spec in SUBSET_FILES else spec
    wanted = read_subset_list(path)
    base = np.array([os.path.basename(str(n)) for n in source.file_names])
    mask = np.isin(base, np.array(sorted(wanted))) & readable & (source.labels >= 0)  # a class is needed
    missing = len(wanted) - int(mask.sum())
    unreadable = source.num_unreadable
    if missing > unreadable:
        raise DataError(f"label_subset {path!r}: {len(wanted) - missing} of its {len(wanted)} file names match "
                        f"an image of the split ({source.num_examples} images); the list does not fit this "
                        f"dataset.")
    if missing:  # they can be among the images that could not be read: degrade, do not stop
        logging.warning("label_subset %r: %d of its %d images are not in the split, which has %d unreadable "
                        "images; training with the %d labelled images found", path, missing, len(wanted),
                        unreadable, len(wanted) - missing)
    return mask


def calibration_fold(labels: np.ndarray, labelled: np.ndarray, per_class: int, seed: int,
                     class_names: Sequence[str] | None = None) -> np.ndarray:
    """``per_class`` labelled images of each class (seeded), as a mask: held back from the
    loss to measure the pseudo-labels. Every class keeps at least one labelled image."""
    fold = np.zeros(len(labels), bool)
    if per_class <= 0:
        return fold
    rng = np.random.default_rng([seed, 0xCA1])  # a stream of its own: the subset's draws stay as they were
    for c in np.unique(labels[labelled]):
        idx = np.flatnonzero(labelled & (labels == c))
        if len(idx) <= per_class:
            name = repr(class_names[c]) if class_names else int(c)
            raise DataError(f"dataset.calibration_per_class={per_class}: class {name} has {len(idx)} labelled "
                            f"images, and at least one must stay in the loss; lower it (or label more)")
        fold[rng.choice(idx, per_class, replace=False)] = True
    return fold


def class_counts(labels: Sequence[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=num_classes)
