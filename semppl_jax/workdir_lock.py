"""One writer per workdir: a lease in ``WORKDIR/LOCK``, taken and renewed by compare-and-swap.

Two trainings (or a training and an export) writing one workdir overwrite each
other's checkpoints and metrics. So whatever writes a workdir first takes its lease:
a small JSON object naming the holder (host, process id, start, mode) with a
heartbeat the holder renews every ``HEARTBEAT_SECS``. The lease is written with
TensorStore's conditional writes (the client Orbax uses), which are atomic on a
local disk, a shared filesystem and a bucket alike (Cloud Storage's generation
preconditions): of two runs racing for it, one wins; a renewal that finds the
lease changed under it knows it was taken over. No ``flock``, which a bucket lacks.

A holder that died is taken over: at once when it ran on this host and its process
is gone, otherwise once its heartbeat is ``STALE_SECS`` old. A multi-host run takes
the lease once, on process 0, and every process learns the outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from absl import logging

from semppl_jax import multihost
from semppl_jax.errors import WorkdirError
from semppl_jax.paths import is_uri, workdir_path

LEASE = "LOCK"
HEARTBEAT_SECS = 30.0
STALE_SECS = 300.0


@dataclasses.dataclass
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    mode: str
    run: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return (f"host {self.host}, process {self.pid}, {self.mode} started {started}, last heartbeat "
                f"{time.time() - self.heartbeat:.0f} s ago")

    def alive(self) -> bool:
        """Its heartbeat is fresh and, on this host, its process still runs."""
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass  # another user's live process
        return time.time() - self.heartbeat < STALE_SECS


def _store(workdir: str):
    import tensorstore as ts

    root = str(workdir_path(workdir)).rstrip("/") + "/"
    spec = root if is_uri(root) else {"driver": "file", "path": root}
    return ts.KvStore.open(spec).result()


def read_holder(workdir: str) -> tuple[Holder | None, bytes]:
    """The lease's holder (None if there is none) and the lease's generation."""
    result = _store(workdir).read(LEASE).result()
    if result.state != "value":
        return None, result.stamp.generation
    try:
        return Holder(**json.loads(result.value)), result.stamp.generation
    except (ValueError, TypeError):  # a damaged lease protects nothing
        return Holder("?", 0, 0.0, 0.0, "?", "?"), result.stamp.generation


class WorkdirLease:
    """This process's lease on ``workdir`` (process 0's, in a multi-host run)."""

    def __init__(self, workdir: str, mode: str):
        self.workdir, self.mode = workdir, mode
        now = time.time()
        self.me = Holder(socket.gethostname(), os.getpid(), now, now, mode, uuid.uuid4().hex[:12])
        self._generation = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> None:
        """Takes the lease, or raises :class:`WorkdirError` naming the live holder."""
        try:
            if not is_uri(self.workdir):  # a bucket has no directories to make
                workdir_path(self.workdir).mkdir(parents=True, exist_ok=True)
            holder, generation = read_holder(self.workdir)
            if holder is not None and holder.alive():
                raise WorkdirError(
                    f"the workdir {self.workdir} is in use by another run ({holder.describe()}). Wait for it to "
                    f"end or stop it, or use another workdir; a run that died is taken over (at once on the same "
                    f"host, else {STALE_SECS:.0f} s after its last heartbeat).")
            if holder is not None:
                logging.warning("taking over the workdir %s from a run that is gone (%s)", self.workdir,
                                holder.describe())
            if not self._write(generation):
                raise WorkdirError(f"the workdir {self.workdir} was taken by another run at the same moment; "
                                   f"that run goes on, this one stops")
        except (PermissionError, NotADirectoryError, FileExistsError) as e:
            raise WorkdirError(f"the workdir {self.workdir} cannot be written ({e}); choose a directory this "
                               f"process may create and write") from e
        except ValueError as e:  # TensorStore's error for a path it cannot write
            if "ermission" in str(e) or "ead-only" in str(e) or "Not a directory" in str(e):
                raise WorkdirError(f"the workdir {self.workdir} cannot be written ({e})") from e
            raise
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lease")
        self._thread.start()

    def _write(self, if_equal: bytes) -> bool:
        self.me.heartbeat = time.time()
        stamp = _store(self.workdir).write(LEASE, json.dumps(dataclasses.asdict(self.me)), if_equal=if_equal).result()
        if stamp.generation == b"":
            return False
        self._generation = stamp.generation
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECS):
            try:
                if not self._write(self._generation):
                    self.lost = True
                    holder, _ = read_holder(self.workdir)
                    logging.error("the lease on %s was taken over (%s): this run no longer holds its workdir",
                                  self.workdir, holder.describe() if holder else "released")
                    return
            except Exception as e:  # noqa: BLE001 - a renewal that fails now may succeed at the next beat
                logging.warning("renewing the lease on %s failed (%s); trying again", self.workdir, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost and self._generation:
            try:
                _store(self.workdir).write(LEASE, None, if_equal=self._generation).result()
            except Exception as e:  # noqa: BLE001 - a lease left behind is taken over when found stale
                logging.warning("releasing the lease on %s failed: %s", self.workdir, e)


@contextlib.contextmanager
def held(workdir: str, mode: str) -> Iterator[WorkdirLease | None]:
    """Within: ``workdir`` is this run's (process 0 holds the lease; every process is told
    whether it got it, and raises alike when another live run holds it)."""
    import jax

    lease = WorkdirLease(workdir, mode) if jax.process_index() == 0 else None

    def take() -> bool:
        lease.acquire()
        return True

    multihost.decided_by_process_zero(take)  # process 0's refusal is raised on every process
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()
