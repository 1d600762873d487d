"""A folder on a bucket is listed by prefix, once a run, by one process.

The bucket is a stand-in speaking Cloud Storage's JSON API (``gcs_stand_in.py``),
reached through TensorStore's own GCS client, and it counts requests: listing 2,501
images must cost 3 list pages and no request for any single image. With two real
processes only process 0 lists; the other reads the names from the workdir's cache.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from semppl_jax import folder_listing, image_folder, split_index
from tests.conftest import REPO
from tests.gcs_stand_in import GcsStandIn
from tests.test_multiprocess import free_port

IMAGES = 2500


def make_bucket(root, n: int = IMAGES) -> None:
    """``bucket-a/photos/train/{cat,dog}/*.jpg`` (names only: listing reads no byte) and one unlabelled."""
    for i in range(n):
        d = root / "bucket-a" / "photos" / "train" / ("cat" if i % 2 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:05d}.jpg").write_bytes(b"")
    (root / "bucket-a" / "photos" / "train" / "unlabelled" / "deep" / "x").mkdir(parents=True)
    (root / "bucket-a" / "photos" / "train" / "unlabelled" / "deep" / "x" / "u.png").write_bytes(b"")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    make_bucket(tmp_path / "gcs")
    stand_in = GcsStandIn(str(tmp_path / "gcs"))
    for k, v in stand_in.env().items():
        monkeypatch.setenv(k, v)
    yield stand_in
    stand_in.close()


def test_a_bucket_folder_is_listed_by_prefix_pages_not_image_by_image(bucket, tmp_path):
    names = folder_listing.list_files("gs://bucket-a/photos/train")
    assert len(names) == IMAGES + 1 and names[0] == "cat/img_00001.jpg" and "unlabelled/deep/x/u.png" in names
    assert dict(bucket.requests) == {"list": 3}  # ceil(2,501 / 1,000) pages; no stat, no read
    source = image_folder.folder_source("gs://bucket-a/photos", "train", cache_dir=str(tmp_path / "index"))
    assert source.num_ids == IMAGES + 1 and source.class_names == ("cat", "dog")
    assert (source.labels == -1).sum() == 1 and np.bincount(source.labels[source.labels >= 0]).tolist() == [1250] * 2
    assert dict(bucket.requests) == {"list": 6}  # the source's own listing: 3 more pages


WORKER = """
import json, sys
import jax
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
from semppl_jax import folder_listing
names, key = folder_listing.shared_listing("gs://bucket-a/photos/train", sys.argv[3])
json.dump(dict(n=len(names), key=key, last=names[-1]), open(sys.argv[4], "w"))
jax.distributed.shutdown()
"""


def _two_processes(tmp_path, bucket, tag: str) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO), **bucket.env())
    port, cache = free_port(), str(tmp_path / "workdir" / "data_index")
    outs = [tmp_path / f"{tag}{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), cache, str(outs[i])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    return [json.loads(o.read_text()) for o in outs]


def test_one_process_lists_the_others_read_the_cache_and_a_change_is_seen(bucket, tmp_path):
    first = _two_processes(tmp_path, bucket, "first")
    assert first[0] == first[1] and first[0]["n"] == IMAGES + 1
    assert dict(bucket.requests) == {"list": 3}  # process 0 alone, by pages
    new = tmp_path / "gcs" / "bucket-a" / "photos" / "train" / "unlabelled" / "zz_new.jpg"
    new.write_bytes(b"")
    again = _two_processes(tmp_path, bucket, "again")
    assert again[0] == again[1] and again[0]["n"] == IMAGES + 2 and again[0]["last"] == "unlabelled/zz_new.jpg"
    assert again[0]["key"] != first[0]["key"]  # the cache was written anew for the changed folder
    assert dict(bucket.requests) == {"list": 6}


def test_the_cached_index_refuses_a_folder_changed_under_the_run(tmp_path):
    """A local folder, validated and indexed into the workdir; an image added afterwards is
    seen at the next start (the listing's digest is part of the index's key)."""
    import tensorflow as tf

    root = tmp_path / "photos"
    for i in range(8):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.png").write_bytes(tf.io.encode_png(np.full((4, 4, 3), i, np.uint8)).numpy())
    index = str(tmp_path / "run" / "data_index")
    source = split_index.index_source(image_folder.folder_source(str(root), "train", cache_dir=index), True, index)
    assert source.num_examples == 8
    (root / "train" / "c0" / "extra.png").write_bytes(tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())
    with pytest.raises(ValueError, match="was the data changed under the run"):
        split_index.index_source(image_folder.folder_source(str(root), "train", cache_dir=index), True, index)
