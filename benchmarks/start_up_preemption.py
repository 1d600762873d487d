"""Does a preemption notice during start-up end every process in 75, and how soon?

Starts the launcher with 2 processes x 4 CPU devices (the tiny preset, as
``tests/test_multihost_launcher.py`` does), waits for process 1's "train set:" line,
sends it SIGTERM after a random delay (the notice may land anywhere in the rest of
start-up: broadcasts, the state's fingerprint, the compile, the agreement before the
loop) and records each process's exit code and time. A process held in a collective
that the stopped one never joins is ended by its watcher ``preemption.STUCK_SECONDS``
later; one still running after ``--limit`` seconds is a hang, and gets SIGABRT so that
its Python stacks land in its log.

    python benchmarks/start_up_preemption.py --runs=12 --seed=0 --workdir=/tmp/start_up_preemption

Prints one JSON line a run and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.test_multihost_launcher import TRAIN_ARGS, _launch, abort_with_stacks  # noqa: E402
from tests.test_multiprocess import free_port  # noqa: E402


def one_run(directory: str, delay: float, limit: float) -> dict:
    os.makedirs(directory, exist_ok=True)
    logs = [open(os.path.join(directory, f"p{i}.log"), "w") for i in range(2)]
    procs = _launch(TRAIN_ARGS + [f"--workdir={directory}/run"], free_port(), logs)
    while "train set:" not in open(os.path.join(directory, "p1.log")).read():
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a process ended before start-up: see {directory}")
        time.sleep(0.05)
    time.sleep(delay)
    procs[1].send_signal(signal.SIGTERM)
    t0, ended = time.time(), {}
    while len(ended) < 2 and time.time() - t0 < limit:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = (round(time.time() - t0, 1), p.returncode)
        time.sleep(0.1)
    abort_with_stacks(procs)
    held = [i for i in range(2) if "still held" in open(os.path.join(directory, f"p{i}.log")).read()]
    return dict(delay=round(delay, 2), seconds=[ended.get(i, (None, None))[0] for i in range(2)],
                codes=[ended.get(i, (None, None))[1] for i in range(2)], held=held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_delay", type=float, default=4.0, help="seconds after process 1's 'train set:' line")
    parser.add_argument("--limit", type=float, default=150.0, help="seconds after SIGTERM that count as a hang")
    parser.add_argument("--workdir", default="/tmp/start_up_preemption")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    for k in range(args.runs):
        r = one_run(os.path.join(args.workdir, str(k)), rng.uniform(0, args.max_delay), args.limit)
        results.append(r)
        print(json.dumps(r), flush=True)
    exited = [r for r in results if r["codes"] == [75, 75]]
    slowest = max((max(r["seconds"]) for r in exited), default=None)
    print(json.dumps(dict(runs=len(results), both_exited_75=len(exited), held_in_a_collective=sum(bool(r["held"])
                                                                                                  for r in results),
                          slowest_exit_seconds=slowest)), flush=True)


if __name__ == "__main__":
    main()
