"""``launch/tpu_pod.sh`` as shipped, against stand-ins that run what the real systems would.

``gcloud`` is a stand-in (``fake_gcloud.py``) whose ``ssh`` runs every command the
launcher sends, for real, in the worker's own home directory (empty on a new slice) and
a clean environment; the workers install uv from a stand-in PyPI and make their Python
3.11 environment with it (``tpu_stand_ins.py``: the image's python3 is 3.10, as on the
TPU images). A worker is a CPU machine here: JAX runs on its CPU, as one process.

The launcher ships a commit: the working tree is copied into a fresh git repository
first, so what is tested is what is checked out.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from semppl_jax import checkpointing, supervise
from semppl_jax.metric_writers import read_jsonl
from tests import tpu_stand_ins
from tests.conftest import REPO
from tests.test_multihost_launcher import _env as launcher_env
from tests.test_multiprocess import free_port


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The working tree (tracked and new files, not ignored ones) as a one-commit repository."""
    root = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes((REPO / name).read_bytes())
            (root / name).chmod((REPO / name).stat().st_mode)
    git = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "the working tree"]):
        subprocess.run(["git", *cmd], cwd=root, env=git, check=True)
    return root


def pod(tmp_path: Path, checkout: Path, workers: int = 1, on_create=("WAITING_FOR_RESOURCES", "ACTIVE"),
        create_failures: int = 0, **settings) -> tuple[dict, Path]:
    """The launcher's environment with the stand-ins in place, and the stand-in's folder."""
    fake = tmp_path / "fake"
    wheelhouse = tmp_path / "pypi"
    tpu_stand_ins.build_uv_wheel(wheelhouse, fake / "uv_record")
    machine = {k: v for k, v in launcher_env(4).items() if k.startswith(("JAX_", "XLA_", "TF_CPP", "PYTHONUNBUF"))}
    tpu_stand_ins.write_config(fake, workers, wheelhouse, machine, list(on_create), create_failures)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\nexec {sys.executable} {REPO / "tests" / "fake_gcloud.py"} "$@"\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_DIR=str(fake), PROJECT="proj", ZONE="us-central2-b",
               TPU="semppl-test", TYPE="v5litepod-8", BUCKET=str(tmp_path / "bucket"), CONFIG="experiments/tiny.py",
               POLL="2", STALE="300", MAX_BACKOFF="2", EXPECT_PLATFORM="cpu")
    env.update(settings)
    return env, fake


def one_process(*args: str) -> list[str]:
    """The launcher arguments of a one-worker run on the stand-in's CPU (a TPU VM needs none)."""
    return [*args, f"--coordinator_address=localhost:{free_port()}", "--num_processes=1", "--process_id=0"]


def launch(checkout: Path, env: dict, args: list[str], log: Path) -> subprocess.Popen:
    """The launcher as a terminal starts it: SIGHUP at its default (a suite run under nohup
    would hand down "ignored", and a launcher that outlives its terminal proves nothing)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        return subprocess.Popen(["bash", str(checkout / "launch" / "tpu_pod.sh"), "tiny", *args], env=env,
                                stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        signal.signal(signal.SIGHUP, previous)


def calls(fake: Path) -> list[list[str]]:
    return [json.loads(line) for line in (fake / "calls.log").read_text().splitlines()]


def wait_until(condition, timeout: float, procs=(), what: str = "", logs=()) -> None:
    deadline = time.time() + timeout
    while not condition():
        tails = "\n".join(Path(p).read_text()[-3000:] for p in logs if Path(p).exists())
        assert time.time() < deadline, f"timed out waiting for {what}\n{tails}"
        assert all(p.poll() is None for p in procs), f"the launcher ended while waiting for {what}\n{tails}"
        time.sleep(0.5)


def metrics_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    records = read_jsonl(str(path)) if path.exists() else []
    return records[-1]["step"] if records else 0


def attempts(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "logs").iterdir() if p.is_dir()) if (workdir / "logs").exists() else []


@pytest.fixture
def cleanup():
    """Stops what the stand-in's workers left running, whatever the test's outcome."""
    folders = []
    yield folders.append
    for fake in folders:
        tpu_stand_ins.kill_workers(fake)


def test_the_run_outlives_the_launcher_a_second_one_reattaches_and_resumes_it_after_preemption(
        tmp_path, checkout, cleanup):
    """One run, from the first request to the end: a capacity error, then a spot slice; the
    launcher's terminal closes (SIGHUP) while the worker trains, and training goes on; a
    second launcher follows the running attempt; the slice is taken back mid-run, and that
    launcher asks for a new one, sets its empty VMs up from scratch and resumes from the
    last checkpoint to the end."""
    env, fake = pod(tmp_path, checkout, create_failures=1, CAPACITY="spot")
    cleanup(fake)
    workdir = tmp_path / "bucket" / "semppl" / "tiny"
    args = one_process("--config.training.num_steps=40", "--config.training.log_every_steps=5",
                       "--config.training.checkpoint_every_steps=10")
    log1, log2 = tmp_path / "launcher1.log", tmp_path / "launcher2.log"
    first = launch(checkout, env, args, log1)
    wait_until(lambda: metrics_step(workdir) >= 5, 400, [first], "training on the worker", [log1])
    os.killpg(first.pid, signal.SIGHUP)  # the laptop's terminal closes
    first.wait(timeout=30)
    step = metrics_step(workdir)
    wait_until(lambda: metrics_step(workdir) > step, 120, (), "training to go on without the launcher", [log1])

    second = launch(checkout, env, args, log2)
    wait_until(lambda: "following the running attempt" in log2.read_text(), 120, [second], "reattaching", [log2])
    wait_until(lambda: (checkpointing.latest_step(str(workdir)) or 0) >= 10, 300, [second], "a checkpoint", [log2])
    tpu_stand_ins.preempt(fake)  # the VMs go, with their processes and home directories
    assert second.wait(timeout=600) == 0, log2.read_text()[-4000:]
    text = log2.read_text()
    assert "the slice was lost" in text and "finished" in text
    assert "preflight: all checks passed" in text  # worker 0's log, followed on the bucket
    first_attempt, second_attempt = attempts(workdir)  # reattached once, restarted once
    assert supervise.read_status(first_attempt / "worker0")["state"] == "running"  # it died with its VM
    output = (first_attempt / "worker0" / "output.log").read_text()
    assert output.index("preflight: all checks passed") < output.index("train set:")
    resumed = (second_attempt / "worker0" / "output.log").read_text()
    assert re.search(r"resumed from step [1-9]\d+", resumed) and "[40/40" in resumed
    assert supervise.read_status(second_attempt / "worker0")["exit_status"] == "0"
    assert checkpointing.latest_step(str(workdir)) == 40

    made = [c for c in calls(fake) if c[:4] == ["compute", "tpus", "queued-resources", "create"]]
    assert len(made) == 3 and all("--spot" in c for c in made)  # a capacity error, the slice, its successor
    assert made[0][made[0].index("--runtime-version") + 1] == "v2-alpha-tpuv5-lite"
    assert any(c[:4] == ["compute", "tpus", "queued-resources", "delete"] for c in calls(fake))
    uv = (fake / "uv_record").read_text().splitlines()
    assert uv[0] == "venv --python 3.11 --python-preference only-managed -> 3.11.7"  # not the image's 3.10
    assert uv[1].startswith("pip install") and "jax[tpu]==" in uv[1]
    assert len(uv) == 4  # once a slice: the first VMs and their successors
    home = tpu_stand_ins.worker_homes(fake)[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
    assert (home / "semppl" / "code" / head / ".complete").exists()  # the launcher's exact commit
    assert (workdir / "logs" / "commit").read_text().strip() == head


def test_a_crash_on_the_workers_ends_the_launcher_with_its_status_and_logs(tmp_path, checkout, cleanup):
    """Two workers; without a TPU cluster to find, --distributed fails on each: the launcher
    reads both statuses from the bucket, stops and names where the logs are."""
    env, fake = pod(tmp_path, checkout, workers=2)
    cleanup(fake)
    done = subprocess.run(["bash", str(checkout / "launch" / "tpu_pod.sh"), "tiny"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the run failed with status 1" in done.stdout + done.stderr
    [attempt] = attempts(tmp_path / "bucket" / "semppl" / "tiny")
    for i in range(2):
        assert supervise.read_status(attempt / f"worker{i}")["exit_status"] == "1"
        assert "coordinator" in (attempt / f"worker{i}" / "output.log").read_text()
    starts = [c for c in calls(fake) if c[3:4] == ["ssh"] and "start" in c[-1]]
    assert sorted(c[c.index("--worker=0") if "--worker=0" in c else c.index("--worker=1")] for c in starts) == [
        "--worker=0", "--worker=1"]  # one ssh a worker, each told its number


@pytest.mark.parametrize("accelerator,runtime", [
    ("v4-64", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e")])
def test_each_generation_gets_its_runtime_and_capacity_options(tmp_path, checkout, accelerator, runtime):
    env, fake = pod(tmp_path, checkout, create_failures=10, TYPE=accelerator, CAPACITY="reserved")
    proc = launch(checkout, env, [], tmp_path / "launcher.log")
    wait_until(lambda: (fake / "calls.log").exists() and any(
        c[3:4] == ["create"] for c in calls(fake)), 60, [proc], "a queued-resource request")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    create = next(c for c in calls(fake) if c[3:4] == ["create"])
    assert create[create.index("--runtime-version") + 1] == runtime and "--reserved" in create
    assert create[create.index("--accelerator-type") + 1] == accelerator and "--node-id" in create


def test_uncommitted_changes_are_refused_before_anything_is_created(tmp_path, checkout):
    env, fake = pod(tmp_path, checkout)
    tracked = checkout / "README.md"
    original = tracked.read_text()
    try:
        tracked.write_text(original + "\nan edit\n")
        done = subprocess.run(["bash", str(checkout / "launch" / "tpu_pod.sh"), "tiny"], env=env, capture_output=True,
                              text=True, timeout=60)
    finally:
        tracked.write_text(original)
    assert done.returncode == 2 and "uncommitted changes" in done.stderr
    assert not (fake / "calls.log").exists()


def test_the_workers_python_meets_every_pin():
    """Every pinned distribution's Requires-Python (from its installed metadata) admits the
    Python the worker script installs, and not the TPU images' own 3.10."""
    script = (REPO / "launch" / "tpu_worker.sh").read_text()
    version = re.search(r"^PYTHON_VERSION=(\S+)", script, re.M).group(1)
    assert '--python "$PYTHON_VERSION" --python-preference only-managed' in script
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==", (REPO / "requirements.txt").read_text(), re.M)
    needs = {p: metadata.metadata(p).get("Requires-Python") or "" for p in pins}
    lowest = max((tuple(map(int, re.findall(r">=\s*(\d+)\.(\d+)", n)[0])) for n in needs.values()
                  if re.search(r">=\s*\d+\.\d+", n)), default=(3, 0))
    assert tuple(map(int, version.split("."))) >= lowest > (3, 10), (version, lowest, needs)
