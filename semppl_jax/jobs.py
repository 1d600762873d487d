"""The jobs behind the launcher: pretrain (with resume; ``training.py``), evaluate, export.

Plain functions of (config, workdir), so the launcher, the demo and the tests
call the same code. Files that are not Orbax's are written by process 0 alone,
atomically; every decision that leads into a collective is made from values
identical on all processes (``periodic_actions.py``).
"""

from __future__ import annotations

import logging as pylogging

from absl import logging

from semppl_jax.paths import workdir_path
from semppl_jax.periodic_actions import CollapseError, collapse_signals  # noqa: F401  (callers' names)
from semppl_jax.preemption import PREEMPTED_EXIT_CODE, Preempted  # noqa: F401


class QuietOrbax(pylogging.Filter):
    """Orbax logs every save at INFO; keep its warnings, drop the chatter."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def export(config, workdir: str) -> str:
    """Writes ``workdir/pretrain.pkl`` (released format) from the latest checkpoint.

    Every process restores (onto its own first device); only process 0 writes."""
    import jax
    from jax.experimental import multihost_utils

    from semppl_jax import checkpointing
    from semppl_jax import export as export_lib

    state, step = checkpointing.restore_state(workdir, config)
    path = str(workdir_path(workdir) / "pretrain.pkl")
    if jax.process_index() == 0:
        export_lib.export_pretrain_pkl(state, path)
        logging.info("exported step %d to %s", step, path)
        print(path)
    multihost_utils.sync_global_devices("semppl_export_done")
    return path


def evaluate(config, workdir: str) -> dict:
    """Runs ``config.eval.protocol``; writes and prints ``workdir/eval_results.json``."""
    import jax

    from semppl_jax import config_checks, datasets, evaluation, sharding
    from semppl_jax.paths import write_json_atomic

    e = config.eval
    config_checks.validate(config, jax.device_count(), jax.process_count())
    if e.batch_size % jax.device_count():
        raise config_checks.ConfigError(f"config.eval.batch_size: {e.batch_size} is not divisible by the "
                                        f"{jax.device_count()} devices")
    index_dir = str(workdir_path(workdir) / "data_index")
    train_source = datasets.load_split(config, config.dataset.train_split, index_dir)
    test_source = datasets.load_split(config, config.dataset.eval_split, index_dir, labels_needed=False,
                                      classes=train_source.class_names)
    labelled = datasets.config_labelled_mask(config, train_source)
    checkpoint = e.checkpoint or workdir
    pretrained = None if checkpoint == "scratch" else evaluation.load_pretrained(checkpoint, config)
    mesh = sharding.make_mesh()
    if e.protocol == "knn":
        if pretrained is None:
            raise ValueError("config.eval.checkpoint: k-NN needs a pretrained encoder, not 'scratch'")
        net, params, net_state = evaluation.frozen_encoder(config, train_source.num_classes, pretrained, mesh)
        result = evaluation.knn_eval(net, params, net_state, train_source, labelled, test_source, config, mesh,
                                     e.max_test_examples)
    else:
        result = evaluation.train_classifier(config, train_source, labelled, test_source, mesh,
                                             None if pretrained is None else (pretrained.params, pretrained.state),
                                             e.protocol)
    result = dict(protocol=e.protocol, checkpoint=checkpoint,
                  checkpoint_file=None if pretrained is None else pretrained.source,
                  step=None if pretrained is None else pretrained.step, **result)
    if jax.process_index() == 0:
        # The latest result, and one file per protocol so that several evaluations coexist.
        for name in ("eval_results.json", f"eval_results_{e.protocol}.json"):
            write_json_atomic(workdir_path(workdir) / name, result)
        print(result)
    return result


def train(config, workdir: str, stop_after: int | None = None, allow_config_change: bool = False) -> dict:
    """Pretrains (or resumes) in ``workdir``; returns the last logged metrics (``training.py``)."""
    from semppl_jax import training

    return training.train(config, workdir, stop_after, allow_config_change)
