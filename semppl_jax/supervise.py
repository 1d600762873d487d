r"""``python -m semppl_jax.supervise --log_dir=DIR -- COMMAND...``: a command whose output and
exit status are kept in ``DIR``, a bucket folder or a local one.

On a TPU VM the run must outlive the ssh session that started it, and a preempted
slice takes the workers' home directories with it. So each worker's command runs
under this supervisor, detached from any terminal (``launch/tpu_worker.sh``), and
what it says is kept beside the checkpoints:

- ``DIR/output.log``: the command's stdout and stderr, flushed every ``FLUSH_SECS``
  (``appendable.py``: numbered parts on a bucket, never rewritten whole);
- ``DIR/status``: ``key value`` lines for the launcher's shell to read: ``state``
  (``running``, then ``exited``), ``host``, ``pid``, ``started``, ``heartbeat`` (Unix
  seconds, every ``HEARTBEAT_SECS``) and, at the end, ``exit_status``.

SIGTERM, SIGINT and SIGHUP sent to the supervisor are passed on to the command, whose
own handlers save and exit 75 (``preemption.py``). The supervisor exits with the
command's status (128 + N when a signal N killed it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from etils import epath

from semppl_jax import appendable
from semppl_jax.paths import is_uri

FLUSH_SECS = 15.0
HEARTBEAT_SECS = 60.0


def write_status(folder: epath.Path, **fields) -> None:
    text = "".join(f"{k} {v}\n" for k, v in fields.items())
    tmp = folder / f"status.tmp.{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(folder / "status")


def read_status(folder: str | os.PathLike) -> dict[str, str]:
    path = epath.Path(folder) / "status"
    if not path.exists():
        return {}
    return dict((line.split(" ", 1) + [""])[:2] for line in path.read_text().splitlines() if line.strip())


def _pump(stream, out: appendable.AppendOnlyFile, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace")
        sys.stdout.write(text)
        sys.stdout.flush()
        with lock:
            out.write(text)


def supervise(log_dir: str, command: Sequence[str]) -> int:
    """Runs ``command``; returns its exit status (see the module doc)."""
    folder = epath.Path(log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out = appendable.AppendOnlyFile(folder / "output.log")
    lock = threading.Lock()
    flush_secs = FLUSH_SECS if is_uri(folder) else 1.0
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    reader = threading.Thread(target=_pump, args=(proc.stdout, out, lock), daemon=True)
    reader.start()
    info = dict(host=socket.gethostname(), pid=os.getpid(),
                started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_status(folder, state="running", heartbeat=int(time.time()), **info)
    last_flush = last_beat = time.monotonic()
    while proc.poll() is None:
        time.sleep(0.2)
        now = time.monotonic()
        if now - last_flush >= flush_secs:
            with lock:
                out.flush()
            last_flush = now
        if now - last_beat >= HEARTBEAT_SECS:
            write_status(folder, state="running", heartbeat=int(time.time()), **info)
            last_beat = now
    reader.join(timeout=30)
    status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    with lock:
        out.close()
    write_status(folder, state="exited", heartbeat=int(time.time()), exit_status=status, **info)
    return status


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if "--" not in args or not args[0].startswith("--log_dir="):
        print("usage: python -m semppl_jax.supervise --log_dir=DIR -- COMMAND...", file=sys.stderr)
        return 2
    command = args[args.index("--") + 1:]
    if not command:
        print("supervise: no command after --", file=sys.stderr)
        return 2
    return supervise(args[0].split("=", 1)[1], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
