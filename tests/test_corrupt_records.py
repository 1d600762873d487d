"""A prepared TFDS dataset whose TFRecord shard is damaged on disk: the run degrades (the
unreadable records are counted and left out) instead of dying or hanging. In its own module
because the mock-ImageNet fixture of test_input_pipeline patches TFDS for its whole module."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments import tiny
from semppl_jax import datasets, input_pipeline, label_subsets, sources, split_index


class CorruptibleRecords(tfds.core.GeneratorBasedBuilder):
    """A small prepared TFDS dataset: real TFRecord shards on disk, built offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(dict(
            image=tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            label=tfds.features.ClassLabel(num_classes=3), file_name=tfds.features.Text())))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(48)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(0)
        for i in range(n):
            yield i, dict(image=rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), label=i % 3,
                          file_name=f"img_{i:03d}.JPEG")


def test_a_corrupt_tfrecord_shard_degrades_and_keeps_processes_equal(tmp_path, caplog):
    """A damaged byte in one shard: the records from there to the shard's end are left out
    with a warning and counted; everything else is read under its own id (whether one
    process or two indexed the split), the labelled subset is drawn from what is there,
    and training and 2-process evaluation both run."""
    data_dir = str(tmp_path / "tfds")
    builder = CorruptibleRecords(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
    shards = sorted(tf.io.gfile.glob(f"{builder.data_dir}/*train.tfrecord*"))
    assert len(shards) == 4
    clean = load(data_dir)
    assert clean.num_examples == 48 and clean.lost_records == 0

    raw = bytearray(open(shards[1], "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(shards[1], "wb").write(bytes(raw))
    # Independent count: the damaged shard read alone, record by record.
    readable = sum(1 for _ in tf.data.TFRecordDataset(shards[1]).ignore_errors().as_numpy_iterator())
    lost = 12 - readable
    assert 0 < lost < 12

    for processes in (1, 2):  # indexed by 1 process, or by 2 each scanning its half
        source = load(data_dir, processes)
        assert (source.num_ids, source.num_examples, source.lost_records) == (48, 48 - lost, lost)
        # The lost records are the damaged shard's tail (ids 12..23); every other id is its record's.
        assert np.flatnonzero(~source.readable).tolist() == list(range(24 - lost, 24))
        assert source.file_names[source.readable].tolist() == clean.file_names[source.readable].tolist()
    assert f"{lost} of its 48 records could not be read" in caplog.text
    ids = sorted(r["image_id"] for r in source.records().as_numpy_iterator())
    assert ids == source.valid_ids().tolist()
    kept = set(source.file_names[source.readable])
    gone = sorted(set(clean.file_names) - kept)

    # A label list naming a lost image: the others are labelled, with a warning. A list with
    # more unmatched names than there are unreadable records does not fit the data: an error.
    listed = tmp_path / "labels.txt"
    listed.write_text("\n".join(sorted(kept)[:3] + gone[:1]) + "\n")
    assert label_subsets.labelled_mask(source, str(listed), 0).sum() == 3
    assert "1 of its 4 images are not in the split" in caplog.text
    listed.write_text("\n".join(sorted(kept)[:3] + [f"elsewhere_{i}.JPEG" for i in range(lost + 1)]) + "\n")
    with pytest.raises(ValueError, match="does not fit this dataset"):
        label_subsets.labelled_mask(source, str(listed), 0)

    labelled = label_subsets.labelled_mask(source, "0.25", 0)
    assert labelled.shape == (48,) and labelled.sum() > 0 and not (labelled & ~source.readable).any()
    config = tiny.get_config()
    config.views.update(dict(num_large=2, large_size=24, num_small=1, small_size=12, eval_resize=28, eval_size=24))
    stream = input_pipeline.train_dataset(source, labelled, config, 8, seed=1).as_numpy_iterator()
    batches = [next(stream) for _ in range(8)]
    assert all(b["large"].shape == (8, 2, 24, 24, 3) for b in batches)
    first = np.concatenate([b["image_id"] for b in batches[:5]]).tolist()  # 40 of the epoch's 48 - lost
    assert len(set(first)) == 40 and set(first) <= set(ids)

    per_process = [list(input_pipeline.eval_dataset(source, config, 8, p, 2).as_numpy_iterator()) for p in (0, 1)]
    assert len(per_process[0]) == len(per_process[1])
    seen = [i for batches in per_process for b in batches for i in b["image_id"][b["mask"]].tolist()]
    assert sorted(seen) == ids


def load(data_dir: str, processes: int = 1) -> sources.Source:
    """The split indexed as ``processes`` processes would: each scans its own share."""
    source = datasets.load_source("corruptible_records", "train", data_dir)
    if processes == 1:
        return split_index.index_source(source, validate=False)
    scans = [split_index.scan_share(source, *split_index.share_range(48, p, processes), validate=False)
             for p in range(processes)]
    index = split_index.SplitIndex(*(np.concatenate([s[k] for s in scans]) for k in ("status", "labels", "names")))
    return split_index._with_index(source, index, min_side=1)
