"""A user's image folder as a source: labels from class directories or a CSV.

Layout: ``root/<split>/<class>/**/<image>``, plus ``root/<split>/unlabelled/**``
for images without a class (or a flat folder labelled by ``dataset.labels_file``).
Only the listing is read here (``folder_listing.py``: one prefix listing a run, by
process 0), and every input that would otherwise pass silently is named: an empty
class directory or two classes that differ only in case or spaces are refused, files
the decoder cannot read are counted by extension, CSV rows naming no image are
counted with the first few named (``labels.py`` reads the CSV).

Ids are a fixed permutation of the listing sorted by base name, so each process's
contiguous share holds every class, and moving an image between a class directory
and ``unlabelled/`` keeps its id.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import tensorflow as tf
from absl import logging

from semppl_jax import folder_listing, label_subsets
from semppl_jax.errors import DataError, MissingDataError
from semppl_jax.sources import RandomAccessSource

# What ``tf.io.decode_image`` reads: JPEG, PNG, GIF, BMP, WebP and JPEG XL.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".jxl")
NAME_PREFIX = "folder:"  # dataset.name of an image folder: folder:/path/to/root
FOLDER_ORDER_SEED = 20230501  # ids of a folder: a fixed permutation of its sorted listing
UNLABELLED_DIR = "unlabelled"  # in an image folder's split: images without a class
NAMED = 5  # files or rows named in a message, before "and N more"


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:NAMED])
    return shown + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def folder_source(root: str, split: str | None, labels_file: str | None = None,
                  cache_dir: str | None = None) -> RandomAccessSource:
    """Images under ``root/<split>`` (``root`` itself if ``split`` is None), labelled by
    their class directory (classes: the sorted directory names) or by ``labels_file``.
    Images under ``unlabelled/``, or not in the CSV, carry no label (``true_label`` -1);
    with ``split`` None and no CSV every image is unlabelled."""
    root = root.rstrip("/")
    top = root if split is None else f"{root}/{split}"
    listing, listing_key = folder_listing.shared_listing(top, cache_dir)
    if not listing:
        _explain_empty(root, split)
    images = [n for n in listing if is_image(n)]
    _warn_unread(top, [n for n in listing if not n.endswith("/") and not is_image(n)])
    if labels_file:
        classes, rel, image_labels = _by_csv(top, images, labels_file)
    elif split is None:
        classes, rel, image_labels = [], images, [-1] * len(images)
    else:
        classes, rel, image_labels = _by_class_directory(top, listing, images)
    if not rel:
        raise DataError(f"image folder {top!r} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    order = sorted(range(len(rel)), key=lambda i: (os.path.basename(rel[i]), rel[i]))
    order = np.array(order)[np.random.default_rng(FOLDER_ORDER_SEED).permutation(len(order))]
    rel_names = np.array(rel)[order]
    paths = np.array([f"{top}/{r}" for r in rel_names])
    labels_arr = np.array(image_labels, np.int32)[order]

    def table(ids: np.ndarray) -> dict[str, np.ndarray]:
        return dict(image_ref=paths[ids], true_label=labels_arr[ids], image_id=ids.astype(np.int32),
                    file_name=rel_names[ids])

    identity = dict(name=f"{NAME_PREFIX}{root}", split=split, n=len(paths), listing=listing_key, classes=classes,
                    labels_file=labels_file or None)
    return RandomAccessSource(name=f"{NAME_PREFIX}{root}", split=split or "", num_ids=len(paths),
                              num_classes=max(len(classes), 1), encoded=True, identity=identity, kind="folder",
                              class_names=tuple(classes), labels=labels_arr, file_names=rel_names, table=table,
                              load=_read_file)


def _warn_unread(top: str, others: list[str]) -> None:
    """Files the decoder cannot read are left out, counted by extension and named."""
    if not others:
        return
    by_ext = collections.Counter(os.path.splitext(n)[1].lower() or "(none)" for n in others)
    logging.warning("image folder %s: %d files are not images the decoder reads (%s) and are left out: %s; "
                    "it reads %s", top, len(others), ", ".join(f"{e} {c}" for e, c in by_ext.most_common()),
                    _some(others), ", ".join(IMAGE_EXTENSIONS))


def _by_csv(top: str, images: list[str], labels_file: str) -> tuple[list[str], list[str], list[int]]:
    """(classes, images, labels) from ``labels_file``; images it does not list carry no label."""
    by_name = label_subsets.read_labels_csv(labels_file)
    classes = label_subsets.class_list(by_name.values(), f"dataset.labels_file {labels_file!r}")
    index = {c: i for i, c in enumerate(classes)}
    present = {os.path.basename(r) for r in images}
    missing = sorted(n for n in by_name if n not in present)
    if len(missing) == len(by_name):
        raise DataError(f"dataset.labels_file {labels_file!r}: none of its {len(by_name)} file names "
                        f"matches an image under {top} (e.g. {sorted(by_name)[0]!r})")
    if missing:  # a CSV may cover several splits, or name files that are gone: counted, never silent
        logging.warning("dataset.labels_file %s: %d of its %d rows name no image under %s (%s)", labels_file,
                        len(missing), len(by_name), top, _some(missing))
    image_labels = [index[by_name[os.path.basename(r)]] if os.path.basename(r) in by_name else -1 for r in images]
    return classes, images, image_labels


def _by_class_directory(top: str, listing: list[str], images: list[str]
                        ) -> tuple[list[str], list[str], list[int]]:
    """(classes, images, labels) of ``<class>/**/<image>`` under ``top``; ``unlabelled/`` gets -1."""
    loose = [n for n in images if "/" not in n]
    if loose:
        raise DataError(f"image folder {top!r} has {len(loose)} images outside any directory ({_some(loose)}): "
                        f"put each under <class>/ or {UNLABELLED_DIR}/, or label them with dataset.labels_file")
    dirs = sorted({n.split("/", 1)[0] for n in listing if "/" in n})
    classes = label_subsets.class_list([d for d in dirs if d != UNLABELLED_DIR], f"image folder {top!r}")
    with_images = {n.split("/", 1)[0] for n in images}
    empty = [c for c in classes if c not in with_images]
    if empty:
        raise DataError(f"image folder {top!r}: the class directories {_some(empty)} hold no image; remove them "
                        f"or add images (a class without images would never be predicted)")
    if not classes:
        raise DataError(f"image folder {top!r} has no class directories (only {UNLABELLED_DIR}/ or nothing); "
                        f"label some images with class directories or dataset.labels_file")
    index = {c: i for i, c in enumerate(classes)}
    return classes, images, [index.get(n.split("/", 1)[0], -1) for n in images]


def _explain_empty(root: str, split: str | None) -> None:
    """Raises the error for a folder (or split) with no file at all, naming what exists."""
    if not tf.io.gfile.isdir(root):
        raise MissingDataError(f"dataset.name='{NAME_PREFIX}{root}': no such directory {root!r}")
    if split is not None:
        splits = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root))
        raise DataError(f"image folder {root!r} has splits {splits}, not {split!r} "
                        f"(expected {root}/{split}/<class>/*.jpg)")
    raise DataError(f"image folder {root!r} holds no file")


def _read_file(ex: dict) -> dict:
    ex = dict(ex)
    ex["image"] = tf.io.read_file(ex.pop("image_ref"))
    return ex
