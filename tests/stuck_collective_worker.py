"""One of two processes whose start-up a notice stops while process 0 waits in a collective.

Run by tests/test_multihost_launcher.py as ``python tests/stuck_collective_worker.py PORT ID WORKDIR``.
Both take the workdir (process 0 holds the lease) and meet once in a collective; then
process 0 enters a second collective alone, which process 1, stopped by the notice
(SIGTERM) before it gets there, never joins. Both must still exit 75, and the lease
must be released.
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from semppl_jax import preemption  # noqa: E402

STUCK_SECONDS = 5.0  # the launcher's 10 s, shortened for the test


def main(port: str, process_id: str, workdir: str) -> None:
    from semppl_jax import distributed, multihost, workdir_lock

    preemption.STUCK_SECONDS = STUCK_SECONDS
    distributed.initialize(f"localhost:{port}", 2, int(process_id))
    with workdir_lock.held(workdir, "train"), preemption.exit_at_once():
        multihost.barrier("both")  # the processes' collectives are connected
        if int(process_id) == 0:
            print("waiting alone", flush=True)
            multihost.barrier("process 0 alone")
            raise AssertionError("the collective that process 1 never joins returned")
        print("ready", flush=True)
        while True:
            time.sleep(0.05)


if __name__ == "__main__":
    preemption.install()
    try:
        main(*sys.argv[1:4])
    except preemption.Preempted as e:
        print(e, flush=True)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)
