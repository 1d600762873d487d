"""Faults injected while a run writes: a full disk during a save, a crash between a
checkpoint's state and its metadata. The last complete checkpoint survives, the run
stops with a message (not a traceback), and a resume goes on from it.
"""

import json
import os
import subprocess
import sys

from semppl_jax import checkpointing, errors
from tests.conftest import REPO
from tests.test_multihost_launcher import _env

TRAIN = ["--config=experiments/tiny.py", "--config.training.num_steps=200",
         "--config.training.checkpoint_every_steps=1", "--config.training.keep_checkpoints=1000",
         "--config.training.checkpoint_every_minutes=600"]

CHECK = """
import json, sys
from experiments import tiny
from semppl_jax import checkpointing
step = checkpointing.latest_step(sys.argv[1])
state, restored = checkpointing.restore_state(sys.argv[1], tiny.get_config())
print(json.dumps(dict(latest=step, restored=restored)))
"""


def on_a_small_disk(tmp_path, script: str, size: str = "6m") -> subprocess.CompletedProcess:
    """``script`` (sh) with ``$0`` a fresh tmpfs of ``size``, in a mount namespace of its own."""
    disk = tmp_path / "disk"
    disk.mkdir()
    prefix = [] if os.geteuid() != 0 else ["unshare", "-rm"]  # root may mount in a namespace of its own
    wrapped = f'mount -t tmpfs -o size={size} tmpfs "$0" && {script}'
    return subprocess.run([*prefix, "sh", "-c", wrapped, str(disk)], cwd=REPO, env=_env(2), capture_output=True,
                          text=True, timeout=600)


def test_a_full_disk_during_a_save_stops_with_a_message_and_the_last_checkpoint_survives(tmp_path):
    py = sys.executable
    done = on_a_small_disk(tmp_path, (
        f'{py} -m semppl_jax.main --workdir="$0/run" {" ".join(TRAIN)} 2> "$0/../train.err"; '
        f'echo "exit $?"; {py} -c \'{CHECK}\' "$0/run"; ls "$0/run/checkpoints"'))
    err = (tmp_path / "train.err").read_text()
    lines = done.stdout.splitlines()
    assert lines[0] == f"exit {errors.USER_ERROR_EXIT_CODE}", done.stdout + done.stderr + err[-3000:]
    assert "error: " in err and "intact" in err and "No space left" in err
    check = json.loads(lines[1])
    assert check["latest"] is not None and check["latest"] >= 1 and check["restored"] == check["latest"]
    assert any("tmp" in name for name in lines[2:])  # the save the disk cut short, never listed as complete


KILL_AT_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
calls = {"n": 0}
real = ocp.JsonCheckpointHandler.async_save


async def killed_between(self, *args, **kwargs):  # the state of step 3 is written, its metadata not
    calls["n"] += 1
    if calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return await real(self, *args, **kwargs)


ocp.JsonCheckpointHandler.async_save = killed_between
sys.argv = ["semppl_jax.main", *sys.argv[1:]]
from semppl_jax import main
main.run()
"""


def test_a_crash_between_a_checkpoint_and_its_metadata_resumes_from_the_last_complete_one(tmp_path):
    workdir = tmp_path / "run"
    crashed = subprocess.run([sys.executable, "-c", KILL_AT_SAVE, f"--workdir={workdir}", *TRAIN], cwd=REPO,
                             env=_env(2), capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert checkpointing.latest_step(str(workdir)) == 2
    resumed = subprocess.run([sys.executable, "-m", "semppl_jax.main", f"--workdir={workdir}", *TRAIN,
                              "--stop_after=2"], cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stderr and checkpointing.latest_step(str(workdir)) == 4
    assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]  # the half-written step, gone
