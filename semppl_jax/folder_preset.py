"""The own-images preset's values, read from the user's folder when a run starts.

``experiments/folder.py`` only marks a config (``config.folder_preset``); every mode
resolves it here once the processes can talk, so that a pod lists the folder once: process
0 lists it into the workdir's cache (the run's one listing, reused by the run itself) and
reads a sample of images; the other processes read the cached listing and receive the
figures. The ``--config.`` overrides are applied again afterwards: what the user says wins.

The rules, each measured on Fashion-MNIST (``docs/own_photos.md``):

- **views**: the images' typical shorter side (the median of up to 64 of them), a
  multiple of 4, at most 48 pixels below 20,000 images (a small set cannot use fine
  detail, and small views keep it to minutes on a CPU), 112 below 200,000, else 224;
  crops of 50-100% of the image;
- **augmentation**: BYOL's, as for photographs: flips, colour jitter, grey, blur and
  solarise; ``grey`` (or a folder of grey images) drops hue and saturation, ``upright``
  drops flips (text, digits, anything a mirror changes);
- **network**: a half-width ResNet-10 below 20,000 images, a ResNet-18 below 200,000,
  else a ResNet-50; views of 64 pixels or less skip the max pool after the stem;
- **schedule**: about 400,000 images seen (at least 30 epochs), a batch of 64 a device up
  to an eighth of the images;
- **queue**: about two epochs of the labelled images' views, so that it fills and holds
  every class;
- **calibration fold**: a tenth of each class's labelled images (at least one, none where a
  class has one) kept out of the loss, voted like the unlabelled images: the estimate of
  the pseudo-labels' accuracy and its interval come from them;
- **vote gate**: positives from votes 70% right rather than the method's 90% where fewer
  than 10 labelled images a class are in the loss: there the held-out votes ran below 90%
  (79-84% on Fashion-MNIST with 3 a class) and the 90% gate stayed shut.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np
from absl import logging

SAMPLE = 64  # images read to find the typical size and whether the folder is grey
IMAGES_SEEN = 400_000  # a small folder is seen this many times over (100 epochs of 4,000 images)
CALIBRATION_FRACTION = 0.1  # of each class's labelled images (at least 1), kept out of the loss
FEW_LABELLED = 10  # labelled images a class in the loss below which the gate asks less
FEW_LABELS_PRECISION = 0.7  # what it asks then (the method's default asks 0.9)


@dataclasses.dataclass(frozen=True)
class Figures:
    """What the preset reads from a folder's training split."""

    images: int
    labelled: int
    classes: int
    side: int  # the median shorter side of the sampled images
    grey: bool  # every sampled image grey
    fewest_labelled: int = 0  # labelled images of the class with fewest


def mark(config: Any, grey: bool, upright: bool) -> None:
    """Marks ``config`` (whose ``dataset.name`` is ``folder:<root>``) for ``resolve``."""
    config.folder_preset = ml_collections.ConfigDict(dict(grey=grey, upright=upright, resolved=False))


def needs_resolving(config: Any) -> bool:
    return "folder_preset" in config and not config.folder_preset.resolved


def resolve(config: Any, index_dir: str | None, overrides: dict[str, Any] | None = None) -> Any:
    """Sets the data-dependent fields of a marked ``config`` in place (a no-op otherwise),
    then ``overrides`` (flat ``{"views.large_size": 64}``); prints why on process 0."""
    if not needs_resolving(config):
        return config
    import jax

    from semppl_jax.image_folder import NAME_PREFIX

    root = config.dataset.name[len(NAME_PREFIX):]
    figures = read_figures(root, index_dir)
    p = config.folder_preset
    lines = choose(config, figures, p.grey or figures.grey, p.upright)
    config.update_from_flattened_dict(overrides or {})  # as parsed from --config.a.b=v
    p.resolved = True
    if jax.process_index() == 0:
        print(f"[folder.py] {root}: {figures.images} training images, {figures.labelled} labelled in "
              f"{figures.classes} classes; typical side {figures.side} px{', grey' if figures.grey else ''}")
        for line in lines + [f"as given: {key}={value!r}" for key, value in (overrides or {}).items()]:
            print(f"[folder.py]   {line}", flush=True)
    return config


def read_figures(root: str, index_dir: str | None) -> Figures:
    """The folder's training split listed (shared through ``index_dir``); process 0 reads
    the sample and tells the others."""
    from semppl_jax import image_folder, multihost

    source = multihost.agreed(lambda: image_folder.folder_source(root, "train", cache_dir=index_dir),
                              f"reading the folder {root}")  # every process on, or none
    labels = source.labels[source.labels >= 0]
    side, grey = multihost.decided_by_process_zero(lambda: typical_image(source, SAMPLE))
    fewest = int(np.bincount(labels, minlength=source.num_classes).min()) if len(labels) else 0
    return Figures(source.num_ids, len(labels), source.num_classes, int(side), bool(grey), fewest)


def typical_image(source: Any, sample: int) -> tuple[int, bool]:
    """(median shorter side, whether every sampled image is grey) of up to ``sample`` images."""
    from semppl_jax.sources import decode

    ids = np.linspace(0, source.num_ids - 1, min(sample, source.num_ids)).astype(int)
    sides, grey = [], True
    for ex in source.records(np.unique(ids)).take(sample):
        image = decode(ex["image"], True).numpy()
        sides.append(min(image.shape[:2]))
        grey &= bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    logging.info("folder preset: sampled %d images", len(sides))
    return int(np.median(sides)), grey


def choose(c: Any, f: Figures, grey: bool, upright: bool) -> list[str]:
    """Sets the data-dependent fields of ``c``; returns why, a line each."""
    cap = 48 if f.images < 20_000 else 112 if f.images < 200_000 else 224
    size = max(16, min(cap, 4 * round(f.side / 4)))
    c.views.update(dict(num_large=2, large_size=size, large_scale=(0.5, 1.0), num_small=0, small_size=size // 2,
                        eval_resize=size, eval_size=size))
    lines = [f"views: 2 of {size} px (typical side {f.side}, at most {cap} for {f.images} images), "
             f"crops of 50-100% of the image (20-100%: k-NN 4 points lower on Fashion-MNIST)"]
    if grey:
        c.augment.update(dict(saturation=0.0, hue=0.0))
    if upright:
        c.augment.flip = c.eval.flip = False
    lines.append(f"augmentation: flips {'off (upright)' if upright else 'on'}, colour jitter "
                 f"{'without hue and saturation (grey)' if grey else 'on'}")
    lines.append(f"network: {_network(c, f.images, size)} ({f.images} images)")
    epochs = max(30, math.ceil(IMAGES_SEEN / f.images))
    c.training.update(dict(batch_per_device=64, max_batch_fraction=1 / 8, num_epochs=float(epochs)))
    lines.append(f"schedule: {epochs} epochs (about {IMAGES_SEEN:,} images seen, at least 30 epochs; 100 "
                 f"epochs of 4,000 rather than 33: k-NN +3 points on Fashion-MNIST), 64 images a device, at "
                 f"most an eighth of the images a batch")
    c.semppl.queue_size = max(64, 2 * c.views.num_large * f.labelled)  # a multiple of num_large, as the gate needs
    lines.append(f"queue: {c.semppl.queue_size} entries (about two epochs of the {f.labelled} labelled images' "
                 f"views)")
    fold = max(1, round(f.fewest_labelled * CALIBRATION_FRACTION)) if f.fewest_labelled >= 2 else 0
    c.dataset.calibration_per_class = fold
    lines.append(f"calibration fold: {fold} labelled image{'s' if fold != 1 else ''} a class kept out of the loss "
                 f"to measure the pseudo-labels (the estimate and its interval; labelled images voted in an "
                 f"embedding their labels shaped ran 8-26 points high with 4 a class)" if fold else
                 "calibration fold: none (a class has a single labelled image); the estimate is the queue's")
    lines.append(_gate(c, f.fewest_labelled - fold))
    return lines


def _gate(c: Any, in_loss: int) -> str:
    """With few labelled images a class the held-out votes run less sure, a 90% gate stays shut
    and SemPPL ties its ablation (Fashion-MNIST, 4 a class)."""
    method = c.semppl.min_vote_precision
    if in_loss >= FEW_LABELLED:
        return f"vote gate: positives from votes {method:.0%} right ({in_loss} labelled a class in the loss)"
    c.semppl.min_vote_precision = FEW_LABELS_PRECISION
    return (f"vote gate: positives from votes {FEW_LABELS_PRECISION:.0%} right, not {method:.0%} ({in_loss} "
            f"labelled a class in the loss; 4 a class on Fashion-MNIST: the {method:.0%} gate stayed shut, "
            f"k-NN +1.0 with {FEW_LABELS_PRECISION:.0%})")


def _network(c: Any, images: int, size: int) -> str:
    if images < 20_000:
        c.model.update(dict(depth="small", width_multiplier=0.5, projector_hidden_size=512,
                            predictor_hidden_size=512, projection_size=128))
        net = "a half-width ResNet-10"
    elif images < 200_000:
        c.model.update(dict(depth="resnet18", projector_hidden_size=2048, predictor_hidden_size=2048))
        net = "a ResNet-18"
    else:
        net = "a ResNet-50"
    if size <= 64:  # small views keep their resolution (Fashion-MNIST k-NN 76.5 against 75.3)
        c.model.stem_max_pool = False
        net += ", no max pool after the stem"
    return net
