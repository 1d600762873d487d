"""Two real processes x 4 CPU devices (jax.distributed on localhost) equal 1 process x 8 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import REPO
from tests.test_sharded_step import make_batches, make_config, run_steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "proc0.npz"
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["PYTHONPATH"] = str(REPO)
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "multiprocess_worker.py"), port, str(i),
                               str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = np.load(out)

    config = make_config()
    state, metrics = run_steps(config, jax.devices(), make_batches(config, 3))
    ref_losses = np.array([float(m["loss"]) for m in metrics])
    loss_diff = np.max(np.abs(got["losses"] - ref_losses))
    params = {"/".join(str(k.key) for k in path): np.asarray(v)
              for path, v in jax.tree.leaves_with_path(state.online_params)}
    param_diff = max(float(np.max(np.abs(got[k] - v))) for k, v in params.items())
    print(f"2x4 vs 1x8: max |loss diff| {loss_diff:.2e}, max |param diff| {param_diff:.2e}")
    assert loss_diff < 2e-5 and param_diff < 1e-4
    np.testing.assert_array_equal(got["queue_labels"], np.asarray(state.queue.labels))
