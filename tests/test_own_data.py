"""A user's own data: unlabelled images that carry no label, in an ``unlabelled/``
directory, outside a labels CSV, or in a second source."""

import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments import tiny
from semppl_jax import checkpointing, datasets, input_pipeline, jobs, label_subsets, split_index
from tests.test_corrupt_records import CorruptibleRecords
from tests.test_input_pipeline import small_views, take


def write_images(directory, names, seed=0, size=34):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for n in names:
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        (directory / n).write_bytes(tf.io.encode_jpeg(img).numpy())


def own_folder(root, labelled_per_class=2, unlabelled_per_class=6, classes=("ant", "bee", "cow")):
    """Class directories for a few images of each class; the rest under unlabelled/ (nested)."""
    for ci, c in enumerate(classes):
        write_images(root / "train" / c, [f"{c}_{i}.jpg" for i in range(labelled_per_class)], seed=ci)
        write_images(root / "train" / "unlabelled" / f"batch{ci % 2}",
                     [f"{c}_{i}.jpg" for i in range(labelled_per_class, labelled_per_class + unlabelled_per_class)],
                     seed=10 + ci)
        write_images(root / "test" / c, [f"{c}_t{i}.jpg" for i in range(2)], seed=20 + ci)
    return root


def test_unlabelled_directory_images_carry_no_label(tmp_path):
    root = own_folder(tmp_path / "own")
    source = datasets.load_source(f"folder:{root}", "train")
    assert source.num_ids == 24 and source.num_classes == 3
    names = source.file_names.tolist()
    no_label = {n for n, y in zip(names, source.labels) if y < 0}
    assert no_label == {n for n in names if n.startswith("unlabelled/")} and len(no_label) == 18
    labelled = label_subsets.labelled_mask(source, "1.0", 0)  # every image that has a class, and only those
    assert sorted(np.array(names)[labelled].tolist()) == sorted(n for n in names if not n.startswith("unlabelled/"))
    batches = take(input_pipeline.train_dataset(source, labelled, small_views(tiny.get_config()), 8, 0), 3)
    ids = np.concatenate([b["image_id"] for b in batches])
    assert sorted(ids.tolist()) == list(range(24))  # an epoch: every image, labelled or not
    for b in batches:
        np.testing.assert_array_equal(b["is_labelled"], source.labels[b["image_id"]] >= 0)
        assert (b["label"][~b["is_labelled"]] == -1).all() and (b["true_label"][~b["is_labelled"]] == -1).all()
    loose = tmp_path / "loose"
    write_images(loose / "train" / "ant", ["a.jpg"])
    write_images(loose / "train", ["stray.jpg"])
    with pytest.raises(ValueError, match="outside any directory"):
        datasets.load_source(f"folder:{loose}", "train")


def test_labels_from_a_csv_for_a_flat_folder(tmp_path):
    flat = tmp_path / "flat" / "train"
    write_images(flat / "2024" / "may", [f"img_{i}.jpg" for i in range(6)])
    write_images(flat, [f"top_{i}.jpg" for i in range(3)], seed=1)
    csv = tmp_path / "labels.csv"
    csv.write_text("file_name,label\nimg_0.jpg,dog\nimg_3.jpg,cat\ntop_1.jpg,dog\n")
    source = datasets.load_source(f"folder:{tmp_path / 'flat'}", "train", labels_file=str(csv))
    got = dict(zip([n.split("/")[-1] for n in source.file_names], source.labels.tolist()))
    assert got == {"img_0.jpg": 1, "img_3.jpg": 0, "top_1.jpg": 1, **{n: -1 for n in
                   ("img_1.jpg", "img_2.jpg", "img_4.jpg", "img_5.jpg", "top_0.jpg", "top_2.jpg")}}
    assert source.num_classes == 2
    csv.write_text("img_0.jpg,dog\nimg_0.jpg,cat\n")
    with pytest.raises(ValueError, match="two classes"):
        datasets.load_source(f"folder:{tmp_path / 'flat'}", "train", labels_file=str(csv))
    csv.write_text("elsewhere.jpg,dog\n")
    with pytest.raises(ValueError, match="none of its 1 file names"):
        datasets.load_source(f"folder:{tmp_path / 'flat'}", "train", labels_file=str(csv))


def test_a_second_source_of_unlabelled_images(tmp_path):
    """dataset.unlabelled: a folder of photos after a labelled folder, and after a
    prepared TFDS dataset (whose reads are sequential)."""
    root = own_folder(tmp_path / "own", unlabelled_per_class=0)
    shutil.rmtree(root / "train" / "unlabelled", ignore_errors=True)
    photos = tmp_path / "photos"
    write_images(photos / "a" / "b", [f"p{i}.png" for i in range(5)])
    write_images(photos, [f"q{i}.jpg" for i in range(4)], seed=3)
    config = small_views(tiny.get_config())
    config.dataset.update(dict(name=f"folder:{root}", unlabelled=f"folder:{photos}", label_subset="1.0"))
    source = datasets.load_split(config, "train")
    assert source.num_ids == 6 + 9 and source.random_access
    assert (source.labels[6:] == -1).all() and (source.labels[:6] >= 0).all()
    labelled = datasets.config_labelled_mask(config, source)
    assert labelled.tolist() == [True] * 6 + [False] * 9
    for p in range(2):
        lo, hi = split_index.share_range(15, p, 2)
        batch = take(input_pipeline.train_dataset(source, labelled, config, 4, 0, p, 2), 1)[0]
        assert ((batch["image_id"] >= lo) & (batch["image_id"] < hi)).all()

    data_dir = str(tmp_path / "tfds")
    CorruptibleRecords(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=2))
    config.dataset.update(dict(name="corruptible_records", data_dir=data_dir, label_subset="0.25"))
    mixed = datasets.load_split(config, "train")
    assert not mixed.random_access and mixed.num_ids == 48 + 9
    records = list(mixed.records().as_numpy_iterator())
    assert sorted(r["image_id"] for r in records) == list(range(57))  # TFDS interleaves its shards
    assert {r["image_id"] for r in records if r["true_label"] == -1} == set(range(48, 57))
    labelled = datasets.config_labelled_mask(config, mixed)
    assert labelled[:48].sum() == 12 and not labelled[48:].any()


def test_unlabelled_directory_and_label_list_train_the_same_encoder(tmp_path):
    """The same images, labelled either by a list of file names (all in class
    directories) or by where they are (the rest under unlabelled/): same ids, same
    labelled subset, same batches, and the same encoder at the same seed."""
    by_dir = own_folder(tmp_path / "by_dir")
    by_list = tmp_path / "by_list"
    shutil.copytree(by_dir, by_list)
    for f in sorted((by_list / "train" / "unlabelled").rglob("*.jpg")):
        f.rename(by_list / "train" / f.name.split("_")[0] / f.name)
    shutil.rmtree(by_list / "train" / "unlabelled")
    listed = tmp_path / "labelled.txt"
    listed.write_text("\n".join(f"{c}_{i}.jpg" for c in ("ant", "bee", "cow") for i in range(2)) + "\n")

    states = []
    for root, subset in ((by_dir, "1.0"), (by_list, str(listed))):
        config = tiny.get_config()
        config.dataset.update(dict(name=f"folder:{root}", label_subset=subset))
        config.views.update(dict(large_size=24, small_size=12))
        config.training.update(dict(batch_size=8, num_steps=4, log_every_steps=2, checkpoint_every_steps=100))
        config.semppl.queue_size = 16
        jobs.train(config, str(tmp_path / f"run_{root.name}"))
        states.append(checkpointing.restore_state(str(tmp_path / f"run_{root.name}"), config)[0])
    for a, b in zip(jax.tree.leaves(states[0].online_params), jax.tree.leaves(states[1].online_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
