"""Evaluation presets: ``eval.py:<protocol>,<preset>[,<preset arg>...]``.

``protocol``: ``finetune`` (encoder + new head on the labelled subset: the
paper's headline), ``linear`` (frozen encoder, BN in inference mode, head on the
whole train split: the released evaluation's recipe), ``knn`` (weighted k-NN,
k=20, T=0.07, labelled subset as support). ``preset`` is the pretraining
preset whose model and data it evaluates (``tiny``, ``mnist5k``, ``imagenet``),
e.g. ``eval.py:finetune,imagenet,resnet50,1pct`` or ``eval.py:knn,mnist5k,0.1``.
Point ``--config.eval.checkpoint`` at a workdir or a ``pretrain.pkl``.
"""

import copy
import importlib

PROTOCOLS = ("finetune", "linear", "knn")
# What names the images a pretraining read; the label fraction comes from ``preset``.
DATA_FIELDS = ("name", "data_dir", "labels_file", "train_split", "eval_split")


def get_config(arg: str | None = "finetune,tiny"):
    parts = (arg or "finetune,tiny").split(",")
    protocol, preset = parts[0], (parts[1] if len(parts) > 1 else "tiny")
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.py: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    module = importlib.import_module(f"experiments.{preset}")
    c = module.get_config(",".join(parts[2:]) or None)
    c.job = "eval"  # the launcher runs it with --mode=eval only
    e = c.eval
    e.protocol = protocol
    if protocol == "linear":
        # The released SemPPL evaluation: SGD Nesterov 0.9, batch 1024, LR 0.3 x B/256,
        # cosine, no weight decay, 100 epochs, whole train split.
        e.update(dict(train_on="all", batch_size=1024, base_lr=0.3, num_epochs=100.0, weight_decay=0.0))
    elif protocol == "finetune":
        # Best reading (semi-supervised fine-tuning as in BYOL/SimCLRv2): SGD Nesterov,
        # small LR, no weight decay, on the labelled subset alone.
        e.update(dict(train_on="labelled", batch_size=1024, base_lr=0.01, num_epochs=30.0, weight_decay=0.0))
    if hasattr(module, "eval_overrides"):  # the preset's own evaluation settings, kept with the preset
        e.update(module.eval_overrides(protocol))
    return c


def for_pretraining(protocol: str, preset: str, pretrain_config, checkpoint: str):
    """``protocol``'s config for one pretraining run: that run's network (overrides
    included) and seed, and its labelled subset's seed; ``preset`` names the data and
    label fraction, e.g. ``mnist5k,0.01`` (an alpha=0 encoder can be read at any fraction)."""
    c = get_config(f"{protocol},{preset}")
    for field in DATA_FIELDS:  # evaluated on the data it was pretrained on (own data included)
        c.dataset[field] = pretrain_config.dataset[field]
    c.model = copy.deepcopy(pretrain_config.model)
    if "folder_preset" in pretrain_config:  # what the folder preset read from the data when the run began
        c.views, c.augment = copy.deepcopy(pretrain_config.views), copy.deepcopy(pretrain_config.augment)
        c.eval.flip, c.folder_preset = pretrain_config.eval.flip, copy.deepcopy(pretrain_config.folder_preset)
    c.seed = pretrain_config.seed
    c.dataset.label_seed = pretrain_config.dataset.label_seed
    c.eval.checkpoint = checkpoint
    return c
