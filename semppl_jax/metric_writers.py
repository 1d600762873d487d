"""Metrics to a JSON-lines file and TensorBoard event files; progress with an ETA."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import numpy as np
from etils import epath


class MetricWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and writes the
    same scalars as TensorBoard summaries. Only process 0 should create one.

    On resume from ``resume_step``, records after it (logged after the checkpoint
    the run resumes from, so about to be logged again) and a torn last line are
    dropped first: every step appears once."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 resume_step: int | None = None):
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / filename
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            tmp = workdir / f"{filename}.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step)}
        record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default():
                for k, v in record.items():
                    if k != "step":
                        tf.summary.write(k, tf.constant(v, tf.float32), step=int(step),
                                         metadata=_scalar_metadata())
            self._tb.flush()

    def write_arrays(self, step: int, **arrays: np.ndarray) -> None:
        """One JSON object of per-class (or other) arrays for ``step``, JSON-lines only."""
        record = {"step": int(step), **{k: np.asarray(v).tolist() for k, v in arrays.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _scalar_metadata():
    """TensorBoard's 'scalars' plugin tag, written without the tensorboard package."""
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = "scalars"
    return meta.SerializeToString()


def read_jsonl(path: str | epath.Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a crash mid-write) is skipped."""
    lines = [line for line in epath.Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


class Progress:
    """Steps/s and ETA over a moving window, as a one-line summary."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self._t0 = time.time()
        self._s0 = start_step
        self._last_t, self._last_s = self._t0, start_step

    def rate(self, step: int) -> float:
        now = time.time()
        rate = (step - self._last_s) / max(now - self._last_t, 1e-9)
        self._last_t, self._last_s = now, step
        return rate

    def line(self, step: int, rate: float) -> str:
        remaining = (self.total - step) / max(rate, 1e-9)
        pct = 100.0 * step / max(self.total, 1)
        return f"[{step}/{self.total} {pct:5.1f}%] {rate:.2f} steps/s, ETA {_fmt(remaining)}"


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
