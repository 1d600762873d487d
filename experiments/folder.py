"""Your own images: ``folder.py:/path/to/photos[,grey][,upright]``.

The folder is laid out as ``photos/train/<class>/*`` (labelled), ``photos/train/unlabelled/**``
(no class) and ``photos/test/<class>/*``. The values that depend on the data are read
from it and printed, each with its reason:

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
  every class.

Every other value is the digits' recipe (``mnist5k.py``: measured on real digits) or the
base config's. The figures behind the rules: ``docs/own_photos.md``.
"""

from __future__ import annotations

import math

from semppl_jax import default_config

SAMPLE = 64  # images read to find the typical size and whether the folder is grey
IMAGES_SEEN = 400_000  # a small folder is seen this many times over (100 epochs of 4,000 images)


def get_config(arg: str | None = None):
    if not arg:
        raise ValueError("folder.py needs the folder: --config=experiments/folder.py:/path/to/photos")
    root, *options = arg.split(",")
    unknown = set(options) - {"grey", "upright"}
    if unknown:
        raise ValueError(f"folder.py: unknown options {sorted(unknown)}; the options are 'grey' and 'upright'")
    from semppl_jax import image_folder

    source = image_folder.folder_source(root, "train")
    labelled = int((source.labels >= 0).sum())
    side, grey = _typical_image(source, SAMPLE)
    grey = grey or "grey" in options
    c = default_config.base_config()
    c.dataset.update(dict(name=f"folder:{root}", label_subset="1.0"))
    choices = _choose(c, source.num_ids, labelled, side, grey, "upright" in options)
    print(f"[folder.py] {root}: {source.num_ids} training images, {labelled} labelled in "
          f"{source.num_classes} classes; typical side {side} px{', grey' if grey else ''}")
    for line in choices:
        print(f"[folder.py]   {line}")
    return c


def _typical_image(source, sample: int) -> tuple[int, bool]:
    """(median shorter side, whether every sampled image is grey) of up to ``sample`` images."""
    import numpy as np

    from semppl_jax.sources import decode

    ids = np.linspace(0, source.num_ids - 1, min(sample, source.num_ids)).astype(int)
    sides, grey = [], True
    for ex in source.records(np.unique(ids)).take(sample):
        image = decode(ex["image"], True).numpy()
        sides.append(min(image.shape[:2]))
        grey &= bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())
    return int(np.median(sides)), grey


def _choose(c, num_images: int, labelled: int, side: int, grey: bool, upright: bool) -> list[str]:
    """Sets the data-dependent fields of ``c``; returns why, a line each."""
    cap = 48 if num_images < 20_000 else 112 if num_images < 200_000 else 224
    size = max(16, min(cap, 4 * round(side / 4)))
    c.views.update(dict(num_large=2, large_size=size, large_scale=(0.5, 1.0), num_small=0, small_size=size // 2,
                        eval_resize=size, eval_size=size))
    lines = [f"views: 2 of {size} px (typical side {side}, at most {cap} for {num_images} images), "
             f"crops of 50-100% of the image (20-100%: k-NN 4 points lower on Fashion-MNIST)"]
    if grey:
        c.augment.update(dict(saturation=0.0, hue=0.0))
    if upright:
        c.augment.flip = c.eval.flip = False
    lines.append(f"augmentation: flips {'off (upright)' if upright else 'on'}, colour jitter "
                 f"{'without hue and saturation (grey)' if grey else 'on'}")
    if num_images < 20_000:
        c.model.update(dict(depth="small", width_multiplier=0.5, projector_hidden_size=512,
                            predictor_hidden_size=512, projection_size=128))
        net = "a half-width ResNet-10"
    elif num_images < 200_000:
        c.model.update(dict(depth="resnet18", projector_hidden_size=2048, predictor_hidden_size=2048))
        net = "a ResNet-18"
    else:
        net = "a ResNet-50"
    if size <= 64:  # small views keep their resolution (Fashion-MNIST k-NN 76.5 against 75.3)
        c.model.stem_max_pool = False
        net += ", no max pool after the stem"
    lines.append(f"network: {net} ({num_images} images)")
    batch_per_device = 64
    epochs = max(30, math.ceil(IMAGES_SEEN / num_images))
    c.training.update(dict(batch_per_device=batch_per_device, max_batch_fraction=1 / 8, num_epochs=float(epochs),
                           log_every_steps=50, checkpoint_every_steps=500, eval_every_steps=500))
    lines.append(f"schedule: {epochs} epochs (about {IMAGES_SEEN:,} images seen, at least 30 epochs; 100 "
                 f"epochs of 4,000 rather than 33: k-NN +3 points on Fashion-MNIST), {batch_per_device} "
                 f"images a device, at most an eighth of the images a batch")
    c.semppl.queue_size = max(64, 2 * c.views.num_large * labelled)  # a multiple of num_large, as the gate needs
    lines.append(f"queue: {c.semppl.queue_size} entries (about two epochs of the {labelled} labelled images' "
                 f"views)")
    # The digits' measured recipe for a small network and a short schedule (mnist5k.py).
    c.semppl.update(dict(alpha=2.0, knn_k=10))
    c.optim.update(dict(base_lr=4.0, warmup_epochs=2.0, ema_base=0.9))
    return lines


def eval_overrides(protocol: str) -> dict:
    """``eval.py:<protocol>,folder,/path``: the digits' measured evaluation, with flips (photographs)."""
    finetune = protocol == "finetune"
    return dict(batch_size=128, base_lr=0.05 if finetune else 0.4, num_epochs=30.0 if finetune else 10.0,
                crop_scale=(0.5, 1.0))
