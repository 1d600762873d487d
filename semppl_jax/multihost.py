"""Decisions every process must share: process 0 decides, the others are told.

Anything that leads into a collective (which checkpoint step to read, whether a
cached file is valid, what a folder holds) must be identical on all processes, so
it is decided once, on process 0, and broadcast; a failure there is broadcast
too and raised on every process alike, so no process is left waiting in a
collective that the others skipped. With one process these are plain calls.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable
from typing import Any

import numpy as np


def _process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _broadcast_bytes(data: bytes, is_source: bool) -> bytes:
    from jax.experimental import multihost_utils

    size = int(multihost_utils.broadcast_one_to_all(np.array(len(data) if is_source else 0, np.int64)))
    buf = np.zeros(max(size, 1), np.uint8)
    if is_source:
        buf[:size] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()[:size]


def _raise_as(kind: str, message: str) -> None:
    from semppl_jax import errors, preemption

    if kind == "Preempted":
        raise preemption.Preempted()
    error = getattr(errors, kind, None) or getattr(builtins, kind, None)
    if not (isinstance(error, type) and issubclass(error, Exception)):
        error = RuntimeError
    raise error(message)


def agreed(work: Callable[[], Any], what: str) -> Any:
    """``work()`` on every process; if it fails on any, every process raises (the failing
    ones their own error, the others naming the first that failed), so none goes on alone."""
    index, count = _process()
    try:
        value, outcome = work(), None
    except Exception as e:  # noqa: BLE001 - told to every process, raised below
        value, outcome = e, f"{type(e).__name__}: {e}"
    outcomes = allgather_json(outcome) if count > 1 else [outcome]
    if outcome is not None:
        raise value
    failed = [p for p, o in enumerate(outcomes) if o is not None]
    if failed:
        raise RuntimeError(f"{what} failed on process {failed[0]}: {outcomes[failed[0]]}")
    return value


def decided_by_process_zero(decide: Callable[[], Any]) -> Any:
    """``decide()`` on process 0 alone; its JSON-able result, or its error, on every process.

    Process 0 re-raises its own exception; the others raise the same type, where it is a
    built-in or one of ``errors.py``'s (``RuntimeError`` otherwise), with the same message."""
    index, count = _process()
    if count == 1:
        return decide()
    error: BaseException | None = None
    payload = b""
    if index == 0:
        try:
            payload = json.dumps({"value": decide()}).encode()
        except BaseException as e:  # noqa: BLE001 - told to every process (a preemption too), raised below
            error = e
            payload = json.dumps({"error": type(e).__name__, "message": str(e)}).encode()
    told = json.loads(_broadcast_bytes(payload, index == 0))
    if error is not None:
        raise error
    if "error" in told:
        _raise_as(told["error"], f"{told['message']} (on process 0)")
    return told["value"]


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order (small values: reports, flags)."""
    index, count = _process()
    if count == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(count, -1)
    return [json.loads(rows[p, :int(sizes[p])].tobytes()) for p in range(count)]


def barrier(name: str) -> None:
    """Every process waits here until all have arrived."""
    if _process()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
