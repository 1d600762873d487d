"""The held-out dataset helper: scikit-learn's digits as a user's image folder."""

import json

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import held_out_digits
from semppl_jax import datasets


def test_folder_holds_every_digit_once_with_its_class_and_pixels(tmp_path):
    from sklearn.datasets import load_digits

    root = tmp_path / "held_out"
    counts = held_out_digits.lay_out(str(root))
    digits = load_digits()
    assert counts == {"train": 1438, "test": 359} and sum(counts.values()) == len(digits.target)
    seen = {}
    for split in ("train", "test"):
        source = datasets.load_source(f"folder:{root}", split)
        assert source.num_ids == counts[split] and source.num_classes == 10
        for name, label in zip(source.file_names, source.labels):
            seen[name.split("/")[-1]] = (split, int(label))
    assert len(seen) == len(digits.target)
    test_counts = np.bincount([label for split, label in seen.values() if split == "test"], minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(0.2 * np.bincount(digits.target)))  # stratified
    for i in (0, 17, 1796):  # classes and pixels as scikit-learn has them
        split, label = seen[f"digit_{i:04d}.png"]
        assert label == digits.target[i]
        png = tf.io.read_file(str(root / split / str(label) / f"digit_{i:04d}.png"))
        np.testing.assert_array_equal(tf.io.decode_png(png).numpy()[..., 0],
                                      np.round(digits.images[i] * 255 / 16).astype(np.uint8))
    # Laid out once: a second call checks and keeps it; another layout is refused.
    assert held_out_digits.lay_out(str(root)) == counts
    assert json.loads((root / "layout.json").read_text())["seed"] == 0
    with pytest.raises(ValueError, match="another layout"):
        held_out_digits.lay_out(str(root), seed=1)
