"""The benchmark scripts' timer: mean wall-clock seconds a call, after one warm-up call
(which compiles), waiting for the device at the end."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax


def seconds_per_call(fn: Callable, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters
