"""Preemption notices: a SIGTERM at any moment ends the job with exit status 75.

Before training's first step there is nothing to save, so the job stops at once;
once training runs, the loop saves at a step every process agrees on and then
stops (``periodic_actions.CheckpointAndStop``). Either way the status is 75
(EX_TEMPFAIL, "try again"), which the launch scripts read as "run me again".

Where a notice is seen:
- **several processes**: ``jax.distributed.initialize`` installs JAX's own SIGTERM
  handler, which records the notice in the coordination service under
  ``RECEIVED_PREEMPTION_NOTICE``, visible to every process, and drives the agreed
  save. A Python handler would replace it, so none is installed: during start-up a
  watcher thread polls that key and interrupts the main thread on every process. A
  main thread that does not stop is held in a collective that a process already gone
  will never join (process 0's decisions are broadcast, the state's fingerprint is
  compared, Orbax meets at barriers): after ``STUCK_SECONDS`` the watcher releases what
  the run holds, leaves the distributed service (the others wait for it there) and
  exits 75. Start-up ends in ``agree_to_start``: all processes enter the loop, or none;
- **one process**: a Python handler, which raises at once during start-up and only
  records the notice once the loop runs (the loop saves, then stops).

``install()`` runs first in the launcher (a SIGTERM during imports or
``jax.distributed.initialize`` also ends in 75); ``exit_at_once()`` brackets
start-up and every job that has nothing to save.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging

# Exit status of a job stopped by a preemption notice: EX_TEMPFAIL from sysexits.h.
# Non-zero, so schedulers do not mark the job Completed; distinct from a crash (1)
# and from a kill (137, 143).
PREEMPTED_EXIT_CODE = 75
NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # JAX's preemption sync manager writes it on SIGTERM
_WAKE_SIGNAL = signal.SIGUSR2  # how the watcher interrupts the main thread (a Python handler)
_POLL_SECONDS = 0.5
STUCK_SECONDS = 10.0  # a main thread back in Python leaves start-up well within this


class Preempted(BaseException):
    """A preemption notice stopped the job; ``step`` is the step saved first, if any.

    A ``BaseException``, like ``KeyboardInterrupt``: raised from a signal handler at any
    point of start-up, it must not be swallowed by a library's ``except Exception``."""

    def __init__(self, step: int | None = None):
        saved = "nothing to save yet" if step is None else f"saved step {step}"
        super().__init__(f"preempted ({saved}); rerun the same command to resume")
        self.step = step


_state = dict(notice=False, at_once=False, watching=False, armed=False)
_releases: list[Callable[[], None]] = []  # what a forced exit releases first (the workdir's lease)


def _on_sigterm(signum, frame) -> None:
    _state["notice"] = True
    _tell_the_others()
    if _state["at_once"]:
        raise Preempted()


def _tell_the_others() -> None:
    """A SIGTERM that reaches this handler while ``jax.distributed.initialize`` connects
    (JAX installs its own handler only after) is recorded where JAX's would record it,
    so that the other processes' watchers stop them too."""
    client = _distributed_client()
    if client is None:
        return
    try:
        client.key_value_set(NOTICE_KEY, datetime.datetime.now(datetime.UTC).isoformat())
    except Exception:  # noqa: BLE001 - the key exists already (another notice): told
        pass


def _on_wake(signum, frame) -> None:
    """The watcher's interrupt: counts only while armed, within start-up (never in the loop).
    It disarms as it raises: a main thread that leaves by itself is not ended by the watcher."""
    if _state["armed"] and _state["at_once"]:
        _state["armed"] = False
        raise Preempted()


@contextlib.contextmanager
def _wake_held_back() -> Iterator[None]:
    """Within: the watcher's interrupt waits (delivered, and judged by ``_on_wake``, on leaving;
    one already caught runs as the mask is set, raising from here)."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {_WAKE_SIGNAL})
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {_WAKE_SIGNAL})


def install() -> None:
    """The single-process SIGTERM handler (replaced by JAX's when the job is distributed)."""
    _state.update(notice=False, at_once=True)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _distributed_client():
    from jax._src import distributed  # the coordination service's client: no public accessor

    return distributed.global_state.client


def local_notice() -> bool:
    """Whether this process's own handler saw a SIGTERM (the single-process loop's check)."""
    return _state["notice"]


def received() -> bool:
    """Whether a notice arrived: on any process when distributed, else on this one."""
    if _state["notice"]:
        return True
    client = _distributed_client()
    if client is None:
        return False
    try:
        client.key_value_try_get(NOTICE_KEY)
    except Exception:  # noqa: BLE001 - NOT_FOUND: no notice yet
        return False
    return True


def _watch(stop: threading.Event, main_thread: int) -> None:
    """Several processes: interrupts the main thread once a notice is in, unless the loop runs;
    ends the process if the main thread has not left start-up ``STUCK_SECONDS`` later. The
    notice stays the service's: ``_state['notice']`` is this process's own handler's alone,
    which the loop reads, and must not differ between processes."""
    while not stop.wait(_POLL_SECONDS):
        if _state["armed"] and _state["at_once"] and received():
            signal.pthread_kill(main_thread, _WAKE_SIGNAL)
            if not stop.wait(STUCK_SECONDS) and _state["armed"]:  # not raised, not through the agreement
                _exit_stuck(main_thread)
            return


def _exit_stuck(main_thread: int) -> None:
    """The main thread has not returned to Python: it waits in a collective that another
    process, already stopped, will not join (or in a long compile or restore). Nothing is
    saved before the first step, so nothing is lost: release what the run holds, leave the
    distributed service (the stopped processes wait in its shutdown barrier for this one)
    and exit 75 without the main thread."""
    logging.warning("preempted (nothing to save yet), but start-up is still held %.0f s later, most likely in a "
                    "collective that another process, already stopped, will not join; exiting without it. Held at %s",
                    STUCK_SECONDS, _held_at(sys._current_frames().get(main_thread)))
    for release in reversed(list(_releases)):
        try:
            release()
        except Exception as e:  # noqa: BLE001 - exiting anyway; each release is tried
            logging.warning("releasing %s before exiting failed: %s", release, e)
    try:
        import jax

        jax.distributed.shutdown()
    except Exception as e:  # noqa: BLE001 - exiting anyway
        logging.warning("leaving the distributed service failed: %s", e)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(PREEMPTED_EXIT_CODE)


def _held_at(frame) -> str:
    """Where the main thread waits: this project's two innermost calls, then the innermost frame."""
    if frame is None:
        return "(unknown)"
    stack = traceback.extract_stack(frame)
    ours = [f for f in stack if f"{os.sep}semppl_jax{os.sep}" in f.filename]
    return " -> ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in [*ours[-2:], stack[-1]])


@contextlib.contextmanager
def released_on_forced_exit(release: Callable[[], None]) -> Iterator[None]:
    """Within: a forced exit (see ``_exit_stuck``) calls ``release`` first."""
    _releases.append(release)
    try:
        yield
    finally:
        _releases.remove(release)


@contextlib.contextmanager
def exit_at_once() -> Iterator[None]:
    """Within: a notice raises :class:`Preempted` in the main thread at once (nothing to save)."""
    if received():
        raise Preempted()
    previous = _state["at_once"]
    _state["at_once"] = True
    stop = threading.Event()
    watcher = None
    if (not _state["watching"] and _distributed_client() is not None
            and threading.current_thread() is threading.main_thread()):
        signal.signal(_WAKE_SIGNAL, _on_wake)  # kept after: a late interrupt must find a handler, not SIG_DFL
        watcher = threading.Thread(target=_watch, args=(stop, threading.get_ident()), daemon=True,
                                   name="preemption-watcher")
        _state.update(watching=True, armed=True)
        watcher.start()
    try:
        yield
    finally:
        stop.set()  # leaving by itself: the watcher neither ends nor interrupts it
        if watcher is not None:
            _state["armed"] = False  # from here a late interrupt finds _on_wake disarmed
            watcher.join()
            _state["watching"] = False
        _state["at_once"] = previous


def agree_to_start(reached_step: Callable[[int], Any], start_step: int) -> None:
    """The last collective of start-up: every process enters the training loop, or none.

    Each first reports ``start_step`` to JAX's preemption sync (``reached_step``: the
    checkpointer's ``reached_preemption``), so that a notice from here on is saved at the
    step after it (its counters start at 0: a resumed run would otherwise be given step 1,
    which it never reaches). Then each says whether it has seen a notice; if any has, all
    stop (75). Else a notice is the loop's: an interrupt already on its way is held back
    and then finds the wake disarmed, so no process stops alone and leaves the others in
    the first step's all-reduce."""
    if _distributed_client() is None:
        return
    from semppl_jax import multihost

    reached_step(start_step)
    with _wake_held_back():
        if any(multihost.allgather_json(received())):
            raise Preempted()
        _state["armed"] = False


@contextlib.contextmanager
def save_first() -> Iterator[None]:
    """Within (the training loop): a notice is only recorded; the loop saves, then stops."""
    previous = _state["at_once"]
    _state["at_once"] = False
    try:
        yield
    finally:
        _state["at_once"] = previous
