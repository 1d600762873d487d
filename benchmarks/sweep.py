"""One-variable-at-a-time sweeps of the demo recipe: what holds learning back.

Each call pretrains one variant of ``experiments/mnist5k.py`` (the demo preset,
any ``--set`` overrides on top) for each seed and records, per run: the final
L_augm and its ratio to log(candidates), the frozen encoder's k-NN top-1
(k=20, labelled digits as support: the demo's protocol), the pseudo-label
accuracy (mean of the last 3 logged batches), the embedding spread and the
wall-clock seconds. Rows are appended to ``WORKDIR/sweep.jsonl`` and the whole
table is printed (``WORKDIR/sweep.md``) next to the raw-pixel k-NN baseline
on the same labelled digits, which needs no training.

    python benchmarks/sweep.py --workdir=workdir_sweep --name=base
    python benchmarks/sweep.py --workdir=workdir_sweep --name=lr2 --set=optim.base_lr=2.0
    python benchmarks/sweep.py --name=half66 --set=model.width_multiplier=0.5,training.num_epochs=66 \
        --knn_fractions=0.01   # alpha = 0: the same encoder's k-NN with 1% labels too

A finished (name, fraction, seed) is not rerun.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "workdir_sweep", "Output directory.")
_NAME = flags.DEFINE_string("name", "base", "Name of the variant (a row of the table).")
_FRACTION = flags.DEFINE_string("fraction", "0.1", "Label fraction.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (each draws its own labelled subset).")
_ALPHA0 = flags.DEFINE_bool("alpha0", True, "Pretrain the alpha=0 baseline (else SemPPL as configured).")
_SET = flags.DEFINE_list("set", [], "Overrides of the demo config, e.g. optim.base_lr=2.0,views.num_small=0.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only print the table of finished runs.")
_KNN_FRACTIONS = flags.DEFINE_list(
    "knn_fractions", [], "With --alpha0: also the k-NN top-1 at these label fractions, from the same encoder "
    "(at alpha = 0 the labels move nothing in it), e.g. 0.01.")


def pixel_knn(fraction: str, seed: int) -> float:
    """k-NN top-1 (k=20, T=0.07, cosine) on raw pixels: the baseline that needs no training,
    computed as the demo and compare.py compute it (``evaluation.pixel_knn``)."""
    from experiments import eval as eval_presets
    from semppl_jax import evaluation

    config = eval_presets.get_config(f"knn,mnist5k,{fraction}")
    config.dataset.label_seed = seed
    return evaluation.pixel_knn(config)["top1"]


def one_run(run_dir: str, fraction: str, seed: int, alpha0: bool, overrides: list[str],
            knn_fractions: list[str] = ()) -> dict:
    from experiments import eval as eval_presets
    from experiments import mnist5k
    from semppl_jax import config_checks, jobs
    from semppl_jax.metric_writers import read_jsonl
    from semppl_jax.paths import write_json_atomic

    config = mnist5k.get_config(fraction)
    config.seed = seed
    config.dataset.label_seed = seed
    config_checks.apply_overrides(config, overrides)
    if alpha0:
        config.semppl.alpha = 0.0
    steps_per_epoch = 4000 // config.training.batch_size
    total = config.training.num_steps or int(np.ceil(config.training.num_epochs * steps_per_epoch))
    config.training.eval_every_steps = max(1, total // 4)
    t0 = time.time()
    summary = jobs.train(config, os.path.join(run_dir, "pretrain"))
    seconds = time.time() - t0
    records = read_jsonl(os.path.join(run_dir, "pretrain", "metrics.jsonl"))
    last = records[-3:]
    out = dict(fraction=float(fraction), seed=seed, alpha0=alpha0, overrides=overrides, steps=summary["step"],
               seconds=round(seconds, 1), knn_top1=summary["knn_top1"], l_augm=summary["l_augm"],
               l_augm_ratio=summary.get("l_augm_ratio"), embedding_std=summary.get("embedding_std"),
               pseudo_label_accuracy=float(np.mean([r["pseudo_label_accuracy"] for r in last])),
               knn_curve=[(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r])
    for other in knn_fractions:
        knn = eval_presets.for_pretraining("knn", f"mnist5k,{other}", config, os.path.join(run_dir, "pretrain"))
        out[f"knn_top1_at_{other}"] = jobs.evaluate(knn, os.path.join(run_dir, f"knn_{other}"))["top1"]
    write_json_atomic(os.path.join(run_dir, "result.json"), out)
    return out


def table(workdir: str) -> str:
    rows = []
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                rows.append(dict(json.load(f), run=name))
    lines = ["| run | overrides | steps | seconds | L_augm | L_augm / log(cand.) | k-NN top-1 | pseudo-label acc. |"
             " k-NN at other fractions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['l_augm_ratio']:.3f}" if r.get("l_augm_ratio") is not None else "–"
        lines.append(f"| {r['run']} | {' '.join(r['overrides']) or '(demo defaults)'} | {r['steps']} | "
                     f"{r['seconds']:.0f} | {r['l_augm']:.3f} | {ratio} | {100 * r['knn_top1']:.1f} | "
                     f"{100 * r['pseudo_label_accuracy']:.1f} | "
                     + (", ".join(f"{100 * v:.1f} at {k[len('knn_top1_at_'):]}" for k, v in r.items()
                                  if k.startswith("knn_top1_at_")) or "–") + " |")
    fractions = sorted({(r["fraction"], r["seed"]) for r in rows})
    base = [f"raw-pixel k-NN (k=20), {100 * f:g}% labels, seed {s}: {100 * pixel_knn(str(f), s):.1f}"
            for f, s in fractions]
    return "\n".join(lines + [""] + base)


def main(argv) -> None:
    del argv
    from semppl_jax import jobs

    logging.get_absl_handler().addFilter(jobs.QuietOrbax())
    os.makedirs(_WORKDIR.value, exist_ok=True)
    if _KNN_FRACTIONS.value and not _ALPHA0.value:
        raise app.UsageError("--knn_fractions needs --alpha0: SemPPL's encoder depends on which digits are labelled")
    if not _REPORT_ONLY.value:
        for seed in map(int, _SEEDS.value):
            run_dir = os.path.join(_WORKDIR.value, f"{_NAME.value}_{_FRACTION.value}_seed{seed}")
            if not os.path.exists(os.path.join(run_dir, "result.json")):
                one_run(run_dir, _FRACTION.value, seed, _ALPHA0.value, _SET.value, _KNN_FRACTIONS.value)
    text = table(_WORKDIR.value)
    with open(os.path.join(_WORKDIR.value, "sweep.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    app.run(main)
