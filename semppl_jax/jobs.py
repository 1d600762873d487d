"""The three jobs behind the launcher: pretrain (with resume), evaluate, export.

Plain functions of (config, workdir), so the launcher, the demo and the tests
call the same code. ``train`` reads top to bottom: devices -> config checks ->
data -> run signature and resume check -> state (fresh or restored) -> compile
and memory check -> loop (step, log, collapse guard, agreed save/stop) -> final
checkpoint and summary.

Multi-host rule: every decision that leads into a collective (save, stop,
skip, eval) is made from values that are identical on all processes: the step
number, metrics that are already all-reduced, Orbax's save policies (the time
policy is decided on the primary host and broadcast) and JAX's preemption sync
point. Files that are not Orbax's are written by process 0 alone, atomically.
"""

from __future__ import annotations

import logging as pylogging
import math
import signal
import time

import numpy as np
from absl import logging

from semppl_jax.paths import read_json, workdir_path

# Exit status of a run stopped by a preemption notice after saving: EX_TEMPFAIL from
# sysexits.h ("temporary failure, try again"). Non-zero so that schedulers do not
# mark the job Completed; distinct from crashes (1) and from being killed (137, 143).
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """The run saved a checkpoint at an agreed step and stopped on a preemption notice."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved step {step}; rerun the same command to resume")
        self.step = step


class CollapseError(RuntimeError):
    """``training.stop_on_collapse``: a collapse signal fired after warm-up."""


class QuietOrbax(pylogging.Filter):
    """Orbax logs every save at INFO; keep its warnings, drop the chatter."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def collapse_signals(scalars: dict, projection_size: int, t) -> list[str]:
    """Names of the collapse signals that fire: the embedding spread far below the
    healthy ~1/sqrt(D), or the InfoNCE loss at chance (L_augm / log(candidates) ~ 1)."""
    fired = []
    floor = t.collapse_std_fraction / math.sqrt(projection_size)
    if scalars["embedding_std"] < floor:
        fired.append(f"embedding_std {scalars['embedding_std']:.4f} < {floor:.4f} "
                     f"({t.collapse_std_fraction} / sqrt({projection_size}))")
    if scalars["l_augm_ratio"] > t.collapse_loss_ratio:
        fired.append(f"l_augm_ratio {scalars['l_augm_ratio']:.4f} > {t.collapse_loss_ratio} "
                     f"(L_augm at chance)")
    return fired


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
    test_source = datasets.load_split(config, config.dataset.eval_split, index_dir, labels_needed=False)
    labelled = datasets.config_labelled_mask(config, train_source)
    checkpoint = e.checkpoint or workdir
    pretrained = None if checkpoint == "scratch" else evaluation.load_pretrained(checkpoint, config)
    mesh = sharding.make_mesh()
    if e.protocol == "knn":
        if pretrained is None:
            raise ValueError("config.eval.checkpoint: k-NN needs a pretrained encoder, not 'scratch'")
        net = evaluation.make_classifier(config.model, train_source.num_classes, None)
        size = config.views.eval_size
        params, net_state = net.init(jax.random.key(0), jax.numpy.zeros((2, size, size, 3)), True)
        params, net_state = sharding.replicate(
            evaluation.transplant(params, net_state, pretrained.params, pretrained.state), mesh)
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
    """Pretrains (or resumes) in ``workdir``; returns the last logged metrics.

    Raises :class:`Preempted` after saving when a preemption notice (SIGTERM) arrived,
    and :class:`CollapseError` (after saving) when ``training.stop_on_collapse`` is set
    and a collapse signal fires after warm-up.
    """
    import jax

    from semppl_jax import (
        checkpointing,
        config_checks,
        datasets,
        evaluation,
        input_pipeline,
        memory,
        sharding,
        update_step,
    )
    from semppl_jax.metric_writers import MetricWriter, Progress
    from semppl_jax.paths import write_json_atomic

    is_main = jax.process_index() == 0
    num_devices, num_processes = jax.device_count(), jax.process_count()
    config_checks.validate(config, num_devices, num_processes)
    t = config.training

    # Data: which images carry labels is decided once, from the seed. Each process indexes
    # its own share of the split once; the index is cached in the workdir.
    root = workdir_path(workdir)
    index_dir = str(root / "data_index")
    source = datasets.load_split(config, config.dataset.train_split, index_dir)
    config_checks.validate(config, num_devices, num_processes, source.num_examples, source.num_classes)
    labelled = datasets.config_labelled_mask(config, source)
    steps_per_epoch = max(1, source.num_examples // t.batch_size)
    total_steps = t.num_steps or int(math.ceil(t.num_epochs * steps_per_epoch))
    warmup_steps = int(round(config.optim.warmup_epochs * steps_per_epoch))
    local_batch = t.batch_size // num_processes

    # The run's identity, checked against the checkpoint before anything is written.
    meta = checkpointing.run_signature(config, source.num_classes, total_steps)
    ckpt = checkpointing.Checkpointer(root / "checkpoints", t.keep_checkpoints,
                                      t.checkpoint_every_steps, t.checkpoint_every_minutes)
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        try:
            checkpointing.check_resume(ckpt.read_meta(resume_step), meta, ckpt.directory, allow_config_change)
        except checkpointing.ConfigDriftError:
            ckpt.close()
            raise
    if is_main:
        write_json_atomic(root / "config.json", config.to_dict())
    logging.info("devices: %d (%d local) on %d processes, platform %s; global batch %d, per device %d",
                 num_devices, jax.local_device_count(), num_processes, jax.devices()[0].platform,
                 t.batch_size, t.batch_size // num_devices)
    logging.info("train set: %d images (%d unreadable, left out), %d classes, %d labelled (%.2f%%); %d steps "
                 "(%d per epoch)", source.num_examples, source.num_unreadable,
                 source.num_classes, labelled.sum(), 100 * labelled.mean(), total_steps, steps_per_epoch)

    # State: fresh, or the latest checkpoint of this workdir.
    mesh = sharding.make_mesh()
    state = sharding.replicate(
        update_step.init_state(config, jax.random.key(config.seed), source.num_classes, total_steps,
                               steps_per_epoch), mesh)
    if resume_step is not None:
        state, _ = ckpt.restore(checkpointing.abstract_like(state), resume_step)
        logging.info("resumed from step %d of %s", resume_step, ckpt.directory)
    start_step = int(jax.device_get(state.step))
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    summary_path = root / "train_summary.json"
    if start_step >= end_step:  # nothing left to do: keep the finished run's summary
        ckpt.close()
        logging.info("step %d of %d already reached in %s: nothing to train", start_step, total_steps, workdir)
        if summary_path.exists():
            return read_json(summary_path)
        return dict(step=start_step, total_steps=total_steps)

    transposed = config.views.transpose_images
    step_fn = sharding.shard_step(
        update_step.make_update_step(config, source.num_classes, total_steps, steps_per_epoch), mesh, transposed)
    train_ds = input_pipeline.train_dataset(source, labelled, config, local_batch, config.seed,
                                            jax.process_index(), num_processes, start_step)
    batches = train_ds.as_numpy_iterator()

    # Preemption. With several processes, JAX's preemption service (started by
    # jax.distributed.initialize) catches SIGTERM on any host and agrees on a step; a
    # Python handler would replace its C handler, so none is installed then. A single
    # process has no such service: a Python handler sets a flag, read once a step.
    local_signal: dict[str, int | None] = {"signal": None}
    previous_handler = None
    if num_processes == 1:
        def on_signal(signum, _frame):
            local_signal["signal"] = signum

        previous_handler = signal.signal(signal.SIGTERM, on_signal)

    eval_every = t.eval_every_steps
    online_knn = evaluation.OnlineKnn(config, source, labelled, mesh, index_dir) if eval_every else None
    writer = MetricWriter(root, resume_step=start_step) if is_main else None
    class_writer = MetricWriter(root, "per_class.jsonl", False, start_step) if is_main else None
    per_class = None  # leave-own-out k-NN hits and votes per class since the last log, on device
    progress = Progress(total_steps, start_step)
    step, scalars, t_log = start_step, {}, time.time()
    images_since_log = 0
    compiled = None
    collapse_warned = False
    try:
        while step < end_step:
            batch = sharding.shard_batch(next(batches), mesh, transposed)
            if compiled is None:  # compile once, explicitly, to check memory before the first step
                t_compile = time.time()
                compiled = step_fn.lower(state, batch).compile()
                usage = memory.step_bytes(compiled)
                logging.info("compiled the update step in %.1fs; %s", time.time() - t_compile, memory.report(usage))
                memory.check_fits(usage, memory.device_limit(jax.local_devices()[0]), config, num_devices)
            state, metrics = compiled(state, batch)
            metrics = dict(metrics)
            loo = metrics.pop("loo_per_class")
            per_class = loo if per_class is None else per_class + loo  # asynchronous: no host sync
            step += 1
            images_since_log += t.batch_size
            preempted = local_signal["signal"] is not None or ckpt.reached_preemption(step)

            eval_due = bool(eval_every) and (step % eval_every == 0 or step == total_steps)
            collapsed: list[str] = []
            if step % t.log_every_steps == 0 or step == end_step or eval_due:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not scalars.pop("finite"):
                    raise FloatingPointError(f"non-finite state or loss at step {step} (not saved): {scalars}")
                if eval_due:
                    scalars.update(online_knn(state.online_params, state.online_state))
                hits, votes = jax.device_get(per_class)
                per_class = None
                voted = votes > 0
                if voted.any():  # the class whose labelled images the queue votes worst, since the last log
                    scalars["loo_knn_accuracy_worst_class"] = float(np.min(hits[voted] / votes[voted]))
                if class_writer:
                    class_writer.write_arrays(step, loo_knn_correct=hits, loo_knn_voted=votes)
                now = time.time()
                scalars["images_per_sec"] = images_since_log / max(now - t_log, 1e-9)
                scalars["step_time_sec"] = (now - t_log) * t.batch_size / max(images_since_log, 1)
                scalars["skipped_images"] = float(source.num_unreadable)
                t_log, images_since_log = now, 0
                if writer:
                    writer.write(step, scalars)
                logging.info("%s | loss %.4f l_augm/log(B) %.3f emb-std %.4f loo-knn %.3f pl-share %.3f "
                             "pl-acc(hidden labels) %.3f queue %.2f lr %.4f%s",
                             progress.line(step, progress.rate(step)), scalars["loss"], scalars["l_augm_ratio"],
                             scalars["embedding_std"], scalars["loo_knn_accuracy"],
                             scalars["pseudo_label_vote_share"], scalars["pseudo_label_accuracy"],
                             scalars["queue_fill"], scalars["learning_rate"],
                             f" knn-top1 {scalars['knn_top1']:.3f}" if "knn_top1" in scalars else "")
                if step > warmup_steps:  # metrics are all-reduced: every process decides alike
                    collapsed = collapse_signals(scalars, config.model.projection_size, t)
                    if collapsed and not collapse_warned:
                        logging.warning("collapse at step %d: %s. Lower semppl.lam or the learning rate; "
                                        "training.stop_on_collapse=True stops here.", step, "; ".join(collapsed))
                        collapse_warned = True
            stop_collapse = bool(collapsed) and t.stop_on_collapse

            if preempted or stop_collapse or step == end_step or ckpt.should_save(step):
                if not bool(jax.device_get(metrics["finite"])):  # replicated: the same on every process
                    raise FloatingPointError(f"non-finite state at step {step}: not saved; the last "
                                             f"checkpoint ({ckpt.latest_step()}) is intact")
                ckpt.save(step, state, meta)
            if preempted:
                logging.warning("preemption notice: saved step %d, exiting (status %d)", step, PREEMPTED_EXIT_CODE)
                raise Preempted(step)
            if stop_collapse:
                raise CollapseError(f"stopped at step {step} (checkpoint saved): collapse signal "
                                    f"{'; '.join(collapsed)}")
    finally:
        ckpt.close()  # waits for an async save in flight
        if writer:
            writer.close()
            class_writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    summary = dict(step=step, total_steps=total_steps, **scalars)
    if is_main:
        write_json_atomic(summary_path, summary)
        print(summary)
    return summary
