"""A random training batch of the config's views, for benchmarks that time the step alone."""

from __future__ import annotations

from typing import Any

import numpy as np


def random_batch(config: Any, num_classes: int = 1000, seed: int = 0, labelled_fraction: float = 0.1) -> dict:
    """uint8 views ``[b, V, H, W, 3]`` plus labels, flags and ids, as the input pipeline makes them."""
    rng = np.random.default_rng(seed)
    v, b = config.views, config.training.batch_size
    true = rng.integers(0, num_classes, b).astype(np.int32)
    lab = rng.uniform(size=b) < labelled_fraction
    return dict(large=rng.integers(0, 256, (b, v.num_large, v.large_size, v.large_size, 3), dtype=np.uint8),
                small=rng.integers(0, 256, (b, v.num_small, v.small_size, v.small_size, 3), dtype=np.uint8),
                label=np.where(lab, true, -1).astype(np.int32), is_labelled=lab,
                image_id=np.arange(b, dtype=np.int32), true_label=true)
