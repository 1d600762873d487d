"""A real image dataset no preset was tuned on, as a folder: scikit-learn's 1,797
handwritten digits (UCI optical digits: 8x8 pixels, 16 grey levels, other writers
and another scanner than MNIST), laid out as ``ROOT/{train,test}/<digit>/*.png``.

Images keep their 8x8 pixels (grey 0-16 scaled to 0-255): the input pipeline resizes
them as it would a user's. The split is stratified and seeded (80% train).

    python benchmarks/held_out_digits.py --root=/tmp/held_out
    python benchmarks/compare.py --workdir=/tmp/held/base --fractions=0.05,0.1 \
        --set=dataset.name=folder:/tmp/held_out
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def lay_out(root: str, test_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Writes the folder (once: an existing one is checked, not rewritten); returns the
    number of images per split."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    from semppl_jax.label_subsets import stratified_subset

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [n, 8, 8, 1]
    labels = digits.target.astype(np.int64)
    test = stratified_subset(labels, test_fraction, seed)  # round(fraction * n) of each class
    counts = {"train": int(np.sum(~test)), "test": int(np.sum(test))}
    marker = os.path.join(root, "layout.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) != dict(counts=counts, test_fraction=test_fraction, seed=seed):
                raise ValueError(f"{root} holds another layout; choose another --root")
        return counts
    for i, (img, y, is_test) in enumerate(zip(images, labels, test)):
        d = os.path.join(root, "test" if is_test else "train", str(int(y)))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"digit_{i:04d}.png"), "wb") as f:
            f.write(tf.io.encode_png(img).numpy())
    with open(marker, "w") as f:
        json.dump(dict(counts=counts, test_fraction=test_fraction, seed=seed), f)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(lay_out(args.root, args.test_fraction, args.seed)))


if __name__ == "__main__":
    main()
