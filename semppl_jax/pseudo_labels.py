"""``--mode=pseudo_label``: every unlabelled training image's k-NN label, for review.

With the final encoder, each unlabelled image (readable, not in the labelled subset)
is voted over all labelled images exactly as the k-NN evaluation does (weighted
k-NN, ``eval.knn_k``, ``eval.knn_temperature``, centre crops). Written to the workdir:

- ``pseudo_labels.csv`` and ``pseudo_labels.jsonl``: file name, id, label, class name,
  vote share (the label's share of the vote weight) and margin (that share less the
  runner-up's), least confident first: the first rows are the ones worth a look;
- ``pseudo_labels_by_class.csv``: per class, how many images, mean share and margin
  (and accuracy where hidden labels exist);
- ``pseudo_labels_summary.json``; where the unlabelled images have hidden labels (the
  demo), accuracy by confidence bucket and ``pseudo_labels_reliability.png``; where the
  run kept a calibration fold (``dataset.calibration_per_class``), the label-free
  estimate of these pseudo-labels' accuracy: the fold voted the same way by the other
  labelled images, with a Wilson 95% interval over the fold.

Each process embeds and votes its own part; process 0 merges the parts into one file
holding every image once.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from semppl_jax.paths import read_json, workdir_path, write_json_atomic

BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0001)  # vote-share buckets for the reliability table
FIELDS = ("file_name", "image_id", "pseudo_label", "class_name", "vote_share", "margin", "hidden_label")


def vote_confidence(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class scores [n, C] -> (label, the label's share of the total, that share less the runner-up's)."""
    total = np.maximum(scores.sum(axis=1), 1e-30)
    order = np.argsort(-scores, axis=1)
    label = order[:, 0]
    top = scores[np.arange(len(scores)), label] / total
    second = scores[np.arange(len(scores)), order[:, 1]] / total if scores.shape[1] > 1 else np.zeros(len(scores))
    return label.astype(np.int32), top, top - second


def reliability(share: np.ndarray, correct: np.ndarray) -> list[dict]:
    """Accuracy of the pseudo-labels by vote-share bucket."""
    rows = []
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
        inside = (share >= lo) & (share < hi)
        if inside.any():
            rows.append(dict(share_from=lo, share_to=min(hi, 1.0), images=int(inside.sum()),
                             mean_share=float(share[inside].mean()), accuracy=float(correct[inside].mean())))
    return rows


def by_class(labels: np.ndarray, share: np.ndarray, margin: np.ndarray, num_classes: int,
             class_names: tuple[str, ...], correct: np.ndarray | None) -> list[dict]:
    rows = []
    for c in range(num_classes):
        mine = labels == c
        row = dict(label=c, class_name=class_names[c] if c < len(class_names) else str(c), images=int(mine.sum()),
                   mean_share=float(share[mine].mean()) if mine.any() else None,
                   mean_margin=float(margin[mine].mean()) if mine.any() else None)
        if correct is not None:
            row["accuracy"] = float(correct[mine].mean()) if mine.any() else None
        rows.append(row)
    return rows


def plot_reliability(rows: list[dict], path: epath.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="share = accuracy")
    ax.plot([r["mean_share"] for r in rows], [r["accuracy"] for r in rows], "o-", label="pseudo-labels")
    for r in rows:
        ax.annotate(str(r["images"]), (r["mean_share"], r["accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    ax.set(xlabel="vote share (bucket mean)", ylabel="accuracy against hidden labels", xlim=(0, 1.02),
           ylim=(0, 1.02), title="Pseudo-label reliability")
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def write_pseudo_labels(config: Any, workdir: str) -> dict:
    """The job behind ``--mode=pseudo_label`` (see the module doc); returns the summary."""
    import jax
    from jax.experimental import multihost_utils

    from semppl_jax import datasets, evaluation, multihost, sharding

    root = workdir_path(workdir)
    index_dir = str(root / "data_index")
    source = datasets.load_split(config, config.dataset.train_split, index_dir)
    in_loss, fold = datasets.pretraining_masks(config, source)  # the same on every process: collectives agree
    labelled = in_loss | fold
    unlabelled = source.valid_ids()[~labelled[source.valid_ids()]]
    if not len(unlabelled):
        raise ValueError("every training image is labelled: there is nothing to pseudo-label")
    checkpoint = config.eval.checkpoint or workdir
    pretrained = evaluation.load_pretrained(checkpoint, config)
    if fold.any() and not multihost.decided_by_process_zero(lambda: fold_as_trained(config, checkpoint)):
        fold = np.zeros_like(fold)  # no estimate; the fold's images are still labelled, the support
        in_loss = labelled
    mesh = sharding.make_mesh()
    net, params, net_state = evaluation.frozen_encoder(config, source.num_classes, pretrained, mesh)
    support = [evaluation.embed(net, params, net_state, source, config, mesh, ids=np.flatnonzero(part))
               for part in (in_loss, fold) if part.any()]
    support_emb, support_y = (np.concatenate(parts) for parts in zip(*support))
    estimate = fold_estimate(support[0], support[1], source.num_classes, config) if fold.any() else {}
    emb, ids = evaluation.embed_local(net, params, net_state, source, config, mesh, unlabelled)
    scores = evaluation.knn_classify(support_emb, support_y, emb, source.num_classes, config.eval.knn_k,
                                     config.eval.knn_temperature)
    label, share, margin = vote_confidence(scores)
    rows = [dict(file_name=str(source.file_names[i]), image_id=int(i), pseudo_label=int(y),
                 class_name=source.class_names[y] if y < len(source.class_names) else str(int(y)),
                 vote_share=round(float(s), 6), margin=round(float(m), 6), hidden_label=int(source.labels[i]))
            for i, y, s, m in zip(ids, label, share, margin)]
    parts = root / "pseudo_labels.parts"
    parts.mkdir(parents=True, exist_ok=True)
    (parts / f"part-{jax.process_index():05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    multihost_utils.sync_global_devices("semppl_pseudo_label_parts")
    summary: dict = {}
    if jax.process_index() == 0:
        summary = _merge(parts, root, source, pretrained, checkpoint, len(unlabelled), estimate)
    multihost_utils.sync_global_devices("semppl_pseudo_label_done")
    return summary


FOLD_FIELDS = ("dataset.calibration_per_class", "dataset.label_subset", "dataset.label_seed")


def fold_as_trained(config: Any, checkpoint: str) -> bool:
    """Whether the fold this config draws is the one the run kept out of its loss, by the
    run's ``config.json`` beside its checkpoints: the same fields, true; another fold,
    refused naming the field (its images may have been in the loss: the estimate would read
    high); no ``config.json`` (a released pickle), false, with a warning."""
    from semppl_jax.errors import ConfigError

    path = epath.Path(checkpoint)
    saved = (path.parent if path.suffix == ".pkl" else path) / "config.json"
    if not saved.exists():
        logging.warning("no %s: which images the run kept out of its loss is not known, so the pseudo-labels' "
                        "accuracy is not estimated", saved)
        return False
    trained = read_json(saved)
    for field in FOLD_FIELDS:
        section, name = field.split(".")
        was, now = trained.get(section, {}).get(name), config[section][name]
        if was != now:
            raise ConfigError(f"config.{field}: {now!r} here, {was!r} in the pretraining run ({saved}); the "
                              f"calibration fold would not be the images it kept out of the loss. Give "
                              f"--config.{field}={was!r}")
    return True


def fold_estimate(in_loss: tuple[np.ndarray, np.ndarray], fold: tuple[np.ndarray, np.ndarray], num_classes: int,
                  config: Any, z: float = 1.96) -> dict:
    """The calibration fold's (embeddings, labels) voted over the other labelled images'
    as the export votes: the share right estimates the exported pseudo-labels' accuracy
    without their labels (slightly low: the export's support also holds the fold), and
    the Wilson interval over the fold says how sure that is."""
    import jax.numpy as jnp

    from semppl_jax import evaluation, vote_gate

    scores = evaluation.knn_classify(in_loss[0], in_loss[1], fold[0], num_classes, config.eval.knn_k,
                                     config.eval.knn_temperature)
    right, images = float(np.mean(np.argmax(scores, 1) == fold[1])), len(fold[1])
    low, high = (float(v) for v in vote_gate.wilson(jnp.asarray(right), jnp.asarray(float(images)), z))
    return dict(calibration_images=images, accuracy_estimate=right, accuracy_low=low, accuracy_high=high)


def _merge(parts: epath.Path, root: epath.Path, source: Any, pretrained: Any, checkpoint: str,
           expected: int, estimate: dict) -> dict:
    rows = [json.loads(line) for p in sorted(parts.glob("part-*.jsonl")) for line in p.read_text().splitlines()
            if line.strip()]
    ids = [r["image_id"] for r in rows]
    if len(ids) != expected or len(set(ids)) != expected:
        raise RuntimeError(f"pseudo-labels: the parts hold {len(ids)} rows ({len(set(ids))} images) for "
                           f"{expected} unlabelled images")
    rows.sort(key=lambda r: (r["vote_share"], r["margin"], r["image_id"]))  # least confident first
    hidden = np.array([r["hidden_label"] for r in rows])
    has_hidden = bool((hidden >= 0).all())
    for r in rows:
        if not has_hidden:
            r.pop("hidden_label")
    fields = [f for f in FIELDS if has_hidden or f != "hidden_label"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    (root / "pseudo_labels.csv").write_text(out.getvalue())
    (root / "pseudo_labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    label = np.array([r["pseudo_label"] for r in rows])
    share = np.array([r["vote_share"] for r in rows])
    margin = np.array([r["margin"] for r in rows])
    correct = (label == hidden) if has_hidden else None
    classes = by_class(label, share, margin, source.num_classes, source.class_names, correct)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(classes[0]))
    writer.writeheader()
    writer.writerows(classes)
    (root / "pseudo_labels_by_class.csv").write_text(out.getvalue())
    summary = dict(images=len(rows), checkpoint=checkpoint, step=pretrained.step,
                   mean_vote_share=float(share.mean()), mean_margin=float(margin.mean()),
                   classes_without_images=int(sum(c["images"] == 0 for c in classes)), **estimate)
    if correct is not None:
        table = reliability(share, correct)
        summary.update(accuracy=float(correct.mean()), reliability=table)
        plot_reliability(table, root / "pseudo_labels_reliability.png")
    write_json_atomic(root / "pseudo_labels_summary.json", summary)
    parts.rmtree()
    logging.info("pseudo-labels of %d images written to %s%s%s", len(rows), root / "pseudo_labels.csv",
                 f" (accuracy against hidden labels {summary['accuracy']:.4f})" if correct is not None else "",
                 f"; estimated from {estimate['calibration_images']} calibration images: "
                 f"{estimate['accuracy_estimate']:.1%} right (95%: {estimate['accuracy_low']:.1%}-"
                 f"{estimate['accuracy_high']:.1%})" if estimate else "")
    print(json.dumps({k: v for k, v in summary.items() if k != "reliability"}))
    return summary
