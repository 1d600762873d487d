"""Each process reads its own share; a resume many epochs in replays nothing it need not;
the split index is built from shares, cached, and refused when the data changes."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments import tiny
from semppl_jax import datasets, input_pipeline, label_subsets, split_index
from tests.conftest import REPO
from tests.test_corrupt_records import CorruptibleRecords
from tests.test_input_pipeline import make_image_folder, small_views, take
from tests.test_multiprocess import free_port


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """A prepared TFDS dataset on disk: 48 records in 4 TFRecord shards."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    CorruptibleRecords(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    return data_dir


def sources(prepared):
    synthetic = datasets.load_source("synthetic", "train", synthetic_size=48, synthetic_image_size=28)
    tfds_source = split_index.index_source(datasets.load_source("corruptible_records", "train", prepared), False)
    return {"in memory": synthetic, "prepared TFDS": tfds_source}


@pytest.mark.parametrize("kind", ["in memory", "prepared TFDS"])
@pytest.mark.parametrize("mixed", [False, True])
def test_resume_epochs_in_equals_the_straight_stream(prepared, kind, mixed):
    """48 images, 2 processes, 6 a batch: 4 steps an epoch. Resuming at step 18 (4.5
    epochs in) gives the straight stream's batches, on both processes, in both batch
    compositions."""
    source = sources(prepared)[kind]
    config = small_views(tiny.get_config())
    config.dataset.shuffle_buffer = 8
    if mixed:
        config.dataset.labelled_per_batch = 4  # 2 a process
    labelled = label_subsets.labelled_mask(source, "0.25", 0)
    for p in range(2):
        straight = take(input_pipeline.train_dataset(source, labelled, config, 6, 3, p, 2), 21)
        resumed = take(input_pipeline.train_dataset(source, labelled, config, 6, 3, p, 2, start_step=18), 3)
        for x, y in zip(straight[18:], resumed):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
        lo, hi = split_index.share_range(source.num_ids, p, 2)
        ids = np.concatenate([b["image_id"] for b in straight])
        assert ((ids >= lo) & (ids < hi)).all()  # only its own share
        if not mixed:  # every epoch is its share once, in a new order
            epochs = ids[:120].reshape(5, 24)
            assert all(sorted(e.tolist()) == list(range(lo, hi)) for e in epochs)
            assert len({tuple(e) for e in epochs}) == 5
        else:
            assert all(b["is_labelled"].sum() == 2 for b in straight)


def test_a_process_reads_only_its_share(prepared):
    """What each process asks of the source: image-table rows of its share (in memory,
    folders) or record ranges of its share (TFDS); no other record is ever touched."""
    config = small_views(tiny.get_config())
    for kind, source in sources(prepared).items():
        for p in range(3):
            asked = []
            spy = source
            if source.random_access:
                spy = dataclasses.replace(source, table=lambda ids, s=source: (asked.extend(ids.tolist()),
                                                                                       s.table(ids))[1])
            else:
                spy = dataclasses.replace(source, read_range=lambda lo, hi, s=source: (
                    asked.extend(range(lo, hi)), s.read_range(lo, hi))[1])
            labelled = label_subsets.labelled_mask(source, "0.25", 0)
            take(input_pipeline.train_dataset(spy, labelled, config, 4, 0, p, 3, start_step=7), 2)
            lo, hi = split_index.share_range(48, p, 3)
            assert sorted(set(asked)) == list(range(lo, hi)), kind


def test_index_is_cached_reused_without_reading_and_refused_when_the_data_changes(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    index_dir = str(tmp_path / "run" / "data_index")
    source = datasets.load_source(f"folder:{root}", "train")
    first = split_index.index_source(source, True, index_dir)
    assert first.num_examples == 18 and [os.path.basename(s) for s in first.skipped] == ["broken.jpg"]
    assert len(os.listdir(index_dir)) == 1

    def no_reads(ex):
        raise AssertionError("an image was read")

    again = split_index.index_source(dataclasses.replace(source, load=no_reads), True, index_dir)
    np.testing.assert_array_equal(again.readable, first.readable)
    assert again.skipped == first.skipped
    (root / "train" / "dog" / "new.jpg").write_bytes(tf.io.encode_jpeg(np.zeros((9, 9, 3), np.uint8)).numpy())
    with pytest.raises(ValueError, match="built for another dataset"):
        split_index.index_source(datasets.load_source(f"folder:{root}", "train"), True, index_dir)


INDEX_WORKER = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
port, pid, root, out = sys.argv[1:5]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
from semppl_jax import datasets, label_subsets, split_index
source = split_index.index_source(datasets.load_source(f"folder:{root}", "train"), True, out + "/index")
np.savez(f"{out}/proc{pid}.npz", readable=source.readable, names=np.asarray(source.file_names, str))
def no_reads(ex):
    raise AssertionError("an image was read")
import dataclasses
again = split_index.index_source(dataclasses.replace(datasets.load_source(f"folder:{root}", "train"), load=no_reads),
                              True, out + "/index")  # both processes agree the cache exists and read it
assert (again.readable == source.readable).all()
jax.distributed.shutdown()
"""


def test_two_processes_index_their_halves_and_agree_with_one(tmp_path):
    """Two real processes each decode only their half of a folder with a broken file;
    the all-gathered index equals one process's, on both, process 0 caches it, and a
    second start reads the cache on both without reading an image."""
    root = make_image_folder(tmp_path / "imgs")
    (root / "train" / "eel" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", INDEX_WORKER, port, str(i), str(root), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    one = split_index.index_source(datasets.load_source(f"folder:{root}", "train"), True)
    for i in range(2):
        got = np.load(tmp_path / f"proc{i}.npz")
        np.testing.assert_array_equal(got["readable"], one.readable)
        assert got["names"].tolist() == one.file_names.tolist()
    assert (~one.readable).sum() == 1 and len(os.listdir(tmp_path / "index")) == 1
