"""Evaluation and export read one checkpoint step, chosen on process 0 and broadcast.

Two real processes read a workdir holding steps 2 and 4; process 1 sees the
directory as a lagging filesystem (or a listing taken a moment earlier) would, its
newest step missing. Both must read step 4, the encoder and the whole state alike.
"""

import json
import os
import subprocess
import sys

from experiments import tiny
from semppl_jax import jobs
from tests.conftest import REPO
from tests.test_multiprocess import free_port

WORKER = """
import json, sys
import jax
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
import numpy as np
import orbax.checkpoint as ocp
from experiments import tiny
from semppl_jax import checkpointing, evaluation
if jax.process_index() == 1:  # this host's view lags: the newest step is not listed yet
    listed = ocp.utils.checkpoint_steps
    ocp.utils.checkpoint_steps = lambda d, *a, **k: [s for s in listed(d, *a, **k) if s != max(listed(d, *a, **k))]
    assert checkpointing.latest_step(sys.argv[3]) == 2
config = tiny.get_config()
params, _, step = checkpointing.restore_encoder(sys.argv[3], config)
_, state_step = checkpointing.restore_state(sys.argv[3], config)
pre = evaluation.load_pretrained(sys.argv[3], config)
total = float(sum(np.abs(np.asarray(v)).sum() for m in params.values() for v in m.values()))
json.dump(dict(step=step, state_step=state_step, pretrained_step=pre.step, total=total), open(sys.argv[4], "w"))
jax.distributed.shutdown()
"""


def test_both_processes_read_process_zeros_step(tmp_path):
    config = tiny.get_config()
    config.training.update(num_steps=4, checkpoint_every_steps=2, keep_checkpoints=5)
    workdir = tmp_path / "run"
    jobs.train(config, str(workdir))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    port = free_port()
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(workdir), str(outs[i])],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    got = [json.loads(o.read_text()) for o in outs]
    assert got[0] == got[1] and got[0]["step"] == got[0]["state_step"] == got[0]["pretrained_step"] == 4


FETCH_WORKER = """
import json, os, sys
import jax
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
from semppl_jax import label_subsets
fetched = []


def download(url, target):  # the network, stood in: SimCLR's list from a local copy
    fetched.append(url)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    open(target, "w").write("n01440764_10026.JPEG\\nn01440764_10027.JPEG\\n")
    return target


label_subsets._download = download
path = label_subsets.resolve_subset_file("1pct", sys.argv[3], fetch=True)
names = len(label_subsets.read_subset_list(path))
json.dump(dict(path=path, fetched=len(fetched), names=names), open(sys.argv[4], "w"))
jax.distributed.shutdown()
"""


def test_label_lists_are_fetched_once_by_process_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no list in ~/.cache on either host
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("SEMPPL_SUBSET_DIR", None)
    port, cache = free_port(), str(tmp_path / "bucket" / "imagenet_subsets")
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", FETCH_WORKER, str(port), str(i), cache, str(outs[i])],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    got = [json.loads(o.read_text()) for o in outs]
    assert [g["fetched"] for g in got] == [1, 0]  # process 0 alone wrote it
    assert got[0]["path"] == got[1]["path"] == f"{cache}/1percent.txt" and got[1]["names"] == 2
    assert os.listdir(cache) == ["1percent.txt"]  # no temporary file left behind
