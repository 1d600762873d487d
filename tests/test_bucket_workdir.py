"""A ``gs://`` workdir is never made local.

No bucket is reachable offline, so ``gs://`` paths are served by a stand-in: epath's
backend for them maps ``gs://`` onto a local directory, TensorBoard's writer and
Orbax's manager record the path they are given. Meanwhile ``os.path.abspath``,
``os.makedirs``, ``os.replace`` and ``open`` fail on any ``gs:`` path: the run
passes only if every workdir file goes through epath with its URI intact.
"""

import builtins
import os

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
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "train_summary.json", "data_index"}
    assert [r["step"] for r in read_jsonl(str(run / "metrics.jsonl"))] == [2, 4]
    assert FakeCheckpointer.made == ["gs://bucket/run/checkpoints"] * 2
    assert boards == ["gs://bucket/run/tensorboard"] * 2
    assert not any("gs:" in p.name for p in tmp_path.iterdir())  # nothing local named after the bucket


def test_checkpointer_and_readers_keep_the_uri(monkeypatch):
    made = []
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp, "CheckpointManager", lambda directory, **kw: made.append(directory))
    checkpointing.Checkpointer.__init__(object.__new__(checkpointing.Checkpointer), "gs://b/run/checkpoints", 3)
    assert [str(d) for d in made] == ["gs://b/run/checkpoints"]
    assert str(paths.workdir_path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    local = paths.workdir_path("relative/run")
    assert local.is_absolute() and str(local).endswith("/relative/run")
