"""Pretraining: ``setup`` builds the run's parts, ``train`` is the loop over them.

``setup``: devices -> config checks -> data (each process indexes its share once) ->
run signature checked against the checkpoint -> state, fresh or restored -> the
step compiled once, its memory checked -> the periodic actions. ``train`` then steps
and hands each step to the actions (``periodic_actions.py``), which log, evaluate,
guard, checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import jax
from absl import logging

from semppl_jax import (
    checkpointing,
    config_checks,
    datasets,
    evaluation,
    input_pipeline,
    memory,
    preemption,
    sharding,
    update_step,
)
from semppl_jax import periodic_actions as pa
from semppl_jax.metric_writers import MetricWriter, Progress
from semppl_jax.paths import read_json, workdir_path, write_json_atomic


@dataclasses.dataclass
class Run:
    """Everything the loop needs, and what must be closed when it ends."""

    state: Any
    start_step: int
    end_step: int
    total_steps: int
    step_fn: Any  # the compiled update step
    batches: Iterator[dict]  # global (sharded) batches from start_step on
    actions: list[pa.Action]
    closing: contextlib.ExitStack  # checkpointer, writers, signal handler, profiler
    gathered: pa.GatherScalars  # holds the last log step's scalars, for the summary
    summary_path: Any


def _data(config: Any, root: Any, num_devices: int, num_processes: int):
    source = datasets.load_split(config, config.dataset.train_split, str(root / "data_index"))
    config_checks.resolve_batch(config, num_devices, source.num_examples)
    config_checks.validate(config, num_devices, num_processes, source.num_examples, source.num_classes)
    labelled, fold = datasets.pretraining_masks(config, source)
    t = config.training
    steps_per_epoch = max(1, source.num_examples // t.batch_size)
    total_steps = t.num_steps or int(math.ceil(t.num_epochs * steps_per_epoch))
    logging.info("train set: %d images (%d unreadable, left out), %d classes, %d labelled (%.2f%%), %d more in "
                 "the calibration fold; %d steps (%d per epoch)", source.num_examples, source.num_unreadable,
                 source.num_classes, labelled.sum(), 100 * labelled.mean(), fold.sum(), total_steps, steps_per_epoch)
    return source, (labelled, fold), steps_per_epoch, total_steps


def _open_checkpointer(config: Any, root: Any, meta: dict, allow_config_change: bool, closing):
    """The workdir's checkpointer; a resume whose config drifted is refused before anything is written."""
    t = config.training
    ckpt = checkpointing.Checkpointer(root / "checkpoints", t.keep_checkpoints, t.checkpoint_every_steps,
                                      t.checkpoint_every_minutes)
    closing.callback(ckpt.close)  # waits for an async save in flight
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        changes = checkpointing.check_resume(ckpt.read_meta(resume_step), meta, ckpt.directory, allow_config_change)
        if changes and jax.process_index() == 0:
            logging.warning("resuming step %d with changed fields (recorded in config_history.jsonl): %s",
                            resume_step, "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
            checkpointing.record_changes(root, resume_step, changes)
    return ckpt, resume_step


def _compile(step_fn, state, batch, config: Any):
    """Compiles once, explicitly, to check memory before the first step."""
    t0 = time.time()
    compiled = step_fn.lower(state, batch).compile()
    usage = memory.step_bytes(compiled)
    logging.info("compiled the update step in %.1fs; %s", time.time() - t0, memory.report(usage))
    memory.check_fits(usage, memory.device_limit(jax.local_devices()[0]), config, jax.device_count())
    return compiled


def _actions(config: Any, root: Any, source: Any, masks: Any, mesh: Any, ckpt: Any, meta: dict,
             steps: tuple[int, int, int, int], closing) -> tuple[list[pa.Action], pa.GatherScalars]:
    """The periodic actions, in the order they see each step (``periodic_actions.py``)."""
    t = config.training
    start_step, end_step, total_steps, steps_per_epoch = steps
    is_main = jax.process_index() == 0
    cadence = pa.Cadence(t.log_every_steps, end_step, total_steps, t.eval_every_steps)
    gathered = pa.GatherScalars(cadence)
    writer = closing.enter_context(contextlib.closing(MetricWriter(root, resume_step=start_step))) \
        if is_main else None
    class_writer = closing.enter_context(contextlib.closing(
        MetricWriter(root, "per_class.jsonl", False, start_step))) if is_main else None
    actions: list[pa.Action] = [gathered]
    labelled, fold = masks
    if fold.any():
        actions.append(pa.CalibrationFold(int(fold.sum()), steps_per_epoch))
    if t.eval_every_steps:  # the fold's labels may serve the k-NN's support: evaluation, not the loss
        actions.append(pa.OnlineKnnEval(cadence, evaluation.OnlineKnn(config, source, labelled | fold, mesh,
                                                                      str(root / "data_index"))))
    actions += [
        pa.PerClassLeaveOwnOut(class_writer),
        pa.Throughput(t.batch_size, source.num_unreadable),
        pa.WriteAndPrint(writer, Progress(total_steps, start_step)),
        pa.CollapseGuard(int(round(config.optim.warmup_epochs * steps_per_epoch)), config.model.projection_size, t),
        pa.CheckpointAndStop(ckpt, meta, end_step, t.stop_on_collapse),
    ]
    if t.profile_first_step is not None:
        profile = pa.Profile(t.profile_first_step, t.profile_num_steps, str(root / "profile"))
        closing.callback(profile.close)
        profile.begin(start_step)
        actions.append(profile)
    return actions, gathered


def setup(config: Any, workdir: str, stop_after: int | None = None,
          allow_config_change: bool = False) -> Run | dict:
    """The run's parts, or the finished run's summary when there is nothing left to do."""
    is_main = jax.process_index() == 0
    num_devices, num_processes = jax.device_count(), jax.process_count()
    config_checks.resolve_batch(config, num_devices)
    config_checks.validate(config, num_devices, num_processes)
    t = config.training
    root = workdir_path(workdir)
    source, masks, steps_per_epoch, total_steps = _data(config, root, num_devices, num_processes)

    closing = contextlib.ExitStack()
    with contextlib.ExitStack() as on_error:
        on_error.push(closing)  # closed here only if setup fails
        meta = checkpointing.run_signature(config, source.num_classes, total_steps)
        ckpt, resume_step = _open_checkpointer(config, root, meta, allow_config_change, closing)
        if is_main:  # the config in force (a deliberate change at a resume: config_history.jsonl)
            write_json_atomic(root / "config.json", config.to_dict())
        logging.info("devices: %d (%d local) on %d processes, platform %s; global batch %d, per device %d",
                     num_devices, jax.local_device_count(), num_processes, jax.devices()[0].platform,
                     t.batch_size, t.batch_size // num_devices)
        mesh = sharding.make_mesh()
        state = sharding.replicate(update_step.init_state(config, jax.random.key(config.seed), source.num_classes,
                                                          total_steps, steps_per_epoch), mesh)
        if resume_step is not None:
            state, _ = ckpt.restore(checkpointing.abstract_like(state), resume_step)
            logging.info("resumed from step %d of %s", resume_step, ckpt.directory)
        start_step = int(jax.device_get(state.step))
        end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
        summary_path = root / "train_summary.json"
        if start_step >= end_step:  # nothing left to do: keep the finished run's summary
            logging.info("step %d of %d already reached in %s: nothing to train", start_step, total_steps, workdir)
            closing.close()
            return read_json(summary_path) if summary_path.exists() else dict(step=start_step,
                                                                              total_steps=total_steps)

        transposed = config.views.transpose_images
        step_fn = sharding.shard_step(
            update_step.make_update_step(config, source.num_classes, total_steps, steps_per_epoch), mesh, transposed)
        labelled, fold = masks
        local = input_pipeline.train_dataset(source, labelled, config, t.batch_size // num_processes, config.seed,
                                             jax.process_index(), num_processes, start_step,
                                             calibration=fold if fold.any() else None).as_numpy_iterator()
        batches = (sharding.shard_batch(b, mesh, transposed) for b in local)
        first = next(batches)
        compiled = _compile(step_fn, state, first, config)

        steps = (start_step, end_step, total_steps, steps_per_epoch)
        actions, gathered = _actions(config, root, source, masks, mesh, ckpt, meta, steps, closing)
        preemption.agree_to_start(ckpt.reached_preemption, start_step)  # every process enters the loop, or none
        on_error.pop_all()
    return Run(state, start_step, end_step, total_steps, compiled, itertools.chain([first], batches), actions,
               closing, gathered, summary_path)


def train(config: Any, workdir: str, stop_after: int | None = None, allow_config_change: bool = False) -> dict:
    """Pretrains (or resumes) in ``workdir``; returns the last logged metrics.

    Raises ``Preempted`` after saving when a preemption notice (SIGTERM) arrived, and
    ``CollapseError`` (after saving) when ``training.stop_on_collapse`` is set and a
    collapse signal fires after warm-up.
    """
    with preemption.exit_at_once():  # nothing to save before the first step
        run = setup(config, workdir, stop_after, allow_config_change)
    if isinstance(run, dict):
        return run
    state, step = run.state, run.start_step
    with run.closing, preemption.save_first():
        for batch in itertools.islice(run.batches, run.end_step - run.start_step):
            state, metrics = run.step_fn(state, batch)
            step += 1
            report = pa.Report(step, state, metrics)
            for action in run.actions:
                action(report)
    summary = dict(step=step, total_steps=run.total_steps, **run.gathered.last)
    if jax.process_index() == 0:
        write_json_atomic(run.summary_path, summary)
        print(summary)
    return summary
