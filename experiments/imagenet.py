"""ImageNet presets: ``imagenet.py:<arch>,<1pct|10pct>`` (e.g. ``resnet50,1pct``).

Paper scale: batch 4096, 4x224 + 2x96 views, LARS base LR 0.2 x B/256 with 10
warm-up epochs; labels from SimCLR's 1% / 10% lists. Archs: resnet18, resnet50,
resnet50x2, resnet50x4, resnet101, resnet152, resnet200, resnet200x2, and
``_sk`` variants (selective kernels, e.g. resnet50_sk).
"""

from semppl_jax import default_config

ARCHS = {
    "resnet18": ("resnet18", 1), "resnet34": ("resnet34", 1), "resnet50": ("resnet50", 1),
    "resnet50x2": ("resnet50", 2), "resnet50x4": ("resnet50", 4), "resnet101": ("resnet101", 1),
    "resnet152": ("resnet152", 1), "resnet200": ("resnet200", 1), "resnet200x2": ("resnet200", 2),
}


def get_config(arg: str | None = "resnet50,1pct"):
    arch, _, subset = (arg or "resnet50,1pct").partition(",")
    subset = subset or "1pct"
    sk = arch.endswith("_sk")
    base = arch[:-3] if sk else arch
    if base not in ARCHS:
        raise ValueError(f"imagenet.py: unknown arch {arch!r}; one of {sorted(ARCHS)} (optionally + '_sk')")
    if subset not in ("1pct", "10pct"):
        raise ValueError(f"imagenet.py: label subset must be '1pct' or '10pct', got {subset!r}")
    c = default_config.base_config()
    c.dataset.update(dict(name="imagenet2012", train_split="train", eval_split="validation",
                          label_subset=subset))
    depth, width = ARCHS[base]
    c.model.update(dict(depth=depth, width_multiplier=width, sk_ratio=0.0625 if sk else 0.0))
    # bf16 compute (parameters, optimizer, BN, losses and queue stay float32): 4096 images fit
    # as 128 a chip on 32 TPU v4 chips (README, "Which batch fits"; docs/performance.md).
    c.training.update(dict(batch_size=4096, num_epochs=300.0, log_every_steps=100,
                           eval_every_steps=5000, eval_max_examples=10_000, compute_dtype="bfloat16"))
    # Best reading: the queue holds the labelled entries of about the last 125 steps.
    c.semppl.queue_size = 20_480 if subset == "1pct" else 204_800
    return c
