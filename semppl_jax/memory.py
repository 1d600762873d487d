"""Will the compiled step fit? XLA's memory analysis against the device's limit.

Checked once, after compiling and before the first step, so that a run that
cannot fit stops with numbers and remedies instead of an out-of-memory error
minutes into a pod's budget.
"""

from __future__ import annotations

from typing import Any

GIB = 1024 ** 3


class DoesNotFitError(RuntimeError):
    """The compiled step needs more memory per device than the device has."""


def step_bytes(compiled: Any) -> dict[str, int] | None:
    """Per-device bytes of a compiled step: arguments, outputs, temporaries, aliased and
    the peak estimate (arguments + outputs + temporaries - aliased); None where the
    backend has no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis must not stop training
        return None
    if m is None:
        return None
    out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               temporaries=m.temp_size_in_bytes, aliased=getattr(m, "alias_size_in_bytes", 0))
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def report(usage: dict[str, int] | None) -> str:
    if usage is None:
        return "memory analysis unavailable on this backend"
    return (f"per-device memory: arguments {usage['arguments'] / GIB:.3f} GiB, outputs {usage['outputs'] / GIB:.3f} "
            f"GiB, temporaries {usage['temporaries'] / GIB:.3f} GiB, aliased (donated) {usage['aliased'] / GIB:.3f}"
            f" GiB; peak about {usage['peak'] / GIB:.3f} GiB")


def device_limit(device: Any) -> int | None:
    """Bytes the allocator may use on ``device``. A CPU device's memory is the host's: the
    memory available now, shared by the process's CPU devices. None where neither is known."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        stats = None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"]
    if device.platform == "cpu":
        available = host_available_bytes()
        if available is not None:
            import jax

            return available // max(1, jax.local_device_count("cpu"))
    return None


def host_available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(usage: dict[str, int] | None, limit: int | None, config: Any, num_devices: int) -> None:
    """Raises :class:`DoesNotFitError`, with the remedies, when the step's peak exceeds ``limit``."""
    if usage is None or limit is None or usage["peak"] <= limit:
        return
    t, m = config.training, config.model
    per_device = t.batch_size // num_devices
    remedies = []
    if t.compute_dtype != "bfloat16":
        remedies.append("--config.training.compute_dtype=bfloat16 (about halves activations)")
    if m.remat == "none":
        remedies.append("--config.model.remat=block (recompute block activations in the backward pass)")
    remedies.append(f"a smaller per-device batch (now {per_device}: lower training.batch_size, "
                    f"or use more devices)")
    raise DoesNotFitError(
        f"the update step needs about {usage['peak'] / GIB:.2f} GiB per device (temporaries "
        f"{usage['temporaries'] / GIB:.2f} GiB) but the device allows {limit / GIB:.2f} GiB "
        f"({per_device} images per device, {t.compute_dtype}, remat={m.remat}). Remedies: "
        + "; ".join(remedies) + ".")
