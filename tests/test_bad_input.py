"""A user's folder with the mistakes users make: each one is refused or named, never silent.

A spreadsheet's CSV (byte-order mark, its own column names), class names that differ
only in case or spaces, rows naming files that are gone, an empty class directory,
an image too small to crop, formats the decoder does or does not read, and a test
split with a class the training split lacks.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from experiments import tiny
from semppl_jax import datasets, image_folder, label_subsets


def image(path, size=(12, 12), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 255, (*size, 3), np.uint8)).save(path, fmt)


def config_for(root):
    config = tiny.get_config()
    config.dataset.update(name=f"folder:{root}", label_subset="1.0")
    return config


@pytest.mark.parametrize("header", ["\ufefffile_name,class", "name,label", "Image,Category", "path,y"])
def test_a_csv_header_is_recognised_not_read_as_a_row(tmp_path, header):
    csv = tmp_path / "labels.csv"
    csv.write_text(f"{header}\na.png,cat\nb.png,dog\n", encoding="utf-8")
    assert label_subsets.read_labels_csv(str(csv)) == {"a.png": "cat", "b.png": "dog"}


def test_a_first_row_that_is_data_stays_data(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("a.png,cat\nb.png,dog\n")
    assert label_subsets.read_labels_csv(str(csv)) == {"a.png": "cat", "b.png": "dog"}


def test_classes_differing_only_in_case_or_spaces_are_refused_naming_both(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file_name,class\na.png, A\nb.png,a\n")
    for i in "ab":
        image(tmp_path / "flat" / f"{i}.png")
    with pytest.raises(ValueError, match=r"classes 'A' and 'a' differ only in case or spaces"):
        image_folder.folder_source(str(tmp_path / "flat"), None, str(csv))
    for cls in ("Cat", "cat"):
        image(tmp_path / "photos" / "train" / cls / f"{cls}.png")
    with pytest.raises(ValueError, match=r"'Cat' and 'cat' differ only in case"):
        image_folder.folder_source(str(tmp_path / "photos"), "train")


def test_rows_naming_missing_files_are_counted_and_named(tmp_path, caplog):
    for i in range(3):
        image(tmp_path / "flat" / f"{i}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("file_name,class\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(10)))
    with caplog.at_level(logging.WARNING):
        source = image_folder.folder_source(str(tmp_path / "flat"), None, str(csv))
    assert source.num_ids == 3 and (source.labels >= 0).all()
    assert "7 of its 10 rows name no image" in caplog.text and "'3.png'" in caplog.text and "2 more" in caplog.text


def test_an_empty_class_directory_is_refused(tmp_path):
    image(tmp_path / "photos" / "train" / "cat" / "1.png")
    (tmp_path / "photos" / "train" / "dog").mkdir(parents=True)
    (tmp_path / "photos" / "train" / "dog" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=r"class directories 'dog' hold no image"):
        image_folder.folder_source(str(tmp_path / "photos"), "train")


def test_too_small_images_and_unreadable_formats_are_left_out_by_name(tmp_path, caplog):
    root = tmp_path / "photos"
    for i in range(4):
        image(root / "train" / "cat" / f"{i}.png")
        image(root / "train" / "dog" / f"{i}.jpg")
    image(root / "train" / "dog" / "tiny.png", size=(1, 1))
    image(root / "train" / "cat" / "modern.webp", fmt="WEBP")
    image(root / "train" / "cat" / "scan.tif", fmt="TIFF")
    with caplog.at_level(logging.WARNING):
        source = datasets.load_split(config_for(root), "train", str(tmp_path / "index"))
    names = set(source.file_names[source.readable])
    assert "cat/modern.webp" in names and "dog/tiny.png" not in names and source.num_examples == 9
    assert source.skipped == ("dog/tiny.png",)
    assert f"skipping dog/tiny.png: smaller than {datasets.min_side(config_for(root))} pixels" in caplog.text
    assert "1 files are not images the decoder reads (.tif 1)" in caplog.text and "'cat/scan.tif'" in caplog.text
    assert all(image_folder.is_image(f"x{e}") for e in (".webp", ".jxl", ".JPEG", ".bmp", ".gif"))


def test_a_test_split_is_read_with_the_training_splits_classes(tmp_path):
    root = tmp_path / "photos"
    for cls in ("ant", "bee", "cat"):
        image(root / "train" / cls / f"{cls}.png")
    for cls in ("bee", "cat"):  # the test split lacks 'ant': its labels must still be the train split's
        image(root / "test" / cls / f"{cls}.png")
    config = config_for(root)
    train = datasets.load_split(config, "train")
    test = datasets.load_split(config, "test", labels_needed=False, classes=train.class_names)
    by_name = dict(zip(test.file_names, test.labels))
    assert test.class_names == ("ant", "bee", "cat") and by_name == {"bee/bee.png": 1, "cat/cat.png": 2}
    records = {r["file_name"].decode(): r["true_label"] for r in test.records().as_numpy_iterator()}
    assert records == {"bee/bee.png": 1, "cat/cat.png": 2}
    image(root / "test" / "dog" / "dog.png")
    with pytest.raises(ValueError, match=r"the classes \['dog'\] have no image in the training split"):
        datasets.load_split(config, "test", labels_needed=False, classes=train.class_names)


def test_webp_decodes_to_three_dimensions(tmp_path):
    image(tmp_path / "a.webp", fmt="WEBP")
    from semppl_jax.sources import decode

    assert decode(tf.io.read_file(str(tmp_path / "a.webp")), True).shape == (12, 12, 3)
