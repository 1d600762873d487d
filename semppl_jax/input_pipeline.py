"""tf.data pipelines: multi-crop training views and centre-crop evaluation batches.

Crops change shapes, so they are cut here on the host (each image decoded once,
every view cut from it); colour augmentations keep shapes and run on device
(``augment.py``). Each process reads only its share of the split
(``split_index.share_range``). The training stream is epoch-keyed: epoch ``e`` of a
share is a shuffle seeded by (run seed, ``e``), and every crop's seed comes from
(run seed, element position), so a pipeline restarted at step ``s`` yields the
same batches as one that ran through, without replaying earlier epochs: an image
folder or in-memory source starts at once (ids are shuffled, not images); a
TFDS dataset re-reads at most one epoch of its own share.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from semppl_jax.sources import Source, decode
from semppl_jax.split_index import share_range

MAX_EPOCHS = 1 << 40  # "endless"


def share_ids(source: Source, pool: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """The ids of ``pool`` (sorted) that fall in this process's share of the split."""
    lo, hi = share_range(source.num_ids, process_index, process_count)
    return pool[(pool >= lo) & (pool < hi)]


def epoch_stream(source: Source, ids: np.ndarray, seed: int, position: int, buffer: int,
                 base: tf.data.Dataset | None = None) -> tf.data.Dataset:
    """Records of ``ids``, endless, each epoch in a fresh order keyed to (seed, epoch),
    starting at element ``position`` of that endless stream.

    Random-access sources shuffle ids (a full permutation) and read an image only when
    it is reached, so starting late costs nothing; sequential ones (TFDS) shuffle records
    in a buffer of ``buffer`` and skip at most one epoch of ``ids``. ``base`` replaces the
    sequential read of ``ids`` (e.g. a cached one)."""
    n = len(ids)
    if n == 0:
        raise ValueError("an input stream has no image (this process's share of a subset is empty)")
    first, offset = divmod(int(position), n)
    epochs = tf.data.Dataset.range(first, MAX_EPOCHS)
    if source.random_access:
        table = {k: tf.constant(v) for k, v in source.table(np.asarray(ids)).items()}

        def epoch_order(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e]))
            return tf.data.Dataset.from_tensor_slices(order)

        ds = epochs.flat_map(epoch_order).skip(offset)
        ds = ds.map(lambda i: {k: tf.gather(v, i) for k, v in table.items()})
        return ds.map(source.load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    records = source.records(ids) if base is None else base
    buffer = max(1, min(buffer, n))

    def epoch_records(e):
        return records.shuffle(buffer, seed=tf.constant(seed, tf.int64) * 1_000_003 + e,
                               reshuffle_each_iteration=False)

    return epochs.flat_map(epoch_records).skip(offset)


def _crop_and_resize(image: tf.Tensor, offset: tf.Tensor, size: tf.Tensor, out_size: int) -> tf.Tensor:
    crop = tf.slice(image, tf.stack([offset[0], offset[1], 0]), tf.stack([size[0], size[1], -1]))
    crop = tf.image.resize(crop, [out_size, out_size], method="bicubic")
    return tf.cast(tf.clip_by_value(tf.round(crop), 0.0, 255.0), tf.uint8)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, out_size: int, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> tf.Tensor:
    """Inception-style crop (area and aspect ranges) of a decoded image, stateless."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return _crop_and_resize(image, begin[:2], size[:2], out_size)


def center_crop(image: tf.Tensor, out_size: int, resize: int) -> tf.Tensor:
    """Central ``out_size/resize`` fraction of the shorter side of a decoded image, resized to ``out_size``."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    crop = tf.cast(out_size / resize * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    offset = tf.stack([(h - crop + 1) // 2, (w - crop + 1) // 2])
    return _crop_and_resize(image, offset, tf.stack([crop, crop]), out_size)


def _with_labels(ds: tf.data.Dataset, labelled: np.ndarray, calibration: np.ndarray | None = None
                 ) -> tf.data.Dataset:
    """Adds ``is_labelled`` and ``label`` (-1 unless labelled) from the subset mask. With a
    ``calibration`` fold, the monitors' ``true_label`` is kept for it (and the labelled
    images) alone: the hidden-label sums then count the fold (``CalibrationFold``)."""
    mask = tf.constant(labelled.astype(bool))
    fold = None if calibration is None else tf.constant(calibration.astype(bool))

    def add(ex):
        is_labelled = tf.gather(mask, ex["image_id"])
        true_label = ex["true_label"]
        if fold is not None:
            true_label = tf.where(is_labelled | tf.gather(fold, ex["image_id"]), true_label, -1)
        return dict(ex, is_labelled=is_labelled, true_label=true_label,
                    label=tf.where(is_labelled, ex["true_label"], tf.constant(-1, tf.int32)))

    return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def train_dataset(source: Source, labelled: np.ndarray, config: Any, local_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1, start_step: int = 0,
                  only_labelled: bool = False, calibration: np.ndarray | None = None) -> tf.data.Dataset:
    """Batches of ``{large [b,L,H,W,3], small [b,S,h,w,3], label, is_labelled,
    image_id, true_label}`` for this process, starting at ``start_step``; ``calibration``:
    the fold of labelled images treated as unlabelled (``_with_labels``).

    ``only_labelled`` keeps the labelled images alone (fine-tuning, baselines); from a
    sequential source, the labelled part of the share is read once and kept in memory
    (the encoded records: about 1.3 GB over all hosts for ImageNet's 1%)."""
    if len(labelled) != source.num_ids:
        raise ValueError(f"labelled mask has {len(labelled)} entries for {source.num_ids} images")
    ids = share_ids(source, source.valid_ids(), process_index, process_count)
    if local_batch > len(ids):
        raise ValueError(f"per-process batch {local_batch} exceeds the {len(ids)} training images "
                         f"of this process")
    base = None
    if only_labelled:  # a batch may hold a small labelled set more than once: epochs follow each other
        share = len(ids)
        ids = ids[labelled[ids]]
        if not len(ids):
            raise ValueError(f"process {process_index} has no labelled image in its share of the split")
        if not source.random_access and len(ids) < share:  # read the share once, keep the labelled records
            base = source.records(ids).cache()
    seed = seed * 1000 + process_index
    buffer = config.dataset.shuffle_buffer
    n_lab = config.dataset.labelled_per_batch
    if n_lab is None or only_labelled:
        ds = epoch_stream(source, ids, seed, start_step * local_batch, buffer, base)
    else:
        ds = _fixed_labelled_mix(source, ids, labelled, n_lab, local_batch, process_count, seed, buffer,
                                 start_step)
    ds = _with_labels(ds, labelled, calibration)
    views = config.views
    encoded = source.encoded

    @tf.autograph.experimental.do_not_convert  # plain TF ops: nothing for AutoGraph to do
    def make_views(position, ex):
        base = tf.stack([tf.constant(seed, tf.int64), position + start_step * local_batch])
        seeds = tf.random.experimental.stateless_split(base, views.num_large + views.num_small)
        image = decode(ex["image"], encoded)  # once; every view is cut from it
        large = [random_resized_crop(image, seeds[v], views.large_size, tuple(views.large_scale),
                                     tuple(views.aspect_ratio))
                 for v in range(views.num_large)]
        small = [random_resized_crop(image, seeds[views.num_large + v], views.small_size,
                                     tuple(views.small_scale), tuple(views.aspect_ratio))
                 for v in range(views.num_small)]
        small = tf.stack(small) if small else tf.zeros([0, views.small_size, views.small_size, 3], tf.uint8)
        return dict(large=tf.stack(large), small=small, label=ex["label"],
                    is_labelled=ex["is_labelled"], image_id=ex["image_id"], true_label=ex["true_label"])

    ds = ds.enumerate().map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    if views.transpose_images:  # HWCN: batch last, TPU's cheaper transfer layout
        ds = ds.map(lambda b: dict(b, large=tf.transpose(b["large"], [1, 2, 3, 4, 0]),
                                   small=tf.transpose(b["small"], [1, 2, 3, 4, 0])))
    return ds.prefetch(tf.data.AUTOTUNE)


def _fixed_labelled_mix(source: Source, ids: np.ndarray, labelled: np.ndarray, per_global_batch: int,
                        local_batch: int, process_count: int, seed: int, buffer: int,
                        start_step: int) -> tf.data.Dataset:
    """A fixed number of labelled images in every batch, class-stratified.

    The labelled stream cycles over classes (one class after another, each class's
    images in its own epoch-keyed stream), so every batch holds a near-equal number of
    images of each class; the rest of the batch are unlabelled images. Every
    sub-stream's position at ``start_step`` is arithmetic: a resume replays nothing.
    """
    if per_global_batch % process_count:
        raise ValueError(f"dataset.labelled_per_batch={per_global_batch} is not divisible by the "
                         f"{process_count} processes")
    n_lab = per_global_batch // process_count
    if not 0 < n_lab <= local_batch:
        raise ValueError(f"dataset.labelled_per_batch={per_global_batch} must be in (0, global batch]")
    lab_ids, unl_ids = ids[labelled[ids]], ids[~labelled[ids]]
    classes = np.unique(source.labels[lab_ids])
    if not len(classes):
        raise ValueError("dataset.labelled_per_batch is set but this process has no labelled image")
    m = len(classes)
    drawn = start_step * n_lab  # labelled draws before start_step: draw t is of class t % m
    # A sequential source reads its labelled records once (a small cached set), then per class.
    cached = None if source.random_access else source.records(lab_ids).cache()
    per_class = []
    for j, c in enumerate(classes):
        of_c = lab_ids[source.labels[lab_ids] == c]
        base = None if cached is None else cached.filter(lambda ex, c=c: tf.equal(ex["true_label"], int(c)))
        per_class.append(epoch_stream(source, of_c, seed + 1 + int(c), (drawn - j + m - 1) // m, buffer, base))
    order = tf.data.Dataset.range(m).repeat().skip(drawn % m)
    labelled_stream = tf.data.Dataset.choose_from_datasets(per_class, order)
    slots = np.ones(local_batch, np.int64)  # within each batch: labelled slots spread evenly (0 = labelled)
    slots[np.round(np.linspace(0, local_batch - 1, n_lab)).astype(int)] = 0
    if n_lab == local_batch:
        return labelled_stream
    if not len(unl_ids):
        raise ValueError("dataset.labelled_per_batch leaves room for unlabelled images but this process "
                         "has none")
    # The rest of the batch: unlabelled images only, so the labelled count is exact.
    unlabelled_stream = epoch_stream(source, unl_ids, seed, start_step * (local_batch - n_lab), buffer)
    pattern = tf.data.Dataset.from_tensor_slices(slots).repeat()
    return tf.data.Dataset.choose_from_datasets([labelled_stream, unlabelled_stream], pattern)


def eval_dataset(source: Source, config: Any, local_batch: int, process_index: int = 0,
                 process_count: int = 1, max_examples: int | None = None,
                 ids: np.ndarray | None = None, keep_crops: bool = False) -> tf.data.Dataset:
    """Centre crops of ``ids`` (every readable image with a class if None; the first ``max_examples``),
    every one exactly once over all processes, each reading its own contiguous part.
    The last batch is padded, and ``mask`` marks real examples, so metrics divide by
    true counts. ``keep_crops``: the crops are kept in memory after the first pass, so
    a dataset iterated again (the online k-NN's) reads and decodes nothing more."""
    if ids is None:  # every readable image that has a class (one without has nothing to be scored against)
        ids = source.valid_ids()
        if source.labels is not None:
            ids = ids[source.labels[ids] >= 0]
    ids = np.asarray(ids)
    if max_examples is not None:
        ids = ids[:max_examples]
    part = np.array_split(ids, process_count)[process_index]
    per_process = math.ceil(len(ids) / process_count)
    views = config.views
    ds = source.records(part)

    @tf.autograph.experimental.do_not_convert
    def prep(ex):
        return dict(image=center_crop(decode(ex["image"], source.encoded), views.eval_size, views.eval_resize),
                    label=ex["true_label"], image_id=ex["image_id"], mask=tf.constant(True))

    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Pad to a whole number of batches, identical on every process (static shapes).
    num_batches = max(1, math.ceil(per_process / local_batch))
    blank = dict(image=tf.zeros([views.eval_size, views.eval_size, 3], tf.uint8),
                 label=tf.constant(-1, tf.int32), image_id=tf.constant(-1, tf.int32),
                 mask=tf.constant(False))
    # Padded past the end and cut to the agreed length, so that a record that fails to read
    # mid-evaluation (dropped by the source with a warning) cannot leave one process a batch
    # short of the others, which would hang the collective that follows.
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat()).take(num_batches * local_batch)
    if keep_crops:  # after the cut: a pass then always reaches the end, which completes the cache
        ds = ds.cache()
    return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    return ds.as_numpy_iterator()
