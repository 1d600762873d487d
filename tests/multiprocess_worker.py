"""One process of the two-process test: 4 CPU devices each, JAX's CPU collectives.

Run by tests/test_multiprocess.py as ``python tests/multiprocess_worker.py PORT ID OUT``.
Feeds this process's half of each global batch and, on process 0, saves the
losses and final parameters for comparison with a 1-process x 8-device run (the
state placed by ``sharding.replicate``, which compares a fingerprint across processes;
a value that differs is refused on both).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(port: str, process_id: str, out: str) -> None:
    jax.config.update("jax_disable_most_optimizations", True)
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=int(process_id), local_device_ids=list(range(4)))
    from semppl_jax import sharding
    from semppl_jax import update_step as us
    from tests.test_sharded_step import make_batches, make_config

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    config = make_config()
    batches = make_batches(config, 3)
    pid, half = jax.process_index(), config.training.batch_size // 2
    mesh = sharding.make_mesh()
    state = sharding.replicate(jax.device_get(us.init_state(config, jax.random.key(0), 10, 10, 4)), mesh)
    step = sharding.shard_step(us.make_update_step(config, 10, 10, 4), mesh)
    losses = []
    for batch in batches:
        local = {k: v[pid * half:(pid + 1) * half] for k, v in batch.items()}
        state, metrics = step(state, sharding.shard_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    params = jax.tree.map(np.asarray, jax.device_get(state.online_params))
    try:  # a value that differs between the processes is refused on both, naming process 1
        sharding.replicate({"x": np.full(3, pid, np.float32)}, mesh)
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    if pid == 0:
        flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree.leaves_with_path(params)}
        np.savez(out, losses=np.array(losses), queue_labels=np.asarray(state.queue.labels), refused=refused, **flat)
    assert "process(es) [1]" in refused, refused
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
