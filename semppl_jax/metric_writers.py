"""Metrics to a JSON-lines file and TensorBoard event files; progress with an ETA."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Mapping

import numpy as np
from etils import epath

from semppl_jax import appendable
from semppl_jax.errors import WorkdirError
from semppl_jax.paths import io_error, is_uri

BUCKET_FLUSH_SECS = 30.0  # a bucket workdir's metrics reach it at most this late
_STOP = object()


class MetricWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and writes the
    same scalars as TensorBoard summaries. Only process 0 should create one.

    The loop never waits on the disk or bucket: records are handed to a background
    thread, which writes a local workdir at once and a bucket every
    ``BUCKET_FLUSH_SECS``, as parts that are never rewritten whole
    (``appendable.py``; TensorBoard's event file is started anew at the same size).
    ``close`` writes what is left; a write error surfaces at the next ``write``.

    On resume from ``resume_step``, records after it (logged after the checkpoint
    the run resumes from, so about to be logged again) and a torn last line are
    dropped first: every step appears once."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 resume_step: int | None = None, flush_secs: float | None = None):
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / filename
        if resume_step is not None and appendable.exists(self.path):
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            appendable.rewrite(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        remote = is_uri(self.path)
        self._flush_secs = (BUCKET_FLUSH_SECS if remote else 0.0) if flush_secs is None else flush_secs
        self._board = str(workdir / "tensorboard") if tensorboard else None
        self._roll_board_bytes = appendable.PART_BYTES if remote else None
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, args=(appendable.AppendOnlyFile(self.path),),
                                        daemon=True, name=f"metrics-{filename}")
        self._thread.start()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step)}
        record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._put((record, True))

    def write_arrays(self, step: int, **arrays: np.ndarray) -> None:
        """One JSON object of per-class (or other) arrays for ``step``, JSON-lines only."""
        self._put(({"step": int(step), **{k: np.asarray(v).tolist() for k, v in arrays.items()}}, False))

    def _put(self, item) -> None:
        self._raise_error()
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        """The writer thread's failure, on the loop's thread: the storage's as a message, a bug as itself."""
        e = self._error
        if e is None:
            return
        if isinstance(e, WorkdirError):
            raise e
        if io_error(e):
            raise WorkdirError(f"writing the metrics to {self.path.parent} failed ({e}); the run stops here, its "
                               f"last complete checkpoint intact: rerun to resume once the workdir can be "
                               f"written") from e
        raise RuntimeError(f"writing {self.path} failed") from e

    def _drain(self, out: appendable.AppendOnlyFile) -> None:
        """The writer thread: records to the file (and TensorBoard) until ``close``."""
        board = _Board(self._board, self._roll_board_bytes) if self._board else None
        last = time.monotonic()
        try:
            while True:
                timeout = max(0.0, last + self._flush_secs - time.monotonic()) if self._flush_secs else None
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is not None and item is not _STOP:
                    record, scalars = item
                    out.write(json.dumps(record) + "\n")
                    if board is not None and scalars:
                        board.write(record)
                if item is _STOP or time.monotonic() - last >= self._flush_secs:
                    out.flush()
                    if board is not None:
                        board.flush()
                    last = time.monotonic()
                if item is _STOP:
                    return
        except BaseException as e:  # noqa: BLE001 - surfaced on the loop's thread
            self._error = e
        finally:
            try:
                out.close()
            finally:
                if board is not None:
                    board.close()


class _Board:
    """TensorBoard scalars; on a bucket a new event file every ``roll_bytes`` (TF rewrites
    a bucket's event file whole at each flush)."""

    def __init__(self, logdir: str, roll_bytes: int | None):
        import tensorflow as tf

        self._tf, self._logdir, self._roll = tf, logdir, roll_bytes
        self._writer = tf.summary.create_file_writer(logdir)
        self._bytes = 0

    def write(self, record: dict) -> None:
        tf = self._tf
        if self._roll and self._bytes >= self._roll:
            self._writer.close()
            self._writer, self._bytes = tf.summary.create_file_writer(self._logdir), 0
        with self._writer.as_default():
            for k, v in record.items():
                if k != "step":
                    tf.summary.write(k, tf.constant(v, tf.float32), step=int(record["step"]),
                                     metadata=_scalar_metadata())
                    self._bytes += 64 + len(k)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _scalar_metadata():
    """TensorBoard's 'scalars' plugin tag, written without the tensorboard package."""
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = "scalars"
    return meta.SerializeToString()


def read_jsonl(path: str | epath.Path) -> list[dict]:
    """Records of a JSON-lines file (or its parts, on a bucket: ``appendable.py``); a torn
    last line (a crash mid-write) is skipped."""
    lines = [line for line in appendable.read_text(path).splitlines() if line.strip()]
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
