"""The cluster launch scripts as shipped: Slurm gives every GPU a process, and both
scripts run again after a preemption (exit 75). ``srun``, ``scontrol`` and ``gcloud``
are stand-ins on PATH that record their calls; the Slurm script's run is real (two
tasks of the tiny preset under a Slurm environment, jax.distributed on localhost)."""

import os
import re
import stat
import subprocess
import sys

import pytest

from semppl_jax import distributed
from tests.conftest import REPO
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
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


FAKE_SRUN = """
# Starts $FAKE_TASKS tasks of the command on this machine with Slurm's environment.
if [ -n "${FAKE_SRUN_STATUS:-}" ]; then echo "srun $*" >> "$FAKE_LOG"; exit "$FAKE_SRUN_STATUS"; fi
pids=()
for i in $(seq 0 $((FAKE_TASKS - 1))); do
  SLURM_JOB_ID=$FAKE_JOB SLURM_STEP_NODELIST=localhost SLURM_NTASKS=$FAKE_TASKS SLURM_PROCID=$i \
  SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_TASKS_PER_NODE=$FAKE_TASKS "$@" > "$FAKE_LOG.task$i" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


def run_sbatch(tmp_path, extra_env: dict, *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_tool(bin_dir, "srun", FAKE_SRUN)
    write_tool(bin_dir, "scontrol", 'echo "scontrol $*" >> "$FAKE_LOG"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{env['PATH']}", FAKE_LOG=str(tmp_path / "log"),
               FAKE_TASKS="2", FAKE_JOB=str(free_port()), SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="4242",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS="true", CONFIG="experiments/tiny.py", **extra_env)
    return subprocess.run(["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), "tiny", str(tmp_path / "run"),
                           str(tmp_path / "tfds"), *args], env=env, capture_output=True, text=True, timeout=900)


def test_sbatch_script_runs_two_tasks_to_the_end(tmp_path):
    """The script as shipped, under srun with two tasks: both join one JAX job (8 devices)
    and finish the run; no requeue."""
    done = run_sbatch(tmp_path, {}, "--config.training.num_steps=4", "--config.training.log_every_steps=2")
    logs = "\n".join((tmp_path / f"log.task{i}").read_text()[-3000:] for i in range(2))
    assert done.returncode == 0, done.stderr + logs
    assert "devices: 8 (4 local) on 2 processes" in logs
    assert (tmp_path / "run" / "train_summary.json").exists() and not (tmp_path / "log").exists()


def test_sbatch_script_requeues_a_preempted_run(tmp_path):
    done = run_sbatch(tmp_path, {"FAKE_SRUN_STATUS": "75"})
    assert done.returncode == 75
    assert (tmp_path / "log").read_text().splitlines()[-1] == "scontrol requeue 4242"


FAKE_GCLOUD = """
# Records each call; the slice's state and the run's exit statuses come from files.
echo "gcloud $*" >> "$FAKE_LOG"
case "$*" in
  *" describe "*) s=$(head -n1 "$FAKE_STATES"); sed -i 1d "$FAKE_STATES"; [ "$s" = NONE ] && exit 1; echo "$s";;
  *"cat ~/semppl_status"*) cat "$FAKE_DIR/last_status";;
  *"semppl_jax.main"*) s=$(head -n1 "$FAKE_RUNS"); sed -i 1d "$FAKE_RUNS"; echo "$s" > "$FAKE_DIR/last_status"
                       exit "$s";;
esac
exit 0
"""


def run_pod(tmp_path, states: list[str], runs: list[int]) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_tool(bin_dir, "gcloud", FAKE_GCLOUD)
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    (tmp_path / "runs").write_text("\n".join(map(str, runs)) + "\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"),
               FAKE_STATES=str(tmp_path / "states"), FAKE_RUNS=str(tmp_path / "runs"), FAKE_DIR=str(tmp_path),
               PROJECT="p", ZONE="z", TPU="t", BUCKET="gs://b", REPO_URL="https://example.invalid/semppl_jax.git")
    done = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "resnet50,1pct",
                           "--config.training.batch_size=2048"], env=env, capture_output=True, text=True, timeout=60)
    return done, (tmp_path / "log").read_text().splitlines()


def jax_pin() -> str:
    return re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)


def test_pod_script_runs_again_after_exit_75_with_the_pinned_jax(tmp_path):
    done, calls = run_pod(tmp_path, ["READY"] * 6, [75, 75, 0])
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [c for c in calls if "semppl_jax.main" in c]
    assert len(runs) == 3 and all("--workdir=gs://b/semppl/resnet50_1pct" in c for c in runs)
    assert all("--config.training.batch_size=2048" in c for c in runs)
    installs = [c for c in calls if "jax[tpu]" in c]
    assert len(installs) == 1 and f"-r requirements.txt 'jax[tpu]=={jax_pin()}'" in installs[0]
    assert not any(" create " in c or " delete " in c for c in calls)


def test_pod_script_recreates_a_preempted_slice_and_stops_on_a_crash(tmp_path):
    # Run 1 dies with the slice (ssh 255, the slice PREEMPTED): delete, create, resume, finish.
    done, calls = run_pod(tmp_path, ["NONE", "PREEMPTED", "PREEMPTED", "PREEMPTED", "READY"], [255, 0])
    assert done.returncode == 0, done.stdout + done.stderr
    assert sum(" create " in c for c in calls) == 2 and sum(" delete " in c for c in calls) == 1
    assert sum("jax[tpu]" in c for c in calls) == 2  # set up again on the new VMs
    other = tmp_path / "crash"
    other.mkdir()
    done, calls = run_pod(other, ["READY"] * 4, [1, 0])
    assert done.returncode == 1 and sum("semppl_jax.main" in c for c in calls) == 1
