"""SemPPL's gain over alpha = 0 against how right its pseudo-labels are: table and plot.

Reads ``compare.py`` workdirs: one with the recipe's SemPPL and the alpha = 0 runs
(``--base_dir``) and one per variant (``--variant_dirs=name=dir,...``, each made with
``--methods=semppl --set=...``). Every variant run is paired by seed and label
fraction with the base's alpha = 0 run (same labelled subset, same initialisation).
Writes ``OUT.md`` (a table: final pseudo-label accuracy, the share of unlabelled
images whose vote passed the gate and their accuracy, the gate's held-out votes' accuracy
(no labels needed), k-NN and fine-tuned gains, mean ± standard error) and ``OUT.png`` (gains against pseudo-label
accuracy). The commands behind the shipped figures: ``docs/unsure_pseudo_labels.md``.

    python benchmarks/unsure_study.py --base_dir=/tmp/study/base \
        --variant_dirs="alpha 0.2=/tmp/study/a02,alpha 1=/tmp/study/a1" --out=docs/unsure_study
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.compare import by_seed, finished_runs  # noqa: E402
from semppl_jax.metric_writers import read_jsonl  # noqa: E402

_BASE = flags.DEFINE_string("base_dir", None, "compare.py workdir with the recipe's SemPPL and alpha = 0 runs.",
                            required=True)
_BASE_NAME = flags.DEFINE_string("base_name", "alpha 2 (recipe)", "Name of the base workdir's SemPPL runs.")
_VARIANTS = flags.DEFINE_list("variant_dirs", [], "name=workdir of each SemPPL variant.")
_OUT = flags.DEFINE_string("out", "unsure_study", "Output path without extension (.md and .png are written).")
_TITLE = flags.DEFINE_string("title", "", "A line above the table (the recipe the runs used).")


def _final(run: dict, key: str) -> float | None:
    """``key`` in the last logged step of the run's pretraining (None where not logged)."""
    path = os.path.join(run.get("pretrain_dir") or "", "metrics.jsonl")
    records = read_jsonl(path) if os.path.exists(path) else []
    return float(records[-1][key]) if records and key in records[-1] else None


def _mean_se(vals: list[float]) -> tuple[float, float]:
    return float(np.mean(vals)), float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0


def rows(base: list[dict], variants: dict[str, list[dict]]) -> list[dict]:
    """One row per (variant, label fraction): the variant's runs whose seed has an alpha = 0
    run at that fraction (the others are left out, so every column covers the same seeds)."""
    out = []
    for name, runs in variants.items():
        for frac in sorted({r["fraction"] for r in runs}):
            paired = by_seed(base, "alpha0", frac, "knn_top1")
            mine = [r for r in runs if r["method"] == "semppl" and r["fraction"] == frac and r["seed"] in paired
                    and "knn_top1" in r]
            row = dict(variant=name, fraction=frac, seeds=sorted(r["seed"] for r in mine))
            for key in ("knn_top1", "top1"):
                a0 = by_seed(base, "alpha0", frac, key)
                row[f"{key}_gain"] = [100 * r[key] - a0[r["seed"]] for r in mine]
                row[key] = [100 * r[key] for r in mine]
                row[f"alpha0_{key}"] = [a0[r["seed"]] for r in mine]
            for key in ("pseudo_label_accuracy", "sure_vote_fraction", "sure_pseudo_label_accuracy",
                        "queue_held_out_accuracy"):
                vals = [v for v in (_final(r, key) for r in mine) if v is not None]
                row[key] = 100 * float(np.mean(vals)) if vals else None
            pixels = by_seed(base, "supervised", frac, "pixel_knn_top1")
            row["pixel_knn"] = float(np.mean([pixels[s] for s in row["seeds"] if s in pixels])) if pixels else None
            if row["knn_top1_gain"]:
                out.append(row)
    return out


def _fmt(vals: list[float], signed: bool = True) -> str:
    if not vals:
        return "–"
    m, se = _mean_se(vals)
    if not signed:
        return f"{m:.1f} ± {se:.1f}"
    level = sum(v == 0 for v in vals)
    return (f"{m:+.1f} ± {se:.1f}, ahead in {sum(v > 0 for v in vals)} of {len(vals)}"
            + (f", level in {level}" if level else ""))


def table(study: list[dict]) -> str:
    lines = ["| labels | variant | seeds | pseudo-labels right (%) | held-out votes right (%) | "
             "sure votes (%) / right (%) | k-NN | k-NN − alpha 0 | fine-tuned − alpha 0 | alpha 0 k-NN | "
             "raw pixels k-NN |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(study, key=lambda r: (r["fraction"], r["variant"])):
        pl = "–" if r["pseudo_label_accuracy"] is None else f"{r['pseudo_label_accuracy']:.1f}"
        sure = ("–" if r["sure_vote_fraction"] is None or r["sure_pseudo_label_accuracy"] is None
                else "0 / –" if r["sure_vote_fraction"] == 0  # none passed: no accuracy to give
                else f"{r['sure_vote_fraction']:.0f} / {r['sure_pseudo_label_accuracy']:.1f}")
        pixels = "–" if r["pixel_knn"] is None else f"{r['pixel_knn']:.1f}"
        held = "–" if r.get("queue_held_out_accuracy") is None else f"{r['queue_held_out_accuracy']:.1f}"
        lines.append(f"| {100 * r['fraction']:g}% | {r['variant']} | {len(r['seeds'])} | {pl} | {held} | {sure} | "
                     f"{_fmt(r['knn_top1'], False)} | {_fmt(r['knn_top1_gain'])} | {_fmt(r['top1_gain'])} | "
                     f"{_fmt(r['alpha0_knn_top1'], False)} | {pixels} |")
    return "\n".join(lines)


def plot(study: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    names = sorted({r["variant"] for r in study})
    markers = {f: m for f, m in zip(sorted({r["fraction"] for r in study}), "os^Dv")}
    for ax, key, title in ((axes[0], "knn_top1_gain", "k-NN"), (axes[1], "top1_gain", "fine-tuned")):
        for i, name in enumerate(names):
            pts = sorted((r for r in study if r["variant"] == name and r["pseudo_label_accuracy"] is not None
                          and r[key]), key=lambda r: r["pseudo_label_accuracy"])
            for r in pts:
                m, se = _mean_se(r[key])
                ax.errorbar(r["pseudo_label_accuracy"], m, yerr=se, fmt=markers[r["fraction"]], color=f"C{i}",
                            capsize=3, label=name if r is pts[0] else None)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("final pseudo-label accuracy of the run (%)")
        ax.set_title(f"{title}: SemPPL − alpha 0 (points)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gain over alpha = 0, mean ± s.e. over seeds")
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], ls="", marker=m, color="gray") for m in markers.values()]
    labels += [f"{100 * f:g}% labels" for f in markers]
    axes[1].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv) -> None:
    del argv
    base = finished_runs(_BASE.value)
    variants = {_BASE_NAME.value: base}
    for item in _VARIANTS.value:
        name, _, path = item.partition("=")
        if not path:
            raise app.UsageError(f"--variant_dirs: {item!r} is not name=workdir")
        variants[name] = finished_runs(path)
    study = rows(base, variants)
    text = table(study)
    with open(_OUT.value + ".md", "w") as f:
        f.write((_TITLE.value + "\n\n" if _TITLE.value else "") + text + "\n")
    with open(_OUT.value + ".json", "w") as f:
        json.dump(study, f, indent=1)
    plot(study, _OUT.value + ".png")
    print(text)


if __name__ == "__main__":
    app.run(main)
