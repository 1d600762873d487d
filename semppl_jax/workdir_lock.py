"""One writer per workdir: a lease in ``WORKDIR/LOCK``, taken and renewed by compare-and-swap.

Two trainings (or a training and an export) writing one workdir overwrite each
other's checkpoints and metrics. So whatever writes a workdir first takes its lease:
a small JSON object naming the holder (host, process id, start, mode) that the
holder rewrites every ``HEARTBEAT_SECS``. The lease is written with TensorStore's
conditional writes (the client Orbax uses), atomic on a local disk, a shared
filesystem and a bucket alike (Cloud Storage's generation preconditions): of two
runs racing for it, one wins; a renewal that finds the lease changed under it knows
it was taken over, and the run stops before its next save.

Is the holder still there? On this host (and process namespace) its process either
runs or not. Elsewhere the newcomer watches the lease for ``CONFIRM_SECS``, on its
own clock: a live holder renews it in that time, a dead one does not and is taken
over (so a restart after a crash waits about a minute, and clocks need not agree).
A multi-host run takes the lease once, on process 0, and every process learns the
outcome.
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

from semppl_jax import multihost, preemption
from semppl_jax.errors import WorkdirError
from semppl_jax.paths import is_uri, workdir_path

LEASE = "LOCK"
HEARTBEAT_SECS = 30.0
CONFIRM_SECS = 2 * HEARTBEAT_SECS + 5  # a live holder renews its lease within this


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclasses.dataclass
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    mode: str
    run: str
    pidns: int = 0  # the process-id namespace the pid belongs to (containers share host names)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, process {self.pid}, {self.mode} started {started}"

    def recently_renewed(self) -> bool:
        """By the holder's clock: a hint (the preflight's), not the decision ``acquire`` makes."""
        return time.time() - self.heartbeat < CONFIRM_SECS

    def here(self) -> bool:
        """Whether its process id can be checked from this process."""
        return self.host == socket.gethostname() and self.pidns == _pid_namespace() != 0

    def runs_here(self) -> bool:
        """On this host: its process still runs (not this one: a restarted container reuses ids)."""
        if self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's live process
        return True


def _store(workdir: str):
    import tensorstore as ts

    root = str(workdir_path(workdir)).rstrip("/") + "/"
    return ts.KvStore.open(root if is_uri(root) else {"driver": "file", "path": root}).result()


def read_holder(workdir: str) -> tuple[Holder | None, bytes]:
    """The lease's holder (None if there is none) and the lease's generation."""
    result = _store(workdir).read(LEASE).result()
    if result.state != "value":
        return None, result.stamp.generation
    try:
        fields = json.loads(result.value)
        known = {f.name for f in dataclasses.fields(Holder)}
        return Holder(**{k: v for k, v in fields.items() if k in known}), result.stamp.generation
    except (ValueError, TypeError):  # a damaged lease protects nothing
        return Holder("?", 0, 0.0, 0.0, "?", "?"), result.stamp.generation


def _watch(workdir: str, generation: bytes, seconds: float) -> bool:
    """Whether the lease changes within ``seconds`` (its holder is alive)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        if read_holder(workdir)[1] != generation:
            return True
    return False


class WorkdirLease:
    """This process's lease on ``workdir`` (process 0's, in a multi-host run)."""

    def __init__(self, workdir: str, mode: str):
        self.workdir, self.mode = workdir, mode
        now = time.time()
        self.me = Holder(socket.gethostname(), os.getpid(), now, now, mode, uuid.uuid4().hex[:12], _pid_namespace())
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
            if holder is not None:
                alive = holder.runs_here() if holder.here() else _watch(self.workdir, generation, CONFIRM_SECS)
                if alive:
                    raise WorkdirError(
                        f"the workdir {self.workdir} is in use by another run ({holder.describe()}). Wait for it "
                        f"to end or stop it, or use another workdir; a run that died is taken over (at once on "
                        f"the same host, else when its lease has not been renewed for {CONFIRM_SECS:.0f} s).")
                logging.warning("taking over the workdir %s from a run that is gone (%s)", self.workdir,
                                holder.describe())
            if not self._write(generation):
                raise WorkdirError(f"the workdir {self.workdir} was taken by another run at the same moment; "
                                   f"that run goes on, this one stops")
        except (PermissionError, NotADirectoryError, FileExistsError) as e:
            raise WorkdirError(f"the workdir {self.workdir} cannot be written ({e}); choose a directory this "
                               f"process may create and write") from e
        except ValueError as e:  # TensorStore's error for a path it cannot write
            if not any(s in str(e) for s in ("ermission", "ead-only", "Not a directory", "Is a directory")):
                raise
            raise WorkdirError(f"the workdir {self.workdir} cannot be written ({e})") from e
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lease")
        self._thread.start()

    def _write(self, if_equal: bytes) -> bool:
        self.me.heartbeat = time.time()
        stamp = _store(self.workdir).write(LEASE, json.dumps(dataclasses.asdict(self.me)), if_equal=if_equal).result()
        if stamp.generation == b"":
            return False
        self._generation = stamp.generation
        return True

    def _renew(self) -> None:
        if self._write(self._generation):
            return
        holder, generation = read_holder(self.workdir)
        if holder is not None and holder.run == self.me.run:  # our last renewal landed; its reply did not
            self._generation = generation
            return
        self.lost = True
        logging.error("the lease on %s was taken over (%s): this run stops before its next save", self.workdir,
                      holder.describe() if holder else "released")

    def _beat(self) -> None:
        while not self.lost and not self._stop.wait(HEARTBEAT_SECS):
            try:
                self._renew()
            except Exception as e:  # noqa: BLE001 - a renewal that fails now may pass at the next beat
                logging.warning("renewing the lease on %s failed (%s); trying again", self.workdir, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_SECS)  # a renewal stuck in retries must not hold the exit
        if not self.lost and self._generation:
            try:
                _store(self.workdir).write(LEASE, None, if_equal=self._generation).result()
            except Exception as e:  # noqa: BLE001 - a lease left behind is taken over when found dead
                logging.warning("releasing the lease on %s failed: %s", self.workdir, e)


_HELD: dict[str, WorkdirLease] = {}  # this process's leases, by workdir


def check_still_held(workdir: str) -> None:
    """Raises on every process when this run's lease on ``workdir`` was taken over (a collective:
    call it where every process does, e.g. before a save)."""
    lease = _HELD.get(str(workdir_path(workdir)))
    lost = multihost.allgather_json(bool(lease is not None and lease.lost))
    if any(lost):
        raise WorkdirError(f"another run took over the workdir {workdir} (this run's lease was not renewed in "
                           f"time); this run stops without saving, so that one writer remains")


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
    key = str(workdir_path(workdir))
    if lease is not None:
        _HELD[key] = lease
    try:
        with preemption.released_on_forced_exit(lease.release) if lease is not None else contextlib.nullcontext():
            yield lease
    finally:
        _HELD.pop(key, None)
        if lease is not None:
            lease.release()
