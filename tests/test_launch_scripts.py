"""The Slurm script as shipped: every GPU gets a process, the preflight runs first, a failed
task ends the step, a SIGTERM at any moment ends in 75 and requeues. ``srun`` is a
stand-in that runs the tasks for real, each in a clean home directory (two tasks of the
tiny preset under a Slurm environment, jax.distributed on localhost); ``scontrol``
records its calls."""

import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from semppl_jax import distributed
from tests.conftest import REPO
from tests.test_multihost_launcher import _env as launcher_env
from tests.test_multiprocess import free_port


def slurm_env(node: int, local: int, tasks_per_node: int = 8, nodes: int = 2, **extra) -> dict:
    env = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[001-002]", SLURM_NTASKS=str(nodes * tasks_per_node),
               SLURM_PROCID=str(node * tasks_per_node + local), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
               SLURM_STEP_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})", SLURM_GPUS_ON_NODE="8")
    env.update(extra)
    return env


def test_two_nodes_of_eight_tasks_drive_every_gpu_once():
    """--ntasks-per-node=8 --gpus-per-node=8 (the shipped script): each task sees the node's
    8 GPUs and drives one; the 16 tasks cover the 16 GPUs exactly once."""
    driven = set()
    for node in range(2):
        for local in range(8):
            env = slurm_env(node, local, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
            ids = distributed.slurm_local_device_ids(env)
            assert ids == [local]
            driven |= {(node, i) for i in ids}
    assert driven == {(n, g) for n in range(2) for g in range(8)}


def test_one_task_per_node_drives_all_its_gpus_and_bound_tasks_what_they_see():
    assert distributed.slurm_local_device_ids(slurm_env(1, 0, tasks_per_node=1)) == list(range(8))
    assert distributed.slurm_local_device_ids(slurm_env(0, 1, tasks_per_node=4)) == [2, 3]
    # --gpus-per-task=1: Slurm binds one GPU to each task, which sees it as device 0.
    assert distributed.slurm_local_device_ids(slurm_env(1, 5, CUDA_VISIBLE_DEVICES="5")) == [0]
    assert distributed.slurm_local_device_ids({"CUDA_VISIBLE_DEVICES": "0"}) is None  # not Slurm
    assert distributed.slurm_local_device_ids(slurm_env(0, 0, SLURM_GPUS_ON_NODE="")) is None  # no GPU
    with pytest.raises(ValueError, match="do not divide evenly"):
        distributed.slurm_local_device_ids(slurm_env(0, 0, tasks_per_node=3))
    assert distributed.tasks_on_this_node(dict(SLURM_TASKS_PER_NODE="8(x2),4", SLURM_NODEID="2")) == 4


def test_initialize_passes_the_device_ids(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k, v in slurm_env(1, 3, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7").items():
        monkeypatch.setenv(k, v)
    distributed.initialize()
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=[3])]


def test_shipped_sbatch_asks_for_a_task_per_gpu():
    text = (REPO / "launch" / "slurm_gpu.sbatch").read_text()
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert opts["ntasks-per-node"] == opts["gpus-per-node"] == "8" and "--distributed" in text


def write_tool(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


FAKE_SRUN = f"""#!{sys.executable}
# Stand-in for srun: $FAKE_TASKS tasks of the command on this machine, each with Slurm's
# environment and a home directory of its own that starts empty. --kill-on-bad-exit ends
# the step as soon as a task fails (TERM, then KILL); a SIGTERM to srun reaches every task.
import os, signal, subprocess, sys, time
args, kill_on_bad_exit = sys.argv[1:], False
while args and args[0].startswith("-"):
    kill_on_bad_exit |= args.pop(0) in ("-K", "-K1", "--kill-on-bad-exit", "--kill-on-bad-exit=1")
log = os.environ["FAKE_LOG"]
with open(log + ".srun", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
step = sum(1 for _ in open(log + ".srun"))
if os.environ.get("FAKE_SRUN_STATUS"):
    sys.exit(int(os.environ["FAKE_SRUN_STATUS"]))
n, procs = int(os.environ["FAKE_TASKS"]), []
for i in range(n):
    home = f"{{log}}.home{{step}}.{{i}}"
    os.makedirs(home)
    env = dict(os.environ, HOME=home, SLURM_JOB_ID=os.environ["FAKE_JOB"], SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS=str(n), SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0",
               SLURM_STEP_TASKS_PER_NODE=str(n))
    cmd = args
    if os.environ.get("FAKE_CRASH_TASK") == str(i):  # a task that dies as a GPU fault would
        cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    procs.append(subprocess.Popen(cmd, env=env, stdout=open(f"{{log}}.task{{i}}", "a"), stderr=subprocess.STDOUT))
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs if p.poll() is None])
bad = None
while any(p.poll() is None for p in procs):
    codes = [p.poll() for p in procs]
    bad = bad or next((c if c > 0 else 128 - c for c in codes if c not in (None, 0)), None)
    if bad and kill_on_bad_exit:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        time.sleep(5)
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.1)
codes = [p.wait() for p in procs]
bad = bad or next((c if c > 0 else 128 - c for c in codes if c != 0), 0)
with open(log + ".srun", "a") as f:
    f.write(f"exit {{bad}}\\n")
sys.exit(bad)
"""


def run_sbatch(tmp_path, extra_env: dict, *args: str, background: bool = False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_tool(bin_dir, "srun", FAKE_SRUN)
    write_tool(bin_dir, "scontrol", '#!/usr/bin/env bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    env = {k: v for k, v in launcher_env(4).items() if not k.startswith("SLURM_")}  # with the compile cache
    env.update(PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{env['PATH']}", FAKE_LOG=str(tmp_path / "log"),
               FAKE_TASKS="2", FAKE_JOB=str(free_port()), SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="4242",
               EXPECT_PLATFORM="cpu",
               SLURM_NTASKS="2", XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="true", CONFIG=str(REPO / "experiments" / "tiny.py"),
               PYTHONPATH=str(REPO),
               **extra_env)
    cmd = ["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), "tiny", str(tmp_path / "run"), str(tmp_path / "tfds"),
           *args]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def task_logs(tmp_path) -> str:
    return "\n".join((tmp_path / f"log.task{i}").read_text() for i in range(2) if (tmp_path / f"log.task{i}").exists())


def test_sbatch_script_runs_the_preflight_then_two_tasks_to_the_end(tmp_path):
    """The script as shipped, under srun with two tasks, each in a clean home: the preflight
    passes on both, then both join one JAX job (8 devices) and finish; no requeue."""
    done = run_sbatch(tmp_path, {}, "--config.training.num_steps=4", "--config.training.log_every_steps=2")
    logs = task_logs(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert "preflight: all checks passed" in logs and "8 cpu devices, 4 on each of 2 processes" in logs
    assert "devices: 8 (4 local) on 2 processes" in logs
    steps = (tmp_path / "log.srun").read_text().splitlines()
    assert [line.split()[0] for line in steps] == ["--kill-on-bad-exit=1", "exit", "--kill-on-bad-exit=1", "exit"]
    assert "--mode=check" in steps[0] and "--mode=check" not in steps[2]
    assert (tmp_path / "run" / "train_summary.json").exists() and not (tmp_path / "log").exists()


def test_sbatch_script_requeues_a_preempted_run(tmp_path):
    done = run_sbatch(tmp_path, {"FAKE_SRUN_STATUS": "75"})
    assert done.returncode == 75
    assert (tmp_path / "log").read_text().splitlines()[-1] == "scontrol requeue 4242"


def test_a_crashed_task_ends_the_step_at_once_and_requeues_a_bounded_number_of_times(tmp_path):
    """Task 1 dies (SIGSEGV) while task 0 waits for it in jax.distributed: srun's
    --kill-on-bad-exit ends the step within seconds; the job requeues until MAX_FAILURES
    crashes in a row, then gives up."""
    for attempt in range(1, 4):
        t0 = time.time()
        done = run_sbatch(tmp_path, {"FAKE_CRASH_TASK": "1", "MAX_FAILURES": "2"})
        assert done.returncode == 139, done.stdout + done.stderr
        assert time.time() - t0 < 60
        requeues = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
        assert len(requeues) == min(attempt, 2), (attempt, requeues, done.stderr)
    assert "3 failures in a row; giving up" in done.stderr


@pytest.mark.parametrize("sig,requeued", [(signal.SIGTERM, False), (signal.SIGUSR1, True)])
def test_a_signal_to_the_job_before_training_begins_ends_in_75(tmp_path, sig, requeued):
    """The batch shell gets SIGTERM (preemption, scancel) or SIGUSR1 (the time limit, from
    --signal=B:USR1@120) while the tasks build the training step: it passes SIGTERM to the
    tasks, which stop at once with 75 (nothing to save yet). Before the time limit the job
    requeues itself; after SIGTERM it leaves that to Slurm (a cancelled job stays cancelled)."""
    proc = run_sbatch(tmp_path, {}, "--config.training.num_steps=400", background=True)
    deadline = time.time() + 300
    while "train set:" not in task_logs(tmp_path):
        assert time.time() < deadline and proc.poll() is None, task_logs(tmp_path)[-5000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out + task_logs(tmp_path)[-5000:]
    requeues = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
    assert requeues == (["scontrol requeue 4242"] if requeued else []), out
    assert task_logs(tmp_path).count("nothing to save yet") == 2  # both tasks, at once
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_shipped_sbatch_appends_its_log_and_kills_a_failed_step():
    text = (REPO / "launch" / "slurm_gpu.sbatch").read_text()
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert opts["open-mode"] == "append" and opts["signal"] == "B:USR1@120" and "--requeue" in text
    assert "srun --kill-on-bad-exit=1" in text
