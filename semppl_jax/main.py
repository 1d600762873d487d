r"""SemPPL launcher: ``python -m semppl_jax.main --config=experiments/x.py[:arg] --workdir=DIR``.

Overrides: ``--config.training.batch_size=256`` etc. ``--mode=train`` (default)
pretrains, resuming from ``DIR``'s latest checkpoint; ``--mode=eval`` runs the
config's ``eval.protocol``; ``--mode=export`` writes ``DIR/pretrain.pkl``;
``--mode=pseudo_label`` writes every unlabelled image's k-NN label (``pseudo_labels.py``).
Multi-host: ``--distributed`` (TPU VMs, Slurm: every GPU of the task is used,
``distributed.py``) or the coordinator flags.
A preempted run (SIGTERM) saves at a step all processes agree on and exits with
status 75 (``jobs.PREEMPTED_EXIT_CODE``); rerun the same command to resume.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiments/ config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host GPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-host GPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host GPU).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() (automatic on TPU VMs and SLURM).")

_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "pseudo_label", "check"],
                          "train: pretrain/resume; eval: the config's eval.protocol; "
                          "export: write WORKDIR/pretrain.pkl in the released format; "
                          "pseudo_label: write every unlabelled image's k-NN label to WORKDIR/pseudo_labels.csv; "
                          "check: the preflight (versions, devices, workdir, data, labels, the step's memory).")
_EXPECT_PROCESSES = flags.DEFINE_integer("expect_processes", None,
                                         "--mode=check: the process count the launcher started (fails otherwise).")
_EXPECT_PLATFORM = flags.DEFINE_string("expect_platform", None,
                                       "--mode=check: the device platform expected, e.g. tpu or gpu.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                   "Resume even though fields that define the run (data, labels, seeds, batch, "
                                   "schedule, views) differ from the checkpoint's. Shapes may never change.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "Stop (with a checkpoint) after this many steps of this run; "
                                   "for time-sliced schedulers. Rerun the command to continue.")


def main(argv) -> None:
    del argv
    from semppl_jax import preemption

    preemption.install()  # before anything slow: a SIGTERM during start-up also ends in 75
    try:
        _run_mode()
    except preemption.Preempted as e:  # saved at an agreed step, or nothing to save yet: run us again
        logging.warning("%s", e)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)


def _run_mode() -> None:
    from semppl_jax import distributed, jobs, preemption

    logging.get_absl_handler().addFilter(jobs.QuietOrbax())
    if _DISTRIBUTED.value or _COORDINATOR.value:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if _MODE.value == "train":  # stops at once before its first step, saves first after it
        jobs.train(_CONFIG.value, _WORKDIR.value, stop_after=_STOP_AFTER.value,
                   allow_config_change=_ALLOW_CHANGE.value)
        return
    with preemption.exit_at_once():  # nothing to save in the other modes
        if _MODE.value == "check":
            from semppl_jax import preflight

            if not preflight.run(_CONFIG.value, _WORKDIR.value, _EXPECT_PROCESSES.value, _EXPECT_PLATFORM.value):
                sys.exit(preflight.FAILED_EXIT_CODE)
        elif _MODE.value == "eval":
            jobs.evaluate(_CONFIG.value, _WORKDIR.value)
        elif _MODE.value == "pseudo_label":
            from semppl_jax import pseudo_labels

            pseudo_labels.write_pseudo_labels(_CONFIG.value, _WORKDIR.value)
        else:
            jobs.export(_CONFIG.value, _WORKDIR.value)


def run() -> None:
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
