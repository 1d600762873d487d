"""Starting a multi-process run: ``jax.distributed.initialize`` with every accelerator used.

Under Slurm, JAX gives each process one device, ``[SLURM_LOCALID]``, unless told
otherwise: right for one task per GPU that sees all the node's GPUs, wrong for one
task per node (it would drive one GPU of eight) and for tasks bound to their own GPU
(``--gpus-per-task``: each sees one GPU, numbered 0). ``slurm_local_device_ids``
says which GPUs this task drives in each layout, and ``initialize`` passes them on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")


def tasks_on_this_node(env: Mapping[str, str]) -> int:
    """This node's task count, from Slurm's compressed list (e.g. ``'8(x2),4'``) and ``SLURM_NODEID``."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        if "SLURM_NTASKS_PER_NODE" in env:
            return int(env["SLURM_NTASKS_PER_NODE"])
        raise ValueError("Slurm sets neither SLURM_STEP_TASKS_PER_NODE nor SLURM_TASKS_PER_NODE")
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot read Slurm's tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[int(env.get("SLURM_NODEID", 0))]


def visible_gpus(env: Mapping[str, str]) -> int | None:
    """GPUs this task can see: ``CUDA_VISIBLE_DEVICES`` if set, else Slurm's per-node count."""
    if env.get("CUDA_VISIBLE_DEVICES") not in (None, ""):
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    return None


def slurm_local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
    """The GPUs (local ordinals) this Slurm task drives; None outside Slurm or without GPUs.

    - Tasks that see all the node's GPUs (``--gpus-per-node``): the node's GPUs split
      evenly over its tasks by ``SLURM_LOCALID`` (8 tasks: one each; 1 task: all 8).
    - Tasks bound to their own GPUs (``--gpus-per-task``: fewer visible than the node
      has): every GPU the task sees.
    """
    env = os.environ if env is None else env
    if not all(v in env for v in SLURM_VARS):
        return None
    seen = visible_gpus(env)
    if not seen:
        return None
    on_node = int(env.get("SLURM_GPUS_ON_NODE") or seen)
    if seen < on_node:  # bound: this task sees its own GPUs only
        return list(range(seen))
    tasks, local = tasks_on_this_node(env), int(env["SLURM_LOCALID"])
    if seen % tasks:
        raise ValueError(f"Slurm starts {tasks} tasks on this node with {seen} GPUs, which do not divide "
                         f"evenly; use one task per GPU (--ntasks-per-node={seen}) or one task per node")
    per_task = seen // tasks
    return list(range(local * per_task, (local + 1) * per_task))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """``jax.distributed.initialize``; on Slurm GPUs with this task's device ids."""
    import jax

    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    ids = slurm_local_device_ids()
    if ids is not None:
        kwargs["local_device_ids"] = ids
    jax.distributed.initialize(**kwargs)
