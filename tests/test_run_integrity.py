"""A run that nothing can silently change or overwrite, and user errors that read as messages.

- One writer per workdir: a second training is refused naming the first (two real
  processes); after the first is killed with SIGKILL a new run takes over; the lease
  on a bucket (a Cloud Storage stand-in, through TensorStore's own client).
- A resume that changes what the run computes (alpha, the learning rate, BatchNorm's
  decay, precision) is refused, and recorded in ``config_history.jsonl`` when allowed.
- A config for another mode is refused; an unknown field is named with its full path.
- Imported weights that are NaN, whole numbers or without a replica axis are refused
  by name; a damaged ``pretrain.pkl`` beside checkpoints is skipped, naming it.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import tiny
from semppl_jax import checkpointing, errors, evaluation, export, jobs, workdir_lock
from tests.conftest import REPO
from tests.gcs_stand_in import GcsStandIn
from tests.test_multihost_launcher import _env


def launcher(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semppl_jax.main", *args], cwd=REPO, env=env or _env(4),
                          capture_output=True, text=True, timeout=600)


def test_a_second_training_is_refused_naming_the_first_and_a_dead_one_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    args = ["--config=experiments/tiny.py", f"--workdir={workdir}", "--config.training.num_steps=5000",
            "--config.training.checkpoint_every_steps=2", "--config.training.checkpoint_every_minutes=600"]
    first = subprocess.Popen([sys.executable, "-m", "semppl_jax.main", *args], cwd=REPO, env=_env(4), stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while (checkpointing.latest_step(str(workdir)) or 0) < 2:
            assert time.time() < deadline and first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
            time.sleep(0.2)
        second = launcher(*args, "--stop_after=1")
        assert second.returncode == errors.USER_ERROR_EXIT_CODE, second.stderr[-3000:]
        assert f"process {first.pid}" in second.stderr and "in use by another run" in second.stderr
        assert "Traceback" not in second.stderr and first.poll() is None  # the first goes on
        export_too = launcher("--mode=export", *args[:2])  # anything that writes is refused alike
        assert export_too.returncode == errors.USER_ERROR_EXIT_CODE and f"process {first.pid}" in export_too.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    taken = launcher(*args, "--stop_after=1")
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert "taking over the workdir" in taken.stderr and "is gone" in taken.stderr
    assert not (workdir / workdir_lock.LEASE).exists()  # released at the end


def test_the_lease_on_a_bucket_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    """Through TensorStore's GCS client and a Cloud Storage stand-in: the holder renews its
    lease by conditional writes; a newcomer on another host watches it, is refused while it
    is renewed, and takes it over once it is not."""
    stand_in = GcsStandIn(str(tmp_path / "gcs"))
    (tmp_path / "gcs" / "bucket-l").mkdir(parents=True)
    for k, v in stand_in.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_SECS", 0.2)
    monkeypatch.setattr(workdir_lock, "CONFIRM_SECS", 1.0)
    first = workdir_lock.WorkdirLease("gs://bucket-l/run", "train")
    first.acquire()
    monkeypatch.setattr(workdir_lock.socket, "gethostname", lambda: "another-host")  # the newcomer's host
    try:
        with pytest.raises(errors.WorkdirError, match="in use by another run"):
            workdir_lock.WorkdirLease("gs://bucket-l/run", "export").acquire()
        assert stand_in.requests["write"] >= 4  # renewals, each a conditional write
    finally:
        first._stop.set()  # the holder dies: no more renewals, nothing released
        first._thread.join()
    second = workdir_lock.WorkdirLease("gs://bucket-l/run", "train")
    second.acquire()  # one second without a renewal: taken over
    assert workdir_lock.read_holder("gs://bucket-l/run")[0].run == second.me.run
    first._renew()  # the old holder learns it lost the lease
    assert first.lost
    second.release()
    assert workdir_lock.read_holder("gs://bucket-l/run")[0] is None
    stand_in.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny.get_config()
    config.training.update(num_steps=4, checkpoint_every_steps=2)
    jobs.train(config, str(workdir), stop_after=2)
    return workdir


CHANGES = {"semppl.alpha": 0.0, "optim.base_lr": 5.0, "model.bn_decay": 0.99, "training.compute_dtype": "bfloat16"}


def _changed(**fields):
    config = tiny.get_config()
    config.training.update(num_steps=4, checkpoint_every_steps=2)
    for field, value in fields.items():
        section, name = field.split(".")
        config[section][name] = value
    return config


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_resume_that_changes_what_the_run_computes_is_refused(trained, field):
    with pytest.raises(checkpointing.ConfigDriftError, match=field.replace(".", r"\.")):
        jobs.train(_changed(**{field: CHANGES[field]}), str(trained))  # refused before anything is written
    assert not (trained / "config_history.jsonl").exists()


def test_a_deliberate_change_is_recorded_and_the_config_in_force_written(trained, tmp_path):
    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(workdir)], check=True)
    jobs.train(_changed(**CHANGES), str(workdir), allow_config_change=True)
    [record] = [json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and {k: v["now"] for k, v in record["changes"].items()} == CHANGES
    written = json.loads((workdir / "config.json").read_text())
    assert all(written[f.split(".")[0]][f.split(".")[1]] == v for f, v in CHANGES.items())


def test_a_config_for_another_mode_is_refused(tmp_path):
    train = launcher("--config=experiments/eval.py:knn,tiny", f"--workdir={tmp_path / 'knn'}")
    assert train.returncode == errors.USER_ERROR_EXIT_CODE and "run it with --mode=eval" in train.stderr
    assert not (tmp_path / "knn").exists()  # nothing pretrained into it
    evaluate = launcher("--mode=eval", "--config=experiments/tiny.py", f"--workdir={tmp_path / 'e'}")
    assert evaluate.returncode == errors.USER_ERROR_EXIT_CODE and "needs an evaluation config" in evaluate.stderr


def test_an_unknown_field_is_named_with_its_path_and_the_closest_ones(tmp_path):
    done = launcher("--config=experiments/tiny.py", f"--workdir={tmp_path}", "--config.training.bogus_rate=1",
                    "--config.optim.base_lr=0.1")
    assert done.returncode == errors.USER_ERROR_EXIT_CODE and "Traceback" not in done.stderr
    assert "--config.training.bogus_rate=1: the config experiments/tiny.py has no field 'training.bogus_rate'" \
        in done.stderr
    typo = launcher("--config=experiments/tiny.py", f"--workdir={tmp_path}", "--config.optim.base_rl=0.1")
    assert "did you mean optim.base_lr" in typo.stderr
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    not_dir = launcher("--config=experiments/tiny.py", f"--workdir={a_file}")
    assert not_dir.returncode == errors.USER_ERROR_EXIT_CODE and "cannot be written" in not_dir.stderr
    assert "Traceback" not in not_dir.stderr


def _tampered(exported_path, tmp_path, change) -> str:
    with open(exported_path, "rb") as f:
        payload = pickle.load(f)
    change(payload["experiment_state"])
    path = tmp_path / "pretrain.pkl"
    path.write_bytes(pickle.dumps(payload))
    return str(path)


def test_imported_weights_are_validated_naming_the_first_bad_array(trained, tmp_path):
    config = tiny.get_config()
    exported = export.export_pretrain_pkl(checkpointing.restore_state(str(trained), config)[0], str(tmp_path / "x"))
    first = sorted(export.load_pretrain_pkl(exported)[0])[0]

    def nan(exp):
        w = next(iter(exp["online_params"][first]))
        exp["online_params"][first][w] = np.full_like(exp["online_params"][first][w], np.nan)

    def whole(exp):
        w = next(iter(exp["online_params"][first]))
        exp["online_params"][first][w] = exp["online_params"][first][w].astype(np.int32)

    def empty(exp):
        w = next(iter(exp["online_params"][first]))
        exp["online_params"][first][w] = exp["online_params"][first][w][:0]

    for change, message in ((nan, "non-finite values"), (whole, "int32 values"), (empty, "an empty leading replica")):
        with pytest.raises(errors.CheckpointError, match=f"parameter {first}/.*{message}"):
            export.load_pretrain_pkl(_tampered(exported, tmp_path, change))


def test_a_damaged_export_beside_checkpoints_is_skipped_by_name(trained, tmp_path, caplog):
    import logging

    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(workdir)], check=True)
    (workdir / "pretrain.pkl").write_bytes(b"\x80\x04 not a pickle at all")
    with caplog.at_level(logging.WARNING):
        pre = evaluation.load_pretrained(str(workdir), tiny.get_config())
    assert pre.step == 2 and pre.source.endswith("checkpoints/2")
    assert f"skipping {workdir / 'pretrain.pkl'}" in caplog.text


def test_transient_write_errors_are_retried_then_stop_with_a_message(tmp_path, monkeypatch):
    from etils import epath

    from semppl_jax import paths

    failures = {"left": 2}
    real = epath.Path.write_text

    def flaky(self, *args, **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(5, "Input/output error (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(epath.Path, "write_text", flaky)
    paths.with_retries(lambda: (tmp_path / "x").write_text("ok"), "x", pause=0.01)
    paths.write_json_atomic(tmp_path / "a.json", {"a": 1})  # two failures, then it lands
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1} and failures["left"] == 0
    failures["left"] = 100
    monkeypatch.setattr(paths, "WRITE_ATTEMPTS", 3)
    with pytest.raises(errors.WorkdirError, match=r"failed 3 times .* last complete checkpoint intact"):
        paths.with_retries(lambda: paths.epath.Path(tmp_path / "b.json").write_text("{}"), "b.json",
                           attempts=3, pause=0.01)
    os.remove(tmp_path / "a.json")
