"""SemPPL vs its alpha=0 ablation vs supervised-from-scratch, on the embedded MNIST digits.

For each label fraction and seed: (a) SemPPL pretrain + fine-tune, (b) the same
with alpha = 0 (the ReLICv2-style baseline) + fine-tune, (c) supervised training
from scratch on the labelled subset alone (same fine-tuning recipe). Writes
``WORKDIR/comparison.md`` (mean +- std of fine-tuned top-1), ``comparison.json``,
``comparison.png`` (bars) and ``pseudo_labels.png`` (pseudo-label accuracy of (a)
over training).

    python benchmarks/compare.py --workdir=workdir_compare [--fractions=0.01,0.1 --seeds=0,1,2 --steps=N]

A SemPPL variant is a workdir of its own, paired by seed with the recipe's runs:

    python benchmarks/compare.py --workdir=workdir_m1 --fractions=0.01 --methods=semppl \
        --set=semppl.num_positives=1
    python benchmarks/compare.py --workdir=workdir_compare --report_only --variants=workdir_m1,...

Each SemPPL/ablation run takes minutes on 2 CPU cores; runs already finished in
WORKDIR are reused, so an interrupted comparison continues where it stopped, and
the report covers every finished run in WORKDIR (add seeds with a second call).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "workdir_compare", "Output directory.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.01", "0.1"], "Label fractions.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (the labelled subset changes with the seed).")
_STEPS = flags.DEFINE_integer("steps", None, "Pretraining steps (default: the demo preset's).")
_METHODS = flags.DEFINE_list("methods", ["semppl", "alpha0", "supervised"], "Which of the three to run.")
_SET = flags.DEFINE_list("set", [], "Overrides of the pretraining config, e.g. semppl.knn_k=5,semppl.num_positives=1.")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "Workdirs of SemPPL variants (each made with --methods=semppl --set=...): their runs are "
    "paired by seed with this workdir's SemPPL and alpha = 0 runs in WORKDIR/variants.md.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Run nothing; report the finished runs.")

METHODS = ("semppl", "alpha0", "supervised")


def one_run(workdir: str, method: str, fraction: str, seed: int, steps: int | None,
            overrides: list[str] = ()) -> dict:
    from experiments import mnist5k
    from semppl_jax import config_checks, jobs
    from semppl_jax.metric_writers import read_jsonl
    from semppl_jax.paths import write_json_atomic

    config = mnist5k.get_config(fraction)
    config.seed = seed
    config.dataset.label_seed = seed
    config.training.eval_every_steps = None
    if steps:
        config.training.num_steps = steps
    config_checks.apply_overrides(config, list(overrides))
    done = os.path.join(workdir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            out = json.load(f)
    else:
        curve = []
        pretrain_dir = os.path.join(workdir, "pretrain")
        if method == "alpha0":
            config.semppl.alpha = 0.0
            pretrain_dir = alpha0_twin(workdir, seed, config) or pretrain_dir
        if method != "supervised" and not os.path.exists(os.path.join(pretrain_dir, "train_summary.json")):
            jobs.train(config, pretrain_dir)
        if method == "semppl":
            curve = [(r["step"], r["pseudo_label_accuracy"]) for r in read_jsonl(
                os.path.join(pretrain_dir, "metrics.jsonl"))]
        result = jobs.evaluate(eval_config("finetune", method, fraction, config, pretrain_dir),
                               os.path.join(workdir, "finetune"))
        out = dict(method=method, fraction=float(fraction), seed=seed, top1=result["top1"], top5=result["top5"],
                   pseudo_label_curve=curve, pretrain_dir=None if method == "supervised" else pretrain_dir)
        write_json_atomic(done, out)
    if method != "supervised" and "knn_top1" not in out:  # also added to runs made before it existed
        result = jobs.evaluate(eval_config("knn", method, fraction, config,
                                           out.get("pretrain_dir") or os.path.join(workdir, "pretrain")),
                               os.path.join(workdir, "knn"))
        out["knn_top1"] = result["top1"]
        write_json_atomic(done, out)
    if method == "supervised" and "pixel_knn_top1" not in out:  # the baseline needing no training
        from semppl_jax import evaluation

        knn = eval_config("knn", method, fraction, config, workdir)
        out["pixel_knn_top1"] = evaluation.pixel_knn(knn)["top1"]
        write_json_atomic(done, out)
    return out


# Fields in which two alpha = 0 pretrainings of one seed may differ and still train the same
# encoder: the labelled subset and the queue it sizes (neither reaches the encoder at alpha = 0),
# and how often the online k-NN evaluation runs (it changes nothing in training).
TWIN_FREE_FIELDS = (("dataset", "label_subset"), ("semppl", "queue_size"), ("training", "eval_every_steps"))


def _encoder_defining(config_dict: dict) -> dict:
    """A pretraining config as saved (JSON), less the fields that do not change an alpha = 0 encoder."""
    d = json.loads(json.dumps(config_dict))
    for section, field in TWIN_FREE_FIELDS:
        d[section].pop(field, None)
    return d


def alpha0_twin(workdir: str, seed: int, config) -> str | None:
    """An alpha=0 pretraining of the same seed at another label fraction, if finished.

    With alpha = 0 the labels reach nothing but the queue and the stop-gradient probe,
    neither of which moves the encoder, and the batches do not depend on which images
    are labelled: the encoder is the same at every fraction, so it is pretrained once
    per seed and evaluated with each fraction's labelled subset."""
    parent = os.path.dirname(os.path.abspath(workdir))
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        other = os.path.join(parent, name, "pretrain")
        if (name.startswith("alpha0_") and name.endswith(f"_seed{seed}") and other != os.path.join(workdir, "pretrain")
                and os.path.exists(os.path.join(other, "train_summary.json"))):
            with open(os.path.join(other, "config.json")) as f:
                same = _encoder_defining(json.load(f)) == _encoder_defining(config.to_dict())
            if same:
                return other
    return None


def eval_config(protocol: str, method: str, fraction: str, pretrain_config, pretrain_dir: str):
    """Fine-tune (or k-NN) config for one run, with the pretraining config's model (its
    ``--set`` overrides included) and seeds; supervised = the same recipe from scratch, longer."""
    from experiments import eval as eval_presets

    config = eval_presets.for_pretraining(protocol, f"mnist5k,{fraction}", pretrain_config,
                                          "scratch" if method == "supervised" else pretrain_dir)
    if method == "supervised":  # from scratch needs more epochs than fine-tuning
        config.eval.num_epochs *= 3
        config.eval.base_lr *= 4
    return config


def by_seed(results: list[dict], method: str, fraction: float, key: str) -> dict[int, float]:
    """``key`` of each finished ``method`` run at ``fraction``, in points, by seed."""
    return {r["seed"]: 100 * r[key] for r in results
            if r["method"] == method and r["fraction"] == fraction and key in r}


def _differences(mine: dict[int, float], theirs: dict[int, float]) -> list[float]:
    """``mine - theirs`` for each seed both ran (same labelled subset, same initialisation)."""
    return [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]


def paired_differences(results: list[dict], fraction: float, other: str, key: str = "top1") -> list[float]:
    """SemPPL's ``key`` (fine-tuned top-1 by default) minus ``other``'s, in points, seed by seed."""
    return _differences(by_seed(results, "semppl", fraction, key), by_seed(results, other, fraction, key))


def _stat(vals: list[float]) -> str:
    """mean ± standard error (sample std / sqrt(n)) and n."""
    if not vals:
        return "–"
    if len(vals) == 1:  # no spread to report
        return f"{vals[0]:.1f} (n=1)"
    return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1) / np.sqrt(len(vals)):.1f} (n={len(vals)})"


def _paired(diffs: list[float], who: str = "SemPPL") -> str:
    if not diffs:
        return "–"
    spread = f" ± {np.std(diffs, ddof=1) / np.sqrt(len(diffs)):.1f}" if len(diffs) > 1 else ""
    return f"{np.mean(diffs):+.1f}{spread} ({who} ahead in {sum(d > 0 for d in diffs)} of {len(diffs)})"


def variant_report(base: list[dict], variants: dict[str, list[dict]]) -> str:
    """Each variant's SemPPL runs against the recipe's SemPPL and alpha = 0 runs of the
    same seed and fraction (same labelled subset, same initialisation), in points."""
    lines = ["| variant | labels | k-NN top-1 | k-NN: variant − SemPPL | k-NN: variant − alpha = 0 | "
             "fine-tune top-1 | fine-tune: variant − SemPPL |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, results in variants.items():
        for frac in sorted({r["fraction"] for r in results}):
            row = [name, f"{100 * frac:g}%"]
            for key, others in (("knn_top1", ("semppl", "alpha0")), ("top1", ("semppl",))):
                mine = by_seed(results, "semppl", frac, key)
                row.append(_stat(list(mine.values())))
                for other in others:
                    row.append(_paired(_differences(mine, by_seed(base, other, frac, key)), "variant"))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _tables(results: list[dict], fractions: list[float]) -> tuple[str, dict]:
    """The three tables (fine-tuned, k-NN, paired differences) and the fine-tuned stats for the plot."""
    def values(frac, method, key):
        return list(by_seed(results, method, frac, key).values())

    lines = ["Fine-tuned top-1 (%):", "",
             "| labels | SemPPL | alpha = 0 (ReLICv2-style) | supervised from scratch |", "| --- | --- | --- | --- |"]
    stats = {}
    for frac in fractions:
        row = [f"{100 * frac:g}%"]
        for m in METHODS:
            vals = values(frac, m, "top1")
            stats[(frac, m)] = (np.mean(vals), np.std(vals, ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0,
                                len(vals)) if vals else (np.nan, np.nan, 0)
            row.append(_stat(vals))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "k-NN top-1 (%), frozen encoder, labelled digits as support; raw pixels need no training:", "",
              "| labels | SemPPL k-NN top-1 | alpha = 0 k-NN top-1 | raw-pixel k-NN top-1 |",
              "| --- | --- | --- | --- |"]
    for frac in fractions:
        row = [f"{100 * frac:g}%"] + [_stat(values(frac, m, "knn_top1")) for m in METHODS[:2]]
        # The pixel baseline depends only on the seed's labelled subset: once per seed.
        row.append(_stat(list(by_seed(results, "supervised", frac, "pixel_knn_top1").values())))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Differences paired by seed (same labelled subset, same initialisation):", "",
              "| labels | fine-tune: SemPPL − alpha = 0 | fine-tune: SemPPL − supervised | k-NN: SemPPL − alpha = 0 |",
              "| --- | --- | --- | --- |"]
    for frac in fractions:
        row = [f"{100 * frac:g}%", _paired(paired_differences(results, frac, "alpha0")),
               _paired(paired_differences(results, frac, "supervised")),
               _paired(paired_differences(results, frac, "alpha0", "knn_top1"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), stats


def _plot_bars(stats: dict, fractions: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.25
    for i, m in enumerate(METHODS):
        means = [stats[(fr, m)][0] for fr in fractions]
        stds = [stats[(fr, m)][1] for fr in fractions]
        ax.bar(np.arange(len(fractions)) + (i - 1) * width, means, width, yerr=stds, capsize=3, label=m)
    ax.set_xticks(np.arange(len(fractions)), [f"{100 * f:g}% labels" for f in fractions])
    lows = [stats[k][0] - stats[k][1] for k in stats if stats[k][2]]
    ax.set_ylim(max(0.0, float(np.nanmin(lows)) - 5.0) if lows else 0.0, 100.0)  # zoom on the differences
    ax.set_ylabel("fine-tuned top-1 (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        if r["method"] == "semppl" and r["pseudo_label_curve"]:
            steps, acc = zip(*r["pseudo_label_curve"])
            ax.plot(steps, acc, label=f"{100 * r['fraction']:g}% labels, seed {r['seed']}", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("pseudo-label accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: list[dict], workdir: str) -> str:
    """``comparison.md``/``.json`` and the two plots in ``workdir``; returns the tables."""
    fractions = sorted({r["fraction"] for r in results})
    table, stats = _tables(results, fractions)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write("Top-1 (%) on the 1,000 MNIST test digits, mean ± standard error over seeds.\n\n" + table + "\n")
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump(results, f, indent=1)
    _plot_bars(stats, fractions, os.path.join(workdir, "comparison.png"))
    _plot_curves(results, os.path.join(workdir, "pseudo_labels.png"))
    return table


def main(argv) -> None:
    del argv
    from semppl_jax import jobs

    logging.get_absl_handler().addFilter(jobs.QuietOrbax())
    unknown = set(_METHODS.value) - set(METHODS)
    if unknown:
        raise app.UsageError(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    seeds = [] if _REPORT_ONLY.value else [int(s) for s in _SEEDS.value]
    for seed in seeds:  # seeds outermost: an interrupted comparison covers every fraction
        for fraction in _FRACTIONS.value:
            for method in (m for m in METHODS if m in _METHODS.value):
                run_dir = os.path.join(_WORKDIR.value, f"{method}_{fraction}_seed{seed}")
                one_run(run_dir, method, fraction, seed, _STEPS.value, _SET.value)
                write_report(finished_runs(_WORKDIR.value), _WORKDIR.value)  # partial tables as runs finish
    print(write_report(finished_runs(_WORKDIR.value), _WORKDIR.value))
    if _VARIANTS.value:
        text = variant_report(finished_runs(_WORKDIR.value),
                              {os.path.basename(os.path.normpath(d)): finished_runs(d) for d in _VARIANTS.value})
        with open(os.path.join(_WORKDIR.value, "variants.md"), "w") as f:
            f.write(text + "\n")
        print("\nSemPPL variants, paired by seed with this workdir's runs:\n\n" + text)


def finished_runs(workdir: str) -> list[dict]:
    """Every finished run in ``workdir``, so that the report covers earlier invocations too
    (e.g. extra seeds at one fraction)."""
    results = []
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name, "result.json")
        if name.split("_")[0] in METHODS and os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    return results


if __name__ == "__main__":
    app.run(main)
