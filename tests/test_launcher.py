"""The launcher: config checks that name the field, a real tiny run, exact resume."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from experiments import tiny
from semppl_jax import checkpointing, config_checks, datasets, input_pipeline, jobs
from tests.conftest import REPO

METRIC_KEYS = {"step", "loss", "pseudo_label_accuracy", "semantic_positive_fraction", "queue_fill",
               "learning_rate", "images_per_sec"}


@pytest.mark.parametrize("field,value,match", [
    ("training.batch_size", 36, "training.batch_size: 36 is not divisible by the 8 devices"),
    ("semppl.knn_k", 500, "semppl.knn_k"),
    ("semppl.num_negatives", 32, "semppl.num_negatives"),
    ("model.depth", "resnet7", "model.depth"),
    ("model.width_multiplier", 0.3, r"model.width_multiplier: 0.3 must give whole channel counts"),
    ("model.stem_stride", 4, r"model.stem_stride: must be 2 \(ResNet's stem\) or 1"),
    ("training.compute_dtype", "float16", "training.compute_dtype"),
    ("augment.rotation_degrees", -5.0, r"augment.rotation_degrees: must be in \[0, 180\]"),
    ("semppl.min_vote_share", 1.5, r"semppl.min_vote_share: must be in \[0, 1\]"),
    ("semppl.min_vote_precision", -0.1, r"semppl.min_vote_precision: must be in \[0, 1\]"),
    ("semppl.gate_samples", 0, "semppl.gate_samples: must be >= 1"),
    ("semppl.queue_size", 129, r"semppl.queue_size: 129 must be a multiple of views.num_large=2"),
    ("augment.blur_impl", "fft", r"augment.blur_impl: must be one of \['banded_matmul', 'conv'\]"),
    ("views.eval_size", 96, r"views.eval_size: 96 is larger than views.eval_resize=36"),
    ("views.small_size", 0, r"views.small_size: must be positive, got 0"),
])
def test_bad_values_stop_at_start_naming_the_field(field, value, match):
    config = tiny.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(config_checks.ConfigError, match=match):
        config_checks.validate(config, num_devices=8)


def test_unknown_override_names_the_field():
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    with pytest.raises(Exception, match="no_such_field"):
        fv(["prog", f"--config={REPO}/experiments/tiny.py", "--config.semppl.no_such_field=1"])


def test_tiny_run_writes_metrics_and_config(tmp_path):
    config = tiny.get_config()
    config.training.num_steps = 4
    summary = jobs.train(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert METRIC_KEYS <= set(r) and all(np.isfinite(v) for v in r.values())
    assert json.loads((tmp_path / "config.json").read_text())["model"]["depth"] == "tiny"
    assert summary["step"] == 4 and os.listdir(tmp_path / "tensorboard")
    # Per class, between log steps: every labelled image of the 4 batches voted once.
    per_class = [json.loads(line) for line in (tmp_path / "per_class.jsonl").read_text().splitlines()]
    assert [r["step"] for r in per_class] == [2, 4]
    source = datasets.load_split(config, "train")
    labelled = datasets.config_labelled_mask(config, source)
    batches = input_pipeline.train_dataset(source, labelled, config, 32, config.seed).as_numpy_iterator()
    seen = np.bincount(np.concatenate([b["label"][b["is_labelled"]] for b in (next(batches) for _ in range(4))]),
                       minlength=10)
    np.testing.assert_array_equal(np.sum([r["loo_knn_voted"] for r in per_class], 0), seen)
    assert all(0 <= c <= v for r in per_class for c, v in zip(r["loo_knn_correct"], r["loo_knn_voted"]))


def test_resume_after_stop_equals_straight_run(tmp_path):
    """2N steps straight == N steps, process stops, run again to 2N: bit-identical."""
    config = tiny.get_config()
    config.training.update(num_steps=6, checkpoint_every_steps=100, log_every_steps=3)
    jobs.train(config, str(tmp_path / "straight"))
    jobs.train(config, str(tmp_path / "resumed"), stop_after=3)
    assert checkpointing.Checkpointer(str(tmp_path / "resumed" / "checkpoints"), 3).latest_step() == 3
    jobs.train(config, str(tmp_path / "resumed"))
    a, step_a = checkpointing.restore_state(str(tmp_path / "straight"), config)
    b, step_b = checkpointing.restore_state(str(tmp_path / "resumed"), config)
    assert step_a == step_b == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_epochs_in_equals_straight_run(tmp_path):
    """256 images, batch 32: 8 steps an epoch. Stopped at step 36 (4.5 epochs in) and run
    again to 40: bit-identical to 40 straight steps, in the fixed-labelled-mix mode too."""
    config = tiny.get_config()
    config.training.update(num_steps=40, checkpoint_every_steps=1000, log_every_steps=20)
    config.dataset.labelled_per_batch = 8
    jobs.train(config, str(tmp_path / "straight"))
    jobs.train(config, str(tmp_path / "resumed"), stop_after=36)
    jobs.train(config, str(tmp_path / "resumed"))
    a, _ = checkpointing.restore_state(str(tmp_path / "straight"), config)
    b, step = checkpointing.restore_state(str(tmp_path / "resumed"), config)
    assert step == 40
    chex.assert_trees_all_equal(jax.device_get(a), jax.device_get(b))


def test_resume_refuses_a_changed_architecture(tmp_path):
    config = tiny.get_config()
    config.training.num_steps = 2
    jobs.train(config, str(tmp_path))
    config.model.projection_size = 16
    with pytest.raises(ValueError, match="model.projection_size"):
        jobs.train(config, str(tmp_path))


def test_command_line_run_on_eight_devices(tmp_path):
    # Same program as test_tiny_run_writes_metrics_and_config: the compile cache serves it.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_DISABLE_MOST_OPTIMIZATIONS="true")
    cmd = [sys.executable, "-m", "semppl_jax.main", "--config=experiments/tiny.py", f"--workdir={tmp_path}",
           "--config.training.num_steps=4"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ETA" in out.stderr and (tmp_path / "metrics.jsonl").exists()
    bad = subprocess.run(cmd[:-1] + ["--config.training.batch_size=30"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "config.training.batch_size: 30 is not divisible" in bad.stderr


def _collapsing_config():
    """The KL weighted 100x the InfoNCE at a huge LR: the InfoNCE stays at chance."""
    config = tiny.get_config()
    config.training.update(num_steps=16, log_every_steps=2, checkpoint_every_steps=1000)
    config.semppl.lam, config.optim.base_lr = 100.0, 10.0
    return config


def test_collapse_guard_warns_once_and_stops_with_a_checkpoint(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        jobs.train(_collapsing_config(), str(tmp_path / "warn"))
    warnings = [r.getMessage() for r in caplog.records if "collapse at step" in r.getMessage()]
    assert len(warnings) == 1 and "l_augm_ratio" in warnings[0]
    records = [json.loads(line) for line in (tmp_path / "warn" / "metrics.jsonl").read_text().splitlines()]
    assert all({"embedding_std", "l_augm_ratio"} <= set(r) for r in records)

    config = _collapsing_config()
    config.training.stop_on_collapse = True
    with pytest.raises(jobs.CollapseError, match="l_augm_ratio") as err:
        jobs.train(config, str(tmp_path / "stop"))
    stopped = int(str(err.value).split("stopped at step ")[1].split(" ")[0])
    assert 8 < stopped < 16  # after the 8 warm-up steps, before the end
    assert checkpointing.latest_step(str(tmp_path / "stop")) == stopped


def test_collapse_signals_on_healthy_and_collapsed_metrics():
    t = tiny.get_config().training
    healthy = dict(embedding_std=0.079, l_augm_ratio=0.65)  # the mnist5k demo after warm-up (D=128)
    assert jobs.collapse_signals(healthy, 128, t) == []
    collapsed = dict(embedding_std=0.002, l_augm_ratio=0.999)
    fired = jobs.collapse_signals(collapsed, 128, t)
    assert len(fired) == 2 and fired[0].startswith("embedding_std") and fired[1].startswith("l_augm_ratio")


def test_a_stale_export_never_shadows_a_newer_checkpoint(tmp_path):
    from semppl_jax import evaluation

    config = tiny.get_config()
    config.training.update(num_steps=4, checkpoint_every_steps=2)
    jobs.train(config, str(tmp_path), stop_after=2)
    jobs.export(config, str(tmp_path))  # pretrain.pkl at step 2
    assert evaluation.load_pretrained(str(tmp_path), config).step == 2
    jobs.train(config, str(tmp_path))  # checkpoint at step 4, newer than the export
    newest = evaluation.load_pretrained(str(tmp_path), config)
    assert newest.step == 4 and newest.source.endswith("checkpoints/4")
    # The encoder alone is read: an eval config with another queue and heads still loads it.
    other = tiny.get_config()
    other.semppl.queue_size, other.model.projection_size = 16, 8
    assert evaluation.load_pretrained(str(tmp_path), other).step == 4
    other.model.depth = "resnet18"
    with pytest.raises(checkpointing.ConfigDriftError, match="model.depth"):
        evaluation.load_pretrained(str(tmp_path), other)


def test_a_non_finite_state_is_never_saved(tmp_path):
    config = tiny.get_config()
    config.training.update(num_steps=6, checkpoint_every_steps=1)
    config.optim.base_lr = 1e38  # once the warm-up LR is non-zero, an update overflows the weights
    with pytest.raises(FloatingPointError, match="non-finite") as err:
        jobs.train(config, str(tmp_path))
    failed = int(str(err.value).split("at step ")[1].split(":")[0].split(" ")[0])
    saved = checkpointing.latest_step(str(tmp_path))
    assert saved is None or saved < failed  # the step that went non-finite was not saved
    if saved is not None:
        state, _ = checkpointing.restore_state(str(tmp_path), config)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.online_params))


def test_metrics_file_keeps_each_step_once_and_survives_a_torn_line(tmp_path):
    from semppl_jax.metric_writers import MetricWriter, read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.9}\n{"step": 6, "lo')  # crash mid-write
    assert [r["step"] for r in read_jsonl(str(path))] == [2, 4]
    writer = MetricWriter(str(tmp_path), tensorboard=False, resume_step=2)  # resumed from step 2's checkpoint
    writer.write(4, {"loss": 0.8})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(str(path))] == [(2, 1.0), (4, 0.8)]
    path.write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(str(path))  # a damaged line in the middle is an error, not skipped


def test_profile_steps_write_a_tensorboard_trace(tmp_path):
    """The launcher with --config.training.profile_first_step=2 (2 steps): a jax.profiler trace
    under WORKDIR/profile, where TensorBoard's profile plugin looks (plugins/profile/<run>/*.xplane.pb).
    A process of its own, as a user runs it: JAX's profiler beside TF's in the long-lived test
    process is not what a run sees."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "semppl_jax.main", "--config=experiments/tiny.py",
                           f"--workdir={tmp_path}", "--config.training.num_steps=4",
                           "--config.training.profile_first_step=2", "--config.training.profile_num_steps=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "profiled steps 2-3" in done.stderr
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
