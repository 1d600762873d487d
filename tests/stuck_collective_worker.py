"""One of two processes whose start-up a notice (SIGTERM to process 1) stops.

Run by tests/test_multihost_launcher.py as ``python tests/stuck_collective_worker.py PORT ID WORKDIR MODE``.
Both take the workdir (process 0 holds the lease) and meet once in a collective. Then:
- ``stuck``: process 0 enters a second collective alone, which process 1, stopped by the
  notice before it gets there, never joins: process 0's watcher must end it;
- ``agree``: process 0 waits in ``agree_to_start``; process 1 sees the notice while the
  watcher's interrupt cannot reach it (a long native call) and then reaches the
  agreement too: both stop there, and neither enters the loop's collective alone.
Both must exit 75, and the lease must be released.
"""

import os
import signal
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from semppl_jax import preemption  # noqa: E402

STUCK_SECONDS = 5.0  # the launcher's 10 s, shortened for the test


def main(port: str, process_id: str, workdir: str, mode: str) -> None:
    from jax.experimental import multihost_utils

    from semppl_jax import distributed, multihost, workdir_lock

    preemption.STUCK_SECONDS = STUCK_SECONDS
    distributed.initialize(f"localhost:{port}", 2, int(process_id))
    first = int(process_id) == 0
    with workdir_lock.held(workdir, "train"), preemption.exit_at_once():
        multihost.barrier("both")  # the processes' collectives are connected
        if mode == "stuck" and first:
            print("waiting alone", flush=True)
            multihost.barrier("process 0 alone")
            raise AssertionError("the collective that process 1 never joins returned")
        if mode == "agree":
            if not first:  # a long native call: the watcher's interrupt waits
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
                print("ready", flush=True)
                while not preemption.received():
                    time.sleep(0.05)
            else:
                print("agreeing", flush=True)
            preemption.agree_to_start(multihost_utils.reached_preemption_sync_point, 0)
            multihost.barrier("the first step")
            raise AssertionError("entered the loop")
        print("ready", flush=True)
        while True:
            time.sleep(0.05)


if __name__ == "__main__":
    preemption.install()
    try:
        main(*sys.argv[1:5])
    except preemption.Preempted as e:
        print(e, flush=True)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)
