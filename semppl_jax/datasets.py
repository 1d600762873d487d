"""The run's data: a split loaded with the config's dataset fields, indexed, and its labelled subset.

One idea a file: ``sources.py`` (where images come from: arrays, TFDS, two sources
as one), ``image_folder.py`` (a user's folder, its classes and the inputs it
refuses), ``folder_listing.py`` (listing it once a run), ``split_index.py`` (each
process's share and the index they agree on), ``labels.py`` (which images carry
labels). This file puts them together the way every job reads its data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from semppl_jax import image_folder, label_subsets, sources, split_index
from semppl_jax.errors import DataError
from semppl_jax.sources import Source


def load_source(name: str, split: str, data_dir: str | None = None, synthetic_size: int = 512,
                synthetic_image_size: int = 40, seed: int = 0, labels_file: str | None = None,
                cache_dir: str | None = None) -> Source:
    """Resolves ``dataset.name`` to a source for ``split`` (no image is read; a folder's
    listing is cached in ``cache_dir``)."""
    if name == "synthetic":
        if split not in ("train", "test"):
            raise DataError(f"synthetic has splits 'train' and 'test', not {split!r}")
        num = synthetic_size if split == "train" else max(synthetic_size // 4, 10)
        images, image_labels = sources.synthetic_arrays(num, synthetic_image_size, seed=seed + (split != "train"))
        return sources.array_source(images, image_labels, 10, "synthetic", split)
    if name == "mnist5k":
        images, image_labels = sources.mnist5k_arrays(split)
        return sources.array_source(images, image_labels, 10, "mnist5k", split)
    if name.startswith(image_folder.NAME_PREFIX):
        return image_folder.folder_source(name[len(image_folder.NAME_PREFIX):], split, labels_file, cache_dir)
    if labels_file:
        raise DataError(f"dataset.labels_file labels an image folder; {name!r} is not one")
    return sources.tfds_source(name, split, data_dir)


def load_unlabelled(name: str, split: str, data_dir: str | None = None, cache_dir: str | None = None) -> Source:
    """``dataset.unlabelled``: every image under ``folder:/path`` (any nesting), or a TFDS
    dataset's ``split``; labels, if any, are dropped."""
    if name.startswith(image_folder.NAME_PREFIX):
        return image_folder.folder_source(name[len(image_folder.NAME_PREFIX):], None, cache_dir=cache_dir)
    return sources.without_labels(sources.tfds_source(name, split, data_dir))


def min_side(config: Any) -> int:
    """The shorter side an image needs for every crop the config takes to hold a pixel:
    the centre crop (``eval_size / eval_resize`` of it) and the smallest random crop."""
    v = config.views
    smallest = min(v.large_scale[0], v.small_scale[0] if v.num_small else 1.0)
    return max(math.ceil(v.eval_resize / v.eval_size), math.ceil(1.0 / math.sqrt(smallest)))


def load_split(config: Any, split: str, index_dir: str | None = None, labels_needed: bool = True,
               classes: tuple[str, ...] | None = None) -> Source:
    """``load_source`` for ``split`` with the config's dataset fields (and, for the training
    split, ``dataset.unlabelled`` after it), indexed (``split_index.index_source``; cached
    under ``index_dir`` when given). ``classes``: the training split's class names, which a
    folder's other splits are mapped onto (a class the training split lacks is refused)."""
    d = config.dataset
    source = load_source(d.name, split, d.data_dir, d.synthetic_size, d.synthetic_image_size, config.seed,
                         d.labels_file, index_dir)
    validate = d.validate_images if d.validate_images is not None else d.name.startswith(image_folder.NAME_PREFIX)
    if d.unlabelled and split == d.train_split:
        extra = load_unlabelled(d.unlabelled, d.unlabelled_split, d.data_dir, index_dir)
        source = sources.concat_sources(source, extra)
        validate = validate or d.unlabelled.startswith(image_folder.NAME_PREFIX)
    if classes is not None and source.class_names and tuple(source.class_names) != tuple(classes):
        source = align_classes(source, tuple(classes))
    return split_index.index_source(source, validate, index_dir, labels_needed, min_side=min_side(config))


def align_classes(source: Source, classes: tuple[str, ...]) -> Source:
    """``source``'s labels renumbered onto ``classes`` (the training split's), so that label
    ``i`` names the same class in every split."""
    unknown = sorted(set(source.class_names) - set(classes))
    if unknown:
        raise DataError(f"dataset {source.name!r}, split {source.split!r}: the classes {unknown} have no image in "
                        f"the training split (classes {list(classes)}); a model cannot learn them")
    mapping = np.array([classes.index(c) for c in source.class_names], np.int32)
    renumber = (lambda y: np.where(y >= 0, mapping[np.maximum(y, 0)], -1).astype(np.int32))
    table = source.table
    return dataclasses.replace(source, labels=renumber(source.labels), class_names=classes, num_classes=len(classes),
                               table=lambda ids: (lambda t: dict(t, true_label=renumber(t["true_label"])))(table(ids)))


def config_labelled_mask(config: Any, source: Source) -> np.ndarray:
    """``label_subsets.labelled_mask`` with the config's subset fields."""
    d = config.dataset
    return label_subsets.labelled_mask(source, d.label_subset, d.label_seed, d.subset_cache_dir, d.fetch_subsets)


def pretraining_masks(config: Any, source: Source) -> tuple[np.ndarray, np.ndarray]:
    """(the labelled images whose labels enter the loss, the calibration fold held back);
    together they are ``config_labelled_mask``."""
    labelled = config_labelled_mask(config, source)
    fold = label_subsets.calibration_fold(source.labels, labelled, config.dataset.calibration_per_class,
                                          config.dataset.label_seed, source.class_names)
    return labelled & ~fold, fold
