"""The three jobs behind the launcher: pretrain (with resume), evaluate, export.

Plain functions of (config, workdir), so the launcher, the demo and the tests
call the same code. ``train`` reads top to bottom: devices -> config checks ->
data -> state (fresh or restored) -> loop (step, log, checkpoint, online
k-NN) -> final checkpoint and summary.
"""

from __future__ import annotations

import json
import logging as pylogging
import math
import os
import signal
import time

from absl import logging


class QuietOrbax(pylogging.Filter):
    """Orbax logs every save at INFO; keep its warnings, drop the chatter."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def memory_report(compiled) -> str:
    """Per-device memory of a compiled step (XLA's memory analysis), for a fits-or-not
    answer before the first step. Not every backend reports it."""
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - a backend without the analysis must not stop training
        return f"memory analysis unavailable ({type(e).__name__})"
    if m is None:
        return "memory analysis unavailable on this backend"
    gib = 1024 ** 3
    args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias = getattr(m, "alias_size_in_bytes", 0)
    total = args + out + temp - alias
    return (f"per-device memory: arguments {args / gib:.3f} GiB, outputs {out / gib:.3f} GiB, "
            f"temporaries {temp / gib:.3f} GiB, aliased (donated) {alias / gib:.3f} GiB; "
            f"peak about {total / gib:.3f} GiB")


def export(config, workdir: str) -> str:
    """Writes ``workdir/pretrain.pkl`` (released format) from the latest checkpoint."""
    from semppl_jax import checkpointing
    from semppl_jax import export as export_lib

    state, step = checkpointing.restore_state(workdir, config)
    path = export_lib.export_pretrain_pkl(state, os.path.join(workdir, "pretrain.pkl"))
    logging.info("exported step %d to %s", step, path)
    print(path)
    return path


def evaluate(config, workdir: str) -> dict:
    """Runs ``config.eval.protocol``; writes and prints ``workdir/eval_results.json``."""
    import jax

    from semppl_jax import config_checks, datasets, evaluation, update_step

    e = config.eval
    config_checks.validate(config, jax.device_count(), jax.process_count())
    if e.batch_size % jax.device_count():
        raise config_checks.ConfigError(f"config.eval.batch_size: {e.batch_size} is not divisible by the "
                                        f"{jax.device_count()} devices")
    train_source = datasets.load_split(config, config.dataset.train_split)
    test_source = datasets.load_split(config, config.dataset.eval_split)
    labelled = datasets.config_labelled_mask(config, train_source)
    checkpoint = e.checkpoint or workdir
    pretrained = None if checkpoint == "scratch" else evaluation.load_pretrained(checkpoint, config)
    mesh = update_step.make_mesh()
    if e.protocol == "knn":
        if pretrained is None:
            raise ValueError("config.eval.checkpoint: k-NN needs a pretrained encoder, not 'scratch'")
        net = evaluation.make_classifier(config.model, train_source.num_classes, None)
        size = config.views.eval_size
        params, net_state = net.init(jax.random.key(0), jax.numpy.zeros((2, size, size, 3)), True)
        params, net_state = update_step.replicate(evaluation.transplant(params, net_state, *pretrained), mesh)
        result = evaluation.knn_eval(net, params, net_state, train_source, labelled, test_source, config, mesh,
                                     e.max_test_examples)
    else:
        result = evaluation.train_classifier(config, train_source, labelled, test_source, mesh, pretrained,
                                             e.protocol)
    result = dict(protocol=e.protocol, checkpoint=checkpoint, **result)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        # The latest result, and one file per protocol so that several evaluations coexist.
        for name in ("eval_results.json", f"eval_results_{e.protocol}.json"):
            with open(os.path.join(workdir, name), "w") as f:
                json.dump(result, f, indent=2)
        print(json.dumps(result, indent=2))
    return result


def train(config, workdir: str, stop_after: int | None = None) -> dict:
    """Pretrains (or resumes) in ``workdir``; returns the last logged metrics."""
    import jax
    import numpy as np

    from semppl_jax import checkpointing, config_checks, datasets, evaluation, input_pipeline, update_step
    from semppl_jax.metric_writers import MetricWriter, Progress

    is_main = jax.process_index() == 0
    num_devices, num_processes = jax.device_count(), jax.process_count()
    config_checks.validate(config, num_devices, num_processes)

    # Data: which images carry labels is decided once, from the seed.
    source = datasets.load_split(config, config.dataset.train_split)
    config_checks.validate(config, num_devices, num_processes, source.num_examples, source.num_classes)
    labelled = datasets.config_labelled_mask(config, source)
    steps_per_epoch = max(1, source.num_examples // config.training.batch_size)
    total_steps = config.training.num_steps or int(math.ceil(config.training.num_epochs * steps_per_epoch))
    local_batch = config.training.batch_size // num_processes

    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logging.info("devices: %d (%d local) on %d processes, platform %s; global batch %d, per device %d",
                 num_devices, jax.local_device_count(), num_processes, jax.devices()[0].platform,
                 config.training.batch_size, config.training.batch_size // num_devices)
    logging.info("train set: %d images, %d classes, %d labelled (%.2f%%); %d steps (%d per epoch)",
                 source.num_examples, source.num_classes, labelled.sum(), 100 * labelled.mean(),
                 total_steps, steps_per_epoch)

    # State: fresh, or the latest checkpoint of this workdir.
    mesh = update_step.make_mesh()
    key = jax.random.key(config.seed)
    state = update_step.replicate(
        update_step.init_state(config, key, source.num_classes, total_steps, steps_per_epoch), mesh)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.training.keep_checkpoints)
    meta = checkpointing.arch_signature(config, source.num_classes)
    if ckpt.latest_step() is not None:
        state, restored_step = ckpt.restore(checkpointing.abstract_like(state), meta)
        logging.info("resumed from step %d of %s", restored_step, ckpt.directory)
    start_step = int(jax.device_get(state.step))
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)

    transposed = config.views.transpose_images
    step_fn = update_step.shard_step(
        update_step.make_update_step(config, source.num_classes, total_steps, steps_per_epoch), mesh, transposed)
    train_ds = input_pipeline.train_dataset(source, labelled, config, local_batch, config.seed,
                                            jax.process_index(), num_processes, start_step)
    batches = train_ds.as_numpy_iterator()

    stop = {"signal": None}

    def on_signal(signum, _frame):  # preemption: finish the step, save, exit
        stop["signal"] = signum

    previous_handler = signal.signal(signal.SIGTERM, on_signal)
    eval_every = config.training.eval_every_steps
    online_knn = evaluation.OnlineKnn(config, source, labelled, mesh) if eval_every else None
    writer = MetricWriter(workdir) if is_main else None
    progress = Progress(total_steps, start_step)
    last_ckpt_time = time.time()
    log_every = config.training.log_every_steps
    step, scalars, t_log = start_step, {}, time.time()
    images_since_log = 0
    compiled = None
    while step < end_step:
        batch = update_step.shard_batch(next(batches), mesh, transposed)
        if compiled is None:  # compile once, explicitly, to report memory before the first step
            t_compile = time.time()
            compiled = step_fn.lower(state, batch).compile()
            logging.info("compiled the update step in %.1fs; %s", time.time() - t_compile,
                         memory_report(compiled))
        state, metrics = compiled(state, batch)
        step += 1
        images_since_log += config.training.batch_size
        eval_due = bool(eval_every) and (step % eval_every == 0 or step == total_steps)
        if step % log_every == 0 or step == end_step or eval_due:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if eval_due:
                scalars.update(online_knn(state.online_params, state.online_state))
            if not all(np.isfinite(v) for v in scalars.values()):
                ckpt.close()
                raise FloatingPointError(f"non-finite metrics at step {step}: {scalars}")
            now = time.time()
            scalars["images_per_sec"] = images_since_log / max(now - t_log, 1e-9)
            scalars["step_time_sec"] = (now - t_log) * config.training.batch_size / max(images_since_log, 1)
            t_log, images_since_log = now, 0
            if writer:
                writer.write(step, scalars)
            logging.info("%s | loss %.4f pl-acc %.3f sempos %.2f queue %.2f lr %.4f%s",
                         progress.line(step, progress.rate(step)), scalars["loss"],
                         scalars["pseudo_label_accuracy"], scalars["semantic_positive_fraction"],
                         scalars["queue_fill"], scalars["learning_rate"],
                         f" knn-top1 {scalars['knn_top1']:.3f}" if "knn_top1" in scalars else "")
        due = (step % config.training.checkpoint_every_steps == 0
               or time.time() - last_ckpt_time > 60 * config.training.checkpoint_every_minutes)
        if due or stop["signal"] is not None or step == end_step:
            ckpt.save(step, state, meta, force=True)
            last_ckpt_time = time.time()
        if stop["signal"] is not None:
            logging.warning("signal %d: saved step %d, exiting", stop["signal"], step)
            break
    ckpt.close()
    signal.signal(signal.SIGTERM, previous_handler)
    summary = dict(step=step, total_steps=total_steps, **scalars)
    if writer:
        writer.close()
        with open(os.path.join(workdir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary, indent=2))
    return summary
