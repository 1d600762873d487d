"""SemPPL on images laid out as a user with few labels would: the demo's digits as PNG
files, 10% in class directories, the rest under ``unlabelled/`` with no label anywhere
(their classes kept apart, in a JSON file outside the folder).

Pretrains with the demo preset, runs the k-NN evaluation and ``--mode=pseudo_label``,
and scores the exported pseudo-labels against the classes kept apart; beside them the
k-NN top-1 of the same encoder and of raw pixels, and the run's last leave-own-out
k-NN accuracy (the estimate that needs no labels).

``python benchmarks/own_data_check.py --workdir=/tmp/own [--fraction 0.1 --steps N]``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def lay_out(root: str, fraction: float, seed: int = 0) -> dict[str, int]:
    """Writes the folder; returns {file name: class} of the unlabelled images (kept apart)."""
    import tensorflow as tf

    from semppl_jax import label_subsets, sources

    hidden = {}
    for split in ("train", "test"):
        images, labels = sources.mnist5k_arrays(split)
        chosen = (label_subsets.stratified_subset(labels, fraction, seed) if split == "train"
                  else np.ones(len(labels), bool))
        for i, (img, y) in enumerate(zip(images, labels)):
            name = f"{split}_{i:05d}.png"
            if chosen[i]:
                d = os.path.join(root, split, str(int(y)))
            else:
                d = os.path.join(root, split, "unlabelled", f"part{i % 7}")
                hidden[name] = int(y)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, name), "wb") as f:
                f.write(tf.io.encode_png(img).numpy())
    return hidden


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from experiments import eval as eval_presets
    from experiments import mnist5k
    from semppl_jax import evaluation, jobs, pseudo_labels
    from semppl_jax.metric_writers import read_jsonl

    folder = os.path.join(args.workdir, "photos")
    hidden_path = os.path.join(args.workdir, "kept_apart.json")
    if not os.path.exists(hidden_path):
        hidden = lay_out(folder, args.fraction)
        with open(hidden_path, "w") as f:
            json.dump(hidden, f)
    hidden = json.load(open(hidden_path))
    config = mnist5k.get_config(str(args.fraction))
    config.dataset.update(dict(name=f"folder:{folder}", label_subset="1.0"))
    if args.steps:
        config.training.num_steps = args.steps
    run = os.path.join(args.workdir, "run")
    jobs.train(config, run)
    loo = read_jsonl(os.path.join(run, "metrics.jsonl"))[-1]["loo_knn_accuracy"]
    knn_config = eval_presets.get_config(f"knn,mnist5k,{args.fraction}")
    knn_config.dataset.update(dict(name=f"folder:{folder}", label_subset="1.0"))
    knn_config.eval.checkpoint = run
    knn = jobs.evaluate(knn_config, os.path.join(args.workdir, "knn"))
    pixels = evaluation.pixel_knn(knn_config)
    summary = pseudo_labels.write_pseudo_labels(config, run)
    rows = read_jsonl(os.path.join(run, "pseudo_labels.jsonl"))
    names = [os.path.basename(r["file_name"]) for r in rows]
    assert sorted(names) == sorted(hidden), "the pseudo-labels must cover every unlabelled image once"
    accuracy = float(np.mean([int(r["class_name"]) == hidden[n] for r, n in zip(rows, names)]))
    report = dict(unlabelled_images=len(rows), pseudo_label_accuracy=accuracy, knn_top1=knn["top1"],
                  raw_pixel_knn_top1=pixels["top1"], last_loo_knn_accuracy=loo,
                  mean_vote_share=summary["mean_vote_share"])
    print(json.dumps(report, indent=2))
    with open(os.path.join(args.workdir, "own_data_check.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
