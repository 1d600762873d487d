"""The launcher itself with 2 real processes x 4 CPU devices (jax.distributed on localhost).

SIGTERM reaches one process only (what a pod preemption looks like): both must
save one checkpoint at the same agreed step and exit with the preempted status;
the same two commands then resume and finish; export and the k-NN evaluation
run with 2 processes too. Also single-process: a SIGKILL during saves, then a
resume, and a drifted resume refused.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import tiny
from semppl_jax import checkpointing, datasets, jobs, workdir_lock
from semppl_jax.metric_writers import read_jsonl
from tests.conftest import REPO
from tests.test_multiprocess import free_port


def _env(devices: int) -> dict:
    import jax

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
               PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def _launch(args: list[str], port: int, logs, devices: int = 4) -> list[subprocess.Popen]:
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "semppl_jax.main", f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={i}"] + args
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=logs[i], stderr=subprocess.STDOUT))
    return procs


def abort_with_stacks(procs) -> None:
    """Ends every process; those still running get SIGABRT first, so that their Python
    stacks (``PYTHONFAULTHANDLER``) land in their logs."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGABRT)
    time.sleep(2)
    for p in procs:
        p.kill()


def _wait(procs, timeout: float, log_paths=()) -> list[int]:
    """The exit codes; on a timeout the processes are aborted (``abort_with_stacks``) and the
    failure shows their logs, with where they hung."""
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            abort_with_stacks(procs)
            raise AssertionError(f"not exited within {timeout:.0f} s: "
                                 f"{[q.returncode for q in procs]}\n{_tail(log_paths)}") from None
    return codes


def _tail(paths) -> str:
    return "\n".join(f"--- {p}\n" + open(p).read()[-4000:] for p in paths)


TRAIN_ARGS = ["--config=experiments/tiny.py", "--config.training.num_steps=2000", "--config.training.log_every_steps=5",
              "--config.training.checkpoint_every_steps=100000", "--config.training.checkpoint_every_minutes=600"]


def test_sigterm_to_one_process_then_resume_export_and_knn_with_two_processes(tmp_path):
    workdir = tmp_path / "run"
    log_paths = [tmp_path / f"p{i}.log" for i in range(2)]
    logs = [open(p, "w") for p in log_paths]
    fold = "--config.dataset.calibration_per_class=1"  # the calibration fold's monitors and estimate, 2 processes
    args = TRAIN_ARGS + [fold, f"--workdir={workdir}"]
    procs = _launch(args, free_port(), logs)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 400
    while not (metrics.exists() and read_jsonl(str(metrics)) and read_jsonl(str(metrics))[-1]["step"] >= 15):
        assert time.time() < deadline and all(p.poll() is None for p in procs), _tail(log_paths)
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # one process only
    t0 = time.time()
    codes = _wait(procs, 180, log_paths)
    assert time.time() - t0 < 180
    assert codes == [jobs.PREEMPTED_EXIT_CODE] * 2, (codes, _tail(log_paths))
    saved = checkpointing.latest_step(str(workdir))
    assert saved is not None and 15 < saved < 2000
    # The agreed preemption step, besides the time policy's save at a fresh run's first step.
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["1", str(saved)]
    for p in log_paths:
        assert f"saved step {saved}" in open(p).read()

    # The same two commands resume from the agreed step and finish (a shorter schedule
    # would be a drifted config: finish the original one, but only a few more steps).
    resume = args + ["--stop_after=5"]
    codes = _wait(_launch(resume, free_port(), logs), 400, log_paths)
    assert codes == [0, 0], _tail(log_paths)
    assert checkpointing.latest_step(str(workdir)) == saved + 5
    steps = [r["step"] for r in read_jsonl(str(metrics))]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)  # every logged step once

    codes = _wait(_launch(["--config=experiments/tiny.py", f"--workdir={workdir}", "--mode=export"],
                          free_port(), logs), 400, log_paths)
    assert codes == [0, 0], _tail(log_paths)
    assert (workdir / "pretrain.pkl").exists() and not list(workdir.glob("*.tmp*"))

    knn_dir = tmp_path / "knn"
    codes = _wait(_launch(["--config=experiments/eval.py:knn,tiny", f"--workdir={knn_dir}",
                           "--mode=eval", f"--config.eval.checkpoint={workdir}", "--config.semppl.queue_size=64"],
                          free_port(), logs), 400, log_paths)
    assert codes == [0, 0], _tail(log_paths)
    result = json.loads((knn_dir / "eval_results.json").read_text())
    assert result["step"] == saved + 5 and 0.0 <= result["top1"] <= 1.0 and result["num_examples"] == 64

    # Pseudo-labels with 2 processes: one file, every unlabelled image once (not the fold's),
    # and the fold's estimate.
    codes = _wait(_launch(["--config=experiments/tiny.py", fold, f"--workdir={workdir}", "--mode=pseudo_label"],
                          free_port(), logs), 400, log_paths)
    assert codes == [0, 0], _tail(log_paths)
    rows = read_jsonl(str(workdir / "pseudo_labels.jsonl"))
    config = tiny.get_config()
    labelled = datasets.config_labelled_mask(config, datasets.load_split(config, "train"))
    assert sorted(r["image_id"] for r in rows) == np.flatnonzero(~labelled).tolist()
    assert not (workdir / "pseudo_labels.parts").exists()
    summary = json.loads((workdir / "pseudo_labels_summary.json").read_text())
    assert summary["calibration_images"] == 10
    assert summary["accuracy_low"] <= summary["accuracy_estimate"] <= summary["accuracy_high"]
    logged = [r for r in read_jsonl(str(metrics)) if "calibration_images" in r]
    assert logged and all(0 < r["calibration_images"] <= 10 for r in logged)


def test_sigkill_during_saves_then_resume(tmp_path):
    """Saves at every step, killed with SIGKILL mid-run: the resume starts from the last
    complete checkpoint and leaves no temporary checkpoint directory behind."""
    workdir = tmp_path / "run"
    log = open(tmp_path / "log", "w")
    cmd = [sys.executable, "-m", "semppl_jax.main", "--config=experiments/tiny.py", f"--workdir={workdir}",
           "--config.training.num_steps=400", "--config.training.checkpoint_every_steps=1",
           "--config.training.keep_checkpoints=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(8), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while checkpointing.latest_step(str(workdir)) is None or checkpointing.latest_step(str(workdir)) < 8:
        assert time.time() < deadline and proc.poll() is None, open(tmp_path / "log").read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = checkpointing.latest_step(str(workdir))
    resume = subprocess.run(cmd + ["--stop_after=2"], cwd=REPO, env=_env(8), capture_output=True, text=True,
                            timeout=400)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert f"resumed from step {before}" in resume.stderr
    assert checkpointing.latest_step(str(workdir)) == before + 2
    assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]


@pytest.mark.parametrize("field,value", [("training.batch_size", 16), ("dataset.label_subset", "0.5"),
                                         ("seed", 3)])
def test_drifted_resume_is_refused_naming_the_field(tmp_path, field, value):
    config = tiny.get_config()
    config.training.num_steps = 2
    jobs.train(config, str(tmp_path))
    before = (tmp_path / "config.json").read_text()
    summary = (tmp_path / "train_summary.json").read_text()
    drifted = tiny.get_config()
    drifted.training.num_steps = 2
    section, _, name = field.rpartition(".")
    (drifted[section] if section else drifted)[name] = value
    with pytest.raises(checkpointing.ConfigDriftError, match=field.replace(".", r"\.")):
        jobs.train(drifted, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before  # refused before anything is written
    # Deliberately allowed: it goes on (nothing left to train here), the summary intact.
    jobs.train(drifted, str(tmp_path), allow_config_change=True)
    assert (tmp_path / "train_summary.json").read_text() == summary


def _wait_for(paths, text: str, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any(text in open(p).read() for p in paths):
        assert time.time() < deadline and all(p.poll() is None for p in procs), _tail(paths)
        time.sleep(0.1)


def _start_two_workers(tmp_path, mode: str):
    workdir = tmp_path / "run"
    log_paths = [tmp_path / f"p{i}.log" for i in range(2)]
    logs = [open(p, "w") for p in log_paths]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "stuck_collective_worker.py"), str(port), str(i),
                               str(workdir), mode], cwd=REPO, env=_env(2), stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    return workdir, log_paths, procs


def test_a_process_held_in_a_collective_by_a_stopped_one_still_exits_75(tmp_path):
    """A notice reaches process 1 before a collective that process 0 has already entered
    (start-up broadcasts process 0's decisions): process 1 stops and waits in the
    distributed service's shutdown barrier, process 0 would wait in the collective for
    ever. Its watcher ends it: the lease released, the service left, 75."""
    workdir, log_paths, procs = _start_two_workers(tmp_path, "stuck")
    _wait_for(log_paths[:1], "waiting alone", procs)
    _wait_for(log_paths[1:], "ready", procs)
    time.sleep(1)  # process 0 is in the collective
    procs[1].send_signal(signal.SIGTERM)
    t0 = time.time()
    assert _wait(procs, 120, log_paths) == [jobs.PREEMPTED_EXIT_CODE] * 2, _tail(log_paths)
    assert time.time() - t0 < 60
    held = open(log_paths[0]).read()
    assert "still held" in held and "multihost.py" in held and "barrier" in held, _tail(log_paths)  # where
    assert workdir_lock.read_holder(str(workdir))[0] is None  # the lease released


def test_a_notice_at_the_end_of_start_up_stops_every_process_at_the_agreement(tmp_path):
    """Process 0 has finished start-up and waits to enter the loop; the notice reaches
    process 1 while the watcher's interrupt cannot (a long native call). Both stop at the
    agreement before the loop (75), none is ended by its watcher, and neither enters the
    first step's collective alone."""
    workdir, log_paths, procs = _start_two_workers(tmp_path, "agree")
    _wait_for(log_paths[:1], "agreeing", procs)
    _wait_for(log_paths[1:], "ready", procs)
    time.sleep(1)
    procs[1].send_signal(signal.SIGTERM)
    t0 = time.time()
    assert _wait(procs, 120, log_paths) == [jobs.PREEMPTED_EXIT_CODE] * 2, _tail(log_paths)
    assert time.time() - t0 < 60
    assert not any("still held" in open(p).read() or "entered the loop" in open(p).read() for p in log_paths), \
        _tail(log_paths)
    assert workdir_lock.read_holder(str(workdir))[0] is None


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_during_start_up_ends_in_75_at_once(tmp_path, processes):
    """A notice before the first step (here while the step is being built, right after the
    data is indexed) has nothing to save: every process exits 75 at once, no step is taken
    and nothing is saved. With two processes the notice reaches one of them only."""
    workdir = tmp_path / "run"
    log_paths = [tmp_path / f"p{i}.log" for i in range(processes)]
    logs = [open(p, "w") for p in log_paths]
    args = TRAIN_ARGS + [f"--workdir={workdir}"]
    if processes == 2:
        procs = _launch(args, free_port(), logs)
    else:
        procs = [subprocess.Popen([sys.executable, "-m", "semppl_jax.main", *args], cwd=REPO, env=_env(4),
                                  stdout=logs[0], stderr=subprocess.STDOUT)]
    _wait_for(log_paths[-1:], "train set:", procs)
    procs[-1].send_signal(signal.SIGTERM)
    t0 = time.time()
    codes = _wait(procs, 120, log_paths)
    assert codes == [jobs.PREEMPTED_EXIT_CODE] * processes, (codes, _tail(log_paths))
    assert time.time() - t0 < 60
    assert checkpointing.latest_step(str(workdir)) is None and not (workdir / "metrics.jsonl").exists()
    assert all("nothing to save yet" in open(p).read() for p in log_paths)
