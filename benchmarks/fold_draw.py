"""Is a calibration fold a typical draw of images? (runs of ``benchmarks/own_photos.py``)

The fold's estimate is the accuracy of a few labelled images voted like unlabelled ones;
its Wilson interval covers which images happened to be drawn. This scores, with a run's
final encoder and the same weighted k-NN as the pseudo-label export (support: the labelled
images outside the fold), the fold against the unlabelled images, whose classes the
benchmark's layout keeps in ``hidden.json``, and ranks the fold's accuracy among
class-balanced draws of as many unlabelled images: a fold drawn without bias ranks
anywhere from 0 to 1 (uniformly over runs, about); a fold biased by its labels ranks high in
every run.

    python benchmarks/fold_draw.py --root=/tmp/own_photos --set=fashion --labels=0.1,4 --seeds=0,1,2 --tag=fold

Prints one JSON line a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DRAWS = 2000


def final_embeddings(config, source, workdir: str) -> np.ndarray:
    """The final encoder's centre-crop embedding of every training image, by image id."""
    from semppl_jax import evaluation, sharding

    mesh = sharding.make_mesh()
    net, params, state = evaluation.frozen_encoder(config, source.num_classes,
                                                   evaluation.load_pretrained(workdir, config), mesh)
    emb, ids = evaluation.embed_local(net, params, state, source, config, mesh, source.valid_ids())  # one process
    out = np.zeros((len(source.labels), emb.shape[1]), np.float32)
    out[ids] = emb
    return out


def rank_among_draws(right: np.ndarray, classes: np.ndarray, pool: np.ndarray, per_class: np.ndarray,
                     observed: float, seed: int = 0) -> float:
    """The mid-rank of ``observed`` among class-balanced draws from ``pool`` (``per_class[c]``
    images of class c): the share of draws below it plus half the share equal to it (a
    small fold's accuracy takes few values: counting ties whole would rank it high)."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(pool & (classes == c)) for c in range(len(per_class))]
    accs = [np.mean(np.concatenate([right[rng.choice(m, k, replace=False)] for m, k in zip(members, per_class) if k]))
            for _ in range(DRAWS)]
    accs = np.asarray(accs)
    return float(np.mean(accs < observed - 1e-9) + 0.5 * np.mean(np.abs(accs - observed) <= 1e-9))


def score(root: str, name: str, labels_spec: str, seed: int, tag: str, method: str = "semppl") -> dict:
    """``method``: ``semppl``, or ``alpha0`` (whose encoder no label reached: a fold that ranks
    high there too is an easy draw, not one its labels made easy)."""
    from own_photos import _config, alpha0_encoder, run_dir, runs_dir

    from semppl_jax import datasets, evaluation

    layout = os.path.join(root, name, f"{labels_spec}_seed{seed}")
    runs = runs_dir(root, tag)
    config = _config(layout, seed, method == "alpha0")
    workdir = (os.path.join(run_dir(runs, name, labels_spec, seed, "semppl"), "pretrain") if method == "semppl"
               else alpha0_encoder(runs, name, seed, config))
    source = datasets.load_split(config, config.dataset.train_split, os.path.join(workdir, "data_index"))
    in_loss, fold = datasets.pretraining_masks(config, source)
    if not fold.any():
        raise ValueError(f"{workdir}: no calibration fold")
    with open(os.path.join(layout, "hidden.json")) as f:
        hidden = json.load(f)
    index = {c: i for i, c in enumerate(source.class_names)}
    classes = np.array([index[hidden[str(f)]] if str(f) in hidden else int(y)
                        for f, y in zip(source.file_names, source.labels)])
    emb = final_embeddings(config, source, workdir)
    support = np.flatnonzero(in_loss)
    scores = evaluation.knn_classify(emb[support], source.labels[support], emb, source.num_classes,
                                     config.eval.knn_k, config.eval.knn_temperature)
    right = scores.argmax(1) == classes
    unlabelled = ~(in_loss | fold)
    unlabelled[np.setdiff1d(np.arange(len(classes)), source.valid_ids())] = False
    per_class = np.bincount(classes[fold], minlength=source.num_classes)
    return dict(set=name, labels=labels_spec, seed=seed, method=method, fold_images=int(fold.sum()),
                fold_knn_accuracy=float(right[fold].mean()), unlabelled_knn_accuracy=float(right[unlabelled].mean()),
                fold_rank=rank_among_draws(right, classes, unlabelled, per_class, float(right[fold].mean()), seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--set", default="fashion")
    parser.add_argument("--labels", default="0.1,4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tag", default="fold")
    parser.add_argument("--methods", default="semppl", choices=["semppl", "alpha0", "semppl,alpha0"],
                        help="whose final encoder scores the fold")
    args = parser.parse_args()
    for labels_spec in args.labels.split(","):
        for seed in map(int, args.seeds.split(",")):
            for method in args.methods.split(","):
                print(json.dumps(score(args.root, args.set, labels_spec, seed, args.tag, method)), flush=True)


if __name__ == "__main__":
    main()
