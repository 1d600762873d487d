r"""SemPPL launcher: ``python -m semppl_jax.main --config=experiments/x.py[:arg] --workdir=DIR``.

Overrides: ``--config.training.batch_size=256`` etc. Modes: ``train`` (default)
pretrains, resuming from ``DIR``'s latest checkpoint; ``eval`` runs an evaluation
config's ``eval.protocol`` (``experiments/eval.py``); ``export`` writes
``DIR/pretrain.pkl``; ``pseudo_label`` writes every unlabelled image's k-NN label
(``pseudo_labels.py``); ``check`` is the preflight a launch runs first on every host
(``preflight.py``). A mode refuses a config that is not for it.

Exit status: 0 done; 75 stopped by SIGTERM, rerun to resume (``preemption.py``); 78
the preflight found a problem; 64 a user error, printed as one paragraph (a config
field, a path, the data, a checkpoint, a workdir another run holds: ``errors.py``);
1 a bug, with its traceback. Whatever writes a workdir holds its lease
(``workdir_lock.py``): a second run on it is refused, naming the first.
Multi-host: ``--distributed`` (TPU VMs, Slurm: every GPU of the task is used,
``distributed.py``) or the coordinator flags.
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
                          "train: pretrain/resume; eval: an evaluation config's eval.protocol; "
                          "export: write WORKDIR/pretrain.pkl in the released format; "
                          "pseudo_label: write every unlabelled image's k-NN label to WORKDIR/pseudo_labels.csv; "
                          "check: the preflight (versions, devices, workdir, data, labels, the step's memory).")
_EXPECT_PROCESSES = flags.DEFINE_integer("expect_processes", None,
                                         "--mode=check: the process count the launcher started (fails otherwise).")
_EXPECT_PLATFORM = flags.DEFINE_string("expect_platform", None,
                                       "--mode=check: the device platform expected, e.g. tpu or gpu.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "Resume even though fields that change what the run computes differ from the "
                                  "checkpoint's; each change is recorded in WORKDIR/config_history.jsonl. "
                                  "Shapes may never change.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "Stop (with a checkpoint) after this many steps of this run; "
                                   "for time-sliced schedulers. Rerun the command to continue.")

EVAL_JOB, PRETRAIN_JOB = "eval", "pretrain"  # config.job: what a config is for


def main(argv) -> None:
    del argv
    from semppl_jax import errors, preemption

    preemption.install()  # before anything slow: a SIGTERM during start-up also ends in 75
    try:
        _run_mode()
    except preemption.Preempted as e:  # saved at an agreed step, or nothing to save yet: run us again
        logging.warning("%s", e)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)
    except errors.UserError as e:
        _user_error(str(e))


def _user_error(message: str) -> None:
    from semppl_jax import errors

    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(errors.USER_ERROR_EXIT_CODE)


def check_job(config, mode: str) -> None:
    """A mode refuses a config that is not for it (an evaluation config would otherwise
    pretrain a fresh network into the workdir)."""
    from semppl_jax.errors import ConfigError

    job = config.get("job", PRETRAIN_JOB)
    if mode == "eval" and job != EVAL_JOB:
        raise ConfigError("--mode=eval needs an evaluation config, experiments/eval.py:<protocol>,<preset>[,...] "
                          "(finetune, linear or knn), with --config.eval.checkpoint= the workdir or pretrain.pkl "
                          "to evaluate")
    if mode != "eval" and job == EVAL_JOB:
        raise ConfigError(f"{_CONFIG_ARG[0] or 'this config'} is an evaluation config: run it with --mode=eval "
                          f"(--mode={mode} would {'pretrain a fresh network' if mode == 'train' else 'not evaluate'}"
                          f" into the workdir)")


def _run_mode() -> None:
    from semppl_jax import distributed, folder_listing, jobs

    logging.get_absl_handler().addFilter(jobs.QuietOrbax())
    if _DISTRIBUTED.value or _COORDINATOR.value:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    with folder_listing.one_listing_a_run():  # a folder is listed once, whoever asks first
        _run(_MODE.value, _CONFIG.value, _WORKDIR.value, config_flags.get_override_values(flags.FLAGS["config"]))


def _run(mode: str, config, workdir: str, overrides: dict) -> None:
    from semppl_jax import folder_preset, jobs, preemption, workdir_lock
    from semppl_jax.paths import workdir_path

    if mode != "check":  # the preflight checks evaluation configs as well
        check_job(config, mode)
    if mode == "check":  # writes nothing to keep; reports a live holder instead of taking the lease
        from semppl_jax import preflight

        with preemption.exit_at_once():
            if not preflight.run(config, workdir, _EXPECT_PROCESSES.value, _EXPECT_PLATFORM.value, overrides):
                sys.exit(preflight.FAILED_EXIT_CODE)
        return
    with workdir_lock.held(workdir, mode):
        # experiments/folder.py's values, from the run's listing of the folder (cached in the workdir)
        folder_preset.resolve(config, str(workdir_path(workdir) / "data_index"), overrides)
        if mode == "train":  # stops at once before its first step, saves first after it
            jobs.train(config, workdir, stop_after=_STOP_AFTER.value, allow_config_change=_ALLOW_CHANGE.value)
            return
        with preemption.exit_at_once():  # nothing to save in the other modes
            if mode == "eval":
                jobs.evaluate(config, workdir)
            elif mode == "pseudo_label":
                from semppl_jax import pseudo_labels

                pseudo_labels.write_pseudo_labels(config, workdir)
            else:
                jobs.export(config, workdir)


_CONFIG_ARG: list[str | None] = [None]  # the --config value as given, for messages


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with an override that names no field of the config turned into a
    message naming its full path and the closest fields (ml-collections raises a bare
    ``AttributeError`` for it)."""
    _CONFIG_ARG[0] = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        from semppl_jax import config_checks

        message = config_checks.explain_override_error(_CONFIG_ARG[0], argv, e)
        if message is None:
            raise
        _user_error(message)
        raise AssertionError("unreachable") from e


def run() -> None:
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
