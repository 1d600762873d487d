"""Your own images: ``folder.py:/path/to/photos[,grey][,upright]``.

The folder is laid out as ``photos/train/<class>/*`` (labelled), ``photos/train/unlabelled/**``
(no class) and ``photos/test/<class>/*``. The values that depend on the data (view size,
augmentation, network, schedule, queue, calibration fold, vote gate) are read from it when
the run starts, by process 0 from the run's one listing, and printed, each with its reason:
the rules are in ``semppl_jax/folder_preset.py``, the figures behind them in
``docs/own_photos.md``.
``grey`` drops hue and saturation jitter (also chosen when the sampled images are grey);
``upright`` drops flips (text, digits, anything a mirror changes).

Every other value is the digits' recipe (``mnist5k.py``: measured on real digits) or the
base config's.
"""

from __future__ import annotations

from semppl_jax import default_config, folder_preset
from semppl_jax.image_folder import NAME_PREFIX

OPTIONS = ("grey", "upright")


def get_config(arg: str | None = None):
    if not arg:
        raise ValueError("folder.py needs the folder: --config=experiments/folder.py:/path/to/photos")
    root, *options = arg.split(",")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"folder.py: unknown options {sorted(unknown)}; the options are {' and '.join(OPTIONS)}")
    c = default_config.base_config()
    c.dataset.update(dict(name=f"{NAME_PREFIX}{root.rstrip('/')}", label_subset="1.0"))
    folder_preset.mark(c, grey="grey" in options, upright="upright" in options)
    c.training.update(dict(log_every_steps=50, checkpoint_every_steps=500, eval_every_steps=500))
    # The digits' measured recipe for a small network and a short schedule (mnist5k.py).
    c.semppl.update(dict(alpha=2.0, knn_k=10))
    c.optim.update(dict(base_lr=4.0, warmup_epochs=2.0, ema_base=0.9))
    return c


def eval_overrides(protocol: str) -> dict:
    """``eval.py:<protocol>,folder,/path``: the digits' measured evaluation, with flips (photographs)."""
    finetune = protocol == "finetune"
    return dict(batch_size=128, base_lr=0.05 if finetune else 0.4, num_epochs=30.0 if finetune else 10.0,
                crop_scale=(0.5, 1.0))
