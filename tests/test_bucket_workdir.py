"""A ``gs://`` workdir is never made local.

No bucket is reachable offline, so ``gs://`` paths are served by a stand-in: epath's
backend for them maps ``gs://`` onto a local directory, TensorBoard's writer and
Orbax's manager record the path they are given. Meanwhile ``os.path.abspath``,
``os.makedirs``, ``os.replace`` and ``open`` fail on any ``gs:`` path: the run
passes only if every workdir file goes through epath with its URI intact.
"""

import builtins
import os
import time

import pytest
from etils import epath
from etils.epath import backend as epath_backend

from experiments import tiny
from semppl_jax import checkpointing, jobs, paths
from semppl_jax.metric_writers import read_jsonl


class BucketOnDisk:
    """epath's os backend with ``gs://`` mapped onto ``root``."""

    def __init__(self, root: str):
        self._root, self._os = root, epath_backend.os_backend

    def _local(self, p):
        p = os.fspath(p)
        return os.path.join(self._root, p[len("gs://"):]) if p.startswith("gs://") else p

    def __getattr__(self, name):
        method = getattr(self._os, name)

        def call(*args, **kwargs):
            return method(*(self._local(a) if isinstance(a, (str, os.PathLike)) else a for a in args), **kwargs)

        return call


class FakeCheckpointer:
    """Orbax's arrays go through TensorStore's own GCS client: recorded, kept in memory."""

    made: list = []

    def __init__(self, directory, keep, every_steps=None, every_minutes=None, **_):
        FakeCheckpointer.made.append(str(directory))
        self.directory, self.every = directory, every_steps
        self.saved = getattr(FakeCheckpointer, "store", {})
        FakeCheckpointer.store = self.saved

    def latest_step(self):
        return max(self.saved, default=None)

    def read_meta(self, step):
        return self.saved[step][1]

    def restore(self, abstract, step):
        return self.saved[step][0], step

    def reached_preemption(self, step):
        return False

    def should_save(self, step):
        return step % self.every == 0

    def save(self, step, state, meta):
        self.saved[step] = (state, meta)

    def close(self):
        pass


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "bucket_contents"
    root.mkdir()
    fake = BucketOnDisk(str(root))
    real_backend = epath.gpath.PosixGPath._backend
    monkeypatch.setattr(epath.gpath.PosixGPath, "_backend", property(
        lambda self: fake if self._path_str.startswith("gs://") else real_backend.fget(self)))

    def guard(fn):
        def checked(*args, **kwargs):
            for a in args[:2]:
                if isinstance(a, (str, os.PathLike)) and "gs:" in os.fspath(a):
                    raise AssertionError(f"{fn.__name__}({os.fspath(a)!r}): a bucket path made local")
            return fn(*args, **kwargs)
        return checked

    for module, name in ((os.path, "abspath"), (os, "makedirs"), (os, "replace"), (builtins, "open")):
        monkeypatch.setattr(module, name, guard(getattr(module, name)))
    import tensorflow as tf

    boards = []
    real_writer = tf.summary.create_file_writer
    monkeypatch.setattr(tf.summary, "create_file_writer", lambda logdir, *a, **k: (
        boards.append(logdir), real_writer(fake._local(logdir), *a, **k))[1])
    FakeCheckpointer.made, FakeCheckpointer.store = [], {}
    monkeypatch.setattr(checkpointing, "Checkpointer", FakeCheckpointer)
    return root, boards


def test_a_run_and_its_resume_keep_a_bucket_workdir(bucket, tmp_path, monkeypatch):
    root, boards = bucket
    monkeypatch.chdir(tmp_path)
    config = tiny.get_config()
    config.dataset.validate_images = True  # the data index is written to the workdir too
    config.training.update(num_steps=4, checkpoint_every_steps=2, log_every_steps=2)
    jobs.train(config, "gs://bucket/run", stop_after=2)
    summary = jobs.train(config, "gs://bucket/run")
    assert summary["step"] == 4
    run = root / "bucket" / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl.parts", "per_class.jsonl.parts",
                                               "train_summary.json", "data_index"}
    assert not (run / "metrics.jsonl").exists()  # a bucket cannot append: parts, never one object rewritten
    assert [r["step"] for r in read_jsonl(str(run / "metrics.jsonl"))] == [2, 4]
    assert FakeCheckpointer.made == ["gs://bucket/run/checkpoints"] * 2
    assert boards == ["gs://bucket/run/tensorboard"] * 2
    assert not any("gs:" in p.name for p in tmp_path.iterdir())  # nothing local named after the bucket


class CountingBucket(BucketOnDisk):
    """Records the size of every object upload; each one takes ``delay`` seconds."""

    def __init__(self, root: str, delay: float = 0.0):
        super().__init__(root)
        self.uploads: list[tuple[str, int]] = []
        self.delay = delay

    def open(self, path, mode="r", **kwargs):
        f = self._os.open(self._local(path), mode, **kwargs)
        if "w" in mode or "a" in mode:
            name, write = os.fspath(path), f.write

            def upload(data):
                time.sleep(self.delay)
                self.uploads.append((name, len(data)))
                return write(data)

            f.write = upload
        return f


@pytest.fixture
def counting_bucket(tmp_path, monkeypatch):
    fake = CountingBucket(str(tmp_path))
    real_backend = epath.gpath.PosixGPath._backend
    monkeypatch.setattr(epath.gpath.PosixGPath, "_backend", property(
        lambda self: fake if self._path_str.startswith("gs://") else real_backend.fget(self)))
    return fake


def test_metrics_on_a_bucket_are_never_rewritten_whole(counting_bucket, monkeypatch):
    """1,000 logged steps, each flushed: every upload is at most one part (16 KB here),
    never the whole file, so the total grows linearly; every record reads back once, in
    order, also after a resume that drops the steps logged after its checkpoint."""
    from semppl_jax import appendable, metric_writers

    monkeypatch.setattr(appendable, "PART_BYTES", 16 * 1024)
    writer = metric_writers.MetricWriter("gs://b/run", tensorboard=False, flush_secs=0.0)
    for step in range(1, 1001):
        writer.write(step, {"loss": 1.0 / step, "accuracy": step / 1000})
    writer.close()
    text = appendable.read_text("gs://b/run/metrics.jsonl")
    assert [r["step"] for r in read_jsonl("gs://b/run/metrics.jsonl")] == list(range(1, 1001))
    sizes = [n for name, n in counting_bucket.uploads if "metrics.jsonl.parts/" in name]
    assert len(sizes) == 1000 and max(sizes) <= 16 * 1024 + 100  # a part, not the 63 KB file
    whole = sum(len(line) + 1 for line in text.splitlines()) * 1000 // 2  # a rewrite per flush: ~n^2 / 2
    assert sum(sizes) < whole / 3
    writer = metric_writers.MetricWriter("gs://b/run", tensorboard=False, resume_step=500, flush_secs=0.0)
    writer.write(501, {"loss": 0.5})
    writer.close()
    assert [r["step"] for r in read_jsonl("gs://b/run/metrics.jsonl")] == list(range(1, 502))


def test_the_loop_never_waits_on_the_bucket(counting_bucket):
    """Each upload takes 0.2 s here; 200 writes return at once, and the default bucket
    cadence (a flush every 30 s) makes a single upload of them at ``close``."""
    from semppl_jax import metric_writers

    counting_bucket.delay = 0.2
    writer = metric_writers.MetricWriter("gs://b/slow", tensorboard=False)
    t0 = time.time()
    for step in range(200):
        writer.write(step, {"loss": 1.0})
    assert time.time() - t0 < 0.5
    writer.close()
    assert len([n for n, _ in counting_bucket.uploads if "metrics.jsonl" in n]) == 1
    assert len(read_jsonl("gs://b/slow/metrics.jsonl")) == 200


def test_checkpointer_and_readers_keep_the_uri(monkeypatch):
    made = []
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp, "CheckpointManager", lambda directory, **kw: made.append(directory))
    checkpointing.Checkpointer.__init__(object.__new__(checkpointing.Checkpointer), "gs://b/run/checkpoints", 3)
    assert [str(d) for d in made] == ["gs://b/run/checkpoints"]
    assert str(paths.workdir_path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    local = paths.workdir_path("relative/run")
    assert local.is_absolute() and str(local).endswith("/relative/run")
