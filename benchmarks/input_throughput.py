"""Examples/second of the pretraining input pipeline on this host.

Settings: (1) ImageNet-like: JPEGs with ImageNet's size distribution (generated
on the fly, ~400x350 on average), 4x224 + 2x96 views, each image decoded once and
every crop cut from it; (2) the demo: 28-pixel MNIST digits, its views.
Examples/s per host core tells how many cores an accelerator needs at its step rate.
``python benchmarks/input_throughput.py [--batches 20]``. Prints a table, writes JSON.
"""

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf

from experiments import mnist5k
from semppl_jax import datasets, default_config, input_pipeline, sources


def imagenet_like_source(num: int, seed: int = 0) -> sources.Source:
    """Random-texture JPEGs whose sizes follow ImageNet's (median ~500x375, aspect 0.5-2)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(num):
        area = np.exp(rng.normal(np.log(500 * 375), 0.35))
        aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.7)))
        h, w = int(np.sqrt(area / aspect)), int(np.sqrt(area * aspect))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = tf.image.resize(base, [h, w], method="bilinear").numpy().astype(np.uint8)
        jpegs.append(tf.io.encode_jpeg(img, quality=90).numpy())
    return sources.array_source(np.array(jpegs, dtype=object), np.zeros(num, np.int32), 1000, "imagenet_like",
                                 "train", encoded=True)


def measure(source, config, batch: int, batches: int) -> float:
    labelled = np.zeros(source.num_examples, bool)
    labelled[::100] = True
    it = input_pipeline.train_dataset(source, labelled, config, batch, seed=0).as_numpy_iterator()
    next(it)  # warm-up: threads, caches
    t = time.time()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.time() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--out", default="input_throughput.json")
    args = parser.parse_args()
    tf.config.set_visible_devices([], "GPU")
    cores = len(os.sched_getaffinity(0))
    results = []
    imagenet_cfg = default_config.base_config()  # 4x224 + 2x96, the paper's views
    src = imagenet_like_source(512)
    results.append(dict(setting="ImageNet-size JPEGs, 4x224 + 2x96", batch=64,
                        examples_per_sec=measure(src, imagenet_cfg, 64, args.batches)))
    demo_cfg = mnist5k.get_config()
    src = datasets.load_source("mnist5k", "train")
    results.append(dict(setting="demo: MNIST 28px, its views", batch=256,
                        examples_per_sec=measure(src, demo_cfg, 256, args.batches)))
    print(f"host cores used by tf.data: {cores}")
    print(f"{'setting':40s} {'batch':>6s} {'examples/s':>12s} {'per core':>10s}")
    for r in results:
        r["examples_per_sec_per_core"] = r["examples_per_sec"] / cores
        print(f"{r['setting']:40s} {r['batch']:6d} {r['examples_per_sec']:12.1f} "
              f"{r['examples_per_sec_per_core']:10.1f}")
    with open(args.out, "w") as f:
        json.dump(dict(host_cores=cores, results=results), f, indent=2)


if __name__ == "__main__":
    main()
