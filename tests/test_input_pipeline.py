"""Input pipelines: the JPEG path (mock ImageNet), image folders, label subsets,
batch composition, determinism/resume and evaluation counting. Offline."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from experiments import tiny
from semppl_jax import datasets, input_pipeline, label_subsets, split_index


def small_views(config):
    config.views.update(dict(num_large=2, large_size=24, num_small=1, small_size=12, eval_resize=28,
                             eval_size=24))
    return config


def take(ds, n):
    return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


@pytest.fixture(scope="module")
def mock_imagenet():
    with tfds.testing.mock_data(num_examples=24):
        source = datasets.load_source("imagenet2012", "train")
        yield source, [str(n) for n in source.file_names]


def test_mock_imagenet_through_the_jpeg_path(mock_imagenet, tmp_path):
    source, names = mock_imagenet
    assert source.encoded and source.num_examples == 24 and source.num_classes == 1000
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(names[:5]) + "\n")
    labelled = label_subsets.labelled_mask(source, str(subset), 0)
    assert labelled.sum() == 5
    config = small_views(tiny.get_config())
    batch = take(input_pipeline.train_dataset(source, labelled, config, 8, seed=0), 3)[0]
    assert batch["large"].shape == (8, 2, 24, 24, 3) and batch["large"].dtype == np.uint8
    assert batch["small"].shape == (8, 1, 12, 12, 3)
    assert np.all((batch["label"] == -1) == ~batch["is_labelled"])
    lab = batch["is_labelled"]
    assert np.array_equal(batch["label"][lab], batch["true_label"][lab])
    assert np.array_equal(labelled[batch["image_id"]], lab)  # flag follows the file-name list
    assert batch["large"].std() > 0  # real pixels, not padding


def test_a_list_that_matches_no_image_is_an_error(mock_imagenet, tmp_path):
    source, names = mock_imagenet
    subset = tmp_path / "wrong.txt"
    subset.write_text("n00000000_1.JPEG\nn00000000_2.JPEG\n" + names[0] + "\n")
    with pytest.raises(ValueError, match="1 of its 3 file names match"):
        label_subsets.labelled_mask(source, str(subset), 0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        label_subsets.labelled_mask(source, str(tmp_path / "missing.txt"), 0)


def test_imagenet_1pct_list_resolves_from_the_cache_dir(mock_imagenet, tmp_path, monkeypatch):
    """A list in subset_cache_dir (or $SEMPPL_SUBSET_DIR) is found; SimCLR's ImageNet names
    match no image of another dataset, which is an error, not an empty subset."""
    monkeypatch.delenv("SEMPPL_SUBSET_DIR", raising=False)
    cache = tmp_path / "subsets"
    cache.mkdir()
    (cache / "1percent.txt").write_text("n04235860_14959.JPEG\nn04239074_7724.JPEG\nn02096294_8485.JPEG\n")
    path = label_subsets.resolve_subset_file("1pct", str(cache))
    assert path == str(cache / "1percent.txt") and len(label_subsets.read_subset_list(path)) == 3
    monkeypatch.setenv("SEMPPL_SUBSET_DIR", str(cache))
    assert label_subsets.resolve_subset_file("1pct", None) == path
    source, _ = mock_imagenet
    with pytest.raises(ValueError, match="0 of its 3 file names match"):
        label_subsets.labelled_mask(source, "1pct", 0, str(cache))


def test_missing_subset_list_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setattr(label_subsets, "DEFAULT_SUBSET_DIR", str(tmp_path))
    monkeypatch.delenv("SEMPPL_SUBSET_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="10percent.txt not found.*fetch_subsets"):
        label_subsets.resolve_subset_file("10pct", str(tmp_path / "cache"))


def make_image_folder(root, per_class=6, classes=("cat", "dog", "eel")):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                img = np.full((30 + i, 26 + 2 * i, 3), 40 * ci, np.uint8) + rng.integers(0, 30, (30 + i, 26 + 2 * i, 3),
                                                                                         dtype=np.uint8)
                (d / f"{c}_{i}.jpg").write_bytes(tf.io.encode_jpeg(img).numpy())
    return root


def test_image_folder_same_code_path(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    source = datasets.load_source(f"folder:{root}", "train")
    assert source.encoded and source.num_examples == 18 and source.num_classes == 3
    labelled = label_subsets.labelled_mask(source, "0.34", 0)  # 2 of 6 per class
    true = np.array([r["true_label"] for r in source.records().as_numpy_iterator()])
    assert np.array_equal(true, source.labels)  # the listing's labels are the records' labels
    assert np.bincount(true[labelled], minlength=3).tolist() == [2, 2, 2]
    config = small_views(tiny.get_config())
    batch = take(input_pipeline.train_dataset(source, labelled, config, 6, seed=1), 1)[0]
    assert batch["large"].shape == (6, 2, 24, 24, 3)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        datasets.load_source(f"folder:{tmp_path}/nope", "train")
    with pytest.raises(ValueError, match="has splits"):
        datasets.load_source(f"folder:{root}", "validation")


def test_image_folder_with_bad_files_trains_and_names_them(tmp_path):
    """A PNG is decoded; a truncated JPEG and a text file named .jpg are left out with a
    warning naming each; the other images keep their ids; batches are deterministic."""
    root = make_image_folder(tmp_path / "imgs")
    cat = root / "train" / "cat"
    img = np.random.default_rng(1).integers(0, 255, (28, 28, 3), dtype=np.uint8)
    (cat / "cat_png.png").write_bytes(tf.io.encode_png(img).numpy())
    (cat / "cat_truncated.jpg").write_bytes(tf.io.encode_jpeg(img).numpy()[:120])
    (cat / "cat_text.jpg").write_bytes(b"this is not an image")
    source = split_index.index_source(datasets.load_source(f"folder:{root}", "train"), validate=True)
    assert source.num_ids == 21 and source.num_examples == 19  # 18 good JPEGs + the PNG
    assert sorted(n.split("/")[-1] for n in source.skipped) == ["cat_text.jpg", "cat_truncated.jpg"]
    ids = [r["image_id"] for r in source.records().as_numpy_iterator()]
    assert ids == source.valid_ids().tolist() and len(ids) == 19
    labelled = label_subsets.labelled_mask(source, "0.5", 0)
    config = small_views(tiny.get_config())
    a = take(input_pipeline.train_dataset(source, labelled, config, 8, seed=1), 5)
    b = take(input_pipeline.train_dataset(source, labelled, config, 8, seed=1, start_step=3), 2)
    np.testing.assert_array_equal(a[3]["large"], b[0]["large"])
    assert sum(int((x["image_id"] >= 0).sum()) for x in a) == 40


def test_stratified_fraction_counts():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 100])
    mask = label_subsets.stratified_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[mask]).tolist() == [1, 2, 3, 4, 10]
    assert not np.array_equal(mask, label_subsets.stratified_subset(labels, 0.1, seed=4))
    assert label_subsets.stratified_subset(labels, 0.001, 0).sum() == 5  # at least one a class
    with pytest.raises(ValueError):
        label_subsets.stratified_subset(labels, 1.5, 0)


def test_fixed_number_of_labelled_images_per_batch_class_stratified():
    config = small_views(tiny.get_config())
    config.dataset.labelled_per_batch = 10
    source = datasets.load_source("synthetic", "train", synthetic_size=200, synthetic_image_size=28)
    labelled = label_subsets.labelled_mask(source, "0.1", 0)  # 2 a class
    batches = take(input_pipeline.train_dataset(source, labelled, config, 20, seed=0), 4)
    counts = np.zeros(10, int)
    for b in batches:
        assert b["is_labelled"].sum() == 10
        counts += np.bincount(b["label"][b["is_labelled"]], minlength=10)
    assert counts.tolist() == [4] * 10  # 40 labelled draws: every class exactly 4 times


def test_same_seed_same_batches_and_resume_mid_stream():
    config = small_views(tiny.get_config())
    source = datasets.load_source("synthetic", "train", synthetic_size=64, synthetic_image_size=28)
    labelled = label_subsets.labelled_mask(source, "0.25", 0)
    a = take(input_pipeline.train_dataset(source, labelled, config, 16, seed=7), 6)
    b = take(input_pipeline.train_dataset(source, labelled, config, 16, seed=7), 6)
    resumed = take(input_pipeline.train_dataset(source, labelled, config, 16, seed=7, start_step=4), 2)
    other = take(input_pipeline.train_dataset(source, labelled, config, 16, seed=8), 1)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for x, y in zip(a[4:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["large"], other[0]["large"])
    # An epoch covers every image once (64 images = 4 batches of 16).
    assert sorted(np.concatenate([x["image_id"] for x in a[:4]]).tolist()) == list(range(64))


@pytest.mark.parametrize("processes", [1, 3])
def test_eval_sees_every_example_exactly_once(processes):
    config = small_views(tiny.get_config())
    source = datasets.load_source("synthetic", "test", synthetic_size=280, synthetic_image_size=28)
    assert source.num_examples == 70
    seen, sizes = [], set()
    for p in range(processes):
        for b in input_pipeline.eval_dataset(source, config, 16, p, processes).as_numpy_iterator():
            sizes.add(b["image"].shape)
            seen.extend(b["image_id"][b["mask"]].tolist())
            assert (b["image_id"][~b["mask"]] == -1).all()
    assert sorted(seen) == list(range(70)) and sizes == {(16, 24, 24, 3)}


def test_only_labelled_batches_may_exceed_the_labelled_set():
    """Fine-tuning on 4 labelled images with batches of 10: labelled images only, each
    epoch (4 draws) every labelled image once."""
    config = small_views(tiny.get_config())
    source = datasets.load_source("synthetic", "train", synthetic_size=40, synthetic_image_size=28)
    labelled = np.zeros(40, bool)
    labelled[[3, 11, 19, 30]] = True
    batches = take(input_pipeline.train_dataset(source, labelled, config, 10, 0, only_labelled=True), 2)
    ids = np.concatenate([b["image_id"] for b in batches])
    assert all(b["is_labelled"].all() for b in batches)
    assert all(sorted(ids[i:i + 4].tolist()) == [3, 11, 19, 30] for i in range(0, 20, 4))


def test_batch_larger_than_the_data_is_an_error():
    config = small_views(tiny.get_config())
    source = datasets.load_source("synthetic", "train", synthetic_size=16, synthetic_image_size=28)
    with pytest.raises(ValueError, match="exceeds the 16 training images"):
        input_pipeline.train_dataset(source, np.zeros(16, bool), config, 32, seed=0)


def test_mnist5k_is_real_and_split_fixed():
    train = datasets.load_source("mnist5k", "train")
    test = datasets.load_source("mnist5k", "test")
    assert train.num_examples == 4000 and test.num_examples == 1000
    assert np.bincount(train.labels).tolist() == [400] * 10
    first = next(train.records().as_numpy_iterator())["image"]
    assert first.shape == (28, 28, 3) and first.max() > 200 and (first == 0).mean() > 0.5  # a digit on black


def test_hwcn_layout_puts_the_batch_last():
    config = small_views(tiny.get_config())
    source = datasets.load_source("synthetic", "train", synthetic_size=32, synthetic_image_size=28)
    labelled = label_subsets.labelled_mask(source, "0.25", 0)
    plain = take(input_pipeline.train_dataset(source, labelled, config, 8, seed=2), 1)[0]
    config.views.transpose_images = True
    hwcn = take(input_pipeline.train_dataset(source, labelled, config, 8, seed=2), 1)[0]
    assert hwcn["large"].shape == (2, 24, 24, 3, 8) and hwcn["small"].shape == (1, 12, 12, 3, 8)
    np.testing.assert_array_equal(hwcn["large"], plain["large"].transpose(1, 2, 3, 4, 0))


def test_eval_keeps_its_batch_count_when_records_vanish_mid_read():
    """A source that delivers fewer records than it counted (a read failure after start-up,
    dropped with a warning) still gives every process the same number of batches."""
    config = small_views(tiny.get_config())
    source = datasets.load_source("synthetic", "test", synthetic_size=280, synthetic_image_size=28)
    short = dataclasses.replace(source, table=lambda ids: source.table(ids[ids < 50]))
    counts = [sum(1 for _ in input_pipeline.eval_dataset(short, config, 16, p, 2).as_numpy_iterator())
              for p in (0, 1)]
    assert counts == [3, 3]  # 35 per process -> 3 batches of 16, though process 1 gets only 15 records
