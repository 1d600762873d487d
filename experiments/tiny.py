"""Tiny preset: the tiny ResNet on synthetic 32-pixel images; runs on CPU in seconds.

For tests and smoke runs, not for results.
"""

from semppl_jax import default_config


def get_config(arg: str | None = None):
    c = default_config.base_config()
    c.dataset.name = "synthetic"
    c.dataset.synthetic_size = 256
    c.dataset.label_subset = "0.1"
    c.views.update(dict(num_large=2, large_size=32, num_small=2, small_size=16,
                        eval_resize=36, eval_size=32))
    c.model.update(dict(depth="tiny", projector_hidden_size=64, predictor_hidden_size=64,
                        projection_size=32))
    c.semppl.queue_size = 128
    c.optim.warmup_epochs = 1.0
    c.training.update(dict(batch_size=32, num_steps=12, log_every_steps=2,
                           checkpoint_every_steps=6))
    return c


def eval_overrides(protocol: str) -> dict:
    """``eval.py:<protocol>,tiny``: seconds, not results."""
    del protocol
    return dict(batch_size=32, num_epochs=2.0, crop_scale=(0.3, 1.0))
